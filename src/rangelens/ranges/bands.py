"""Density bands: the activation values where a concept is more likely than the other concepts.

NeuronLens (Haider et al., arXiv 2502.06809) masks a salient neuron inside ``mu +- tau sigma`` of the
concept's rows. When concept distributions overlap, that band also holds most of the other
concepts' rows. A density band keeps only the likelihood-ratio region of Neyman and Pearson (1933):
for concept c on neuron j,

    band = {x : f_c(x) / f_rest(x) > ratio},

with ``f_c`` the density of c's rows and ``f_rest`` that of all other concepts' rows pooled (ratio 1:
c is the more likely side under equal priors). The band may be empty or several disjoint intervals.

Estimator: a binned Gaussian kernel density estimate (Silverman 1986, "Density Estimation", §3.5;
Wand 1994, "Fast computation of multivariate kernel estimators"): the streaming histograms of
:class:`~rangelens.ranges.stats.ConceptStats` convolved with a Gaussian kernel, evaluated at the bin centres.
The raw rows are not kept, so an exact KDE is impossible; a plain histogram ratio flips on noise
(100-200 rows per concept over 64 bins leave many bins with 0-2 rows). Bandwidth: Silverman's rule
``0.9 min(sigma, IQR / 1.34) n^(-1/5)``, separately for c and for the rest, and never below one bin
(the histogram resolves nothing finer). The ratio is read only where the data give evidence, between
the first and last bin holding at least :data:`MIN_ROWS` smoothed rows of all concepts together; band
ends fall where the log-ratio crosses ``log(ratio)``, interpolated linearly between bin centres, and a
band that reaches either end of that stretch continues to -inf / +inf: values in the sparse tails,
and beyond every training row, take the side of the nearest well-estimated bin instead of a ratio of
one or two rows (which made spurious tail bands even for identical laws). Where both densities are
below 1e-12 per bin the ratio counts as 1.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from rangelens.errors import RangelensError
from rangelens.ranges.stats import ConceptStats

F64 = npt.NDArray[np.float64]
FLOOR = 1e-12  # density per bin below which a density counts as absent
MIN_ROWS = 5.0  # smoothed rows per bin (all concepts) for the ratio to be read there
_CHUNK = 256  # rows per kernel-matrix block: (256, 64, 64) float64 is 8 MB


def silverman_bandwidth(counts: npt.ArrayLike, std: npt.ArrayLike) -> F64:
    """Silverman's rule ``0.9 min(std, IQR / 1.34) n^(-1/5)`` per row, in bins, at least 1.

    ``counts`` ``(N, B)`` histogram rows, ``std`` ``(N,)`` their standard deviations in bins. The IQR
    comes from the binned CDF (rows uniform within a bin); a zero IQR or std is ignored in the min.
    """
    h = np.asarray(counts, dtype=np.float64)
    n = h.sum(axis=1)
    cum = np.cumsum(h, axis=1)
    quartiles = []
    for q in (0.25, 0.75):
        target = q * n
        k = np.minimum((cum < target[:, None]).sum(axis=1), h.shape[1] - 1)
        before = np.take_along_axis(cum, k[:, None], 1)[:, 0] - h[np.arange(len(h)), k]
        inside = h[np.arange(len(h)), k]
        share = np.divide(target - before, inside, out=np.zeros_like(n), where=inside > 0)
        quartiles.append(k + share)
    spread = np.stack([np.asarray(std, dtype=np.float64), (quartiles[1] - quartiles[0]) / 1.34])
    spread = np.where(spread > 0, spread, np.inf).min(axis=0)
    rule = 0.9 * spread * np.maximum(n, 1.0) ** -0.2
    return np.where(np.isfinite(rule), np.maximum(rule, 1.0), 1.0)


def binned_kde(counts: npt.ArrayLike, bandwidth: npt.ArrayLike) -> F64:
    """Gaussian-smoothed densities ``(N, B)`` at the bin centres, per bin (rows sum to about 1).

    ``counts`` ``(N, B)``; ``bandwidth`` ``(N,)`` in bins. Rows without counts give zeros.
    """
    h = np.asarray(counts, dtype=np.float64)
    width = np.asarray(bandwidth, dtype=np.float64)
    offsets = np.arange(h.shape[1], dtype=np.float64)
    offsets = offsets[:, None] - offsets[None, :]
    out = np.empty_like(h)
    for start in range(0, len(h), _CHUNK):
        w = width[start : start + _CHUNK, None, None]
        kernel = np.exp(-0.5 * (offsets / w) ** 2) / (w * np.sqrt(2 * np.pi))
        out[start : start + _CHUNK] = np.einsum("nib,nb->ni", kernel, h[start : start + _CHUNK])
    total = h.sum(axis=1, keepdims=True)
    return np.divide(out, total, out=np.zeros_like(out), where=total > 0)


def log_ratio(f_concept: npt.ArrayLike, f_rest: npt.ArrayLike) -> F64:
    """``log(f_c / f_rest)`` with both floored at :data:`FLOOR` (0 where both are absent)."""
    return np.log(np.maximum(f_concept, FLOOR)) - np.log(np.maximum(f_rest, FLOOR))


def intervals_above(
    values: F64, threshold: float, first: int, last: int
) -> list[tuple[float, float]]:
    """Maximal intervals, in bin-edge units, where ``values`` (one per bin centre) exceeds
    ``threshold``, read on bins ``first..last``; crossings interpolate linearly between centres
    (centre of bin i is ``i + 0.5``) and a run touching ``first`` / ``last`` is open to -inf / +inf."""
    above = values[first : last + 1] > threshold
    out: list[tuple[float, float]] = []
    i, n = 0, above.size
    while i < n:
        if not above[i]:
            i += 1
            continue
        j = i
        while j + 1 < n and above[j + 1]:
            j += 1
        lo = -np.inf if i == 0 else _crossing(values, first + i - 1, threshold)
        hi = np.inf if j == n - 1 else _crossing(values, first + j, threshold)
        out.append((lo, hi))
        i = j + 1
    return out


def _crossing(values: F64, i: int, threshold: float) -> float:
    """Where the line through centres ``i`` and ``i + 1`` meets ``threshold`` (edge units)."""
    a, b = float(values[i]), float(values[i + 1])
    t = (threshold - a) / (b - a) if b != a else 0.5
    return i + 0.5 + min(max(t, 0.0), 1.0)


def density_bands(
    stats: ConceptStats, neurons: npt.ArrayLike, ratio: float = 1.0
) -> tuple[F64, F64]:
    """Density bands of each concept on its ``neurons`` ``(C, k)``: ``(band_lo, band_hi)``, each
    ``(C, k, m)``; slot s of a row is its s-th interval from the left, unused slots are NaN, and
    ``m >= 1`` is the most intervals any row has. Closed intervals in activation units."""
    if not (np.isfinite(ratio) and ratio > 0):
        raise RangelensError(
            f"likelihood-ratio threshold must be a finite number > 0; got {ratio!r}"
        )
    count = np.asarray(stats.count)
    if (count > 0).sum() < 2:
        raise RangelensError(
            "density bands compare a concept with the others: need rows of at least 2 concepts"
        )
    index = np.asarray(neurons, dtype=np.int64)
    state = stats.state_dict()
    hist = state["hist_counts"]  # (C, d, B)
    step = np.ldexp(1.0, state["hist_exp"])  # (d,) bin width
    origin = state["hist_start"] * step  # (d,) left edge of bin 0
    total = hist.sum(axis=0)  # (d, B)
    std = stats.std
    rows: list[list[list[tuple[float, float]]]] = []
    for c in range(len(stats.concepts)):
        j = index[c]
        mine, rest = hist[c, j], total[j] - hist[c, j]
        rest_std = stats.complement(c)[1][j]
        f_c = binned_kde(mine, silverman_bandwidth(mine, std[c, j] / step[j]))
        f_r = binned_kde(rest, silverman_bandwidth(rest, rest_std / step[j]))
        lr = log_ratio(f_c, f_r)
        rows_per_bin = f_c * mine.sum(axis=1, keepdims=True) + f_r * rest.sum(axis=1, keepdims=True)
        row = []
        for r, neuron in enumerate(j):
            read = np.flatnonzero(rows_per_bin[r] >= MIN_ROWS)
            if read.size == 0:  # too few rows anywhere: read every occupied bin
                read = np.flatnonzero(total[neuron])
            found = intervals_above(lr[r], float(np.log(ratio)), int(read[0]), int(read[-1]))
            row.append(
                [
                    (origin[neuron] + a * step[neuron], origin[neuron] + b * step[neuron])
                    for a, b in found
                ]
            )
        rows.append(row)
    m = max(1, max(len(band) for row in rows for band in row))
    band_lo = np.full((*index.shape, m), np.nan)
    band_hi = np.full((*index.shape, m), np.nan)
    for c, row in enumerate(rows):
        for r, band in enumerate(row):
            for s, (a, b) in enumerate(band):
                band_lo[c, r, s], band_hi[c, r, s] = a, b
    return band_lo, band_hi


def band_mass(
    stats: ConceptStats, band_lo: npt.ArrayLike, band_hi: npt.ArrayLike, neurons: npt.ArrayLike
) -> F64:
    """Estimated rows of every concept inside one band per neuron of ``neurons`` ``(k,)``:
    ``(C, k)``, summed over the band's intervals ``(k, m)`` (NaN slots are unused; the intervals are
    disjoint). Uses :meth:`ConceptStats.mass_in`."""
    j = np.asarray(neurons, dtype=np.int64)
    lo, hi = np.asarray(band_lo, dtype=np.float64), np.asarray(band_hi, dtype=np.float64)
    mass = np.zeros((len(stats.concepts), j.size))
    for s in range(lo.shape[-1]):
        used = ~np.isnan(lo[:, s])
        if not used.any():
            continue
        a, b = np.ones(stats.n_neurons), np.zeros(stats.n_neurons)  # empty where unused
        a[j[used]], b[j[used]] = lo[used, s], hi[used, s]
        mass += np.asarray(stats.mass_in(a, b))[:, j] * used
    return mass


def band_separation(
    stats: ConceptStats, neurons: np.ndarray, band_lo: np.ndarray, band_hi: np.ndarray
) -> np.ndarray:
    """Purity x coverage ``(C, k)`` of each concept's band on its ``neurons`` (NaN where the band
    holds no rows): the share of in-band rows that are the concept's, times the share of the
    concept's rows in its band (from the histograms, :meth:`ConceptStats.mass_in`)."""
    purity, covered = band_purity_coverage(stats, neurons, band_lo, band_hi)
    return purity * covered


def band_purity_coverage(
    stats: ConceptStats, neurons: np.ndarray, band_lo: np.ndarray, band_hi: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``(purity, coverage)``, each ``(C, k)``, of the bands ``(C, k, m)``; purity NaN where the
    band holds no rows."""
    count = np.asarray(stats.count, dtype=np.float64)
    purity = np.empty(neurons.shape)
    covered = np.empty(neurons.shape)
    for c in range(len(stats.concepts)):
        mass = band_mass(stats, band_lo[c], band_hi[c], neurons[c])
        total = mass.sum(axis=0)
        with np.errstate(divide="ignore", invalid="ignore"):
            purity[c] = np.where(total > 0, mass[c] / total, np.nan)
        covered[c] = mass[c] / count[c]
    return purity, covered
