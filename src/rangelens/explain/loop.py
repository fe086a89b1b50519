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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rangelens.explain.offline import LexicalSimulator
from rangelens.explain.records import ActivationRecord, NeuronRecord, write_json
from rangelens.explain.roles import Mode, Roles, StepFailure, Trace
from rangelens.explain.scoring import best_threshold, detection, score_records

EXPLANATION_FORMAT = "rangelens.explain.neuron/1"


@dataclass
class Round:
    """One step of the loop: what was tried, its validation score, whether it was kept."""

    round: int
    action: str
    validation: float
    accepted: bool
    modes: list[Mode]


@dataclass
class MethodScores:
    """Validation and held-out correlation, held-out detection (AUC, balanced accuracy)."""

    validation: float
    held_out: float
    auc: float
    balanced_accuracy: float


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
    """Simulate and score mode sets on a record's validation / held-out texts."""

    def __init__(self, roles: Roles, record: NeuronRecord, trace: Trace) -> None:
        self.roles = roles
        self.record = record
        self.trace = trace

    def predict(self, modes: list[Mode], records: list[ActivationRecord]) -> list[np.ndarray]:
        if not modes:
            return [np.zeros(len(r.activations)) for r in records]
        sim = self.roles.simulator.simulate(modes, self.record.explain_set, records, self.trace)
        return sim.predictions

    def validation(self, modes: list[Mode]) -> float:
        recs = self.record.validation
        return self.roles.scorer.score(self.predict(modes, recs), recs)

    def final(self, modes: list[Mode]) -> MethodScores:
        val_pred = self.predict(modes, self.record.validation)
        held_pred = self.predict(modes, self.record.held_out)
        positive = np.array(
            [r.max_activation >= self.record.threshold for r in self.record.validation]
        )
        cut = best_threshold(np.array([float(p.max()) for p in val_pred]), positive)
        det = detection(held_pred, self.record.held_out, self.record.threshold, cut)
        return MethodScores(
            validation=self.roles.scorer.score(val_pred, self.record.validation),
            held_out=self.roles.scorer.score(held_pred, self.record.held_out),
            auc=det.auc,
            balanced_accuracy=det.balanced_accuracy,
        )

    def worst_fit(self, modes: list[Mode], n: int) -> list[ActivationRecord]:
        """Validation texts with the largest residual after a linear fit of simulated to true."""
        recs = self.record.validation
        preds = self.predict(modes, recs)
        x, y = np.concatenate(preds), np.concatenate([r.activations for r in recs])
        slope, intercept = np.polyfit(x, y, 1) if np.ptp(x) > 0 else (0.0, float(y.mean()))
        errors = [
            float(np.abs(np.asarray(r.activations) - (slope * p + intercept)).max())
            for r, p in zip(recs, preds, strict=True)
        ]
        return [recs[i] for i in np.argsort(errors)[::-1][:n]]


def attach_ranges(modes: list[Mode], record: NeuronRecord) -> list[Mode]:
    """Assign each activating explain-set exemplar to the mode whose lexicon best explains its peak;
    a mode's range is the span of its exemplars' peak activations; its score is the held-out
    correlation of its own share of the lexical simulation."""
    if not modes:
        return modes
    lexical = LexicalSimulator()
    trace = Trace()
    explain = [r for r in record.explain_set if r.max_activation >= record.threshold]
    sim = lexical.simulate(modes, record.explain_set, explain, trace)
    owners: dict[int, list[ActivationRecord]] = {m: [] for m in range(len(modes))}
    for r, rec in enumerate(explain):
        shares = [float(sim.per_mode[m][r][rec.peak]) for m in range(len(modes))]
        if max(shares) > 0:
            owners[int(np.argmax(shares))].append(rec)
    held = lexical.simulate(modes, record.explain_set, record.held_out, trace)
    out = []
    for m, mode in enumerate(modes):
        peaks = [rec.max_activation for rec in owners[m]]
        out.append(
            Mode(
                mode.label,
                mode.explanation,
                mode.components,
                exemplars=[rec.text_index for rec in owners[m]],
                lo=min(peaks) if peaks else None,
                hi=max(peaks) if peaks else None,
                score=score_records(held.per_mode[m], record.held_out),
            )
        )
    return out


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
    trace = Trace()
    ev = Evaluator(roles, record, trace)
    history: list[Round] = []
    components = roles.decomposer.decompose(record, trace)
    single = roles.explainer.explain_top(record, single_pass_k or len(record.top), trace)
    best: list[Mode] = [single] if single.components else []
    best_score = ev.validation(best)
    history.append(Round(0, "start from the single-pass explanation", best_score, True, best))
    for grouping in roles.clusterer.candidates(components, record, trace):
        modes = roles.explainer.explain(grouping, record, trace)
        score = ev.validation(modes)
        accepted = score > best_score
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
            accepted = score > best_score + min_delta
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
        modes=attach_ranges(best, record),
        iterative=ev.final(best),
        single_pass_mode=attach_ranges([single], record)[0],
        single_pass=ev.final([single]),
        history=history,
        failures=trace.failures,
    )
