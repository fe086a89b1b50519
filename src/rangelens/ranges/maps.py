"""Activation ranges: the band of a salient neuron's values that carries a concept (NeuronLens §1).

Haider et al., "Neurons Speak in Ranges" (arXiv 2502.06809): for concept c and salient neuron j the
activation range is ``[mu_cj - tau * sigma_cj, mu_cj + tau * sigma_cj]`` over c's examples. This
module fits those ranges from streaming :class:`~rangelens.ranges.stats.ConceptStats`, and beyond the paper
density bands (:mod:`rangelens.ranges.bands`: where c is more likely than the other concepts, possibly
several intervals), stores them in a versioned on-disk format, and measures how Gaussian and how
separated the per-concept distributions are.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, overload

import numpy as np
import numpy.typing as npt
import pandas as pd
from safetensors.numpy import load_file, save_file

from rangelens.artifacts import atomic_path, write_text
from rangelens.config.analysis import RangeMethod
from rangelens.errors import RangelensError, choices
from rangelens.ranges.bands import band_separation, density_bands
from rangelens.ranges.ranking import top_neurons
from rangelens.ranges.stats import ConceptStats

FORMAT_VERSION = "rangelens.ranges/2"
READABLE_FORMATS = ("rangelens.ranges/1", FORMAT_VERSION)  # /1: one interval [lo, hi] per neuron
RANGE_METHODS = get_args(RangeMethod)  # declared once, in the config
SELECTIONS = ("ranking", "band")
TENSORS_FILE = "ranges.safetensors"
HEADER_FILE = "ranges.json"
_ARRAYS = ("neurons", "lo", "hi", "mean", "std")
_BANDS = ("band_lo", "band_hi")

Interval = tuple[float, float]


@dataclass(frozen=True)
class ConceptRange:
    """One concept's activation range on one neuron; ``rank`` 0 is its most salient.

    ``intervals``: the band, disjoint closed intervals from left to right (empty: masks nothing);
    ``lo`` / ``hi`` are its outer ends (NaN for an empty band). Built without ``intervals``, the band
    is the single interval ``[lo, hi]``.
    """

    concept: str
    neuron: int
    lo: float
    hi: float
    mean: float
    std: float
    rank: int
    intervals: tuple[Interval, ...] = ()

    def __post_init__(self) -> None:
        if not self.intervals and self.lo <= self.hi:
            object.__setattr__(self, "intervals", ((self.lo, self.hi),))

    @overload
    def contains(self, x: float) -> bool: ...
    @overload
    def contains(self, x: np.ndarray) -> np.ndarray: ...
    def contains(self, x: float | np.ndarray) -> bool | np.ndarray:
        """Whether ``x`` (a value or an array of values) lies in one of the band's intervals."""
        values = np.asarray(x)
        inside = np.zeros(values.shape, dtype=bool)
        for lo, hi in self.intervals:
            inside |= (lo <= values) & (values <= hi)
        return bool(inside) if inside.ndim == 0 else inside


