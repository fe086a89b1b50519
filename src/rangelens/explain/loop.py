"""The NeuronScope loop (Liu et al., arXiv 2601.03671) against its baselines, on equal terms.

Iterative: decompose -> cluster (candidate groupings) -> explain -> simulate -> score on the
validation pool; the single-pass explanation of the top exemplars is one more starting candidate,
and the best of them is kept (best-so-far). Then rounds of refinement from the worst-fit texts of
the FEEDBACK pool: only the mode whose own simulation fits the feedback pool worst is revised (or
dropped), the other modes are kept as they are, and a revision is kept only if its validation
correlation beats the best so far by ``min_delta``; the loop stops at a plateau (``patience``
rounds without a kept revision) or after ``rounds``. (Before, the loop never started from the
single-pass candidate and revised every mode at once: its candidates were weaker than single-pass
ones on its own acceptance pool.)

Baselines, each scored by :mod:`rangelens.explain.evaluation` on the same held-out texts:
single-pass (Bills et al. 2023) with an EQUAL BUDGET: as many candidates as the loop scored, each
from a different sample of the top exemplars, the best kept on the same validation pool (the first
candidate alone is reported too); a best-of-N control: the same loop with the refiner shown random
feedback texts instead of the worst-fit ones (it tests worst-fit SELECTION); a no-feedback
control: from the same start, as many revisions as the loop scored, made without any
activation-labelled feedback (blind edits: the decomposer's unused components added, a random
component dropped, modes split or merged), accepted on the same validation pool (it tests whether
feedback helps at all); the per-token lookup table. Modes get the activation
range ``[lo, hi]`` of the peak activations of the explain-set exemplars they account for.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from rangelens.errors import RangelensError
from rangelens.explain.evaluation import Evaluator, MethodScores
from rangelens.explain.records import ActivationRecord, NeuronRecord, write_json
from rangelens.explain.revisions import Feedback, Proposer, blind, focused
from rangelens.explain.roles import (
    Component,
    FailureLog,
    Mode,
    Roles,
    StepFailure,
    explanation_text,
)
from rangelens.explain.scoring import CalibrationKind, score_records
from rangelens.explain.semantic import SemanticJudge, add_semantic_scores, lookup_list

EXPLANATION_FORMAT = "rangelens.explain.neuron/2"
SCORED = ("iterative", "single_pass", "single_pass_first", "control", "nofeedback", "lookup")


@dataclass
class Round:
    """One step of the loop: what was tried, its validation score (None: failed), whether kept."""

    round: int
    action: str
    validation: float | None
    accepted: bool
    modes: list[Mode]


def _scores(data: dict[str, Any] | None) -> MethodScores | None:
    return None if data is None else MethodScores(**data)


@dataclass
class NeuronExplanation:
    """One neuron's result: modes, the baselines, their scores and the loop's history.

    ``single_pass`` is the equal-budget single-pass baseline (best of ``n_candidates``),
    ``single_pass_first`` its first candidate alone; ``control`` the random-feedback best-of-N
    control; ``nofeedback`` the no-feedback control (blind edits, same budget); ``lookup`` the
    per-token lookup table (a reference ceiling, not a competitor: a short explanation cannot carry
    a per-token table) and ``lookup_text`` its top words as a list a judge can read;
    ``simulator`` / ``judge`` name what produced the correlation / detection numbers."""

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
    n_candidates: int = 0
    single_pass_first: MethodScores | None = None
    control_modes: list[Mode] = field(default_factory=list)
    control: MethodScores | None = None
    lookup: MethodScores | None = None
    nofeedback_modes: list[Mode] = field(default_factory=list)
    nofeedback: MethodScores | None = None
    lookup_text: str = ""
    simulator: str = "lexical"
    judge: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"format": EXPLANATION_FORMAT, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NeuronExplanation:
        d = {k: v for k, v in data.items() if k != "format"}
        for key in ("modes", "control_modes", "nofeedback_modes"):
            d[key] = [Mode.from_dict(m) for m in d.get(key, [])]
        d["single_pass_mode"] = Mode.from_dict(d["single_pass_mode"])
        for key in SCORED:
            d[key] = _scores(d.get(key))
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


def attach_ranges(modes: list[Mode], record: NeuronRecord, ev: Evaluator) -> list[Mode]:
    """Give each mode the activating explain-set exemplars whose peak its own explanation predicts
    (above that mode's median prediction; an exemplar may belong to several modes), else the
    activating texts its components were found in, strongest first; a mode's range is the span of
    its exemplars' peak activations (None only when it has no activating exemplar at all); its
    score is the held-out correlation of its own explanation, calibrated on the calibration pool."""
    if not modes:
        return modes
    explain = [r for r in record.explain_set if r.max_activation >= record.threshold]
    out = []
    for mode in modes:
        preds = ev.raw(mode.explanation, explain)
        flat = [p for p in preds if p is not None]
        base = float(np.median(np.concatenate(flat))) if flat else 0.0
        owned = [
            rec
            for pred, rec in zip(preds, explain, strict=True)
            if pred is not None and float(pred[rec.peak]) > base
        ]
        if not owned:
            found = {t for c in mode.components for t in c.sources}
            owned = [rec for rec in explain if rec.text_index in found]
        owned.sort(key=lambda rec: -rec.max_activation)
        peaks = [rec.max_activation for rec in owned]
        held = ev.held_out(partial(ev.raw, mode.explanation))
        out.append(
            replace(
                mode,
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


def refine(
    start: tuple[list[Mode], float | None],
    record: NeuronRecord,
    ev: Evaluator,
    propose: Proposer,
    *,
    rounds: int,
    patience: int,
    min_delta: float,
    history: list[Round],
    budget: int | None = None,
) -> tuple[list[Mode], int]:
    """Refinement rounds from ``start`` (best-so-far kept); returns the best modes and the
    candidates scored (at most ``budget`` when given, then without the plateau stop)."""
    best, best_score = start
    stale = n = r = 0
    while best:
        r += 1
        if budget is None and (r > rounds or stale >= patience):
            break
        if budget is not None and (n >= budget or r > 10 * max(rounds, 1)):
            break
        kept = False
        for proposal in propose(best):
            if budget is not None and n >= budget:
                break
            score = ev.validation(proposal)
            n += 1
            accepted = _better(score, best_score, min_delta)
            history.append(
                Round(r, f"refine to {len(proposal)} mode(s)", score, accepted, proposal)
            )
            if accepted:
                best, best_score, kept = proposal, score, True
        stale = 0 if kept else stale + 1
    return best, n


def single_pass_candidates(
    record: NeuronRecord, roles: Roles, n: int, k: int, trace: FailureLog
) -> list[Mode]:
    """``n`` single-pass explanations: the first from the top ``k`` exemplars, the others each
    from a seeded random sample of 60% of the top exemplars."""
    out = [roles.explainer.explain_top(record, k, trace)]
    top = record.top
    size = max(2, int(np.ceil(0.6 * len(top))))
    for i in range(1, n):
        pick = np.sort(np.random.default_rng(i).choice(len(top), min(size, len(top)), False))
        sub = replace(record, top=[top[j] for j in pick], quantiles=list(record.quantiles))
        out.append(roles.explainer.explain_top(sub, min(k, len(sub.top)), trace))
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
    calibration: CalibrationKind = "linear",
    controls: bool = True,
) -> NeuronExplanation:
    """Run NeuronScope and its baselines on one neuron's exemplars (see the module docstring);
    ``controls=False`` skips the random-feedback control (the lookup table is always scored)."""
    if not record.feedback:
        raise RangelensError(
            f"neuron {record.neuron}'s record has no feedback pool (an old format); rebuild it"
        )
    trace = FailureLog()
    ev = Evaluator(roles, record, trace, calibration)
    history: list[Round] = []
    components: list[Component] = roles.decomposer.decompose(record, trace)
    k = single_pass_k or len(record.top)
    starts = [
        roles.explainer.explain(g, record, trace)
        for g in roles.clusterer.candidates(components, record, trace)
    ]
    first = roles.explainer.explain_top(record, k, trace)
    starts.append([first] if first.explanation.strip() else [])
    best: list[Mode] = []
    best_score: float | None = None
    for i, modes in enumerate(starts):
        score = ev.validation(modes)
        accepted = _better(score, best_score, 0.0)
        what = "single-pass start" if i == len(starts) - 1 else f"cluster into {len(modes)} mode(s)"
        history.append(Round(0, what, score, accepted, modes))
        if accepted:
            best, best_score = modes, score
    n_first = len(starts)
    knobs: dict[str, Any] = {"rounds": rounds, "patience": patience, "min_delta": min_delta}
    worst: Feedback = lambda modes: ev.worst_fit(modes, n_worst)  # noqa: E731
    final, n_refined = refine(
        (best, best_score), record, ev, focused(roles, record, ev, worst), history=history, **knobs
    )
    n_candidates = max(1, n_first + n_refined)

    candidates = [first] + single_pass_candidates(record, roles, n_candidates, k, trace)[1:]
    scored = [(ev.validation([c]), i) for i, c in enumerate(candidates)]
    pick = max(scored, key=lambda s: (s[0] is not None, s[0] or 0.0, -s[1]))[1]
    single = candidates[pick]

    control_modes: list[Mode] = []
    control = nofeedback = None
    nofeedback_modes: list[Mode] = []
    if controls:
        rng = np.random.default_rng(record.neuron)
        fb = record.feedback

        def shuffled(modes: list[Mode]) -> list[ActivationRecord]:
            return [fb[i] for i in rng.choice(len(fb), min(n_worst, len(fb)), replace=False)]

        control_modes, _ = refine(
            (best, best_score),
            record,
            ev,
            focused(roles, record, ev, shuffled),
            history=[],
            **knobs,
        )
        control = ev.final(control_modes)
        nofeedback_modes, _ = refine(
            (best, best_score),
            record,
            ev,
            blind(roles, record, ev, components, record.neuron),
            history=[],
            budget=n_refined,
            **knobs,
        )
        nofeedback = ev.final(nofeedback_modes)
    return NeuronExplanation(
        model=record.model,
        site=record.site,
        layer=record.layer,
        neuron=record.neuron,
        backend=roles.name,
        target=record.target,
        modes=attach_ranges(final, record, ev),
        iterative=ev.final(final),
        single_pass_mode=attach_ranges([single], record, ev)[0],
        single_pass=ev.final([single]),
        history=history,
        failures=trace.failures,
        n_candidates=n_candidates,
        single_pass_first=ev.final([candidates[0]]),
        control_modes=control_modes,
        control=control,
        lookup=ev.lookup(),
        nofeedback_modes=attach_ranges(nofeedback_modes, record, ev),
        nofeedback=nofeedback,
        lookup_text=lookup_list(record),
        simulator=getattr(roles.simulator, "name", type(roles.simulator).__name__),
        judge=getattr(roles.judge, "name", type(roles.judge).__name__) if roles.judge else "",
    )


# The explanation text each scored method stands for (the semantic judge reads it).
METHOD_TEXTS: dict[str, Callable[[NeuronExplanation], str | None]] = {
    "iterative": lambda e: explanation_text(e.modes),
    "single_pass": lambda e: e.single_pass_mode.explanation,
    "control": lambda e: explanation_text(e.control_modes) if e.control is not None else None,
    "nofeedback": lambda e: (
        explanation_text(e.nofeedback_modes) if e.nofeedback is not None else None
    ),
    "lookup": lambda e: e.lookup_text,
}


def judge_semantics(
    results: Sequence[NeuronExplanation], records: Sequence[NeuronRecord], judge: SemanticJudge
) -> None:
    """Every method of every result scored by the semantic judge, each with its mismatched
    control (another neuron's explanation by the same method; :mod:`.semantic`)."""
    methods = {k: (lambda e, f=f: f(e)) for k, f in METHOD_TEXTS.items()}
    add_semantic_scores(results, records, judge, methods)  # type: ignore[arg-type]
