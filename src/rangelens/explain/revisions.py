"""How the loop and its controls revise modes: :func:`focused` (the loop: the worst-simulated mode
only, from activation-labelled feedback texts) and :func:`blind` (the no-feedback control: edits made
without any text or activation)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from rangelens.explain.evaluation import Evaluator
from rangelens.explain.records import ActivationRecord, NeuronRecord
from rangelens.explain.roles import Component, Mode, Roles
from rangelens.explain.scoring import score_records

Feedback = Callable[[list[Mode]], list[ActivationRecord]]
Proposer = Callable[[list[Mode]], list[list[Mode]]]


def worst_mode(modes: list[Mode], record: NeuronRecord, ev: Evaluator) -> int:
    """Index of the mode whose own explanation simulates the feedback pool worst (correlation)."""
    if len(modes) <= 1:
        return 0
    fits = [score_records(ev.raw(m.explanation, record.feedback), record.feedback) for m in modes]
    return int(np.argmin(fits))


def focused(roles: Roles, record: NeuronRecord, ev: Evaluator, feedback: Feedback) -> Proposer:
    """Revisions of the worst-simulated mode only (the refiner sees that mode and the feedback
    texts; the other modes are kept as they are), and the modes without it."""

    def propose(modes: list[Mode]) -> list[list[Mode]]:
        w = worst_mode(modes, record, ev)
        rest = modes[:w] + modes[w + 1 :]
        out = [
            rest + p for p in roles.refiner.propose([modes[w]], feedback(modes), record, ev.trace)
        ]
        return out + ([rest] if rest else [])

    return propose


def blind(
    roles: Roles, record: NeuronRecord, ev: Evaluator, pool: list[Component], seed: int
) -> Proposer:
    """The no-feedback control's revisions: no text and no activation is shown. The decomposer's
    components not yet used are added (in its order) to a random mode, a random component is
    dropped, and the refiner's structural edits (split, merge) are asked for with no feedback."""
    rng = np.random.default_rng(seed)

    def propose(modes: list[Mode]) -> list[list[Mode]]:
        used = {c.key for m in modes for c in m.components}
        unused = [c for c in pool if c.key not in used]
        out: list[list[Mode]] = []
        if modes and unused:
            m = int(rng.integers(len(modes)))
            for new in (unused[:1], unused[:3]):
                grown = Mode("", "", modes[m].components + new)
                out.append(modes[:m] + [grown] + modes[m + 1 :])
        comps = [(i, c) for i, m in enumerate(modes) for c in m.components]
        if len(comps) > 1:
            i, drop = comps[int(rng.integers(len(comps)))]
            kept = Mode("", "", [c for c in modes[i].components if c is not drop])
            out.append(modes[:i] + [kept] + modes[i + 1 :])
        out = [
            roles.explainer.explain([m for m in p if m.components], record, ev.trace) for p in out
        ]
        return out + roles.refiner.propose(modes, [], record, ev.trace)

    return propose
