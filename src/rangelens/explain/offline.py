"""The deterministic offline backend, a LEXICAL BASELINE: NeuronScope's roles without an LLM.

- decomposer: contrastive token / bigram / previous-token features at activation peaks, kept when
  they are over-represented at peaks (binomial z-score against all explain-set tokens); weight =
  shrunk mean activation where the feature occurs;
- clusterer: agglomerative clustering of the components' MiniLM embeddings into K = 1..4 modes (K is
  chosen on validation by the loop);
- explainer: each mode rendered as a readable line ``label: word, word, after "word"`` (subwords
  merged into words, strongest first, the label naming the shared pattern when there is one);
  single-pass baseline: the peak words of the top exemplars (as Bills et al. 2023 explain from
  top-activating contexts);
- simulator: :class:`~rangelens.explain.lexical.LexicalSimulator`, which reads only that text;
- refiner: add components from under-predicted worst-fit exemplars, drop components firing in
  over-predicted ones, split or merge modes.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from sklearn.cluster import AgglomerativeClustering

from rangelens.activations.models import LoadedModel, load_model
from rangelens.explain.lexical import (
    LexicalSimulator,
    Words,
    readable,
    segment,
)
from rangelens.explain.lexical_judge import LexicalJudge
from rangelens.explain.naming import mode_label
from rangelens.explain.records import ActivationRecord, NeuronRecord
from rangelens.explain.roles import Component, ComponentKind, FailureLog, Mode, Roles, normalize


class MiniLMEmbedder:
    """Mean-pooled, L2-normalised all-MiniLM-L6-v2 sentence embeddings, memoised per string."""

    def __init__(self, lm: LoadedModel | None = None) -> None:
        self._lm = lm
        self._memo: dict[str, np.ndarray] = {}

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        missing = sorted({t for t in texts if t not in self._memo})
        if missing:
            if self._lm is None:
                self._lm = load_model("minilm-l6")
            tok = self._lm.tokenizer(missing, padding=True, truncation=True, return_tensors="pt")
            with torch.inference_mode():
                hidden = self._lm.model(**tok).last_hidden_state
            mask = tok["attention_mask"].unsqueeze(-1).float()
            vecs = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
            self._memo.update(zip(missing, vecs.numpy(), strict=True))
        return np.stack([self._memo[t] for t in texts]) if texts else np.zeros((0, 384))


def match(comp: Component, tokens: Sequence[str]) -> np.ndarray:
    """Where ``comp`` occurs in ``tokens`` (token level; the offline roles' own bookkeeping, never
    used to score an explanation)."""
    toks = np.array([normalize(t) for t in tokens], dtype=object)
    out = np.zeros(len(toks), dtype=bool)
    if comp.kind == "token":
        out = toks == comp.pattern[0]
    elif comp.kind == "bigram" and len(toks) > 1:
        out[1:] = (toks[:-1] == comp.pattern[0]) & (toks[1:] == comp.pattern[1])
    elif comp.kind == "after" and len(toks) > 1:
        out[1:] = toks[:-1] == comp.pattern[0]
    return np.asarray(out, dtype=bool)


def _features(
    tokens: Sequence[str], words: Words, t: int
) -> list[tuple[ComponentKind, list[str], str]]:
    """(kind, pattern, readable text) of the offline features at position ``t``: the token (shown
    as its whole word), the bigram ending here (the words it spans) and, at a word start, the
    previous word as context (``after``)."""
    w = int(words.index[t])
    if not words.is_word(w):
        return []  # the tail of a word cut off before the text: a subword fragment, not a word
    feats: list[tuple[ComponentKind, list[str], str]] = [
        ("token", [normalize(tokens[t])], readable(words.shown[w]))
    ]
    if t >= 1 and words.is_word(int(words.index[t - 1])):
        p = int(words.index[t - 1])
        inside = np.flatnonzero((words.index >= p) & (words.index <= w))
        span = (
            " ".join(words.shown[p : w + 1])  # WordPiece tokens carry no spaces
            if words.wordpiece
            else "".join(_merge(tokens[int(i)] for i in inside))
        )
        feats.append(("bigram", [normalize(tokens[t - 1]), normalize(tokens[t])], readable(span)))
        if p != w:
            feats.append(("after", [normalize(tokens[t - 1])], readable(words.shown[p])))
    return feats


def _merge(tokens: Iterable[str]) -> list[str]:
    """Token strings with subword markers resolved (``##ing`` -> ``ing``, ``Ġx`` -> `` x``)."""
    out = []
    for tok in tokens:
        if tok.startswith("##"):
            out.append(tok[2:])
        else:
            out.append(tok.replace("Ġ", " ").replace("▁", " ").replace("Ċ", "\n"))
    return out


def _peaks(rec: ActivationRecord, threshold: float) -> list[int]:
    """Positions at or above half the text's maximum, if the text is activating."""
    top = rec.max_activation
    if top < threshold or top <= 0:
        return []
    return [t for t, a in enumerate(rec.activations) if a >= max(0.5 * top, threshold * 0.5)]


class OfflineDecomposer:
    """Contrastive peak features: over-represented at peaks vs. all explain-set tokens."""

    def __init__(self, max_components: int = 40, min_z: float = 2.0, prior: float = 2.0) -> None:
        self.max_components = max_components
        self.min_z = min_z
        self.prior = prior

    def decompose(self, record: NeuronRecord, trace: FailureLog) -> list[Component]:
        recs = record.explain_set
        mean = float(np.mean([a for r in recs for a in r.activations]))
        seen: dict[str, tuple[ComponentKind, list[str]]] = {}
        shown: dict[str, Counter[str]] = defaultdict(Counter)
        total: dict[str, int] = defaultdict(int)
        act_sum: dict[str, float] = defaultdict(float)
        at_peak: dict[str, int] = defaultdict(int)
        sources: dict[str, set[int]] = defaultdict(set)
        n_all = n_peak = 0
        for rec in recs:
            peaks = set(_peaks(rec, record.threshold))
            words = segment(rec.tokens)
            for t, a in enumerate(rec.activations):
                n_all += 1
                n_peak += t in peaks
                for kind, pattern, text in _features(rec.tokens, words, t):
                    key = f"{kind}:{'|'.join(pattern)}"
                    seen.setdefault(key, (kind, pattern))
                    total[key] += 1
                    act_sum[key] += a
                    if t in peaks:
                        at_peak[key] += 1
                        sources[key].add(rec.text_index)
                        shown[key][text] += 1
        scored = []
        for key, k in at_peak.items():
            p = (total[key] + 0.5) / (n_all + 1.0)
            z = (k - n_peak * p) / np.sqrt(n_peak * p * (1 - p))
            weight = (act_sum[key] + self.prior * mean) / (total[key] + self.prior) - mean
            if k >= 2 and z >= self.min_z and weight > 0:
                scored.append((z, key, weight))
        scored.sort(key=lambda s: -s[0])
        comps = []
        for _, key, weight in scored[: self.max_components]:
            kind, pattern = seen[key]
            text = shown[key].most_common(1)[0][0]
            comps.append(Component(text, kind, pattern, float(weight), sorted(sources[key])))
        return comps


class OfflineClusterer:
    """Components grouped by their MiniLM embeddings into K modes for each K in ``ks``."""

    def __init__(self, embedder: MiniLMEmbedder, ks: Sequence[int] = (1, 2, 3, 4)) -> None:
        self.embedder = embedder
        self.ks = ks

    def candidates(
        self, components: list[Component], record: NeuronRecord, trace: FailureLog
    ) -> list[list[Mode]]:
        return [
            group(components, k, self.embedder) for k in self.ks if k <= max(len(components), 1)
        ]


def _embed_text(c: Component) -> str:
    return c.text if c.kind != "after" else f"after {c.text}"


def group(components: list[Component], k: int, embedder: MiniLMEmbedder) -> list[Mode]:
    """Agglomerative (cosine, average linkage) grouping of components into ``k`` modes."""
    if k <= 1 or len(components) <= 1:
        return [Mode("", "", list(components))]
    vecs = embedder([_embed_text(c) for c in components])
    labels = AgglomerativeClustering(n_clusters=k, metric="cosine", linkage="average").fit_predict(
        vecs
    )
    return [
        Mode("", "", [c for c, lab in zip(components, labels, strict=True) if lab == m])
        for m in range(k)
    ]


class OfflineExplainer:
    """Render each mode as one readable line (see :func:`render`), labelled by what its words share
    (:mod:`rangelens.explain.naming`; topics by ``embedder``)."""

    def __init__(self, embedder: MiniLMEmbedder | None = None) -> None:
        self.embedder = embedder

    def explain(self, modes: list[Mode], record: NeuronRecord, trace: FailureLog) -> list[Mode]:
        return [render(m, record, self.embedder) for m in modes if m.components]

    def explain_top(self, record: NeuronRecord, k: int, trace: FailureLog) -> Mode:
        """The words at the peaks of the top ``k`` exemplars (up to 3 peaks per text)."""
        peaks: dict[str, list[float]] = defaultdict(list)
        texts: dict[str, Counter[str]] = defaultdict(Counter)
        sources: dict[str, set[int]] = defaultdict(set)
        for rec in record.top[:k]:
            acts = np.asarray(rec.activations)
            words = segment(rec.tokens)
            for t in [int(i) for i in np.argsort(-acts)[:3]]:
                w = int(words.index[t])
                if not words.is_word(w):
                    continue  # a subword fragment (the text starts inside a word)
                if acts[t] >= 0.5 * acts.max() and acts.max() > 0:
                    key = normalize(rec.tokens[t])
                    peaks[key].append(float(acts[t]))
                    texts[key][readable(words.shown[w])] += 1
                    sources[key].add(rec.text_index)
        comps = [
            Component(
                texts[key].most_common(1)[0][0],
                "token",
                [key],
                float(np.mean(v)),
                sorted(sources[key]),
            )
            for key, v in peaks.items()
        ]
        return render(Mode("", "", comps), record, self.embedder)


MAX_ITEMS = 12  # words shown per mode


def _quote(text: str) -> str:
    plain = text.replace(" ", "").isalnum() or re.fullmatch(r"[\w'-]+( [\w'-]+)*", text)
    return text if plain else '"' + text.replace('"', "'") + '"'


def render(
    mode: Mode, record: NeuronRecord | None = None, embedder: MiniLMEmbedder | None = None
) -> Mode:
    """``label: item, item, after "word"``: the components' readable words, strongest first and
    without repeats (subword components that share a word collapse into it; a two-word phrase whose
    last word is already listed is left out), at most :data:`MAX_ITEMS`; the label names what they
    share (:func:`rangelens.explain.naming.mode_label`: a precise category, the nearest topic, the
    concept of the texts they peak in)."""
    comps = sorted(mode.components, key=lambda c: -c.weight)
    single = {c.text.lower() for c in comps if c.kind == "token"}
    shown = [
        c
        for c in comps
        if not (
            c.kind == "bigram"
            and c.text.lower().split()[-1:]
            and c.text.lower().split()[-1] in single
        )
    ]

    def item(c: Component) -> str:
        return f"after {_quote(c.text)}" if c.kind == "after" else _quote(c.text)

    items = list(dict.fromkeys(item(c) for c in shown))[:MAX_ITEMS]
    shown = [c for c in shown if item(c) in items]  # the label speaks of what is listed
    words = [c.text for c in shown if c.kind != "after"]
    contexts = [c.text for c in shown if c.kind == "after"]
    texts = sorted({t for c in shown for t in c.sources})
    label, bare = mode_label(words, contexts, texts, record, embedder)
    if len(items) == 1 and bare:
        return Mode(label, label, comps)  # not 'the word "X": X'
    return Mode(label, f"{label}: {', '.join(items)}" if items else "", comps)


class OfflineRefiner:
    """Revisions from the worst-fit exemplars: add their peak features, drop components that fire in
    over-predicted texts, split the largest mode, merge the two closest modes."""

    def __init__(self, embedder: MiniLMEmbedder, max_drops: int = 3) -> None:
        self.embedder = embedder
        self.max_drops = max_drops

    def propose(
        self,
        modes: list[Mode],
        worst: list[ActivationRecord],
        record: NeuronRecord,
        trace: FailureLog,
    ) -> list[list[Mode]]:
        proposals: list[list[Mode]] = []
        known = {c.key for m in modes for c in m.components}
        under = [r for r in worst if r.max_activation >= record.threshold]
        over = [r for r in worst if r.max_activation < record.threshold]
        new = self._peak_components(under, record, known)
        if new:
            tokens_only = [c for c in new if c.kind == "token"]
            proposals.append(self._add(modes, tokens_only))
            proposals.append(self._add(modes, new))
        firing = []
        for comp in (c for m in modes for c in m.components):
            if any(match(comp, r.tokens).any() for r in over):
                firing.append(comp)
        firing.sort(key=lambda c: c.weight)
        for comp in firing[: self.max_drops]:
            proposals.append(
                [replace_components(m, [c for c in m.components if c is not comp]) for m in modes]
            )
        largest = max(modes, key=lambda m: len(m.components), default=None)
        if largest is not None and len(largest.components) >= 4:
            rest = [m for m in modes if m is not largest]
            proposals.append(rest + group(largest.components, 2, self.embedder))
        if len(modes) >= 2:
            cents = np.stack(
                [self.embedder([_embed_text(c) for c in m.components]).mean(0) for m in modes]
            )
            sims = cents @ cents.T - 2 * np.eye(len(modes))
            i, j = np.unravel_index(int(np.argmax(sims)), sims.shape)
            merged = Mode("", "", modes[i].components + modes[j].components)
            proposals.append([m for k, m in enumerate(modes) if k not in (i, j)] + [merged])
        return [[render(m, record, self.embedder) for m in p if m.components] for p in proposals]

    def _peak_components(
        self, recs: list[ActivationRecord], record: NeuronRecord, known: set[str]
    ) -> list[Component]:
        """Peak features of ``recs`` that also occur in the explain set, weighted by explain-set
        statistics."""
        spec: dict[str, Component] = {}
        for rec in recs:
            words = segment(rec.tokens)
            for t in _peaks(rec, record.threshold):
                for kind, pattern, text in _features(rec.tokens, words, t):
                    comp = Component(text, kind, pattern, 1.0, [rec.text_index])
                    if comp.key not in known:
                        spec.setdefault(comp.key, comp)
        explain = record.explain_set
        mean = float(np.mean([a for r in explain for a in r.activations]))
        out = []
        for comp in spec.values():
            hits = np.concatenate(
                [np.asarray(r.activations)[match(comp, r.tokens)] for r in explain]
            )
            if len(hits) == 0:  # no explain-set evidence: would only memorise validation
                continue
            comp.weight = float((hits.sum() + 2 * mean) / (len(hits) + 2) - mean)
            if comp.weight > 0:
                out.append(comp)
        return out

    def _add(self, modes: list[Mode], new: list[Component]) -> list[Mode]:
        if not modes:
            return [Mode("", "", list(new))]
        cents = np.stack(
            [self.embedder([_embed_text(c) for c in m.components]).mean(0) for m in modes]
        )
        target = np.argmax(self.embedder([_embed_text(c) for c in new]) @ cents.T, axis=1)
        return [
            replace_components(
                m, m.components + [c for c, t in zip(new, target, strict=True) if t == i]
            )
            for i, m in enumerate(modes)
        ]


def replace_components(mode: Mode, components: list[Component]) -> Mode:
    """The mode with new components; its label and explanation are re-rendered."""
    return Mode("", "", components)


def offline_roles(embedder: MiniLMEmbedder | None = None) -> Roles:
    """The default deterministic backend."""
    embedder = embedder or MiniLMEmbedder()
    return Roles(
        name="offline",
        decomposer=OfflineDecomposer(),
        clusterer=OfflineClusterer(embedder),
        explainer=OfflineExplainer(embedder),
        simulator=LexicalSimulator(),
        refiner=OfflineRefiner(embedder),
        judge=LexicalJudge(),
    )
