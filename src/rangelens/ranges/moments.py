"""The exact maths behind :class:`~rangelens.ranges.stats.ConceptStats`: batch checking, pooled
central moments (the pairwise update of Chan et al. 1979 and Pébay 2008) and the power-of-two
histogram grid that lets histograms merge bit for bit."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from rangelens.errors import RangelensError

if TYPE_CHECKING:
    import torch

MIN_EXP = -40  # finest histogram bin width, 2**-40
F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
Moments = tuple[F64, F64, F64, F64]  # mean, M2, M3, M4


def batch_arrays(
    acts: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor | Sequence[int],
    n_neurons: int,
    n_concepts: int,
) -> tuple[F64, I64]:
    """A batch as float64 ``(n, n_neurons)`` activations and int64 labels in ``[0, n_concepts)``;
    a torch tensor is converted without importing torch here. Bad shapes, dtypes and labels are
    one-line errors."""
    if _is_tensor(acts):  # a torch tensor (torch is imported only by whoever made it)
        if not acts.is_floating_point():  # type: ignore[union-attr]
            raise RangelensError(f"acts must be floating point; got dtype {acts.dtype}")
        x = acts.detach().cpu().double().numpy()  # type: ignore[union-attr]
    else:
        raw = np.asarray(acts)
        if raw.dtype.kind != "f":
            raise RangelensError(f"acts must be floating point; got dtype {raw.dtype}")
        x = raw.astype(np.float64)
    if x.ndim != 2 or x.shape[1] != n_neurons:
        raise RangelensError(f"acts must have shape (n, {n_neurons}); got {x.shape}")
    y = (
        labels.detach().cpu().numpy()  # type: ignore[union-attr]
        if _is_tensor(labels)
        else np.asarray(labels)
    )
    if y.shape != (len(x),):
        raise RangelensError(f"labels must have shape ({len(x)},) like acts; got {y.shape}")
    if y.size and y.dtype.kind not in "iu":
        raise RangelensError(f"labels must be integers; got dtype {y.dtype}")
    bad = (y < 0) | (y >= n_concepts)
    if bad.any():
        row = int(np.argmax(bad))
        raise RangelensError(
            f"label {y[row]} (row {row}) is out of range [0, {n_concepts}) "
            f"for {n_concepts} concepts"
        )
    finite = np.isfinite(x)
    if not finite.all():
        row, col = np.argwhere(~finite)[0]
        raise RangelensError(f"acts[{row}, {col}] = {x[row, col]} is not finite")
    return x, y.astype(np.int64)


def _is_tensor(value: object) -> bool:
    return type(value).__module__.startswith("torch") and hasattr(value, "detach")


def _check_index(value: int, size: int, what: str) -> int:
    if not isinstance(value, int | np.integer) or not 0 <= value < size:
        raise RangelensError(f"{what} {value!r} is out of range [0, {size})")
    return int(value)


def _at(values: I64, k: I64) -> I64:
    """``values[c, j, k[c, j]]`` for every (c, j)."""
    return np.take_along_axis(values, k[..., None], axis=-1)[..., 0]


def _divide(num: F64, den: npt.ArrayLike, where: npt.NDArray[np.bool_], fill: float | F64) -> F64:
    """``num / den`` where ``where`` holds, else ``fill``, without division warnings."""
    out = np.array(np.broadcast_to(fill, np.broadcast_shapes(np.shape(num), np.shape(den))))
    return np.divide(num, den, out=out.astype(np.float64), where=where)


def _pool_moments(count: I64, mean: F64, m2: F64, m3: F64, m4: F64) -> Moments:
    """Combine groups along axis 0 (``count`` broadcasts against ``mean[..., 0]``).

    Central sums about the pooled mean, with ``delta_g = mean_g - mean``:
    ``M2 = sum M2_g + n_g delta^2``, ``M3 = sum M3_g + 3 delta M2_g + n_g delta^3``,
    ``M4 = sum M4_g + 4 delta M3_g + 6 delta^2 M2_g + n_g delta^4``; for two groups this is the
    pairwise update of Chan et al. / Pébay. A group holding all rows gets weight exactly 1 and
    delta 0 (empty groups hold zeros), so merging with nothing changes nothing, bit for bit.
    """
    n = count[..., None].astype(np.float64)
    total = n.sum(axis=0)
    pooled_mean = (n / np.maximum(total, 1.0) * mean).sum(axis=0)
    delta = mean - pooled_mean
    d2 = delta * delta
    return (
        pooled_mean,
        (m2 + n * d2).sum(axis=0),
        (m3 + 3.0 * delta * m2 + n * d2 * delta).sum(axis=0),
        (m4 + 4.0 * delta * m3 + 6.0 * d2 * m2 + n * d2 * d2).sum(axis=0),
    )


def _bin_index(x: F64, exp: I64) -> I64:
    """Absolute bin ``floor(x / 2**exp)``, exactly: scaling by a power of two is exact unless it
    underflows, and then only a negative ``x`` rounded to -0.0 would land in the wrong bin."""
    index = np.floor(np.ldexp(x, -exp)).astype(np.int64)
    return index - ((index == 0) & (x < 0))


def _grid(lo: F64, hi: F64, n_bins: int) -> tuple[I64, I64]:
    """Canonical ``(exp, start)`` per neuron for data spanning ``[lo, hi]`` (see the module doc)."""
    magnitude = np.frexp(np.maximum(np.abs(lo), np.abs(hi)))[1].astype(np.int64)
    floor = np.maximum(MIN_EXP, magnitude - 52)
    # Fitting needs (hi - lo) / 2**exp <= n_bins: a lower bound on exp (-inf where hi == lo).
    with np.errstate(divide="ignore"):
        bound = np.floor(np.log2(hi / n_bins - lo / n_bins)) - 1.0
    exp = np.maximum(bound, floor).astype(np.int64)
    while True:
        fits = _bin_index(hi, exp) - _bin_index(lo, exp) < n_bins
        if fits.all():
            return exp, _bin_index(lo, exp)
        exp += ~fits


def _regrid(counts: I64, exp: I64, start: I64, new_exp: I64, new_start: I64) -> None:
    """Move histogram ``counts`` ``(C, d, n_bins)``, in place, to a grid no finer
    (``new_exp >= exp``) whose window holds all its non-empty bins."""
    moved = np.flatnonzero((new_exp != exp) | (new_start != start))
    n_concepts, n_moved, n_bins = counts.shape[0], len(moved), counts.shape[-1]
    # Absolute bin i becomes i >> k (floor division by 2**k). |i| < 2**52, so capping k at 63
    # (numpy's limit for int64 shifts) changes nothing.
    shift = np.minimum(new_exp[moved] - exp[moved], 63)
    absolute = start[moved, None] + np.arange(n_bins)
    # Empty bins past the old data may land outside the new window; where they go does not matter.
    target = np.clip((absolute >> shift[:, None]) - new_start[moved, None], 0, n_bins - 1)
    rows = np.arange(n_concepts * n_moved).reshape(n_concepts, n_moved, 1)
    regridded = np.zeros((n_concepts, n_moved, n_bins), dtype=np.int64)
    np.add.at(regridded.reshape(-1), (rows * n_bins + target).ravel(), counts[:, moved].ravel())
    counts[:, moved] = regridded
