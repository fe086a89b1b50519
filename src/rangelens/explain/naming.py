"""Labels for the offline word-list modes that tell the truth and name the meaning.

A mode's label says what its words share, from data the run already has, in this order:

1. a **category** (``numbers``, ``capitalised words``, ...; :data:`~.lexical.CATEGORIES`) only when
   it is PRECISE: at least 75% of the listed words fit it and, on the explain set, at least half of
   the words that fit it sit at an activation peak (so ``numbers`` is not said of a neuron that
   ignores most numbers). The label never changes what the lexical simulator predicts: it reads
   only the listed items of a ``label: items`` line;
2. the **topic**: the nearest topic words (:data:`TOPICS`) to the mean MiniLM embedding of the
   listed words (cosine at least :data:`TOPIC_MIN`, and at least half of the words themselves at
   cosine :data:`WORD_MIN` or more to it: a centroid of unrelated words names nothing; a second
   topic within 0.05 is named too);
3. the **concept**: the labelled dataset's class shared by the texts the mode's words peak in
   ("politics (82% of exemplars)": at least half of them, at least 3 texts, and 1.5 times the
   class's share of the record's texts);
4. else the word itself for a one-word mode, and ``mixed (no category/concept/topic shared)`` when
   nothing is shared: what was tried is said.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np

from rangelens.explain.lexical import CATEGORIES, _suffix, readable, segment
from rangelens.explain.records import NeuronRecord

TOPICS = tuple(
    [
        "politics",
        "government",
        "elections",
        "parliament",
        "law",
        "crime",
        "police",
        "courts",
        "military",
        "war",
        "terrorism",
        "economy",
        "business",
        "finance",
        "markets",
        "stocks",
        "banking",
        "companies",
        "trade",
        "jobs",
        "taxes",
        "energy",
        "oil",
        "technology",
        "computers",
        "software",
        "internet",
        "phones",
        "games",
        "science",
        "health",
        "medicine",
        "education",
        "sport",
        "football",
        "cricket",
        "rugby",
        "tennis",
        "athletics",
        "olympics",
        "music",
        "film",
        "television",
        "celebrities",
        "awards",
        "books",
        "art",
        "fashion",
        "food",
        "travel",
        "weather",
        "family",
        "religion",
        "money",
        "places",
        "countries",
        "cities",
        "people",
        "time",
    ]  # no category names (numbers, names, ...): those must be precise (above)
)
TOPIC_MIN = 0.65  # set on the MiniLM L5 / SmolLM2 L15 lists, never on benchmark layers
WORD_MIN = 0.45  # a word supports a topic at this cosine; half the listed words must
CATEGORY_SHARE, CATEGORY_PRECISION = 0.75, 0.5
CONCEPT_SHARE, CONCEPT_LIFT, CONCEPT_MIN = 0.5, 1.5, 3
MIXED = "mixed (no category/concept/topic shared)"

Embedder = Callable[[Sequence[str]], np.ndarray]


def category(words: Sequence[str], record: NeuronRecord | None) -> str | None:
    """The first category that is precise for ``words`` on ``record``'s explain set (see the module
    docstring); without a record only the share of listed words is checked."""
    low = [w.strip().lower() or w for w in words]
    if len(low) < 2:
        return None
    need = max(2, int(np.ceil(CATEGORY_SHARE * len(low))))
    named = [(name, pred) for name, _, pred in CATEGORIES]
    for n in (4, 3, 2):
        ends = Counter(w[-n:] for w in low if len(w) > n + 2 and w.isalpha())
        named += [(f"words ending in -{e}", _suffix(e)) for e, k in ends.items() if k >= need]
    for name, pred in named:
        fit = sum(pred(w, s, False) for w, s in zip(low, words, strict=True))
        if fit < need:
            continue
        if record is None or precision(pred, record) >= CATEGORY_PRECISION:
            return name
    return None


def precision(pred: Callable[[str, str, bool], bool], record: NeuronRecord) -> float:
    """Share of the explain set's words fitting ``pred`` whose activation is a peak (at least half
    the activating threshold and half their text's maximum)."""
    hits = peaks = 0
    for rec in record.explain_set:
        words = segment(rec.tokens)
        acts = np.asarray(rec.activations)
        top = max(float(acts.max()), 1e-12)
        for w, (low, shown) in enumerate(zip(words.text, words.shown, strict=True)):
            if not pred(low, shown, w == 0):
                continue
            a = float(acts[words.index == w].max())
            hits += 1
            peaks += a >= 0.5 * record.threshold and a >= 0.5 * top
    return peaks / hits if hits else 0.0


def topic(words: Sequence[str], embedder: Embedder | None) -> str | None:
    """The nearest topic word(s) to the list (``"parliament/government"``), or None."""
    content = [w for w in words if any(c.isalpha() for c in w)]
    if embedder is None or len(content) < 2:
        return None
    vecs = embedder([w.strip().lower() for w in content])  # memoised per word: cheap to re-ask
    query = vecs.mean(0) / max(float(np.linalg.norm(vecs.mean(0))), 1e-12)
    sims = embedder(list(TOPICS)) @ query
    order = np.argsort(-sims)
    support = float((vecs @ embedder([TOPICS[order[0]]])[0] >= WORD_MIN).mean())
    if sims[order[0]] < TOPIC_MIN or support < 0.5:
        return None
    close = [TOPICS[i] for i in order[:2] if sims[i] >= max(TOPIC_MIN, sims[order[0]] - 0.05)]
    return "/".join(close)


def concept(texts: Sequence[int], record: NeuronRecord | None) -> tuple[str, float] | None:
    """The concept most of ``texts`` (text indices) belong to, with its share, when it is shared
    (see the module docstring)."""
    if record is None:
        return None
    every = [
        r
        for pool in (record.top, record.quantiles, record.feedback, record.validation)
        for r in pool
    ]
    labels = {r.text_index: r.concept for r in every if r.concept is not None}
    mine = [labels[t] for t in set(texts) if t in labels]
    if len(mine) < CONCEPT_MIN:
        return None
    name, count = Counter(mine).most_common(1)[0]
    share = count / len(mine)
    base = sum(v == name for v in labels.values()) / len(labels)
    if share >= CONCEPT_SHARE and share >= CONCEPT_LIFT * base:
        return name, share
    return None


def mode_label(
    words: Sequence[str],
    contexts: Sequence[str],
    texts: Sequence[int],
    record: NeuronRecord | None = None,
    embedder: Embedder | None = None,
) -> tuple[str, bool]:
    """The label of a mode listing ``words`` (and ``contexts``: words they follow) whose words peak
    in ``texts``; and whether it is a bare word label (``the word "X"``) that needs no list."""
    parts = [p for p in (category(words, record), topic(words, embedder)) if p]
    shared = concept(texts, record)
    if shared is not None:
        parts.append(f"{shared[0]} ({shared[1]:.0%} of exemplars)")
    if parts:
        return "; ".join(parts), False
    low = {w.strip().lower() or w for w in words}
    if len(low) == 1:
        shown = readable(words[0])
        return f'the {"phrase" if " " in shown else "word"} "{shown}"', True
    if words:
        return MIXED, False
    if contexts:
        return f'words after "{readable(contexts[0])}"', False
    return "no pattern", False
