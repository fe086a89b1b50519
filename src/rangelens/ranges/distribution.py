"""How the concept distributions on a map's salient neurons look: Gaussian-likeness (skew, excess
kurtosis), overlap with the other concepts (Bhattacharyya coefficient of the fitted Gaussians) and
range purity (the share of in-range activations that come from the concept). NeuronLens (Haider et
al., arXiv 2502.06809) assumes Gaussian-like, separable distributions; these tables test it.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pandas as pd

from rangelens.errors import RangelensError
from rangelens.ranges.bands import band_purity_coverage
from rangelens.ranges.maps import RangeMap
from rangelens.ranges.stats import ConceptStats


def bhattacharyya(
    mu1: npt.ArrayLike, s1: npt.ArrayLike, mu2: npt.ArrayLike, s2: npt.ArrayLike
) -> np.ndarray:
    """Bhattacharyya coefficient ``BC = exp(-BD)`` of two univariate Gaussians, elementwise.

    ``BC = sqrt(2 s1 s2 / (s1^2 + s2^2)) * exp(-(mu1 - mu2)^2 / (4 (s1^2 + s2^2)))``: 1 for
    identical distributions, 0 for disjoint ones. Computed relative to the larger sigma so tiny
    sigmas do not underflow; two point masses (both sigma 0) give 1 if equal, else 0; a point mass
    against a Gaussian gives 0.
    """
    m1, sd1, m2, sd2 = (np.asarray(a, dtype=np.float64) for a in (mu1, s1, mu2, s2))
    big, small = np.maximum(sd1, sd2), np.minimum(sd1, sd2)
    gap = np.abs(m1 - m2)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        ratio = small / big
        spread = 1.0 + ratio**2
        bc = np.sqrt(2.0 * ratio / spread) * np.exp(-((gap / big) ** 2) / (4.0 * spread))
    return np.where(big > 0, bc, (gap == 0).astype(np.float64))


def distribution_table(stats: ConceptStats, range_map: RangeMap) -> pd.DataFrame:
    """Per-(concept, salient neuron) shape and overlap of the concept-conditioned distributions.

    NeuronLens finds these distributions Gaussian-like (skew ~ 0, excess kurtosis ~ 0) and well
    separated across concepts. Columns: concept, neuron, rank, mean, std, skew, excess_kurtosis, lo,
    hi; ``bhattacharyya_max`` / ``bhattacharyya_mean``: the largest / average Bhattacharyya
    coefficient between this concept's fitted Gaussian and each other concept's on the neuron (NaN
    without other concepts); ``purity``: share of all in-range rows that are of this concept (NaN if
    none are in range); ``coverage``: share of the concept's own rows in range (both over all the
    band's intervals, from ``stats.mass_in``); ``n_intervals``: intervals in the band.
    """
    if list(range_map.concepts) != list(stats.concepts):
        raise RangelensError(
            f"range map concepts {range_map.concepts!r} differ from the stats concepts "
            f"{stats.concepts!r}"
        )
    neurons = range_map.neurons
    n_concepts, k = neurons.shape
    count = np.asarray(stats.count, dtype=np.float64)
    mean = np.asarray(stats.mean, dtype=np.float64)
    std = np.asarray(stats.std, dtype=np.float64)

    # Overlap of concept c's Gaussian with every concept c' on c's salient neurons: (C', C, k).
    overlap = bhattacharyya(mean[:, neurons], std[:, neurons], range_map.mean, range_map.std)
    others = (~np.eye(n_concepts, dtype=bool) & (count > 0)[:, None])[:, :, None]
    n_others = others.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        bc_mean = np.where(others, overlap, 0.0).sum(axis=0) / n_others
    bc_max = np.where(n_others > 0, np.where(others, overlap, -np.inf).max(axis=0), np.nan)

    purity, covered = band_purity_coverage(stats, neurons, *range_map.bands)

    def at_salient(values: np.ndarray) -> np.ndarray:
        return np.take_along_axis(np.asarray(values, dtype=np.float64), neurons, axis=1).ravel()

    frame = range_map.to_frame()[["concept", "neuron", "rank"]]
    return frame.assign(
        mean=range_map.mean.ravel(),
        std=range_map.std.ravel(),
        skew=at_salient(stats.skew),
        excess_kurtosis=at_salient(stats.excess_kurtosis),
        lo=range_map.lo.ravel(),
        hi=range_map.hi.ravel(),
        bhattacharyya_max=bc_max.ravel(),
        bhattacharyya_mean=bc_mean.ravel(),
        purity=purity.ravel(),
        coverage=covered.ravel(),
        n_intervals=range_map.n_intervals.ravel(),
    )


def distribution_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per-concept and ``"overall"`` summary of a :func:`distribution_table`.

    Columns: concept, n_neurons, median skew, excess kurtosis, Bhattacharyya max / mean and purity,
    and mean coverage; medians resist the heavy tails a few odd neurons produce.
    """
    rows = {str(c): _summary_row(group) for c, group in table.groupby("concept", sort=False)}
    rows["overall"] = _summary_row(table)
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("concept").reset_index()


def _summary_row(frame: pd.DataFrame) -> dict[str, float | int]:
    return {
        "n_neurons": len(frame),
        "median_skew": float(frame["skew"].median()),
        "median_excess_kurtosis": float(frame["excess_kurtosis"].median()),
        "median_bhattacharyya_max": float(frame["bhattacharyya_max"].median()),
        "median_bhattacharyya_mean": float(frame["bhattacharyya_mean"].median()),
        "median_purity": float(frame["purity"].median()),
        "mean_coverage": float(frame["coverage"].mean()),
    }
