"""Scores of simulated against true activations.

``correlation`` is OpenAI's "all at once" score (Bills et al. 2023): Pearson correlation over the
concatenated tokens of every scored text. ``detection`` asks whether the simulation tells activating
from non-activating texts (text level, maximum activation per text), as EleutherAI's delphi
detection scorer: ROC AUC, and balanced accuracy at a decision threshold chosen elsewhere (on
validation).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.metrics import roc_auc_score

from rangelens.explain.records import ActivationRecord


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


def score_records(simulated: Sequence[np.ndarray], records: Sequence[ActivationRecord]) -> float:
    """Correlation over all tokens of all ``records`` at once."""
    if not records:
        return 0.0
    sim = np.concatenate([np.asarray(s, dtype=np.float64) for s in simulated])
    true = np.concatenate([np.asarray(r.activations, dtype=np.float64) for r in records])
    return correlation(sim, true)


class CorrelationScorer:
    """The default scorer role: :func:`score_records` (OpenAI's all-at-once correlation)."""

    def score(self, simulated: Sequence[np.ndarray], records: Sequence[ActivationRecord]) -> float:
        return score_records(simulated, records)


@dataclass(frozen=True)
class Detection:
    """Text-level detection of activating texts: ROC AUC and balanced accuracy at ``threshold``."""

    auc: float
    balanced_accuracy: float
    threshold: float


def best_threshold(sim_max: np.ndarray, positive: np.ndarray) -> float:
    """The simulated-maximum threshold with the best balanced accuracy (fit on validation)."""
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
    return float(np.mean(rates))


def detection(
    simulated: Sequence[np.ndarray],
    records: Sequence[ActivationRecord],
    activating: float,
    threshold: float,
) -> Detection:
    """Texts whose true maximum is ``>= activating`` are positives; AUC of the simulated maxima
    (0.5 when only one class is present) and balanced accuracy of ``sim_max >= threshold``."""
    sim_max = np.array([float(np.max(s)) for s in simulated])
    positive = np.array([r.max_activation >= activating for r in records])
    auc = 0.5
    if positive.any() and not positive.all() and np.isfinite(sim_max).all():
        auc = float(roc_auc_score(positive, sim_max))
    return Detection(auc, _balanced_accuracy(sim_max >= threshold, positive), threshold)
