"""The tensor maths of NeuronLens range interventions (Haider et al., arXiv 2502.06809): replace
neuron values that lie inside a range (or any band of several intervals) by a replacement value,
hard or soft, at every position or the last real one. :func:`apply_ranges` is the pure function
the mask hooks run; use it on cached activations too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

from rangelens.errors import RangelensError, choices

REPLACEMENTS = ("zero", "mean", "complement_mean")  # or a float, or per-neuron values
MASK_POSITIONS = ("all", "last")  # which tokens a mask edits
MODES = ("hard", "soft")

Values = npt.ArrayLike | torch.Tensor


def _check_choice(value: object, valid: Sequence[str], what: str) -> None:
    if not isinstance(value, str) or value not in valid:
        raise RangelensError(f"unknown {what} {value!r}; valid: {choices(valid)}")


def _check_options(positions: str, mode: str, scale: float) -> None:
    _check_choice(positions, MASK_POSITIONS, "positions")
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
        passes = self.on(x)
        return at_last(x, attention_mask, lambda old: _replace(old, passes, mode, scale))


def at_last(
    x: torch.Tensor,
    attention_mask: torch.Tensor | None,
    edit: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """``x`` ``(batch, seq, d)`` with ``edit`` applied to the last real token of each row (read
    from ``attention_mask`` ``(batch, >= seq)``, its last ``seq`` columns; None: no padding)."""
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
        # With a KV cache the mask also covers past tokens; the current ones are its last columns.
        mask = attention_mask[:, -seq:].to(x.device) != 0
        last = (mask * torch.arange(mask.shape[1], device=x.device)).argmax(1)
        real = mask[rows, last]  # False for a row without any real token here
    old = x[rows, last]
    new = edit(old)
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
