"""The comparison protocol: how a fixed explanation (or a baseline) is scored.

Pools are disjoint (:class:`~rangelens.explain.records.NeuronRecord` checks it): candidates are
accepted on ``validation``; the calibration (Bills et al. 2023) of a fixed explanation and the
detection threshold are fitted on the calibration pool (``feedback + validation``); the final scores
come from ``held_out`` only. Held-out scores: all-at-once correlation of the calibrated simulation,
text-level detection from the simulation (AUC, balanced accuracy) and, when a judge is given,
delphi-style detection and fuzzing (Paulo et al. 2024, "Automatically interpreting millions of
features in large language models") from the explanation text alone. An empty explanation is a
failure: chance scores, flagged ``empty``. The per-token lookup table (token -> mean activation on
the explain pool) is the baseline every table shows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from rangelens.explain.records import ActivationRecord, NeuronRecord
from rangelens.explain.roles import FailureLog, Judge, Mode, Roles, explanation_text
from rangelens.explain.scoring import (
    Calibration,
    CalibrationKind,
    Detection,
    best_threshold,
    detection,
    detection_from_scores,
    fit_calibration,
    text_scores,
)

Predictor = Callable[[Sequence[ActivationRecord]], list[np.ndarray | None]]


@dataclass
class MethodScores:
    """Validation (acceptance) and held-out correlation; held-out detection from the simulation
    (AUC, balanced accuracy); judge detection and fuzzing (None without a judge); held-out texts
    whose simulation or judging failed (left out of the scores); ``empty``: no explanation;
    ``semantic_*``: the embedding judge's AUC on the held-out texts (:mod:`.semantic`), the same
    judge's AUC for another neuron's explanation (the mismatched control, the floor) and why it
    could not score this explanation (None when it could)."""

    validation: float
    held_out: float
    auc: float
    balanced_accuracy: float
    failed_texts: int = 0
    empty: bool = False
    calibration: str = "linear"
    judge_auc: float | None = None
    judge_accuracy: float | None = None
    fuzz_auc: float | None = None
    fuzz_accuracy: float | None = None
    judge_failed: int = 0
    semantic_auc: float | None = None
    semantic_mismatched: float | None = None
    semantic_failure: str | None = None


@dataclass(frozen=True)
class LookupTable:
    """Per-token baseline: each token id's mean activation on the explain pool; unseen tokens get
    the pool's mean."""

    means: dict[int, float]
    default: float

    @classmethod
    def fit(cls, records: Sequence[ActivationRecord]) -> LookupTable:
        sums: dict[int, list[float]] = {}
        for rec in records:
            for tok, a in zip(rec.token_ids, rec.activations, strict=True):
                sums.setdefault(int(tok), []).append(float(a))
        every = [a for r in records for a in r.activations]
        return cls({t: float(np.mean(v)) for t, v in sums.items()}, float(np.mean(every)))

    def predict(self, records: Sequence[ActivationRecord]) -> list[np.ndarray | None]:
        return [
            np.array([self.means.get(int(t), self.default) for t in r.token_ids]) for r in records
        ]


def fuzz_set(
    records: Sequence[ActivationRecord], threshold: float, seed: int = 0
) -> tuple[list[ActivationRecord], list[list[bool]], np.ndarray]:
    """Delphi fuzzing texts: each activating text twice, once with its peak tokens (>= half its
    maximum) highlighted (a positive) and once with as many random non-peak tokens (a negative)."""
    rng = np.random.default_rng(seed)
    texts: list[ActivationRecord] = []
    marks: list[list[bool]] = []
    labels: list[bool] = []
    for rec in records:
        acts = np.asarray(rec.activations)
        if rec.max_activation < threshold or rec.max_activation <= 0:
            continue
        peak = acts >= 0.5 * rec.max_activation
        others = np.flatnonzero(~peak)
        if len(others) < peak.sum():
            continue
        wrong = np.zeros(len(acts), dtype=bool)
        wrong[rng.choice(others, int(peak.sum()), replace=False)] = True
        texts += [rec, rec]
        marks += [peak.tolist(), wrong.tolist()]
        labels += [True, False]
    return texts, marks, np.array(labels, dtype=bool)


def judged(scores: Sequence[float | None], positive: np.ndarray) -> Detection:
    """A judge's P(yes) per item against the true labels: AUC and balanced accuracy at 0.5, failed
    items (None) left out (count them with ``scores.count(None)``)."""
    keep = [i for i, s in enumerate(scores) if s is not None]
    recs = [ActivationRecord(["x"], [0], [float(positive[i])], i) for i in keep]
    return detection_from_scores([scores[i] for i in keep], recs, 0.5, 0.5)


