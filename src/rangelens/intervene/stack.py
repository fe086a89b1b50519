"""Several edits in one forward: edit k acts only on the k-th of K equal row slices of a batch that
stacks K copies of the same texts, so K masked forwards run as one batched forward.

Each edit's hook function (``edit_batch``) runs unchanged on its own slice, which has the shape a
forward of the unstacked batch would give it, so the edited values are those of K separate forwards.
Hooks go through the one primitive, :class:`~rangelens.activations.hooks.Trace` (one per site).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from typing import Any, Protocol

import torch
from torch import nn

from rangelens.activations.hooks import ForwardContext, Trace, get_module
from rangelens.activations.sites import NeuronSite
from rangelens.errors import RangelensError


class RowEdit(Protocol):
    """An edit of a forward at one site (:class:`~rangelens.intervene.RangeMask`,
    :class:`~rangelens.intervene.LeaceEdit`)."""

    site: NeuronSite
    positions: str

    def edit_batch(
        self, x: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor: ...

    def attach(self, model: nn.Module) -> AbstractContextManager[Any]: ...


def site_module(model: nn.Module, site: NeuronSite) -> nn.Module:
    """The module an edit at ``site`` hooks; a one-line error if ``model`` has none there."""
    try:
        return get_module(model, site.module_path)
    except RangelensError as err:
        raise RangelensError(
            f"site {site.name} ({site.module_path!r}) is not in this model; resolve the site on "
            f"the model you attach to"
        ) from err


def check_width(site: NeuronSite, x: torch.Tensor) -> None:
    if x.shape[-1] != site.width:
        raise RangelensError(
            f"site {site.name} has width {x.shape[-1]} in this forward, not the resolved "
            f"{site.width}; resolve the site on this model"
        )


def forward_mask(forward: ForwardContext | None) -> torch.Tensor | None:
    """The attention mask of the forward in progress (None: no context, or no mask passed)."""
    if forward is None:
        return None
    if not forward.active:
        raise RangelensError(
            "positions 'last' reads attention_mask from the forward of the model the mask is "
            "attached to; call that model, not one of its submodules"
        )
    return forward.tensor("attention_mask")


def _where(site: NeuronSite) -> tuple[str, bool]:
    return site.module_path, site.hook == "input"


@contextmanager
def attach_stacked(model: nn.Module, edits: Sequence[RowEdit | None]) -> Iterator[None]:
    """Hook ``edits`` into ``model`` so that edit k acts only on rows ``[k·B, (k+1)·B)`` of each
    forward's batch of ``K·B`` rows (``K = len(edits)``; None leaves its slice unedited).

    One :class:`Trace` per site edits its slices in one hook call; the forward's attention mask is
    sliced alike for ``positions="last"``. A single edit is simply attached (no slicing).
    """
    if len(edits) == 1:
        only = edits[0]
        with only.attach(model) if only is not None else nullcontext():
            yield
        return
    k = len(edits)
    sites: dict[tuple[str, bool], NeuronSite] = {}
    for e in edits:
        if e is not None:
            site_module(model, e.site)
            sites.setdefault(_where(e.site), e.site)

    def hook(at: list[RowEdit | None], last: bool) -> Any:
        def edit(x: torch.Tensor, forward: ForwardContext | None = None) -> torch.Tensor:
            if x.shape[0] % k:
                raise RangelensError(
                    f"a stacked forward of {k} edits needs a batch of k·B rows; this value has "
                    f"{x.shape[0]} rows (shape {tuple(x.shape)})"
                )
            mask = forward_mask(forward) if last else None
            masks = mask.chunk(k) if mask is not None else (None,) * k
            parts = x.chunk(k)
            return torch.cat(
                [
                    part if e is None else e.edit_batch(part, m)
                    for e, part, m in zip(at, parts, masks, strict=True)
                ]
            )

        return edit

    with ExitStack() as stack:
        for where in sites:
            at = [e if e is not None and _where(e.site) == where else None for e in edits]
            last = any(e is not None and e.positions == "last" for e in at)
            path, is_input = where
            edit = hook(at, last)
            stack.enter_context(
                Trace(model, path, input=is_input, edit=edit, retain=False, context=last)
            )
        yield