@dataclass(eq=False)
class RangeMap:
    """Ranges for every concept's salient neurons; saved as safetensors + JSON metadata.

    Row c of each ``(C, k)`` array describes concept ``concepts[c]``; column r is its r-th most
    salient neuron. ``band_lo`` / ``band_hi`` ``(C, k, m)`` hold each band as up to m disjoint closed
    intervals, left to right, unused slots NaN (absent: the single interval ``[lo, hi]``); ``lo`` /
    ``hi`` are the band's outer ends (NaN for an empty band). ``metadata`` is free-form JSON-able
    provenance (model, site, layer, position, dataset, tau, p, ranking, method, ...).

    On disk (format ``rangelens.ranges/2``) a directory holds ``ranges.safetensors`` (int64
    ``neurons``, float64 ``lo``, ``hi``, ``mean``, ``std``, ``band_lo``, ``band_hi``) and
    ``ranges.json`` (``format``, ``concepts``, ``metadata``). Format ``/1`` (no bands) still loads.
    """

    concepts: list[str]
    neurons: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    metadata: dict[str, Any] = field(default_factory=dict)
    band_lo: np.ndarray | None = None
    band_hi: np.ndarray | None = None

    def top_neurons(self, k: int) -> list[int]:
        """The ``k`` most salient neurons: rank by rank, round-robin over concepts, no duplicates."""
        picked: list[int] = []
        for rank in range(self.neurons.shape[1]):
            for n in self.neurons[:, rank]:
                if int(n) not in picked and len(picked) < k:
                    picked.append(int(n))
        return picked

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
        if (self.band_lo is None) != (self.band_hi is None):
            raise RangelensError("RangeMap needs both band_lo and band_hi, or neither")
        if self.band_lo is None or self.band_hi is None:
            self.band_lo, self.band_hi = self.lo[..., None].copy(), self.hi[..., None].copy()
        self.band_lo = np.asarray(self.band_lo, dtype=np.float64)
        self.band_hi = np.asarray(self.band_hi, dtype=np.float64)
        _check_bands(self.band_lo, self.band_hi, self.lo, self.hi, shape)

    @property
    def bands(self) -> tuple[np.ndarray, np.ndarray]:
        """``(band_lo, band_hi)``, each ``(C, k, m)``: the bands' intervals, unused slots NaN."""
        assert self.band_lo is not None and self.band_hi is not None  # set by __post_init__
        return self.band_lo, self.band_hi

    @property
    def n_intervals(self) -> npt.NDArray[np.int64]:
        """Intervals in each band, ``(C, k)`` (0: the band masks nothing)."""
        return (~np.isnan(self.bands[0])).sum(axis=-1)

    @property
    def single_interval(self) -> bool:
        """Whether every band is exactly one interval (as in NeuronLens)."""
        return bool((self.n_intervals == 1).all())

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
        band_lo, band_hi = self.bands
        return [
            ConceptRange(
                concept=self.concepts[c],
                neuron=int(self.neurons[c, r]),
                lo=float(self.lo[c, r]),
                hi=float(self.hi[c, r]),
                mean=float(self.mean[c, r]),
                std=float(self.std[c, r]),
                rank=r,
                intervals=tuple(
                    (float(a), float(b))
                    for a, b in zip(band_lo[c, r], band_hi[c, r], strict=True)
                    if not np.isnan(a)
                ),
            )
            for r in range(self.neurons.shape[1])
        ]

    def to_frame(self) -> pd.DataFrame:
        """One row per (concept, salient neuron): concept, neuron, rank, lo, hi, mean, std,
        n_intervals."""
        n_concepts, k = self.neurons.shape
        return pd.DataFrame(
            {
                "concept": np.repeat(np.asarray(self.concepts, dtype=object), k),
                "neuron": self.neurons.ravel(),
                "rank": np.tile(np.arange(k, dtype=np.int64), n_concepts),
                **{name: getattr(self, name).ravel() for name in _ARRAYS[1:]},
                "n_intervals": self.n_intervals.ravel(),
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
                {name: np.ascontiguousarray(getattr(self, name)) for name in _ARRAYS + _BANDS},
                str(tmp),
                metadata={"format": FORMAT_VERSION},
            )
        write_text(path / HEADER_FILE, header + "\n")

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> RangeMap:
        """Read a range map written by :meth:`save` (format ``/2``, or ``/1`` without bands)."""
        path = Path(directory)
        missing = [name for name in (TENSORS_FILE, HEADER_FILE) if not (path / name).is_file()]
        if missing:
            raise RangelensError(
                f"{str(path)!r} is not a saved range map: missing {choices(missing)}"
            )
        header = json.loads((path / HEADER_FILE).read_text(encoding="utf-8"))
        if header.get("format") not in READABLE_FORMATS:
            raise RangelensError(
                f"range map {str(path)!r} has format {header.get('format')!r}; "
                f"valid: {choices(READABLE_FORMATS)}"
            )
        arrays = load_file(str(path / TENSORS_FILE))
        names = _ARRAYS + (_BANDS if header["format"] == FORMAT_VERSION else ())
        absent = [name for name in names if name not in arrays]
        if absent:
            raise RangelensError(f"range map {str(path)!r} lacks arrays {choices(absent)}")
        return cls(
            concepts=header["concepts"],
            metadata=header["metadata"],
            **{name: arrays[name] for name in names},
        )


def _check_bands(
    band_lo: np.ndarray, band_hi: np.ndarray, lo: np.ndarray, hi: np.ndarray, shape: tuple[int, int]
) -> None:
    """Bands are ``(C, k, m >= 1)``, used slots first, each ``lo <= hi``, left to right and
    disjoint, with ``lo`` / ``hi`` their outer ends."""
    for name, array in (("band_lo", band_lo), ("band_hi", band_hi)):
        if array.ndim != 3 or array.shape[:2] != shape or array.shape[2] < 1:
            raise RangelensError(
                f"RangeMap {name} has shape {array.shape}; expected {(*shape, 'm >= 1')}"
            )
    if band_lo.shape != band_hi.shape:
        raise RangelensError(f"band_lo {band_lo.shape} and band_hi {band_hi.shape} differ in shape")
    used = ~np.isnan(band_lo)
    problems = {
        "a NaN in only one of band_lo / band_hi": used != ~np.isnan(band_hi),
        "an unused slot before a used one": ~used[..., :-1] & used[..., 1:],
        "an interval with lo > hi": used & (band_lo > band_hi),
        "intervals out of order or overlapping": used[..., 1:]
        & ~(band_hi[..., :-1] < band_lo[..., 1:]),
    }
    for what, bad in problems.items():
        if bad.any():
            c, r = np.argwhere(bad)[0][:2]
            raise RangelensError(f"RangeMap band of concept row {c}, column {r} has {what}")
    last = np.maximum(used.sum(axis=-1) - 1, 0)[..., None]
    ends = (band_lo[..., 0], np.take_along_axis(band_hi, last, axis=-1)[..., 0])
    for name, given, end in (("lo", lo, ends[0]), ("hi", hi, ends[1])):
        if not np.array_equal(given, end, equal_nan=True):
            raise RangelensError(f"RangeMap {name} differs from the outer end of its bands")


def fit_ranges(
    stats: ConceptStats,
    scores: np.ndarray,
    *,
    tau: float = 2.0,
    p: float = 0.3,
    method: str = "gaussian",
    coverage: float = 0.9545,
    ratio: float = 1.0,
    select: str = "ranking",
    metadata: Mapping[str, Any] | None = None,
) -> RangeMap:
    """Fit each concept's ranges on its top ``p`` share of neurons.

    ``"gaussian"``: ``[mu - tau * sigma, mu + tau * sigma]`` over the concept's rows (NeuronLens;
    the released code uses tau = 2). A neuron with sigma = 0 gets the degenerate range ``[mu, mu]``,
    never the NaN bounds of the reference code (which then silently never masked). ``tau = inf``
    gives ``[-inf, inf]`` everywhere: the neuron-masking baseline. ``"quantile"``: the central
    ``coverage`` interval of the concept's rows, ``[q((1 - coverage) / 2), q((1 + coverage) / 2)]``,
    for neurons that are not Gaussian. ``"density"``: the likelihood-ratio band of
    :func:`rangelens.ranges.bands.density_bands` with threshold ``ratio`` (tau unused), possibly empty or
    several intervals.

    ``select``: ``"ranking"`` keeps the top ``p`` neurons by ``scores`` ``(C, d)``; ``"band"`` keeps
    those whose band separates best, by purity x coverage on the training histograms (ties by
    ``scores``), so ``p`` is the share of neurons worth masking. ``tau``, ``p``, ``method`` (and
    ``coverage``, ``ratio``, ``select`` where they apply) are added to ``metadata``.
    """
    if method not in RANGE_METHODS:
        raise RangelensError(f"unknown range method {method!r}; valid: {choices(RANGE_METHODS)}")
    if select not in SELECTIONS:
        raise RangelensError(f"unknown selection {select!r}; valid: {choices(SELECTIONS)}")
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

    k = top_neurons(scores, p).shape[1]  # also validates p
    if select == "band":
        candidates = np.tile(np.arange(stats.n_neurons, dtype=np.int64), (len(stats.concepts), 1))
    else:
        candidates = top_neurons(scores, p)
    band_lo, band_hi = _bands(stats, candidates, method, tau, coverage, ratio)
    if select == "band":
        separation = np.nan_to_num(band_separation(stats, candidates, band_lo, band_hi), nan=0.0)
        order = np.lexsort((-scores, -separation), axis=-1)[:, :k].astype(np.int64)
        neurons = order
        band_lo = np.take_along_axis(band_lo, order[..., None], axis=1)
        band_hi = np.take_along_axis(band_hi, order[..., None], axis=1)
        width = max(1, int((~np.isnan(band_lo)).sum(axis=-1).max(initial=0)))
        band_lo, band_hi = band_lo[..., :width], band_hi[..., :width]
    else:
        neurons = candidates
    used = (~np.isnan(band_lo)).sum(axis=-1)
    last = np.maximum(used - 1, 0)[..., None]
    fitted: dict[str, Any] = {"tau": float(tau), "p": float(p), "method": method}
    if method == "quantile":
        fitted["coverage"] = float(coverage)
    if method == "density":
        fitted["ratio"] = float(ratio)
    if select != "ranking":
        fitted["select"] = select
    return RangeMap(
        concepts=list(stats.concepts),
        neurons=neurons,
        lo=band_lo[..., 0],
        hi=np.take_along_axis(band_hi, last, axis=-1)[..., 0],
        mean=np.take_along_axis(np.asarray(stats.mean, dtype=np.float64), neurons, axis=1),
        std=np.take_along_axis(np.asarray(stats.std, dtype=np.float64), neurons, axis=1),
        metadata={**(metadata or {}), **fitted},
        band_lo=band_lo,
        band_hi=band_hi,
    )


def _bands(
    stats: ConceptStats, neurons: np.ndarray, method: str, tau: float, coverage: float, ratio: float
) -> tuple[np.ndarray, np.ndarray]:
    """``(band_lo, band_hi)`` ``(C, k, m)`` of ``method`` on ``neurons`` ``(C, k)``."""
    if method == "density":
        return density_bands(stats, neurons, ratio)
    if method == "quantile":
        bounds = np.asarray(stats.quantile([(1 - coverage) / 2, (1 + coverage) / 2]))
        lo = np.take_along_axis(bounds[0], neurons, axis=1)
        hi = np.take_along_axis(bounds[1], neurons, axis=1)
    elif np.isinf(tau):
        lo, hi = np.full(neurons.shape, -np.inf), np.full(neurons.shape, np.inf)
    else:
        mean = np.take_along_axis(np.asarray(stats.mean, dtype=np.float64), neurons, axis=1)
        std = np.take_along_axis(np.asarray(stats.std, dtype=np.float64), neurons, axis=1)
        lo, hi = mean - tau * std, mean + tau * std
    return lo[..., None], hi[..., None]
