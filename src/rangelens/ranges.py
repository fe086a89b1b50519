"""Activation ranges: the band of a salient neuron's values that carries a concept (NeuronLens §1).

Haider et al., "Neurons Speak in Ranges" (arXiv 2502.06809): for concept c and salient neuron j the
activation range is ``[mu_cj - tau * sigma_cj, mu_cj + tau * sigma_cj]`` over c's examples. This
module fits those ranges from streaming :class:`~rangelens.stats.ConceptStats`, stores them in a
versioned on-disk format, and measures how Gaussian and how separated the per-concept distributions
are.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

import numpy as np
import numpy.typing as npt
import pandas as pd
from safetensors.numpy import load_file, save_file

from rangelens.artifacts import atomic_path, write_text
from rangelens.errors import RangelensError, choices
from rangelens.ranking import top_neurons
from rangelens.stats import ConceptStats

FORMAT_VERSION = "rangelens.ranges/1"
RANGE_METHODS = ("gaussian", "quantile")
TENSORS_FILE = "ranges.safetensors"
HEADER_FILE = "ranges.json"
_ARRAYS = ("neurons", "lo", "hi", "mean", "std")


@dataclass(frozen=True)
class ConceptRange:
    """One concept's activation range ``[lo, hi]`` on one neuron; ``rank`` 0 is its most salient."""

    concept: str
    neuron: int
    lo: float
    hi: float
    mean: float
    std: float
    rank: int

    @overload
    def contains(self, x: float) -> bool: ...
    @overload
    def contains(self, x: np.ndarray) -> np.ndarray: ...
    def contains(self, x: float | np.ndarray) -> bool | np.ndarray:
        """Whether ``x`` (a value or an array of values) lies in the closed range ``[lo, hi]``."""
        values = np.asarray(x)
        inside = (self.lo <= values) & (values <= self.hi)
        return bool(inside) if inside.ndim == 0 else inside


