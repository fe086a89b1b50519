"""Steering with ranges: push a model toward a concept by setting the concept's salient neurons to
values inside the concept's range, through the same hook as the masks.

:class:`RangeSteer` sets neuron ``neurons[j]`` to ``values[j]`` at every position (or the last real
one) of every forward while attached, so during generation each new token is steered.
:meth:`RangeSteer.from_range_map` takes the values from a concept's ranges: its mean (the centre
of ``mu +- tau sigma``, or the mean from ``stats``) or a quantile of the concept's distribution
(clipped into the range). :class:`DirectionSteer` is the standard baseline: add ``alpha`` times the
concept's mean-difference vector ``mu_concept - mu_rest`` to every neuron of the site.
:func:`generate` runs greedy generation with one of them attached::

    steer = RangeSteer.from_range_map(site, ranges, "sports", stats=stats)
    base, steered = generate(lm, prompts), generate(lm, prompts, steer=steer)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from rangelens.activations.hooks import Trace
from rangelens.activations.models import LoadedModel
from rangelens.activations.sites import NeuronSite
from rangelens.errors import RangelensError, choices
from rangelens.intervene.apply import Values, _floats, _numpy
from rangelens.intervene.stack import check_width, site_module
from rangelens.ranges.maps import RangeMap
from rangelens.ranges.stats import ConceptStats

STEER_VALUES = ("mean", "quantile")


class RangeSteer:
    """Set ``neurons`` of ``site`` to ``values`` at every position of every forward while attached
    (hook-based, removed on exit; ``hook="input"`` sites such as ``mlp`` edit the module's input)."""

    def __init__(self, site: NeuronSite, neurons: Values, values: Values) -> None:
        index = _numpy(neurons).astype(np.int64).ravel()
        if index.size == 0:
            raise RangelensError("no neurons to steer; give at least one")
        if index.min() < 0 or index.max() >= site.width:
            raise RangelensError(
                f"neuron out of range for site {site.name} of width {site.width}: "
                f"{int(index[(index < 0) | (index >= site.width)][0])}"
            )
        self.site = site
        self.neurons: npt.NDArray[np.int64] = index
        self.values: npt.NDArray[np.float64] = _floats(values, index.size, "values")
        if not np.isfinite(self.values).all():
            raise RangelensError("steering values must be finite")

    def __repr__(self) -> str:
        return f"RangeSteer(site={self.site.name!r}, neurons={self.neurons.size})"

    @classmethod
    def from_range_map(
        cls,
        site: NeuronSite,
        range_map: RangeMap,
        concept: str | int,
        *,
        stats: ConceptStats | None = None,
        value: str = "mean",
        q: float = 0.5,
    ) -> RangeSteer:
        """Steer toward ``concept``: its salient neurons set to a value inside its range.

        ``value="mean"``: the concept's mean on each neuron (the map's ``mean``, the centre of
        ``mu +- tau sigma``); ``"quantile"``: the concept's ``q`` quantile from ``stats`` (the
        run's statistics). The value is clipped into the range's hull ``[lo, hi]``.
        """
        if value not in STEER_VALUES:
            raise RangelensError(
                f"unknown steering value {value!r}; valid: {choices(STEER_VALUES)}"
            )
        c = range_map.concept_index(concept)
        neurons = range_map.neurons[c]
        if stats is not None and (
            list(stats.concepts) != list(range_map.concepts) or stats.n_neurons != site.width
        ):
            raise RangelensError(
                f"stats ({len(stats.concepts)} concepts, {stats.n_neurons} neurons) do not match "
                f"the range map at site {site.name}; use the stats the ranges were fitted on"
            )
        if value == "quantile":
            if stats is None:
                raise RangelensError("value 'quantile' needs stats (the run's ConceptStats)")
            if not 0.0 <= q <= 1.0:
                raise RangelensError(f"q must be in [0, 1], got {q}")
            values = stats.quantile(q)[c, neurons]
        else:
            values = np.asarray(range_map.mean[c], dtype=np.float64)
        # Inside the range's hull [lo, hi] (an empty band, lo = hi = NaN, keeps the value).
        low, high = range_map.lo[c], range_map.hi[c]
        values = np.where(np.isnan(low), values, np.clip(values, low, high))
        return cls(site, neurons, values)

    def edit(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` with the steered neurons set (the pure function the hook runs)."""
        check_width(self.site, x)
        out = x.clone()
        index = torch.as_tensor(self.neurons, device=x.device)
        out[..., index] = torch.as_tensor(self.values, dtype=x.dtype, device=x.device)
        return out

    @contextmanager
    def attach(self, model: nn.Module) -> Iterator[RangeSteer]:
        """Hook the steer into ``model`` for a ``with`` block (always removed)."""
        site_module(model, self.site)
        path, is_input = self.site.module_path, self.site.hook == "input"
        with Trace(model, path, input=is_input, edit=self.edit, retain=False):
            yield self


class DirectionSteer:
    """The mean-difference baseline: add ``alpha * vector`` to every neuron of ``site`` at every
    position while attached."""

    def __init__(self, site: NeuronSite, vector: Values, alpha: float = 1.0) -> None:
        self.site = site
        self.vector = _floats(vector, site.width, "vector")
        self.alpha = float(alpha)

    def __repr__(self) -> str:
        return f"DirectionSteer(site={self.site.name!r}, alpha={self.alpha})"

    @classmethod
    def mean_difference(
        cls, site: NeuronSite, stats: ConceptStats, concept: str | int, alpha: float = 1.0
    ) -> DirectionSteer:
        """``alpha * (mu_concept - mu_rest)`` from the run's statistics (the rest: every other
        concept's rows pooled)."""
        names = list(stats.concepts)
        if isinstance(concept, str):
            if concept not in names:
                raise RangelensError(f"unknown concept {concept!r}; valid: {choices(names)}")
            c = names.index(concept)
        else:
            c = int(concept)
        rest, _ = stats.complement(c)
        return cls(site, np.asarray(stats.mean)[c] - np.asarray(rest), alpha)

    def edit(self, x: torch.Tensor) -> torch.Tensor:
        check_width(self.site, x)
        return x + self.alpha * torch.as_tensor(self.vector, dtype=x.dtype, device=x.device)

    @contextmanager
    def attach(self, model: nn.Module) -> Iterator[DirectionSteer]:
        site_module(model, self.site)
        path, is_input = self.site.module_path, self.site.hook == "input"
        with Trace(model, path, input=is_input, edit=self.edit, retain=False):
            yield self


def generate(
    lm: LoadedModel,
    prompts: Sequence[str],
    *,
    steer: Any = None,
    max_new_tokens: int = 32,
    batch_size: int = 16,
) -> list[str]:
    """Greedy continuations of ``prompts`` (the new text only), with ``steer`` attached if given
    (anything with ``attach(model)``: a steer or a mask). Prompts are left-padded, as generation
    needs."""
    if max_new_tokens < 1:
        raise RangelensError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    tok = lm.tokenizer
    out: list[str] = []
    context: AbstractContextManager[Any] = (
        steer.attach(lm.model) if steer is not None else nullcontext()
    )
    with torch.inference_mode(), context:
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start : start + batch_size])
            enc = tok(chunk, return_tensors="pt", padding=True, padding_side="left")
            enc = {k: v.to(lm.device) for k, v in enc.items()}
            run: Any = lm.model.generate  # typed loosely by transformers
            ids = run(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )
            new = ids[:, enc["input_ids"].shape[1] :]
            out.extend(tok.batch_decode(new, skip_special_tokens=True))
    return out
