"""Streaming, exactly mergeable per-(concept, neuron) activation statistics (NeuronLens recording).

:class:`ConceptStats` keeps, for every concept and neuron, the row count, the mean and the central
moment sums ``M2..M4`` (float64, combined with the pairwise update of Chan et al. 1979 and Pébay
2008), min, max, the sum of ``|x|`` and a histogram. However the rows are split into ``add``
batches and ``merge`` calls, in any order, the result is the statistics of the union: counts, min,
max and histograms bit for bit, moments to floating-point precision. Memory does not grow with the
number of rows.

Histogram grid, shared by all concepts of a neuron so their histograms are directly comparable: bins
of width ``2**exp`` anchored at integer multiples of the width (absolute bin ``i`` covers
``[i * 2**exp, (i + 1) * 2**exp)``), ``n_bins`` of them from absolute bin ``start``. ``exp`` is the
smallest integer, at least ``max(MIN_EXP, frexp_exponent(max |x|) - 52)``, at which the neuron's
[min, max] over all rows fits in ``n_bins`` bins; ``start`` is the bin of that min. Both are
functions of the union's [min, max] alone, and a wider range never needs a finer grid, so new rows
only ever coarsen the grid (absolute bin ``i`` goes to ``i >> k``, exactly): a histogram never
depends on how its rows were batched or merged. The floor on ``exp`` gives constant neurons a tiny
but finite bin width and keeps absolute bin indices below ``2**52``, exact in int64 and float64.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    import torch
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from rangelens.artifacts import atomic_path
from rangelens.errors import RangelensError, choices
from rangelens.ranges.moments import (
    F64,
    I64,
    Moments,
    _at,
    _bin_index,
    _check_index,
    _divide,
    _grid,
    _pool_moments,
    _regrid,
    batch_arrays,
)

FORMAT_VERSION = "rangelens.stats/1"
POOLED_CONCEPT = "__all__"


class ConceptStats:
    """Streaming per-(concept, neuron) moments, extrema and histograms (mergeable).

    Concepts without rows have mean = var = mean_abs = 0, min = +inf and max = -inf (the merge
    identities) and NaN quantiles. Where count < 2 or the data is constant (max == min), var = 0,
    skew = 0 and kurtosis = 3 (the normal values), never NaN.
    """

    def __init__(self, concepts: Sequence[str], n_neurons: int, n_bins: int = 64) -> None:
        names = list(concepts)
        if not names or not all(isinstance(c, str) for c in names):
            raise RangelensError(f"concepts must be a non-empty sequence of strings; got {names!r}")
        repeated = sorted({c for c in names if names.count(c) > 1})
        if repeated:
            raise RangelensError(f"concepts must be unique; repeated: {choices(repeated)}")
        if not isinstance(n_neurons, int | np.integer) or n_neurons < 1:
            raise RangelensError(f"n_neurons must be a positive integer; got {n_neurons!r}")
        if not isinstance(n_bins, int | np.integer) or n_bins < 2:
            raise RangelensError(f"n_bins must be an integer >= 2; got {n_bins!r}")
        self.concepts: list[str] = names
        self.n_neurons: int = int(n_neurons)
        self.n_bins: int = int(n_bins)
        shape = (len(names), self.n_neurons)
        self._count: I64 = np.zeros(len(names), dtype=np.int64)
        self._mean: F64 = np.zeros(shape)
        self._m2: F64 = np.zeros(shape)
        self._m3: F64 = np.zeros(shape)
        self._m4: F64 = np.zeros(shape)
        self._min: F64 = np.full(shape, np.inf)
        self._max: F64 = np.full(shape, -np.inf)
        self._abs_sum: F64 = np.zeros(shape)
        self._hist_exp: I64 = np.zeros(self.n_neurons, dtype=np.int64)
        self._hist_start: I64 = np.zeros(self.n_neurons, dtype=np.int64)
        self._hist_counts: I64 = np.zeros((*shape, self.n_bins), dtype=np.int64)

    def __repr__(self) -> str:
        return (
            f"ConceptStats(concepts={self.concepts!r}, n_neurons={self.n_neurons}, "
            f"n_bins={self.n_bins}, rows={int(self._count.sum())})"
        )

    # ------------------------------------------------------------------------------------ updating

    def add(
        self,
        acts: np.ndarray | torch.Tensor,
        labels: np.ndarray | torch.Tensor | Sequence[int],
    ) -> None:
        """Add rows ``acts`` ``(n, n_neurons)`` (any float dtype) of concepts ``labels`` (n,)."""
        x, y = self._check_batch(acts, labels)
        if len(y) == 0:
            return
        # Per-concept sums as one-hot matmuls, extrema per concept present: no loop over neurons.
        onehot = (y == np.arange(len(self.concepts))[:, None]).astype(np.float64)
        count = onehot.sum(axis=1).astype(np.int64)
        mean = onehot @ x / np.maximum(count, 1)[:, None]
        dev = x - mean[y]
        dev2 = dev * dev
        lo = np.full(self._mean.shape, np.inf)
        hi = np.full(self._mean.shape, -np.inf)
        for c in np.flatnonzero(count):
            rows = x[y == c]
            lo[c], hi[c] = rows.min(axis=0), rows.max(axis=0)
        moments = (mean, onehot @ dev2, onehot @ (dev2 * dev), onehot @ (dev2 * dev2))
        self._absorb(count, moments, lo, hi, onehot @ np.abs(x))
        bins = _bin_index(x, self._hist_exp) - self._hist_start
        # Flat indices into the (always C-contiguous) counts: far faster than a tuple index.
        flat = (y[:, None] * self.n_neurons + np.arange(self.n_neurons)) * self.n_bins + bins
        np.add.at(self._hist_counts.reshape(-1), flat.ravel(), 1)

    def empty(self) -> ConceptStats:
        """A new, empty statistics object of the same shape (concepts, neurons, bins)."""
        return ConceptStats(self.concepts, self.n_neurons, n_bins=self.n_bins)

    def merge(self, other: ConceptStats) -> ConceptStats:
        """A new object holding the statistics of the union of ``self``'s and ``other``'s rows."""
        if not isinstance(other, ConceptStats):
            raise RangelensError(f"can only merge ConceptStats; got {type(other).__name__}")
        for name in ("concepts", "n_neurons", "n_bins"):
            if getattr(self, name) != getattr(other, name):
                raise RangelensError(
                    f"cannot merge ConceptStats with different {name}: "
                    f"{getattr(self, name)!r} vs {getattr(other, name)!r}"
                )
        out = self._copy()
        if other._count.any():
            out._absorb(other._count, other._moments(), other._min, other._max, other._abs_sum)
            theirs = other._hist_counts.copy()
            _regrid(theirs, other._hist_exp, other._hist_start, out._hist_exp, out._hist_start)
            out._hist_counts += theirs
        return out

    def pooled(self) -> ConceptStats:
        """All rows as one pseudo-concept ``"__all__"`` (corpus mean, spread, histogram)."""
        return self._pool(np.ones(len(self.concepts), dtype=bool), POOLED_CONCEPT)

    def complement(self, c: int) -> tuple[F64, F64]:
        """``(mean, std)``, each ``(n_neurons,)``, over all rows whose concept is not ``c``.

        Zeros when there are no such rows.
        """
        c = _check_index(c, len(self.concepts), "concept")
        rest = self._pool(np.arange(len(self.concepts)) != c, f"not {self.concepts[c]}")
        return rest.mean[0], rest.std[0]

    # ---------------------------------------------------------------------------------- statistics

    @property
    def count(self) -> I64:
        """Rows per concept, ``(C,)``."""
        return self._count.copy()

    @property
    def mean(self) -> F64:
        return self._mean.copy()

    @property
    def var(self) -> F64:
        """Population variance (ddof = 0)."""
        return _divide(self._m2, self._count[:, None], self._spread(), 0.0)

    @property
    def std(self) -> F64:
        return np.sqrt(self.var)

    @property
    def skew(self) -> F64:
        """Fisher skewness ``m3 / m2**1.5`` (biased, as ``scipy.stats.skew``); 0 for a normal."""
        n = self._count[:, None].astype(np.float64)
        return _divide(np.sqrt(n) * self._m3, self._m2**1.5, self._spread(), 0.0)

    @property
    def kurtosis(self) -> F64:
        """Pearson kurtosis ``m4 / m2**2`` (biased); 3 for a normal."""
        n = self._count[:, None].astype(np.float64)
        return _divide(n * self._m4, self._m2**2, self._spread(), 3.0)

    @property
    def excess_kurtosis(self) -> F64:
        """Kurtosis - 3; 0 for a normal."""
        return self.kurtosis - 3.0

    @property
    def min(self) -> F64:
        return self._min.copy()

    @property
    def max(self) -> F64:
        return self._max.copy()

    @property
    def mean_abs(self) -> F64:
        """Mean of ``|x|``: the NeuronLens reference ranking."""
        return _divide(self._abs_sum, self._count[:, None], self._count[:, None] > 0, 0.0)

    # ---------------------------------------------------------------------------------- histograms

    def hist_edges(self, neuron: int) -> F64:
        """Bin edges ``(n_bins + 1,)`` of ``neuron``, shared by all concepts."""
        j = _check_index(neuron, self.n_neurons, "neuron")
        if not self._count.any():
            raise RangelensError("no rows added yet, so there is no histogram grid")
        return self._edges()[j]

    def histogram(self, concept: int, neuron: int) -> tuple[I64, F64]:
        """``(counts (n_bins,), edges (n_bins + 1,))``; bins are ``[edge_k, edge_k+1)``."""
        c = _check_index(concept, len(self.concepts), "concept")
        edges = self.hist_edges(neuron)
        return self._hist_counts[c, neuron].copy(), edges

    def mass_in(self, lo: npt.ArrayLike, hi: npt.ArrayLike) -> F64:
        """Estimated number of each concept's rows with ``lo <= x <= hi``, ``(C, n_neurons)``.

        ``lo`` and ``hi`` broadcast to ``(C, n_neurons)``. Within a bin, a concept's rows are taken
        as uniform over the part of the bin inside that concept's [min, max] (a part that shrinks to
        a point is a point mass, counted when inside ``[lo, hi]``). Exact when ``lo`` and ``hi`` are
        bin edges and no row equals ``hi`` (such rows sit in the bin starting at ``hi``).
        """
        shape = (len(self.concepts), self.n_neurons)
        try:
            low, high = (np.broadcast_to(np.asarray(b, dtype=np.float64), shape) for b in (lo, hi))
        except ValueError:
            raise RangelensError(
                f"lo and hi must broadcast to (concepts, neurons) = {shape}; "
                f"got {np.shape(lo)} and {np.shape(hi)}"
            ) from None
        if np.isnan(low).any() or np.isnan(high).any():
            raise RangelensError("lo and hi must not contain NaN")
        cum = self._hist_counts.cumsum(axis=-1)
        return np.maximum(self._below(high, cum, True) - self._below(low, cum, False), 0.0)

    def quantile(self, q: float | Sequence[float] | np.ndarray) -> F64:
        """Approximate per-(concept, neuron) quantiles from the histograms.

        Inverts the piecewise-linear CDF described in :meth:`mass_in`, so results lie in the
        concept's [min, max]; error below one bin width. Shape ``(C, n_neurons)`` for a scalar
        ``q``, else ``(len(q), C, n_neurons)``; NaN for concepts without rows.
        """
        qs = np.asarray(q, dtype=np.float64)
        if qs.ndim > 1 or not np.all((qs >= 0.0) & (qs <= 1.0)):
            raise RangelensError(f"q must be a number or 1-D sequence in [0, 1]; got {q!r}")
        cum = self._hist_counts.cumsum(axis=-1)
        out = np.empty((qs.size, len(self.concepts), self.n_neurons))
        for i, qi in enumerate(qs.ravel()):
            target = qi * self._count[:, None].astype(np.float64)
            # The bin where the CDF reaches target; bin 0 (left end: the min) for target 0.
            k = np.minimum((cum < target[..., None]).sum(axis=-1), self.n_bins - 1)
            left, right = self._support(k)
            n_k = _at(self._hist_counts, k)
            share = _divide(target - (_at(cum, k) - n_k), n_k.astype(np.float64), n_k > 0, 0.0)
            out[i] = left + share * (right - left)
        out[:, self._count == 0] = np.nan
        return out[0] if qs.ndim == 0 else out

    # ------------------------------------------------------------------------------- serialisation

    def state_dict(self) -> dict[str, np.ndarray]:
        """Copies of all state arrays: ``count`` (C,), ``mean``, ``m2``, ``m3``, ``m4`` (central
        moment sums), ``min``, ``max``, ``abs_sum`` (C, d), ``hist_exp``, ``hist_start`` (d,) and
        ``hist_counts`` (C, d, n_bins); bin ``k`` of neuron ``j`` starts at
        ``(hist_start[j] + k) * 2**hist_exp[j]``."""
        return {name: getattr(self, f"_{name}").copy() for name in self._state_layout()}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Replace the state with copies of ``state`` (as from :meth:`state_dict`), checked."""
        layout = self._state_layout()
        if set(state) != set(layout):
            raise RangelensError(
                f"state keys {sorted(state)} differ from the expected {sorted(layout)}"
            )
        for name, (shape, dtype) in layout.items():
            value = np.asarray(state[name])
            if value.shape != shape or value.dtype != dtype:
                raise RangelensError(
                    f"state {name!r} has shape {value.shape} and dtype {value.dtype}; "
                    f"expected {shape} and {np.dtype(dtype)}"
                )
        for name in layout:
            setattr(self, f"_{name}", np.array(state[name], order="C"))

    def save(self, path: str | Path) -> None:
        """Write one safetensors file: the :meth:`state_dict` arrays, and string metadata
        ``format`` (``"rangelens.stats/1"``), ``concepts`` (a JSON list), ``n_neurons``, ``n_bins``.

        Written atomically (:func:`rangelens.artifacts.atomic_path`), so readers never see a partial
        file.
        """
        path = Path(path)
        metadata = {
            "format": FORMAT_VERSION,
            "concepts": json.dumps(self.concepts),
            "n_neurons": str(self.n_neurons),
            "n_bins": str(self.n_bins),
        }
        with atomic_path(path) as tmp:
            save_file(self.state_dict(), str(tmp), metadata=metadata)

    @classmethod
    def load(cls, path: str | Path) -> ConceptStats:
        """Read a file written by :meth:`save`; arrays come back bit for bit."""
        with safe_open(str(path), framework="numpy") as f:
            metadata = f.metadata() or {}
        if metadata.get("format") != FORMAT_VERSION:
            raise RangelensError(
                f"{path}: format {metadata.get('format')!r} is not {FORMAT_VERSION!r}"
            )
        stats = cls(
            json.loads(metadata["concepts"]), int(metadata["n_neurons"]), int(metadata["n_bins"])
        )
        stats.load_state_dict(load_file(str(path)))
        return stats

    # ------------------------------------------------------------------------------------ internal

    def _state_layout(self) -> dict[str, tuple[tuple[int, ...], type[np.generic]]]:
        cd = (len(self.concepts), self.n_neurons)
        layout: dict[str, tuple[tuple[int, ...], type[np.generic]]] = {
            "count": ((len(self.concepts),), np.int64)
        }
        for name in ("mean", "m2", "m3", "m4", "min", "max", "abs_sum"):
            layout[name] = (cd, np.float64)
        layout["hist_exp"] = ((self.n_neurons,), np.int64)
        layout["hist_start"] = ((self.n_neurons,), np.int64)
        layout["hist_counts"] = ((*cd, self.n_bins), np.int64)
        return layout

    def _copy(self) -> ConceptStats:
        out = ConceptStats(self.concepts, self.n_neurons, self.n_bins)
        out.load_state_dict(self.state_dict())
        return out

    def _moments(self) -> Moments:
        return self._mean, self._m2, self._m3, self._m4

    def _spread(self) -> npt.NDArray[np.bool_]:
        """Where the data is not constant, so var > 0 and the shape statistics are defined."""
        return (self._max > self._min) & (self._m2 > 0)

    def _absorb(self, count: I64, moments: Moments, lo: F64, hi: F64, abs_sum: F64) -> None:
        """Fold in other rows' statistics (at least one row) and move the histogram to the grid of
        the union; the caller adds those rows' histogram counts."""
        had_rows = self._count.any()
        stacked = (
            np.stack([mine, theirs]) for mine, theirs in zip(self._moments(), moments, strict=True)
        )
        self._mean, self._m2, self._m3, self._m4 = _pool_moments(
            np.stack([self._count, count]), *stacked
        )
        self._count = self._count + count
        self._min = np.minimum(self._min, lo)
        self._max = np.maximum(self._max, hi)
        self._abs_sum = self._abs_sum + abs_sum
        exp, start = _grid(self._min.min(axis=0), self._max.max(axis=0), self.n_bins)
        if had_rows:
            _regrid(self._hist_counts, self._hist_exp, self._hist_start, exp, start)
        self._hist_exp, self._hist_start = exp, start

    def _pool(self, keep: npt.NDArray[np.bool_], name: str) -> ConceptStats:
        """The concepts selected by ``keep`` as one concept ``name``, on this object's grid."""
        out = ConceptStats([name], self.n_neurons, self.n_bins)
        out._count = self._count[keep].sum(keepdims=True)
        pooled = _pool_moments(self._count[keep], *(m[keep] for m in self._moments()))
        out._mean, out._m2, out._m3, out._m4 = (m[None] for m in pooled)
        out._min = self._min[keep].min(axis=0, keepdims=True)
        out._max = self._max[keep].max(axis=0, keepdims=True)
        out._abs_sum = self._abs_sum[keep].sum(axis=0, keepdims=True)
        out._hist_exp, out._hist_start = self._hist_exp.copy(), self._hist_start.copy()
        out._hist_counts = self._hist_counts[keep].sum(axis=0, keepdims=True)
        return out

    def _edges(self) -> F64:
        offsets = self._hist_start[:, None] + np.arange(self.n_bins + 1)
        return np.ldexp(offsets.astype(np.float64), self._hist_exp[:, None])

    def _support(self, k: I64) -> tuple[F64, F64]:
        """Ends of the part of bin ``k`` ``(C, d)`` inside each concept's [min, max], where the
        concept's rows in that bin are modelled as uniform (a point mass when the ends meet)."""
        present = self._count[:, None] > 0
        lo, hi = np.where(present, self._min, 0.0), np.where(present, self._max, 0.0)
        left = np.ldexp((self._hist_start + k).astype(np.float64), self._hist_exp)
        right = np.ldexp((self._hist_start + k + 1).astype(np.float64), self._hist_exp)
        return np.clip(left, lo, hi), np.clip(right, lo, hi)

    def _below(self, v: F64, cum: I64, inclusive: bool) -> F64:
        """Modelled number of each concept's rows with ``x <= v`` (``x < v`` if not
        ``inclusive``), for ``v`` ``(C, d)`` (may be infinite); ``cum``: cumulative bin counts."""
        edges = self._edges()
        inside = np.clip(v, edges[:, 0], edges[:, -1])
        k = np.clip(_bin_index(inside, self._hist_exp) - self._hist_start, 0, self.n_bins - 1)
        left, right = self._support(k)
        point = (v >= left) if inclusive else (v > left)
        share = np.clip(_divide(v - left, right - left, right > left, point.astype(float)), 0, 1)
        n_k = _at(self._hist_counts, k)
        return _at(cum, k) - n_k + n_k * share

    def _check_batch(
        self,
        acts: np.ndarray | torch.Tensor,
        labels: np.ndarray | torch.Tensor | Sequence[int],
    ) -> tuple[F64, I64]:
        return batch_arrays(acts, labels, self.n_neurons, len(self.concepts))
