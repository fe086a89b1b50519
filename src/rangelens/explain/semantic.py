"""An independent semantic judge that needs no LLM: does an explanation MEAN what the neuron does?

delphi's embedding scorer (Paulo et al. 2024, "Automatically interpreting millions of features in
large language models"): the explanation is the query, held-out texts are the documents, and the
score is the ROC AUC with which the query's cosine similarity to a document tells the activating
texts (maximum at or above the neuron's activating threshold) from the others (random texts and the
near misses of the top-activating half of the held-out pool that stay below the threshold).
Embeddings are mean-pooled, L2-normalised all-MiniLM-L6-v2 (the embedded ``minilm-l6``), so the
judge reads meaning, not word overlap, and shares nothing with the lexical simulator or an LLM.

Every score has a floor: :func:`add_semantic_scores` also scores each neuron's texts with ANOTHER
neuron's explanation by the same method (the mismatched control, ~0.5 when explanations are
specific). An explanation the judge cannot score (empty, longer than the embedding model reads,
no word at all) is a counted failure with its reason, never a number.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.metrics import roc_auc_score

from rangelens.explain.lexical import plain_text
from rangelens.explain.records import ActivationRecord, NeuronRecord

MAX_QUERY_WORDS = 120  # all-MiniLM-L6-v2 was trained on <= 128 word pieces; longer is truncated
JUDGE_NAME = "embedding (all-MiniLM-L6-v2, AUC of similarity)"

Embedder = Callable[[Sequence[str]], np.ndarray]


def unscorable(explanation: str) -> str | None:
    """Why the judge cannot score ``explanation`` (None when it can)."""
    text = explanation.strip()
    if not text:
        return "empty explanation"
    if not re.search(r"\w", text):
        return "no word in the explanation"
    n = len(text.split())
    if n > MAX_QUERY_WORDS:
        return f"too long ({n} words > {MAX_QUERY_WORDS} the embedding model reads)"
    return None


@dataclass
class SemanticVerdict:
    """One explanation judged on one neuron's held-out texts: its AUC, or the failure's reason."""

    auc: float | None
    failure: str | None = None


class SemanticJudge:
    """Scores explanation texts by embedding similarity (see the module docstring). ``embedder``
    maps strings to L2-normalised vectors; by default the embedded minilm-l6, loaded on first use
    (a missing package is a one-line error naming ``rangelens setup``)."""

    name = JUDGE_NAME

    def __init__(self, embedder: Embedder | None = None) -> None:
        if embedder is None:
            from rangelens.explain.offline import MiniLMEmbedder

            embedder = MiniLMEmbedder()
        self.embedder = embedder

    def judge(
        self, explanation: str, records: Sequence[ActivationRecord], threshold: float
    ) -> SemanticVerdict:
        """AUC of the explanation's similarity to ``records`` for telling activating texts
        (maximum ``>= threshold``) from the others; a failure when it cannot be scored or the texts
        hold a single class."""
        reason = unscorable(explanation)
        if reason is not None:
            return SemanticVerdict(None, reason)
        positive = np.array([r.max_activation >= threshold for r in records], dtype=bool)
        if positive.all() or not positive.any():
            return SemanticVerdict(None, "the held-out texts hold a single class")
        query = self.embedder([explanation.strip()])[0]
        docs = self.embedder([plain_text(r.tokens) for r in records])
        return SemanticVerdict(float(roc_auc_score(positive, docs @ query)))


def lookup_list(record: NeuronRecord, n: int = 12, min_count: int = 2) -> str:
    """The lookup table as an explanation a reader (and the judge) can read: the ``n`` words with
    the highest mean activation on the explain pool (seen at least ``min_count`` times)."""
    from rangelens.explain.lexical import segment

    acts: dict[str, list[float]] = {}
    for rec in record.explain_set:
        words = segment(rec.tokens)
        for w, shown in enumerate(words.shown):
            if not re.search(r"\w", shown) or not words.is_word(w):
                continue
            peak = max(a for a, i in zip(rec.activations, words.index, strict=True) if i == w)
            acts.setdefault(shown.lower(), []).append(peak)
    kept = [(float(np.mean(v)), k) for k, v in acts.items() if len(v) >= min_count]
    top = [k for _, k in sorted(kept, reverse=True)[:n]]
    return f"lookup list: {', '.join(top)}" if top else ""


MethodTexts = Callable[[object], str | None]


def add_semantic_scores(
    results: Sequence[object],
    records: Sequence[NeuronRecord],
    judge: SemanticJudge,
    methods: dict[str, MethodTexts],
) -> None:
    """Fill ``semantic_auc`` / ``semantic_mismatched`` / ``semantic_failure`` of each method's
    :class:`~rangelens.explain.evaluation.MethodScores` on every result (``results[i]`` explains
    ``records[i]``). ``methods`` maps a score attribute (``iterative``, ``single_pass``, ...) to
    the explanation text it scored. The mismatched control of neuron i is the explanation of
    neuron i+1 (cyclically) by the same method, judged on neuron i's held-out texts; with a single
    neuron there is no control (None)."""
    n = len(results)
    for key, text_of in methods.items():
        texts = [text_of(r) for r in results]
        for i, (result, record) in enumerate(zip(results, records, strict=True)):
            scores = getattr(result, key, None)
            if scores is None or texts[i] is None:
                continue
            own = judge.judge(texts[i] or "", record.held_out, record.threshold)
            scores.semantic_auc, scores.semantic_failure = own.auc, own.failure
            other = texts[(i + 1) % n] if n > 1 else None
            scores.semantic_mismatched = (
                None if other is None else judge.judge(other, record.held_out, record.threshold).auc
            )
