"""NeuronLens interventions: range masking and neuron masking through hooks on stock models.

Haider et al., "Neurons Speak in Ranges" (arXiv 2502.06809): at a site, each salient neuron of a
concept is replaced by a value *only while its activation lies inside the concept's range*
``[lo, hi]`` (:class:`RangeMask`); the neuron-masking baseline replaces it whatever its value
(:class:`NeuronMask`, tau = infinity). Masks are context managers over forward hooks, removed on
exit even if the forward raises, and compose: nest several ``attach`` blocks, or build one mask
over several concepts::

    site = resolve_site(lm.model, "resid", -1)
    mask = RangeMask.from_range_map(site, ranges, ["sports", "world"],
                                    stats=stats, replacement="mean")
    with mask.attach(lm.model):
        logits = lm.model(**model_inputs(lm.model, batch)).logits

:func:`apply_ranges` is the pure tensor function the hooks run, for use on cached activations.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from rangelens.errors import RangelensError, choices
from rangelens.hooks import Trace, get_module
from rangelens.ranges import RangeMap
from rangelens.sites import NeuronSite
from rangelens.stats import ConceptStats

REPLACEMENTS = ("zero", "mean", "complement_mean")  # or a float, or per-neuron values
POSITIONS = ("all", "last")
MODES = ("hard", "soft")

Values = npt.ArrayLike | torch.Tensor
_M = TypeVar("_M", bound="RangeMask")


def _check_choice(value: object, valid: Sequence[str], what: str) -> None:
    if not isinstance(value, str) or value not in valid:
        raise RangelensError(f"unknown {what} {value!r}; valid: {choices(valid)}")


def _check_options(positions: str, mode: str, scale: float) -> None:
    _check_choice(positions, POSITIONS, "positions")
    _check_choice(mode, MODES, "mode")
    if mode == "soft" and not 0.0 <= scale < 1.0:
        raise RangelensError(f"scale must be in [0, 1) for mode 'soft'; got {scale!r}")
    if mode == "hard" and scale != 0.0:
        raise RangelensError(f"scale {scale!r} only applies to mode 'soft'; use 0 with 'hard'")


def _numpy(values: Values) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy()
    return np.asarray(values)


def _floats(values: Values, k: int, what: str) -> npt.NDArray[np.float64]:
    """``values`` as ``(k,)`` float64: a scalar is broadcast; NaN is refused."""
    array = _numpy(values)
    if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        raise RangelensError(f"{what} must be real numbers; got dtype {array.dtype}")
    array = array.astype(np.float64)
    if array.ndim == 0:
        array = np.full(k, float(array))
    if array.shape != (k,):
        raise RangelensError(f"{what} has shape {array.shape}; expected ({k},), one per neuron")
    if np.isnan(array).any():
        raise RangelensError(f"{what} is NaN at position {int(np.isnan(array).argmax())}")
    return array


def _replacement_values(replacement: str | Values, k: int) -> npt.NDArray[np.float64]:
    """Replacement values for ``k`` neurons from ``"zero"``, a float or ``(k,)`` values."""
    if isinstance(replacement, str):
        _check_choice(replacement, REPLACEMENTS, "replacement")
        if replacement != "zero":
            raise RangelensError(
                f"replacement {replacement!r} needs concept statistics: use "
                f"RangeMask.from_range_map(..., stats=...) or pass the values"
            )
        return np.zeros(k)
    values = _floats(replacement, k, "replacement")
    if not np.isfinite(values).all():
        raise RangelensError("replacement values must be finite")
    return values


def _bounds(
    lo: Values, hi: Values, k: int, neurons: npt.NDArray[np.int64]
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Validated ``(lo, hi)``: ``(k,)`` (one interval per neuron; a scalar is broadcast) or
    ``(k, m)`` (a band of up to m intervals per neuron, unused slots NaN in both)."""
    if _numpy(lo).ndim < 2 and _numpy(hi).ndim < 2:
        low, high = _floats(lo, k, "lo"), _floats(hi, k, "hi")
        used = np.ones(k, dtype=bool)
    else:
        low, high = (_numpy(b) for b in (lo, hi))
        if low.ndim != 2 or low.shape != high.shape or low.shape[0] != k or low.shape[1] < 1:
            raise RangelensError(
                f"lo and hi have shapes {low.shape} and {high.shape}; expected ({k},) or "
                f"({k}, m), one band of m intervals per neuron"
            )
        low, high = low.astype(np.float64), high.astype(np.float64)
        used = ~np.isnan(low)
        if (used != ~np.isnan(high)).any():
            j = int(np.argwhere(used != ~np.isnan(high))[0][0])
            raise RangelensError(
                f"band of neuron {int(neurons[j])} has a NaN in only one of lo / hi; valid: "
                f"NaN in both marks an unused slot"
            )
    inverted = used & (low > high)
    if inverted.any():
        j = np.argwhere(inverted)[0]
        raise RangelensError(
            f"lo > hi for neuron {int(neurons[j[0]])} ({float(low[tuple(j)])!r} > "
            f"{float(high[tuple(j)])!r}); "
            f"valid: lo <= hi"
        )
    return low, high


