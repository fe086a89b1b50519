"""Range and neuron masks: context managers that hook :func:`~rangelens.intervene.apply.apply_ranges`
into a stock model at a site (through :class:`~rangelens.activations.hooks.Trace`, removed on exit
even if the forward raises)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from rangelens.activations.hooks import ForwardContext, Trace
from rangelens.activations.sites import NeuronSite
from rangelens.errors import RangelensError, choices
from rangelens.intervene.apply import (
    REPLACEMENTS,
    Values,
    _check_choice,
    _check_options,
    _numpy,
    _Ranges,
    _replacement_values,
)
from rangelens.intervene.stack import check_width, forward_mask, site_module
from rangelens.ranges.maps import RangeMap
from rangelens.ranges.stats import ConceptStats

_M = TypeVar("_M", bound="RangeMask")


class RangeMask:
    """Replace a concept's salient-neuron activations only where they fall inside its range.

    NeuronLens range masking (Haider et al., arXiv 2502.06809) at ``site``: neuron ``neurons[j]`` is
    replaced where ``lo[j] <= x <= hi[j]`` (see :func:`apply_ranges` for ``mode`` / ``scale``).
    ``replacement``: ``"zero"`` (the reference code), a float, or ``(k,)`` values; the corpus mean
    (``"mean"``) and class-complement mean (``"complement_mean"``) come from :meth:`from_range_map`.
    ``positions``: ``"all"`` tokens (the reference) or the ``"last"`` real token of each row; for
    ``"last"`` the hooks read ``attention_mask`` from the forward call of the model given to
    :meth:`attach` (keyword or positional; absent means no padding), so run forwards through that
    model, as ``model(**model_inputs(model, batch))`` does.
    """

    def __init__(
        self,
        site: NeuronSite,
        neurons: Values,
        lo: Values,
        hi: Values,
        *,
        replacement: str | Values = "zero",
        positions: str = "all",
        mode: str = "hard",
        scale: float = 0.0,
    ) -> None:
        _check_options(positions, mode, scale)
        k = _numpy(neurons).size
        self._ranges = _Ranges(
            neurons, lo, hi, _replacement_values(replacement, k), site.width, f"site {site.name}"
        )
        self.site = site
        self.positions = positions
        self.mode = mode
        self.scale = float(scale)
        for array in (self._ranges.neurons, self._ranges.lo, self._ranges.hi, self._ranges.value):
            array.setflags(write=False)  # the hooks use tensors converted from these

    @property
    def neurons(self) -> npt.NDArray[np.int64]:
        return self._ranges.neurons

    @property
    def lo(self) -> npt.NDArray[np.float64]:
        return self._ranges.lo

    @property
    def hi(self) -> npt.NDArray[np.float64]:
        return self._ranges.hi

    @property
    def replacement(self) -> npt.NDArray[np.float64]:
        """The resolved replacement value of every listed neuron, ``(k,)``."""
        return self._ranges.value

    @property
    def dimensions(self) -> int:
        """How many neurons the mask may change (dimensions it touches)."""
        return int(np.unique(self.neurons).size)

    def edit_rows(self, x: torch.Tensor) -> torch.Tensor:
        """The mask on pooled rows ``(n, d)``: what a forward does to the row a pooled head reads
        (every position, or the last one, is edited elementwise)."""
        return self._ranges.apply(x, self.mode, self.scale, "all", None)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(site={self.site.name!r}, neurons={self.neurons.size}, "
            f"positions={self.positions!r}, mode={self.mode!r}, scale={self.scale})"
        )

    @classmethod
    def _from_arrays(
        cls: type[_M], site: NeuronSite, neurons: Values, lo: Values, hi: Values, **options: Any
    ) -> _M:
        return cls(site, neurons, lo, hi, **options)

    @classmethod
    def from_range_map(
        cls: type[_M],
        site: NeuronSite,
        range_map: RangeMap,
        concepts: str | int | Sequence[str | int],
        *,
        stats: ConceptStats | None = None,
        replacement: str | Values = "zero",
        positions: str = "all",
        mode: str = "hard",
        scale: float = 0.0,
    ) -> _M:
        """One mask over the salient neurons of one or several concepts of ``range_map``.

        Several concepts are applied in the given order (a neuron shared by two concepts is masked
        for the first, then for the second), exactly as nested single-concept masks. A map whose
        bands are not all single intervals gives ``(k, m)`` ``lo`` / ``hi`` (its bands).
        ``replacement``: ``"zero"``, a float, ``(site.width,)`` values indexed by neuron, ``"mean"``
        (the corpus mean, ``stats.pooled()``) or ``"complement_mean"`` (the mean over the other
        concepts' rows, ``stats.complement(c)``); the last two need ``stats`` recorded at this
        site.
        """
        wanted = [concepts] if isinstance(concepts, str | int | np.integer) else list(concepts)
        if not wanted:
            raise RangelensError(
                f"no concepts given; valid: one or more of {choices(range_map.concepts)}"
            )
        rows = [range_map.concept_index(c) for c in wanted]
        per_neuron = _replacement_of_concept(site, range_map, replacement, stats)
        # One interval per neuron stays (k,); density bands (several or no intervals) are (k, m).
        lo, hi = (range_map.lo, range_map.hi) if range_map.single_interval else range_map.bands
        return cls._from_arrays(
            site,
            np.concatenate([range_map.neurons[c] for c in rows]),
            np.concatenate([lo[c] for c in rows]),
            np.concatenate([hi[c] for c in rows]),
            replacement=np.concatenate([per_neuron(c)[range_map.neurons[c]] for c in rows]),
            positions=positions,
            mode=mode,
            scale=scale,
        )

    def edit_batch(
        self, x: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """What the hook does to the site's value ``x`` in a forward (``attention_mask``: the
        forward's, read for ``positions="last"``; None means no padding)."""
        check_width(self.site, x)
        return self._ranges.apply(x, self.mode, self.scale, self.positions, attention_mask)

    @contextmanager
    def attach(self: _M, model: nn.Module) -> Iterator[_M]:
        """Hook the mask into ``model`` for the duration of a ``with`` block (always removed).

        ``hook="input"`` sites (MLP neurons) edit the module's input through a forward pre-hook;
        ``hook="output"`` sites edit its output (element 0 of a tuple output). Several masks on
        row slices of one stacked batch: :func:`~rangelens.intervene.stack.attach_stacked`.
        """
        site_module(model, self.site)
        last = self.positions == "last"  # needs the forward's attention mask: its context

        def edit(x: torch.Tensor, forward: ForwardContext | None = None) -> torch.Tensor:
            return self.edit_batch(x, forward_mask(forward))

        path, is_input = self.site.module_path, self.site.hook == "input"
        with Trace(model, path, input=is_input, edit=edit, retain=False, context=last):
            yield self


def _replacement_of_concept(
    site: NeuronSite,
    range_map: RangeMap,
    replacement: str | Values,
    stats: ConceptStats | None,
) -> Callable[[int], npt.NDArray[np.float64]]:
    """Concept row -> replacement value of every neuron of the site, ``(width,)``."""
    width = site.width
    if not isinstance(replacement, str):
        values = _numpy(replacement)
        if values.ndim == 0:
            values = np.full(width, float(values))
        if values.shape != (width,):
            raise RangelensError(
                f"replacement has shape {values.shape}; expected a float or ({width},) values, "
                f"one per neuron of site {site.name}"
            )
        fixed = values.astype(np.float64)
        return lambda _c: fixed
    _check_choice(replacement, REPLACEMENTS, "replacement")
    if replacement == "zero":
        return lambda _c: np.zeros(width)
    if stats is None:
        raise RangelensError(
            f"replacement {replacement!r} needs stats (ConceptStats recorded at site "
            f"{site.name}); valid without stats: 'zero', a float or per-neuron values"
        )
    if list(stats.concepts) != list(range_map.concepts) or stats.n_neurons != width:
        raise RangelensError(
            f"stats ({len(stats.concepts)} concepts, {stats.n_neurons} neurons) do not match the "
            f"range map ({len(range_map.concepts)} concepts) at site {site.name} of width "
            f"{width}; use the stats the ranges were fitted on"
        )
    if replacement == "mean":
        corpus = stats.pooled().mean[0]
        return lambda _c: corpus
    known = stats
    return lambda c: known.complement(c)[0]


class NeuronMask(RangeMask):
    """The NeuronLens baseline, neuron masking: the same neurons replaced whatever their value
    (range ``[-inf, inf]``, i.e. tau = infinity)."""

    def __init__(
        self,
        site: NeuronSite,
        neurons: Values,
        *,
        replacement: str | Values = "zero",
        positions: str = "all",
        mode: str = "hard",
        scale: float = 0.0,
    ) -> None:
        k = _numpy(neurons).size
        super().__init__(
            site,
            neurons,
            np.full(k, -np.inf),
            np.full(k, np.inf),
            replacement=replacement,
            positions=positions,
            mode=mode,
            scale=scale,
        )

    @classmethod
    def _from_arrays(
        cls: type[_M], site: NeuronSite, neurons: Values, lo: Values, hi: Values, **options: Any
    ) -> _M:
        return cls(site, neurons, **options)
