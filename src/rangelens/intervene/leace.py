"""LEACE (Belrose et al., "LEACE: Perfect linear concept erasure in closed form", NeurIPS 2023) as
an edit of a forward: EleutherAI's ``concept-erasure`` :class:`~concept_erasure.LeaceEraser`, fitted
on pooled features of a site, hooked into a stock model at that site through
:class:`~rangelens.activations.hooks.Trace` (at every token, or the last real one).

LEACE guarantees that no *linear* classifier of the fitted features predicts the concept better
than a constant (on the fitting distribution), with the least mean squared change; it promises
nothing about non-linear probes or about other positions than the ones it was fitted on.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from rangelens.activations.hooks import ForwardContext, Trace
from rangelens.activations.sites import NeuronSite
from rangelens.errors import RangelensError, choices
from rangelens.intervene.apply import MASK_POSITIONS, at_last
from rangelens.intervene.stack import check_width, forward_mask, site_module

if TYPE_CHECKING:
    from concept_erasure import LeaceEraser


@contextmanager
def one_thread() -> Iterator[None]:
    """Torch on one thread for a small dense fit: on a busy machine extra threads only contend
    (a 576-d LEACE fit: 0.3 s on one thread, 10 s on two shared cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class LeaceEdit:
    """``x -> x - ((x - bias) @ right.T) @ left.T`` (the LEACE eraser) on every token of ``site``
    (``positions="all"``) or the last real one (``"last"``)."""

    def __init__(self, site: NeuronSite, eraser: LeaceEraser, positions: str = "all") -> None:
        if positions not in MASK_POSITIONS:
            raise RangelensError(f"positions {positions!r}; valid: {choices(MASK_POSITIONS)}")
        if eraser.proj_left.shape[0] != site.width:
            raise RangelensError(
                f"the eraser has width {eraser.proj_left.shape[0]}, site {site.name} has "
                f"{site.width}; fit it on this site's features"
            )
        self.site, self.eraser, self.positions = site, eraser, positions
        self.neurons = np.zeros(0, dtype=np.int64)  # no neuron list: a dense low-rank edit

    @classmethod
    def fit(
        cls, site: NeuronSite, features: np.ndarray, concept: np.ndarray, positions: str = "all"
    ) -> LeaceEdit:
        """Fit on ``features`` ``(n, d)`` to erase the 0/1 indicator ``concept`` ``(n,)``."""
        from concept_erasure import LeaceEraser

        z = np.asarray(concept, dtype=np.float64)
        if z.ndim != 1 or len(z) != len(features) or len(np.unique(z)) < 2:
            raise RangelensError(
                f"LEACE needs a 0/1 concept indicator with both values, one per feature row "
                f"({len(features)}); got {len(np.unique(z))} distinct values over {len(z)} rows"
            )
        x = torch.as_tensor(np.asarray(features, dtype=np.float64))
        with one_thread():
            return cls(site, LeaceEraser.fit(x, torch.as_tensor(z)[:, None]), positions)

    @functools.cached_property
    def rank(self) -> int:
        """The rank of the edit ``x - eraser(x)`` (dimensions it touches)."""
        with one_thread():
            delta = self.eraser.proj_left @ self.eraser.proj_right
            return int(torch.linalg.matrix_rank(delta).item())

    @property
    def dimensions(self) -> int:
        return self.rank

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """The erased ``x`` ``(..., d)``, computed in float64, returned in ``x``'s dtype."""
        e = self.eraser
        left, right = (t.to(x.device) for t in (e.proj_left, e.proj_right))
        x64 = x.double()
        delta = x64 - e.bias.to(x.device) if e.bias is not None else x64
        return (x64 - (delta @ right.mH) @ left.mH).to(x.dtype)

    def edit_rows(self, x: torch.Tensor) -> torch.Tensor:
        """The edit on pooled rows ``(n, d)`` (what a forward does to the row a pooled head reads)."""
        return self.apply(x)

    def __repr__(self) -> str:
        return f"LeaceEdit(site={self.site.name!r}, rank={self.rank}, positions={self.positions!r})"

    def edit_batch(
        self, x: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """What the hook does to the site's value ``x`` in a forward (``attention_mask``: the
        forward's, read for ``positions="last"``; None means no padding)."""
        check_width(self.site, x)
        return self.apply(x) if self.positions == "all" else at_last(x, attention_mask, self.apply)

    @contextmanager
    def attach(self, model: nn.Module) -> Iterator[LeaceEdit]:
        """Hook the edit into ``model`` for a ``with`` block (always removed)."""
        site_module(model, self.site)
        last = self.positions == "last"

        def edit(x: torch.Tensor, forward: ForwardContext | None = None) -> torch.Tensor:
            return self.edit_batch(x, forward_mask(forward))

        path, is_input = self.site.module_path, self.site.hook == "input"
        with Trace(model, path, input=is_input, edit=edit, retain=False, context=last):
            yield self
