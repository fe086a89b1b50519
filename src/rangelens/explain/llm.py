"""LLM-backed NeuronScope roles (Liu et al., arXiv 2601.03671) over any :class:`LLM`.

Exemplar text is untrusted: every exemplar sits between ``<<<TEXT`` and ``TEXT>>>`` markers (markers
inside the text are defanged) and the system prompt says it is data, never instructions. Replies
must be one JSON object checked against a schema (counts, types, finite numbers); explanations are
also guarded against what small models do wrong -- echoing the markers, the prompt's instructions
("Add / Split / Merge / Reword") or the format. A bad reply is sent back with the error and retried;
after the attempts the step is recorded as a failure and skipped.

The explainer prompt is contrastive, as in delphi (Paulo et al. 2024) and NeuronScope: activating
exemplars with their active tokens marked ``[[like this]]``, non-activating exemplars, and hard
negatives (texts that contain the activating tokens without activating), after one worked example.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, get_args

from rangelens.config.explain import SimulatorName
from rangelens.errors import RangelensError, choices
from rangelens.explain.clients import LLM, Message, ReplyError
from rangelens.explain.lexical import plain_text
from rangelens.explain.llm_scoring import LLMJudge, LLMSimulator
from rangelens.explain.prompts import (
    SYSTEM,
    ask_json,
    chat,
    check_explanation,
    check_phrase,
    delimit,
    show_record,
)
from rangelens.explain.records import ActivationRecord, NeuronRecord
from rangelens.explain.roles import Component, FailureLog, Mode, Roles, traced_map


def phrase_components(phrases: Sequence[str], explanation: str = "") -> list[Component]:
    """Free-text components: the given phrases plus phrases quoted in the explanation."""
    quoted = re.findall(r"(?<!\w)[\"'‘“]([^\"'’”]{2,40})[\"'’”](?!\w)", explanation)
    out: dict[str, Component] = {}
    for p in [*phrases, *quoted]:
        key = p.strip().lower()
        if key and key not in out:
            out[key] = Component(p.strip(), "phrase", [key])
    return list(out.values())


def _strings(data: dict[str, Any], key: str, lo: int, hi: int) -> list[str]:
    items = data.get(key)
    if not isinstance(items, list) or not all(isinstance(s, str) and s.strip() for s in items):
        raise ReplyError(f"{key!r} must be a list of non-empty strings")
    if not lo <= len(items) <= hi:
        raise ReplyError(f"{key!r} must have {lo} to {hi} items, got {len(items)}")
    return [s.strip()[:80] for s in items]


def _scale(record: NeuronRecord) -> float:
    return max(r.max_activation for r in record.explain_set)


def contrast_sets(
    record: NeuronRecord, k: int, n_negative: int = 2
) -> tuple[list[ActivationRecord], list[ActivationRecord], list[ActivationRecord]]:
    """From the explain set only: the ``k`` top exemplars, ``n_negative`` non-activating texts (the
    least active below the threshold), and ``n_negative`` hard negatives (non-activating texts that
    share a peak token of the top ones)."""
    top = [r for r in record.top if r.max_activation >= record.threshold][:k] or record.top[:k]
    below = sorted(
        (r for r in record.explain_set if r.max_activation < record.threshold),
        key=lambda r: r.max_activation,
    )
    peaks = {r.tokens[r.peak].strip().lower() for r in top} - {""}
    hard = [r for r in below if peaks & {t.strip().lower() for t in r.tokens}][:n_negative]
    easy = [r for r in below if r not in hard][:n_negative]
    return top, easy, hard


# One worked example, given as an earlier chat turn (small models copy inline examples).
FEW_SHOT: list[Message] = [
    {
        "role": "user",
        "content": "<<<TEXT activating 0\nthe striker scored a late [[goal]] to win\nTEXT>>>\n"
        "<<<TEXT activating 1\ntwo [[goals]] in the first half\nTEXT>>>\n"
        "<<<TEXT not activating although it shares words 0\nhis goal is to retire early\n"
        "TEXT>>>\n\nWhat makes this neuron activate, unlike in the other texts? Reply with a "
        'JSON object with keys "explanation" and "keywords".',
    },
    {
        "role": "assistant",
        "content": '{"explanation": "the noun goal as a score in football, not as an aim", '
        '"keywords": ["goal", "goals"]}',
    },
]
_EXPLAIN_FORMAT = (
    'Reply with a JSON object with keys "explanation" (one sentence naming the words or contexts '
    'the neuron fires on) and "keywords" (a list of the words from the texts it fires on).'
)


def _explanation(data: dict[str, Any]) -> tuple[str, list[str]]:
    text = data.get("explanation")
    if not isinstance(text, str) or not text.strip():
        raise ReplyError("'explanation' must be a non-empty string")
    if "not as an aim" in text or "score in football" in text:
        raise ReplyError("the explanation copies the worked example; describe these texts")
    keywords = _strings(data, "keywords", 1, 12) if "keywords" in data else []
    return check_explanation(text), keywords


class LLMDecomposer:
    """Ask for the atomic semantic components around the peaks of each top exemplar."""

    def __init__(self, llm: LLM, n_exemplars: int = 6) -> None:
        self.llm = llm
        self.n_exemplars = n_exemplars

    def decompose(self, record: NeuronRecord, trace: FailureLog) -> list[Component]:
        scale = _scale(record)
        recs = [r for r in record.top if r.max_activation >= record.threshold][: self.n_exemplars]

        def one(rec: ActivationRecord, log: FailureLog) -> list[Component]:
            prompt = (
                f"{show_record(rec, 'exemplar', scale)}\n\nWhich short words or phrases of this "
                "text, around the marked tokens, make the neuron fire? Reply with a JSON object "
                'whose key "components" lists 1 to 6 of them, copied from the text.'
            )
            found = ask_json(
                self.llm,
                chat(prompt),
                lambda d: [check_phrase(s) for s in _strings(d, "components", 1, 6)],
                role="decomposer",
                target=f"text {rec.text_index}",
                trace=log,
                prefill='{"components": ["',
            )
            comps = phrase_components(found or [])
            for c in comps:
                c.sources = [rec.text_index]
            return comps

        merged: dict[str, Component] = {}
        for comps in traced_map(self.llm.fan_out, one, recs, trace):
            for c in comps:
                if c.key in merged:
                    merged[c.key].sources += c.sources
                else:
                    merged[c.key] = c
        return list(merged.values())


class LLMClusterer:
    """Ask the LLM to group the components into distinct semantic modes (it chooses how many)."""

    def __init__(self, llm: LLM, max_modes: int = 4) -> None:
        self.llm = llm
        self.max_modes = max_modes

    def candidates(
        self, components: list[Component], record: NeuronRecord, trace: FailureLog
    ) -> list[list[Mode]]:
        if len(components) <= 1:
            return [[Mode("", "", list(components))]]
        listing = "\n".join(f"{i}: {c.text}" for i, c in enumerate(components))
        prompt = (
            "Components found around the neuron's activation peaks:\n"
            f"{delimit(listing, 'components')}\n\n"
            f"Sort them into 1 to {self.max_modes} groups of related meaning. Reply with a JSON "
            'object whose key "modes" lists the groups, each an object with a "label" (a short '
            'name of what the group shares) and "components" (the list of its numbers).'
        )

        def validate(data: dict[str, Any]) -> list[Mode]:
            modes = data.get("modes")
            if not isinstance(modes, list) or not 1 <= len(modes) <= self.max_modes:
                raise ReplyError(f"'modes' must be a list of 1 to {self.max_modes} modes")
            out = []
            for m in modes:
                idx = m.get("components") if isinstance(m, dict) else None
                label = m.get("label") if isinstance(m, dict) else None
                if not isinstance(label, str) or not isinstance(idx, list) or not idx:
                    raise ReplyError("each mode needs a 'label' and a non-empty 'components' list")
                if not all(isinstance(i, int) and 0 <= i < len(components) for i in idx):
                    raise ReplyError(f"component numbers must be integers 0..{len(components) - 1}")
                chosen = [components[i] for i in dict.fromkeys(idx)]
                out.append(Mode(check_phrase(label)[:80], "", chosen))
            return out

        modes = ask_json(
            self.llm,
            chat(prompt),
            validate,
            role="clusterer",
            target="modes",
            trace=trace,
            prefill='{"modes": [{"label": "',
        )
        return [modes if modes is not None else [Mode("", "", list(components))]]


class LLMExplainer:
    """One explanation (with keywords) per mode; the single-pass baseline from the top exemplars.
    Both prompts are contrastive (activating, non-activating and hard-negative exemplars) and
    start with a worked example."""

    def __init__(self, llm: LLM, n_shown: int = 4, n_negative: int = 2) -> None:
        self.llm = llm
        self.n_shown = n_shown
        self.n_negative = n_negative

    def _ask(self, prompt: str, target: str, trace: FailureLog) -> tuple[str, list[str]] | None:
        return ask_json(
            self.llm,
            [{"role": "system", "content": SYSTEM}, *FEW_SHOT, {"role": "user", "content": prompt}],
            _explanation,
            role="explainer",
            target=target,
            trace=trace,
            prefill='{"explanation": "',
        )

    def _contrast(self, record: NeuronRecord, shown: list[ActivationRecord]) -> str:
        scale = _scale(record)
        _, easy, hard = contrast_sets(record, len(shown), self.n_negative)
        parts = [show_record(r, f"activating {i}", scale) for i, r in enumerate(shown)]
        parts += [delimit(plain_text(r.tokens), f"not activating {i}") for i, r in enumerate(easy)]
        parts += [
            delimit(plain_text(r.tokens), f"not activating although it shares words {i}")
            for i, r in enumerate(hard)
        ]
        return "\n".join(parts)

    def explain(self, modes: list[Mode], record: NeuronRecord, trace: FailureLog) -> list[Mode]:
        by_index = {r.text_index: r for r in record.explain_set}

        def one(mode: Mode, log: FailureLog) -> Mode:
            sources = dict.fromkeys(s for c in mode.components for s in c.sources)
            shown = [by_index[s] for s in sources if s in by_index][: self.n_shown]
            comps = ", ".join(c.text for c in mode.components)
            prompt = (
                self._contrast(record, shown)
                + "\n\nOne group of this neuron's behaviour has the components: "
                + delimit(comps, "components")
                + f"\nWhat does this group respond to? {_EXPLAIN_FORMAT}"
            )
            got = self._ask(prompt, f"mode {mode.label!r}", log)
            if got is None:
                return Mode(mode.label, comps, mode.components)
            text, keywords = got
            return Mode(
                mode.label,
                text,
                phrase_components([c.text for c in mode.components] + keywords, text),
            )

        return traced_map(self.llm.fan_out, one, modes, trace)

    def explain_top(self, record: NeuronRecord, k: int, trace: FailureLog) -> Mode:
        shown, _, _ = contrast_sets(record, min(k, self.n_shown + 2), self.n_negative)
        prompt = (
            self._contrast(record, shown)
            + f"\n\nWhat makes this neuron activate, unlike in the other texts? {_EXPLAIN_FORMAT}"
        )
        got = self._ask(prompt, "single-pass", trace)
        if got is None:
            return Mode("single-pass", "", [])
        text, keywords = got
        return Mode("single-pass", text, phrase_components(keywords, text))


class LLMRefiner:
    """Show the current modes and the worst-fit exemplars; ask for revised modes."""

    def __init__(self, llm: LLM, max_modes: int = 4) -> None:
        self.llm = llm
        self.max_modes = max_modes

    def propose(
        self,
        modes: list[Mode],
        worst: list[ActivationRecord],
        record: NeuronRecord,
        trace: FailureLog,
    ) -> list[list[Mode]]:
        scale = _scale(record)
        current = "\n".join(f"- {m.label}: {m.explanation}" for m in modes) or "- (none)"
        shown = "\n".join(
            show_record(r, f"badly predicted {i}", scale) for i, r in enumerate(worst)
        )
        prompt = (
            f"Current description of the neuron:\n{delimit(current, 'modes')}\n\nThese texts "
            f"were predicted badly from it:\n{shown}\n\nWrite an improved description as 1 to "
            f'{self.max_modes} modes. Reply with a JSON object whose key "modes" lists them, '
            'each an object with "label" (a short name of what it responds to), "explanation" '
            '(one sentence) and "keywords" (words from the texts it fires on).'
        )

        def validate(data: dict[str, Any]) -> list[Mode]:
            items = data.get("modes")
            if not isinstance(items, list) or not 1 <= len(items) <= self.max_modes:
                raise ReplyError(f"'modes' must be a list of 1 to {self.max_modes} modes")
            out = []
            for m in items:
                if not isinstance(m, dict) or not isinstance(m.get("label"), str):
                    raise ReplyError("each mode needs a 'label' string")
                text, keywords = _explanation(m)
                label = check_phrase(m["label"])[:80]
                out.append(Mode(label, text, phrase_components(keywords, text)))
            return out

        revised = ask_json(
            self.llm,
            chat(prompt),
            validate,
            role="refiner",
            target="modes",
            trace=trace,
            prefill='{"modes": [{"label": "',
        )
        return [] if revised is None else [revised]


def llm_roles(
    llm: LLM, *, name: str = "llm", n_exemplars: int = 6, simulator: str = "llm"
) -> Roles:
    """LLM decomposer, clusterer, explainer and refiner over one :class:`LLM` (its cache, attempts
    and failure counts are shared). The simulator that scores explanations is the LLM itself (one
    call per scored text; ``"llm"``: echo format, ``"llm-list"``: the list format for small models),
    which also judges the held-out texts (delphi detection and fuzzing); the embedding judge scores
    every method beside it (:mod:`rangelens.explain.semantic`). The lexical simulator is refused:
    an LLM's prose is never scored by word matching."""
    simulator = "llm" if simulator == "auto" else simulator
    if simulator == "lexical":
        raise RangelensError(
            "the lexical simulator scores only the offline word lists: an LLM's prose is never "
            "scored by word matching; use simulator 'llm' or 'llm-list'"
        )
    if simulator not in get_args(SimulatorName):
        raise RangelensError(
            f"unknown simulator {simulator!r}; valid: {choices(get_args(SimulatorName))}"
        )
    return Roles(
        name=name,
        decomposer=LLMDecomposer(llm, n_exemplars),
        clusterer=LLMClusterer(llm),
        explainer=LLMExplainer(llm),
        simulator=LLMSimulator(llm, format="list" if simulator == "llm-list" else "echo"),
        refiner=LLMRefiner(llm),
        judge=LLMJudge(llm),
    )