@dataclass(frozen=True)
class _Pass:
    """Ranges on distinct neurons, applied in one vectorised step (tensors of the activation);
    ``lo`` / ``hi`` are ``(k,)`` or ``(k, m)`` (bands; NaN slots never match)."""

    neurons: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor
    value: torch.Tensor


class _Ranges:
    """Validated ``(neurons, lo, hi, value)``, split into passes over distinct neurons; ``lo`` /
    ``hi`` are ``(k,)`` or ``(k, m)`` bands (see :func:`apply_ranges`).

    A neuron listed ``m`` times (shared by several concepts) is handled in ``m`` passes, in list
    order, so one call equals applying the entries one after the other; each pass is one gather /
    where / scatter, never a loop over neurons or tokens.
    """

    def __init__(
        self, neurons: Values, lo: Values, hi: Values, value: Values, width: int, where: str
    ) -> None:
        index = _numpy(neurons)
        if index.ndim != 1 or not (index.size == 0 or np.issubdtype(index.dtype, np.integer)):
            raise RangelensError(
                f"neurons must be a 1-d array of integers; got shape {index.shape}, "
                f"dtype {index.dtype}"
            )
        index = index.astype(np.int64)
        bad = (index < 0) | (index >= width)
        if bad.any():
            raise RangelensError(
                f"neuron {int(index[bad.argmax()])} out of range for {where} of width {width}; "
                f"valid: 0..{width - 1}"
            )
        k = index.size
        self.neurons = index
        self.lo, self.hi = _bounds(lo, hi, k, index)
        self.value = _floats(value, k, "replacement")
        # Occurrence number of each entry among equal neurons: pass p holds every p-th occurrence.
        order = np.argsort(index, kind="stable")
        first = np.searchsorted(index[order], index[order], side="left")
        occurrence = np.empty(k, dtype=np.int64)
        occurrence[order] = np.arange(k) - first
        self._passes = [occurrence == p for p in range(int(occurrence.max(initial=-1)) + 1)]
        self._cache: dict[tuple[torch.device, torch.dtype], list[_Pass]] = {}

    def on(self, x: torch.Tensor) -> list[_Pass]:
        """The passes as tensors of ``x``'s device and dtype (converted once, then cached)."""
        key = (x.device, x.dtype)
        if key not in self._cache:

            def put(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
                return torch.as_tensor(a, dtype=dtype, device=x.device)

            self._cache[key] = [
                _Pass(
                    put(self.neurons[p], torch.int64),
                    put(self.lo[p], x.dtype),
                    put(self.hi[p], x.dtype),
                    put(self.value[p], x.dtype),
                )
                for p in self._passes
            ]
        return self._cache[key]

    def apply(
        self,
        x: torch.Tensor,
        mode: str,
        scale: float,
        positions: str,
        attention_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        if positions == "all":
            return _replace(x, self.on(x), mode, scale)
        if x.ndim != 3:
            raise RangelensError(
                f"positions 'last' needs (batch, seq, d) activations; got shape {tuple(x.shape)}"
            )
        batch, seq = x.shape[0], x.shape[1]
        rows = torch.arange(batch, device=x.device)
        if attention_mask is None:  # no padding: the last column
            last = torch.full((batch,), seq - 1, device=x.device)
            real = None
        else:
            wrong = attention_mask.ndim != 2 or attention_mask.shape[1] < seq
            if wrong or attention_mask.shape[0] != batch:
                raise RangelensError(
                    f"attention_mask has shape {tuple(attention_mask.shape)}; expected "
                    f"({batch}, >= {seq}) for activations of shape {tuple(x.shape)}"
                )
            # With a KV cache the mask also covers past tokens; the current ones are its last
            # columns.
            mask = attention_mask[:, -seq:].to(x.device) != 0
            last = (mask * torch.arange(mask.shape[1], device=x.device)).argmax(1)
            real = mask[rows, last]  # False for a row without any real token here
        old = x[rows, last]
        new = _replace(old, self.on(x), mode, scale)
        if real is not None:
            new = torch.where(real[:, None], new, old)
        return x.index_put((rows, last), new)


def _replace(x: torch.Tensor, passes: list[_Pass], mode: str, scale: float) -> torch.Tensor:
    for p in passes:
        selected = x.index_select(-1, p.neurons)
        if p.lo.ndim == 1:
            inside = (selected >= p.lo) & (selected <= p.hi)
        else:  # a band: the union of its intervals (comparisons with NaN slots are False)
            column = selected.unsqueeze(-1)
            inside = ((column >= p.lo) & (column <= p.hi)).any(dim=-1)
        value = p.value if mode == "hard" else p.value + scale * (selected - p.value)
        x = x.index_copy(-1, p.neurons, torch.where(inside, value, selected))
    return x


def apply_ranges(
    x: torch.Tensor,
    neurons: Values,
    lo: Values,
    hi: Values,
    replacement: str | Values = 0.0,
    mode: str = "hard",
    scale: float = 0.0,
    *,
    positions: str = "all",
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Range-mask ``x`` ``(..., d)``: the function :class:`RangeMask` hooks run (NeuronLens).

    For every listed neuron j, where ``lo[j] <= x[..., neurons[j]] <= hi[j]``: ``hard`` sets it to
    ``r[j]``, ``soft`` to ``r[j] + scale * (x - r[j])``; elsewhere ``x`` is untouched (bit for bit).
    ``lo`` / ``hi`` of shape ``(k, m)`` give each neuron a band of m closed intervals, masked where
    ``x`` lies in their union, read on the unmasked value (unused slots are NaN in both; a band with
    no interval masks nothing).
    ``replacement`` is ``"zero"``, a float or ``(k,)`` values. A neuron listed twice is processed
    twice, in order. ``positions="last"`` edits only the last real token of each row of a
    ``(batch, seq, d)`` ``x``, read from ``attention_mask`` ``(batch, >= seq)`` (its last ``seq``
    columns; None means no padding). Computed out of place in ``x``'s dtype and device.
    """
    _check_options(positions, mode, scale)
    width = int(x.shape[-1])
    k = _numpy(neurons).size
    ranges = _Ranges(neurons, lo, hi, _replacement_values(replacement, k), width, "activations")
    return ranges.apply(x, mode, scale, positions, attention_mask)


class _ForwardTracker:
    """The ``attention_mask`` of the forward in progress of the model a mask is attached to."""

    def __init__(self, model: nn.Module) -> None:
        params = list(inspect.signature(model.forward).parameters)
        self._position = params.index("attention_mask") if "attention_mask" in params else None
        self.active = False
        self.attention_mask: torch.Tensor | None = None
        self.handles = [
            model.register_forward_pre_hook(self._start, with_kwargs=True),
            model.register_forward_hook(self._end, always_call=True),
        ]

    def _start(self, _m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        mask = kwargs.get("attention_mask")
        if mask is None and self._position is not None and len(args) > self._position:
            mask = args[self._position]
        self.attention_mask = mask if isinstance(mask, torch.Tensor) else None
        self.active = True

    def _end(self, _m: nn.Module, _args: tuple[Any, ...], _out: object) -> None:
        self.active = False
        self.attention_mask = None


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

    @contextmanager
    def attach(self: _M, model: nn.Module) -> Iterator[_M]:
        """Hook the mask into ``model`` for the duration of a ``with`` block (always removed).

        ``hook="input"`` sites (MLP neurons) edit the module's input through a forward pre-hook;
        ``hook="output"`` sites edit its output (element 0 of a tuple output).
        """
        try:
            get_module(model, self.site.module_path)
        except RangelensError as err:
            raise RangelensError(
                f"site {self.site.name} ({self.site.module_path!r}) is not in this model; "
                f"resolve the site on the model you attach to"
            ) from err
        with ExitStack() as stack:
            tracker = _ForwardTracker(model) if self.positions == "last" else None
            if tracker is not None:
                for handle in tracker.handles:
                    stack.callback(handle.remove)

            def edit(x: torch.Tensor) -> torch.Tensor:
                if x.shape[-1] != self.site.width:
                    raise RangelensError(
                        f"site {self.site.name} has width {x.shape[-1]} in this forward, not the "
                        f"resolved {self.site.width}; resolve the site on this model"
                    )
                if tracker is not None and not tracker.active:
                    raise RangelensError(
                        "positions 'last' reads attention_mask from the forward of the model the "
                        "mask is attached to; call that model, not one of its submodules"
                    )
                mask = tracker.attention_mask if tracker is not None else None
                return self._ranges.apply(x, self.mode, self.scale, self.positions, mask)

            path, is_input = self.site.module_path, self.site.hook == "input"
            stack.enter_context(Trace(model, path, input=is_input, edit=edit, retain=False))
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
