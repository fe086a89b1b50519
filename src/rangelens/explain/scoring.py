"""Scores of simulated against true activations, and the calibration fitted before scoring.

A simulator's raw predictions are calibrated (Bills et al. 2023, "Language models can explain
neurons in language models") only after the explanation is fixed, on a calibration pool disjoint
from the scored texts: ``linear`` (least squares, slope clipped at 0 so an explanation is never
rewarded for predicting the opposite of the neuron) or ``percentile`` (the raw values' percentile
ranks mapped onto the calibration pool's activation quantiles).

``correlation`` is OpenAI's "all at once" score: Pearson correlation over the concatenated tokens of
every scored text. ``detection`` asks whether predictions tell activating from non-activating texts
(text level, as EleutherAI's delphi detection scorer): ROC AUC, and balanced accuracy at a decision
threshold fitted on the calibration pool. Texts whose simulation failed (None) are left out of every
score and counted; an empty explanation is a failure, never a score.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from sklearn.metrics import roc_auc_score

from rangelens.explain.records import ActivationRecord

CalibrationKind = Literal["linear", "percentile"]
CALIBRATIONS: tuple[CalibrationKind, ...] = ("linear", "percentile")


def correlation(simulated: np.ndarray, true: np.ndarray) -> float:
    """Pearson correlation; 0.0 (not NaN) when either side is constant or anything is non-finite."""
    x = np.asarray(simulated, dtype=np.float64)
    y = np.asarray(true, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"simulated {x.shape} and true {y.shape} activations differ in shape")
    if x.size < 2 or not (np.isfinite(x).all() and np.isfinite(y).all()):
        return 0.0
    x, y = x - x.mean(), y - y.mean()
    denom = float(np.sqrt((x * x).sum() * (y * y).sum()))
    return float((x * y).sum() / denom) if denom > 0 else 0.0


def _pairs(
    simulated: Sequence[np.ndarray | None], records: Sequence[ActivationRecord]
) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated (prediction, truth) over the texts whose simulation did not fail."""
    if len(simulated) != len(records):
        raise ValueError(f"{len(simulated)} simulations for {len(records)} texts")
    kept = [(s, r) for s, r in zip(simulated, records, strict=True) if s is not None]
    if not kept:
        return np.zeros(0), np.zeros(0)
    sim = np.concatenate([np.asarray(s, dtype=np.float64) for s, _ in kept])
    true = np.concatenate([np.asarray(r.activations, dtype=np.float64) for _, r in kept])
    return sim, true


def score_records(
    simulated: Sequence[np.ndarray | None], records: Sequence[ActivationRecord]
) -> float:
    """Correlation over all tokens of all ``records`` at once (failed texts left out)."""
    sim, true = _pairs(simulated, records)
    return correlation(sim, true) if sim.size else 0.0


class CorrelationScorer:
    """The default scorer role: :func:`score_records` (OpenAI's all-at-once correlation)."""

    def score(
        self, simulated: Sequence[np.ndarray | None], records: Sequence[ActivationRecord]
    ) -> float:
        return score_records(simulated, records)


@dataclass(frozen=True)
class Calibration:
    """A fitted map from raw simulator output to activation units (see the module docstring)."""

    kind: CalibrationKind
    slope: float = 0.0
    intercept: float = 0.0
    raw_points: tuple[float, ...] = field(default_factory=tuple)
    true_points: tuple[float, ...] = field(default_factory=tuple)

    def __call__(self, raw: np.ndarray) -> np.ndarray:
        x = np.asarray(raw, dtype=np.float64)
        if self.kind == "linear" or len(self.raw_points) < 2:
            return self.slope * x + self.intercept
        return np.interp(x, self.raw_points, self.true_points)

    def apply(self, raw: Sequence[np.ndarray | None]) -> list[np.ndarray | None]:
        return [None if r is None else self(r) for r in raw]


