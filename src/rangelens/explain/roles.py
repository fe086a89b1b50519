"""The NeuronScope roles (Liu et al., arXiv 2601.03671) as pluggable components, and what they pass
on.

decomposer -> atomic :class:`Component` s of the activating exemplars; clusterer -> candidate
groupings into :class:`Mode` s; explainer -> one explanation per mode (and the single-pass baseline
of Bills et al. 2023 from the top exemplars); simulator -> raw per-token predictions from the
explanation TEXT alone (its signature carries no activations; calibration happens afterwards, in
:mod:`rangelens.explain.scoring`); judge -> delphi-style detection/fuzzing verdicts from the text
alone; scorer -> how well a simulation fits; refiner -> revised modes from the worst-fit feedback
exemplars. Offline implementations live in :mod:`rangelens.explain.offline` and
:mod:`rangelens.explain.lexical`, LLM-backed ones in :mod:`rangelens.explain.llm`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol, TypeVar

import numpy as np

from rangelens.explain.records import ActivationRecord, NeuronRecord
from rangelens.explain.scoring import CorrelationScorer

ComponentKind = Literal["token", "bigram", "after", "phrase"]
T = TypeVar("T")
R = TypeVar("R")


def normalize(token: str) -> str:
    """Matching form of a token or word: stripped and lower-cased (whitespace tokens kept as is)."""
    return token.strip().lower() or token


@dataclass
class Component:
    """An atomic semantic component. ``pattern`` holds normalized token strings: ``token`` matches
    ``pattern[0]`` at the current token, ``bigram`` the two tokens ending here, ``after`` the
    previous token, ``phrase`` any content word of a free-text phrase. ``weight`` is its strength (1
    if unknown); ``sources`` are text indices of the exemplars it came from."""

    text: str
    kind: ComponentKind
    pattern: list[str]
    weight: float = 1.0
    sources: list[int] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.kind}:{'|'.join(self.pattern)}"

    def render(self) -> str:
        return f"after {self.text!r}" if self.kind == "after" else repr(self.text)


@dataclass
class Mode:
    """One semantic mode: its explanation and components, the explain-set exemplars (text indices)
    it accounts for, the activation range ``[lo, hi]`` their peak activations occupy, and its score
    (held-out correlation of this mode's part of the simulation)."""

    label: str
    explanation: str
    components: list[Component]
    exemplars: list[int] = field(default_factory=list)
    lo: float | None = None
    hi: float | None = None
    score: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Mode:
        comps = [Component(**c) for c in data["components"]]
        return cls(**{**data, "components": comps})


@dataclass
class StepFailure:
    """A role step that failed after its retries (the batch goes on without it)."""

    role: str
    target: str
    error: str
    attempts: int


@dataclass
class FailureLog:
    """Failures and LLM exchanges collected while explaining one neuron."""

    failures: list[StepFailure] = field(default_factory=list)

    def fail(self, role: str, target: str, error: str, attempts: int) -> None:
        self.failures.append(StepFailure(role, target, error, attempts))


FanOut = Callable[[Callable[[T], Any], Sequence[T]], list[Any]]


def traced_map(
    fan_out: FanOut[T],
    fn: Callable[[T, FailureLog], R],
    items: Sequence[T],
    trace: FailureLog,
) -> list[R]:
    """``fn(item, log)`` over ``items`` through ``fan_out`` (in parallel, results in order, e.g.
    :meth:`rangelens.explain.clients.LLM.fan_out`), each item's failures added to ``trace`` in
    item order: the log does not depend on which reply came back first."""

    def one(item: T) -> tuple[R, FailureLog]:
        log = FailureLog()
        return fn(item, log), log

    out = fan_out(one, items)
    for _, log in out:
        trace.failures += log.failures
    return [value for value, _ in out]


def explanation_text(modes: Sequence[Mode]) -> str:
    """The one text a simulator or judge reads for a set of modes: each mode's explanation, one
    ``- `` line per mode when there are several; empty when no mode says anything."""
    said = [m.explanation.strip() for m in modes if m.explanation.strip()]
    return said[0] if len(said) == 1 else "\n".join(f"- {e}" for e in said)


class Decomposer(Protocol):
    def decompose(self, record: NeuronRecord, trace: FailureLog) -> list[Component]: ...


class Clusterer(Protocol):
    def candidates(
        self, components: list[Component], record: NeuronRecord, trace: FailureLog
    ) -> list[list[Mode]]: ...


class Explainer(Protocol):
    def explain(self, modes: list[Mode], record: NeuronRecord, trace: FailureLog) -> list[Mode]: ...

    def explain_top(self, record: NeuronRecord, k: int, trace: FailureLog) -> Mode: ...


class Simulator(Protocol):
    """Predict, from the explanation text alone, a raw (uncalibrated) activation for every token of
    each text (``texts[i]`` is its token strings): one array per text, or None where that text's
    simulation failed (recorded in ``trace``; never replaced by zeros)."""

    def simulate(
        self, explanation: str, texts: Sequence[Sequence[str]], trace: FailureLog
    ) -> list[np.ndarray | None]: ...


class Judge(Protocol):
    """Delphi-style judge (Paulo et al. 2024): from the explanation text alone, how likely each text
    is to activate the neuron (detection, ``highlights`` None) or to have its marked tokens be the
    activating ones (fuzzing, ``highlights[i][t]`` marks token t): a score in [0, 1] per text, or
    None where judging that text failed (recorded in ``trace``)."""

    def judge(
        self,
        explanation: str,
        texts: Sequence[Sequence[str]],
        highlights: Sequence[Sequence[bool]] | None,
        trace: FailureLog,
    ) -> list[float | None]: ...


class Scorer(Protocol):
    def score(
        self, simulated: Sequence[np.ndarray | None], records: Sequence[ActivationRecord]
    ) -> float: ...


class Refiner(Protocol):
    def propose(
        self,
        modes: list[Mode],
        worst: list[ActivationRecord],
        record: NeuronRecord,
        trace: FailureLog,
    ) -> list[list[Mode]]: ...


@dataclass
class Roles:
    """One implementation per role; :func:`rangelens.explain.loop.explain_record` drives them."""

    name: str
    decomposer: Decomposer
    clusterer: Clusterer
    explainer: Explainer
    simulator: Simulator
    refiner: Refiner
    scorer: Scorer = field(default_factory=CorrelationScorer)
    judge: Judge | None = None