@dataclass(eq=False)
class RangeMap:
    """Ranges for every concept's salient neurons; saved as safetensors + JSON metadata.

    Row c of each ``(C, k)`` array describes concept ``concepts[c]``; column r is its r-th most
    salient neuron. ``metadata`` is free-form JSON-able provenance (model, site, layer, position,
    dataset, tau, p, ranking, method, library versions, ...).

    On disk (format ``rangelens.ranges/1``) a directory holds ``ranges.safetensors`` (int64
    ``neurons``, float64 ``lo``, ``hi``, ``mean``, ``std``) and ``ranges.json`` (``format``,
    ``concepts``, ``metadata``).
    """

    concepts: list[str]
    neurons: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.concepts = [str(c) for c in self.concepts]
        self.neurons = np.asarray(self.neurons, dtype=np.int64)
        for name in _ARRAYS[1:]:
            setattr(self, name, np.asarray(getattr(self, name), dtype=np.float64))
        shape = (len(self.concepts), self.neurons.shape[-1] if self.neurons.ndim == 2 else -1)
        for name in _ARRAYS:
            if getattr(self, name).shape != shape:
                raise RangelensError(
                    f"RangeMap {name} has shape {getattr(self, name).shape}; expected {shape} "
                    f"(one row per concept, one column per salient neuron)"
                )

    def concept_index(self, concept: str | int) -> int:
        """Row of ``concept``, given by name or by index."""
        if isinstance(concept, str):
            if concept in self.concepts:
                return self.concepts.index(concept)
        elif 0 <= concept < len(self.concepts):
            return int(concept)
        raise RangelensError(f"unknown concept {concept!r}; valid: {choices(self.concepts)}")

    def ranges(self, concept: str | int) -> list[ConceptRange]:
        """The concept's ranges, most salient neuron first."""
        c = self.concept_index(concept)
        return [
            ConceptRange(
                concept=self.concepts[c],
                neuron=int(self.neurons[c, r]),
                lo=float(self.lo[c, r]),
                hi=float(self.hi[c, r]),
                mean=float(self.mean[c, r]),
                std=float(self.std[c, r]),
                rank=r,
            )
            for r in range(self.neurons.shape[1])
        ]

    def to_frame(self) -> pd.DataFrame:
        """One row per (concept, salient neuron): concept, neuron, rank, lo, hi, mean, std."""
        n_concepts, k = self.neurons.shape
        return pd.DataFrame(
            {
                "concept": np.repeat(np.asarray(self.concepts, dtype=object), k),
                "neuron": self.neurons.ravel(),
                "rank": np.tile(np.arange(k, dtype=np.int64), n_concepts),
                **{name: getattr(self, name).ravel() for name in _ARRAYS[1:]},
            }
        )

    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write ``ranges.safetensors`` and ``ranges.json`` into ``directory``.

        Each file is written atomically (:func:`rangelens.artifacts.atomic_path`), so a crash never
        leaves a half-written file; metadata that is not JSON-able fails before anything is written.
        """
        path = Path(directory)
        header = json.dumps(
            {"format": FORMAT_VERSION, "concepts": self.concepts, "metadata": self.metadata},
            indent=2,
        )
        with atomic_path(path / TENSORS_FILE) as tmp:
            save_file(
                {name: np.ascontiguousarray(getattr(self, name)) for name in _ARRAYS},
                str(tmp),
                metadata={"format": FORMAT_VERSION},
            )
        write_text(path / HEADER_FILE, header + "\n")

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> RangeMap:
        """Read a range map written by :meth:`save`."""
        path = Path(directory)
        missing = [name for name in (TENSORS_FILE, HEADER_FILE) if not (path / name).is_file()]
        if missing:
            raise RangelensError(
                f"{str(path)!r} is not a saved range map: missing {choices(missing)}"
            )
        header = json.loads((path / HEADER_FILE).read_text(encoding="utf-8"))
        if header.get("format") != FORMAT_VERSION:
            raise RangelensError(
                f"range map {str(path)!r} has format {header.get('format')!r}; "
                f"valid: {choices([FORMAT_VERSION])}"
            )
        arrays = load_file(str(path / TENSORS_FILE))
        return cls(
            concepts=header["concepts"],
            metadata=header["metadata"],
            **{name: arrays[name] for name in _ARRAYS},
        )


def fit_ranges(
    stats: ConceptStats,
    scores: np.ndarray,
    *,
    tau: float = 2.0,
    p: float = 0.3,
    method: str = "gaussian",
    coverage: float = 0.9545,
    metadata: Mapping[str, Any] | None = None,
) -> RangeMap:
    """Fit each concept's ranges on its top ``p`` share of neurons by ``scores`` ``(C, d)``.

    ``"gaussian"``: ``[mu - tau * sigma, mu + tau * sigma]`` over the concept's rows (NeuronLens;
    the released code uses tau = 2). A neuron with sigma = 0 gets the degenerate range ``[mu, mu]``,
    never the NaN bounds of the reference code (which then silently never masked). ``tau = inf``
    gives ``[-inf, inf]`` everywhere: the neuron-masking baseline. ``"quantile"``: the central
    ``coverage`` interval of the concept's rows, ``[q((1 - coverage) / 2), q((1 + coverage) / 2)]``,
    for neurons that are not Gaussian. ``tau``, ``p`` and ``method`` (and ``coverage`` for quantile)
    are added to ``metadata``.
    """
    if method not in RANGE_METHODS:
        raise RangelensError(f"unknown range method {method!r}; valid: {choices(RANGE_METHODS)}")
    if not tau > 0:
        raise RangelensError(f"tau must be > 0 (inf for whole-neuron ranges); got {tau!r}")
    if method == "quantile" and not 0.0 < coverage < 1.0:
        raise RangelensError(f"coverage must be in (0, 1); got {coverage!r}")
    scores = np.asarray(scores, dtype=np.float64)
    expected = (len(stats.concepts), stats.n_neurons)
    if scores.shape != expected:
        raise RangelensError(f"scores have shape {scores.shape}; expected {expected} (concepts, d)")
    empty = [c for c, n in zip(stats.concepts, np.asarray(stats.count), strict=True) if n == 0]
    if empty:
        raise RangelensError(f"concepts without any rows cannot get ranges: {choices(empty)}")

    neurons = top_neurons(scores, p)
    mean = np.take_along_axis(np.asarray(stats.mean, dtype=np.float64), neurons, axis=1)
    std = np.take_along_axis(np.asarray(stats.std, dtype=np.float64), neurons, axis=1)
    if method == "quantile":
        bounds = np.asarray(stats.quantile([(1 - coverage) / 2, (1 + coverage) / 2]))
        lo = np.take_along_axis(bounds[0], neurons, axis=1)
        hi = np.take_along_axis(bounds[1], neurons, axis=1)
    elif np.isinf(tau):
        lo, hi = np.full_like(mean, -np.inf), np.full_like(mean, np.inf)
    else:
        lo, hi = mean - tau * std, mean + tau * std
    fitted = {"tau": float(tau), "p": float(p), "method": method}
    if method == "quantile":
        fitted["coverage"] = float(coverage)
    return RangeMap(
        concepts=list(stats.concepts),
        neurons=neurons,
        lo=lo,
        hi=hi,
        mean=mean,
        std=std,
        metadata={**(metadata or {}), **fitted},
    )


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
    none are in range); ``coverage``: share of the concept's own rows in range. Both use
    ``stats.mass_in``.
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

    purity = np.empty((n_concepts, k))
    covered = np.empty((n_concepts, k))
    for c in range(n_concepts):
        lo = np.zeros(stats.n_neurons)
        hi = np.zeros(stats.n_neurons)
        lo[neurons[c]], hi[neurons[c]] = range_map.lo[c], range_map.hi[c]
        mass = np.asarray(stats.mass_in(lo, hi), dtype=np.float64)[:, neurons[c]]
        total = mass.sum(axis=0)
        with np.errstate(divide="ignore", invalid="ignore"):
            purity[c] = np.where(total > 0, mass[c] / total, np.nan)
        covered[c] = mass[c] / count[c]

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