def fit_calibration(
    raw: Sequence[np.ndarray | None],
    records: Sequence[ActivationRecord],
    kind: CalibrationKind = "linear",
) -> Calibration:
    """Fit a :class:`Calibration` of ``raw`` predictions to the true activations of ``records``
    (the calibration pool; failed texts left out). With no usable prediction it predicts the
    pool's mean activation everywhere."""
    if kind not in CALIBRATIONS:
        raise ValueError(f"unknown calibration {kind!r}; valid: {', '.join(CALIBRATIONS)}")
    x, y = _pairs(raw, records)
    if y.size == 0:
        y = np.concatenate([np.asarray(r.activations, dtype=np.float64) for r in records])
    mean = float(y.mean()) if y.size else 0.0
    if x.size < 2 or not np.isfinite(x).all() or np.ptp(x) == 0:
        return Calibration(kind, 0.0, mean)
    if kind == "linear":
        xc = x - x.mean()
        slope = max(0.0, float((xc * (y - mean)).sum() / (xc * xc).sum()))
        return Calibration(kind, slope, mean - slope * float(x.mean()))
    values, inverse = np.unique(x, return_inverse=True)
    ranks = np.argsort(np.argsort(x, kind="stable"), kind="stable").astype(np.float64)
    mean_rank = np.bincount(inverse, weights=ranks) / np.bincount(inverse)
    levels = np.quantile(y, mean_rank / (len(x) - 1))
    return Calibration(kind, raw_points=tuple(values.tolist()), true_points=tuple(levels.tolist()))


@dataclass(frozen=True)
class Detection:
    """Text-level detection of activating texts: ROC AUC and balanced accuracy at ``threshold``."""

    auc: float
    balanced_accuracy: float
    threshold: float


def best_threshold(sim_max: np.ndarray, positive: np.ndarray) -> float:
    """The text-score threshold with the best balanced accuracy (fit on the calibration pool)."""
    candidates = np.unique(sim_max)
    if len(candidates) < 2 or positive.all() or not positive.any():
        return float(candidates[0]) if len(candidates) else 0.0
    accs = [_balanced_accuracy(sim_max >= t, positive) for t in candidates]
    return float(candidates[int(np.argmax(accs))])


def _balanced_accuracy(predicted: np.ndarray, positive: np.ndarray) -> float:
    rates = [
        float((predicted[positive == v] == v).mean())
        for v in (True, False)
        if (positive == v).any()
    ]
    return float(np.mean(rates)) if rates else 0.5


def text_scores(simulated: Sequence[np.ndarray | None]) -> list[float | None]:
    """One detection score per text: the maximum predicted activation (None where failed)."""
    return [None if s is None or len(s) == 0 else float(np.max(s)) for s in simulated]


def detection_from_scores(
    scores: Sequence[float | None],
    records: Sequence[ActivationRecord],
    activating: float,
    threshold: float,
) -> Detection:
    """Texts whose true maximum is ``>= activating`` are positives; AUC of ``scores`` (0.5 when only
    one class is present) and balanced accuracy of ``score >= threshold`` (failed texts left out)."""
    kept = [(s, r) for s, r in zip(scores, records, strict=True) if s is not None]
    score = np.array([s for s, _ in kept], dtype=np.float64)
    positive = np.array([r.max_activation >= activating for _, r in kept], dtype=bool)
    auc = 0.5
    if positive.any() and not positive.all() and np.isfinite(score).all():
        auc = float(roc_auc_score(positive, score))
    return Detection(auc, _balanced_accuracy(score >= threshold, positive), threshold)


def detection(
    simulated: Sequence[np.ndarray | None],
    records: Sequence[ActivationRecord],
    activating: float,
    threshold: float,
) -> Detection:
    """:func:`detection_from_scores` on the per-text maximum of the simulation."""
    return detection_from_scores(text_scores(simulated), records, activating, threshold)
