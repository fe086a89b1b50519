"""The NeuronScope loop (Liu et al., arXiv 2601.03671) and the single-pass baseline (Bills 2023).

decompose -> cluster (candidate groupings, the best on validation is kept) -> explain -> simulate ->
score (the single-pass explanation is the starting point, so a grouping must beat it on validation),
then rounds of refinement from the worst-fit validation exemplars: a revision is kept only if the
validation correlation improves by ``min_delta``; the loop stops at a plateau (``patience`` rounds
without a kept revision) or after ``rounds``. The held-out set is read only once, for the final
report. Modes get the activation range ``[lo, hi]`` of the peak activations of the explain-set
exemplars they account for.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rangelens.errors import RangelensError
from rangelens.explain.records import ActivationRecord, NeuronRecord, write_json
from rangelens.explain.roles import Mode, Roles, StepFailure, Trace, explanation_text
from rangelens.explain.scoring import (
    Calibration,
    CalibrationKind,
    best_threshold,
    detection,
    fit_calibration,
    score_records,
    text_scores,
)

EXPLANATION_FORMAT = "rangelens.explain.neuron/1"


@dataclass
class Round:
    """One step of the loop: what was tried, its validation score, whether it was kept."""

    round: int
    action: str
    validation: float | None
    accepted: bool
    modes: list[Mode]


@dataclass
class MethodScores:
    """Validation and held-out correlation, held-out detection (AUC, balanced accuracy); the
    held-out texts whose simulation failed (left out of the scores); ``empty``: no explanation
    (a failure, scored as chance)."""

    validation: float
    held_out: float
    auc: float
    balanced_accuracy: float
    failed_texts: int = 0
    empty: bool = False
    calibration: str = "linear"


@dataclass
class NeuronExplanation:
    """One neuron's result: modes, the single-pass baseline, scores and the full history."""

    model: str
    site: str
    layer: int | None
    neuron: int
    backend: str
    target: str
    modes: list[Mode]
    iterative: MethodScores
    single_pass_mode: Mode
    single_pass: MethodScores
    history: list[Round] = field(default_factory=list)
    failures: list[StepFailure] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"format": EXPLANATION_FORMAT, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NeuronExplanation:
        d = {k: v for k, v in data.items() if k != "format"}
        d["modes"] = [Mode.from_dict(m) for m in d["modes"]]
        d["single_pass_mode"] = Mode.from_dict(d["single_pass_mode"])
        d["iterative"] = MethodScores(**d["iterative"])
        d["single_pass"] = MethodScores(**d["single_pass"])
        d["history"] = [
            Round(**{**r, "modes": [Mode.from_dict(m) for m in r["modes"]]}) for r in d["history"]
        ]
        d["failures"] = [StepFailure(**f) for f in d["failures"]]
        return cls(**d)

    def save(self, path: str | os.PathLike[str]) -> None:
        write_json(Path(path), self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> NeuronExplanation:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


class Evaluator:
    """Simulate explanations from their text and score them: acceptance (``validation``) on the
    validation pool, the final scores on held-out texts after a calibration fitted on the
    calibration pool (see :mod:`rangelens.explain.scoring`)."""

    def __init__(
        self,
        roles: Roles,
        record: NeuronRecord,
        trace: Trace,
        calibration: CalibrationKind = "linear",
    ) -> None:
        self.roles = roles
        self.record = record
        self.trace = trace
        self.calibration = calibration

    def raw(self, explanation: str, records: Sequence[ActivationRecord]) -> list[np.ndarray | None]:
        """The simulator's raw predictions; an empty explanation fails every text, and a prediction
        of the wrong length counts as a failed text."""
        if not explanation.strip():
            return [None] * len(records)
        preds = self.roles.simulator.simulate(explanation, [r.tokens for r in records], self.trace)
        if len(preds) != len(records):
            self.trace.fail(
                "simulator", "texts", f"{len(preds)} predictions for {len(records)} texts", 1
            )
            return [None] * len(records)
        out: list[np.ndarray | None] = []
        for pred, rec in zip(preds, records, strict=True):
            arr = None if pred is None else np.asarray(pred, dtype=np.float64)
            if arr is not None and (arr.shape != (len(rec.tokens),) or not np.isfinite(arr).all()):
                self.trace.fail(
                    "simulator", f"text {rec.text_index}", "bad prediction shape/value", 1
                )
                arr = None
            out.append(arr)
        return out

    def validation(self, modes: list[Mode]) -> float | None:
        """Correlation on the validation pool; None (a failure) when the explanation is empty or
        every text's simulation failed."""
        recs = self.record.validation
        preds = self.raw(explanation_text(modes), recs)
        if all(p is None for p in preds):
            return None
        return self.roles.scorer.score(preds, recs)

    def calibrate(self, explanation: str) -> tuple[Calibration, list[np.ndarray | None]]:
        """Calibration fitted on the calibration pool only, and the pool's raw predictions."""
        pool = self.record.calibration
        raw = self.raw(explanation, pool)
        return fit_calibration(raw, pool, self.calibration), raw

    def final(self, modes: list[Mode]) -> MethodScores:
        text = explanation_text(modes)
        held_recs = self.record.held_out
        if not text.strip():
            return MethodScores(0.0, 0.0, 0.5, 0.5, failed_texts=len(held_recs), empty=True)
        cal, cal_raw = self.calibrate(text)
        cal_pool = self.record.calibration
        positive = np.array([r.max_activation >= self.record.threshold for r in cal_pool])
        cal_scores = text_scores(cal.apply(cal_raw))
        kept = [i for i, v in enumerate(cal_scores) if v is not None]
        cut = best_threshold(
            np.array([cal_scores[i] for i in kept], dtype=np.float64), positive[kept]
        )
        held = cal.apply(self.raw(text, held_recs))
        det = detection(held, held_recs, self.record.threshold, cut)
        val = self.validation(modes)
        return MethodScores(
            validation=0.0 if val is None else val,
            held_out=self.roles.scorer.score(held, held_recs),
            auc=det.auc,
            balanced_accuracy=det.balanced_accuracy,
            failed_texts=sum(p is None for p in held),
            calibration=self.calibration,
        )

    def worst_fit(self, modes: list[Mode], n: int) -> list[ActivationRecord]:
        """Feedback texts with the largest residual after a linear calibration on those texts."""
        recs = self.record.feedback
        raw = self.raw(explanation_text(modes), recs)
        preds = fit_calibration(raw, recs, "linear").apply(raw)
        mean = float(np.mean([a for r in recs for a in r.activations]))
        errors = [
            float(np.abs(np.asarray(r.activations) - (mean if p is None else p)).max())
            for r, p in zip(recs, preds, strict=True)
        ]
        return [recs[i] for i in np.argsort(errors)[::-1][:n]]


def attach_ranges(modes: list[Mode], record: NeuronRecord, ev: Evaluator) -> list[Mode]:
    """Assign each activating explain-set exemplar to the mode whose own explanation predicts its
    peak highest (above that mode's median prediction); a mode's range is the span of its
    exemplars' peak activations (None when it owns none); its score is the held-out correlation of
    its own explanation, calibrated on the calibration pool."""
    if not modes:
        return modes
    explain = [r for r in record.explain_set if r.max_activation >= record.threshold]
    shares = np.full((len(modes), len(explain)), -np.inf)
    for m, mode in enumerate(modes):
        preds = ev.raw(mode.explanation, explain)
        flat = [p for p in preds if p is not None]
        base = float(np.median(np.concatenate(flat))) if flat else 0.0
        for r, (pred, rec) in enumerate(zip(preds, explain, strict=True)):
            if pred is not None:
                shares[m, r] = float(pred[rec.peak]) - base
    out = []
    for m, mode in enumerate(modes):
        owned = [
            rec
            for r, rec in enumerate(explain)
            if shares[m, r] > 0 and int(np.argmax(shares[:, r])) == m
        ]
        peaks = [rec.max_activation for rec in owned]
        cal, _ = ev.calibrate(mode.explanation)
        held = cal.apply(ev.raw(mode.explanation, record.held_out))
        out.append(
            Mode(
                mode.label,
                mode.explanation,
                mode.components,
                exemplars=[rec.text_index for rec in owned],
                lo=min(peaks) if peaks else None,
                hi=max(peaks) if peaks else None,
                score=score_records(held, record.held_out),
            )
        )
    return out


def _better(score: float | None, best: float | None, margin: float) -> bool:
    """A failed score (None) never wins; any score beats a failed best."""
    return score is not None and (best is None or score > best + margin)


def explain_record(
    record: NeuronRecord,
    roles: Roles,
    *,
    rounds: int = 4,
    patience: int = 2,
    min_delta: float = 5e-3,
    n_worst: int = 4,
    single_pass_k: int | None = None,
) -> NeuronExplanation:
    """Run NeuronScope and the single-pass baseline on one neuron's exemplars."""
    if not record.feedback:
        raise RangelensError(
            f"neuron {record.neuron}'s record has no feedback pool (an old format); rebuild it"
        )
    trace = Trace()
    ev = Evaluator(roles, record, trace)
    history: list[Round] = []
    components = roles.decomposer.decompose(record, trace)
    single = roles.explainer.explain_top(record, single_pass_k or len(record.top), trace)
    best: list[Mode] = [single] if single.explanation.strip() else []
    best_score = ev.validation(best)
    history.append(Round(0, "start from the single-pass explanation", best_score, True, best))
    for grouping in roles.clusterer.candidates(components, record, trace):
        modes = roles.explainer.explain(grouping, record, trace)
        score = ev.validation(modes)
        accepted = _better(score, best_score, 0.0)
        history.append(Round(0, f"cluster into {len(modes)} mode(s)", score, accepted, modes))
        if accepted:
            best, best_score = modes, score
    stale = 0
    for r in range(1, rounds + 1):
        if stale >= patience:
            break
        worst = ev.worst_fit(best, n_worst)
        kept = False
        for proposal in roles.refiner.propose(best, worst, record, trace):
            score = ev.validation(proposal)
            accepted = _better(score, best_score, min_delta)
            history.append(
                Round(r, f"refine to {len(proposal)} mode(s)", score, accepted, proposal)
            )
            if accepted:
                best, best_score, kept = proposal, score, True
        stale = 0 if kept else stale + 1
    return NeuronExplanation(
        model=record.model,
        site=record.site,
        layer=record.layer,
        neuron=record.neuron,
        backend=roles.name,
        target=record.target,
        modes=attach_ranges(best, record, ev),
        iterative=ev.final(best),
        single_pass_mode=attach_ranges([single], record, ev)[0],
        single_pass=ev.final([single]),
        history=history,
        failures=trace.failures,
    )