class Evaluator:
    """Simulate explanations from their text and score them (see the module docstring)."""

    def __init__(
        self,
        roles: Roles,
        record: NeuronRecord,
        trace: FailureLog,
        calibration: CalibrationKind = "linear",
    ) -> None:
        self.roles = roles
        self.record = record
        self.trace = trace
        self.calibration = calibration
        self._validation: dict[str, float | None] = {}

    def raw(self, explanation: str, records: Sequence[ActivationRecord]) -> list[np.ndarray | None]:
        """The simulator's raw predictions; an empty explanation fails every text, and a prediction
        of the wrong length or with non-finite values counts as a failed text."""
        if not explanation.strip():
            return [None] * len(records)
        preds = self.roles.simulator.simulate(explanation, [r.tokens for r in records], self.trace)
        if len(preds) != len(records):
            msg = f"{len(preds)} predictions for {len(records)} texts"
            self.trace.fail("simulator", "texts", msg, 1)
            return [None] * len(records)
        out: list[np.ndarray | None] = []
        for pred, rec in zip(preds, records, strict=True):
            arr = None if pred is None else np.asarray(pred, dtype=np.float64)
            if arr is not None and (arr.shape != (len(rec.tokens),) or not np.isfinite(arr).all()):
                self.trace.fail("simulator", f"text {rec.text_index}", "bad prediction", 1)
                arr = None
            out.append(arr)
        return out

    def validation(self, modes: list[Mode]) -> float | None:
        """Correlation on the validation (acceptance) pool, memoised per explanation text; None (a
        failure) when the explanation is empty or every text's simulation failed."""
        text = explanation_text(modes)
        if text not in self._validation:
            recs = self.record.validation
            preds = self.raw(text, recs)
            ok = any(p is not None for p in preds)
            self._validation[text] = self.roles.scorer.score(preds, recs) if ok else None
        return self._validation[text]

    def worst_fit(self, modes: list[Mode], n: int) -> list[ActivationRecord]:
        """The ``n`` feedback texts with the largest residual after a linear calibration on the
        feedback pool (what a refiner is shown; never validation or held-out texts)."""
        recs = self.record.feedback
        raw = self.raw(explanation_text(modes), recs)
        preds = fit_calibration(raw, recs, "linear").apply(raw)
        mean = float(np.mean([a for r in recs for a in r.activations]))
        errors = [
            float(np.abs(np.asarray(r.activations) - (mean if p is None else p)).max())
            for r, p in zip(recs, preds, strict=True)
        ]
        return [recs[i] for i in np.argsort(errors, kind="stable")[::-1][:n]]

    def calibrate(self, predict: Predictor) -> tuple[Calibration, list[np.ndarray | None]]:
        """Calibration fitted on the calibration pool only, and that pool's calibrated output."""
        pool = self.record.calibration
        cal = fit_calibration(predict(pool), pool, self.calibration)
        return cal, cal.apply(predict(pool))

    def held_out(self, predict: Predictor) -> list[np.ndarray | None]:
        """Calibrated held-out predictions of ``predict``."""
        cal, _ = self.calibrate(predict)
        return cal.apply(predict(self.record.held_out))

    def scores(self, predict: Predictor, validation: float | None) -> MethodScores:
        """Held-out scores of a predictor after calibration on the calibration pool."""
        rec = self.record
        cal, cal_pred = self.calibrate(predict)
        positive = np.array([r.max_activation >= rec.threshold for r in rec.calibration])
        cal_max = text_scores(cal_pred)
        kept = [i for i, v in enumerate(cal_max) if v is not None]
        cut = best_threshold(np.array([cal_max[i] for i in kept], np.float64), positive[kept])
        held = cal.apply(predict(rec.held_out))
        det = detection(held, rec.held_out, rec.threshold, cut)
        return MethodScores(
            validation=0.0 if validation is None else validation,
            held_out=self.roles.scorer.score(held, rec.held_out),
            auc=det.auc,
            balanced_accuracy=det.balanced_accuracy,
            failed_texts=sum(p is None for p in held),
            calibration=self.calibration,
        )

    def final(self, modes: list[Mode]) -> MethodScores:
        """Held-out scores of a fixed explanation, with the judge's verdicts when there is one."""
        text = explanation_text(modes)
        if not text.strip():
            n = len(self.record.held_out)
            return MethodScores(0.0, 0.0, 0.5, 0.5, failed_texts=n, empty=True)
        out = self.scores(lambda recs: self.raw(text, recs), self.validation(modes))
        if self.roles.judge is not None:
            self._judge(self.roles.judge, text, out)
        return out

    def _judge(self, judge: Judge, text: str, out: MethodScores) -> None:
        rec = self.record
        held = rec.held_out
        verdicts = judge.judge(text, [r.tokens for r in held], None, self.trace)
        det = judged(verdicts, np.array([r.max_activation >= rec.threshold for r in held]))
        out.judge_auc, out.judge_accuracy = det.auc, det.balanced_accuracy
        texts, marks, labels = fuzz_set(held, rec.threshold, seed=rec.neuron)
        fuzz = judge.judge(text, [r.tokens for r in texts], marks, self.trace) if texts else []
        if texts:
            f = judged(fuzz, labels)
            out.fuzz_auc, out.fuzz_accuracy = f.auc, f.balanced_accuracy
        out.judge_failed = sum(v is None for v in [*verdicts, *fuzz])

    def lookup(self) -> MethodScores:
        """The per-token lookup-table baseline, fitted on the explain pool."""
        table = LookupTable.fit(self.record.explain_set)
        preds = table.predict(self.record.validation)
        return self.scores(table.predict, self.roles.scorer.score(preds, self.record.validation))
