"""The deterministic offline backend: NeuronScope's roles without an LLM (the default).

- decomposer: contrastive token / bigram / previous-token features at activation peaks, kept when
  they are over-represented at peaks (binomial z-score against all explain-set tokens); weight =
  shrunk mean activation where the feature occurs;
- clusterer: agglomerative clustering of the components' MiniLM embeddings into K = 1..4 modes (K is
  chosen on validation by the loop);
- explainer: each mode's lexicon rendered as text; single-pass baseline: the peak tokens of the top
  exemplars (as Bills et al. 2023 explain from top-activating contexts);
- simulator: per token, each mode's strongest matching component and a decaying echo of recent
  matches, calibrated by ridge regression on the explain set only (never on the scored texts);
- refiner: add components from under-predicted worst-fit exemplars, drop components firing in
  over-predicted ones, split or merge modes.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import torch
from sklearn.cluster import AgglomerativeClustering

from rangelens.explain.records import ActivationRecord, NeuronRecord
from rangelens.explain.roles import (
    Component,
    ComponentKind,
    Mode,
    Roles,
    Simulation,
    Trace,
    normalize,
)
from rangelens.models import LoadedModel, load_model

ECHO = 3  # tokens after a match that still get a (halving) share of it
STOPWORDS = frozenset(
    [
        "the",
        "a",
        "an",
        "and",
        "or",
        "of",
        "to",
        "in",
        "on",
        "at",
        "for",
        "with",
        "by",
        "from",
        "as",
        "is",
        "are",
        "was",
        "were",
        "be",
        "been",
        "it",
        "its",
        "this",
        "that",
        "these",
        "those",
        "neuron",
        "fires",
        "activates",
        "activation",
        "tokens",
        "token",
        "words",
        "word",
        "text",
        "texts",
        "about",
        "mode",
        "related",
        "such",
        "like",
        "when",
        "which",
    ]
)


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


def display(text: str) -> str:
    """Readable one-line form of token text (whitespace-only tokens escaped, e.g. ``\\n``)."""
    return text.strip() or text.encode("unicode_escape").decode("ascii")


def _features(tokens: Sequence[str], t: int) -> list[tuple[ComponentKind, list[str], str]]:
    """(kind, pattern, display text) of the offline features at position ``t``."""
    n = normalize(tokens[t])
    feats: list[tuple[ComponentKind, list[str], str]] = [("token", [n], display(tokens[t]))]
    if t >= 1:
        p = normalize(tokens[t - 1])
        feats.append(("bigram", [p, n], display(tokens[t - 1] + tokens[t])))
        feats.append(("after", [p], display(tokens[t - 1])))
    return feats


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

    def decompose(self, record: NeuronRecord, trace: Trace) -> list[Component]:
        recs = record.explain_set
        mean = float(np.mean([a for r in recs for a in r.activations]))
        seen: dict[str, tuple[ComponentKind, list[str], str]] = {}
        total: dict[str, int] = defaultdict(int)
        act_sum: dict[str, float] = defaultdict(float)
        at_peak: dict[str, int] = defaultdict(int)
        sources: dict[str, set[int]] = defaultdict(set)
        n_all = n_peak = 0
        for rec in recs:
            peaks = set(_peaks(rec, record.threshold))
            for t, a in enumerate(rec.activations):
                n_all += 1
                n_peak += t in peaks
                for kind, pattern, text in _features(rec.tokens, t):
                    key = f"{kind}:{'|'.join(pattern)}"
                    seen.setdefault(key, (kind, pattern, text))
                    total[key] += 1
                    act_sum[key] += a
                    if t in peaks:
                        at_peak[key] += 1
                        sources[key].add(rec.text_index)
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
            kind, pattern, text = seen[key]
            comps.append(Component(text, kind, pattern, float(weight), sorted(sources[key])))
        return comps


class OfflineClusterer:
    """Components grouped by their MiniLM embeddings into K modes for each K in ``ks``."""

    def __init__(self, embedder: MiniLMEmbedder, ks: Sequence[int] = (1, 2, 3, 4)) -> None:
        self.embedder = embedder
        self.ks = ks

    def candidates(
        self, components: list[Component], record: NeuronRecord, trace: Trace
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
    """Render each mode's lexicon (strongest first, with weights) as its explanation."""

    def explain(self, modes: list[Mode], record: NeuronRecord, trace: Trace) -> list[Mode]:
        return [render(m) for m in modes if m.components]

    def explain_top(self, record: NeuronRecord, k: int, trace: Trace) -> Mode:
        peaks: dict[str, list[float]] = defaultdict(list)
        texts: dict[str, str] = {}
        for rec in record.top[:k]:
            acts = np.asarray(rec.activations)
            for t in [int(i) for i in np.argsort(-acts)[:3]]:
                if acts[t] >= 0.5 * acts.max() and acts.max() > 0:
                    key = normalize(rec.tokens[t])
                    peaks[key].append(float(acts[t]))
                    texts.setdefault(key, display(rec.tokens[t]))
        comps = [
            Component(texts[key], "token", [key], float(np.mean(v))) for key, v in peaks.items()
        ]
        return render(Mode("single-pass", "", comps))


def render(mode: Mode) -> Mode:
    comps = sorted(mode.components, key=lambda c: -c.weight)
    label = mode.label or " / ".join(
        f"after {c.text}" if c.kind == "after" else c.text for c in comps[:2]
    )
    lexicon = ", ".join(f"{c.render()} ({c.weight:.2f})" for c in comps)
    return Mode(label, f"fires on {lexicon}", comps)


def _content_words(text: str) -> list[str]:
    return [
        w for w in re.findall(r"[a-z0-9']+", text.lower()) if len(w) >= 3 and w not in STOPWORDS
    ]


class LexicalSimulator:
    """Per-token simulation from the modes' lexicons, calibrated by ridge regression on ``fit``.

    For each mode two features: the strongest matching component weight at the token, and an echo
    ``max_d weight(t - d) / 2**(d - 1)`` of matches in the previous :data:`ECHO` tokens.
    """

    def __init__(self, ridge: float = 1e-3) -> None:
        self.ridge = ridge
        self._norm: dict[int, tuple[ActivationRecord, np.ndarray]] = {}

    def _tokens(self, rec: ActivationRecord) -> np.ndarray:
        hit = self._norm.get(id(rec))
        if hit is None or hit[0] is not rec:
            if len(self._norm) > 20_000:  # bounded memo across many neurons
                self._norm.clear()
            hit = (rec, np.array([normalize(t) for t in rec.tokens], dtype=object))
            self._norm[id(rec)] = hit
        return hit[1]

    def match(self, comp: Component, rec: ActivationRecord) -> np.ndarray:
        """0..1 match strength of ``comp`` at every token of ``rec``."""
        toks = self._tokens(rec)
        out = np.zeros(len(toks))
        if comp.kind == "token":
            out[toks == comp.pattern[0]] = 1.0
        elif comp.kind == "bigram" and len(toks) > 1:
            out[1:][(toks[:-1] == comp.pattern[0]) & (toks[1:] == comp.pattern[1])] = 1.0
        elif comp.kind == "after" and len(toks) > 1:
            out[1:][toks[:-1] == comp.pattern[0]] = 1.0
        elif comp.kind == "phrase":
            words = set(_content_words(" ".join(comp.pattern)))
            for t, tok in enumerate(toks):
                if tok in words and len(tok) >= 2:
                    out[t] = 1.0
                elif len(tok) >= 3 and tok.isalpha() and any(w.startswith(tok) for w in words):
                    out[t] = 0.5
        return out

    def features(self, modes: list[Mode], rec: ActivationRecord) -> np.ndarray:
        """``(n_tokens, 2 * n_modes)``: per mode, [match, echo]."""
        n = len(rec.tokens)
        cols = []
        for mode in modes:
            f = np.zeros(n)
            for comp in mode.components:
                np.maximum(f, comp.weight * self.match(comp, rec), out=f)
            echo = np.zeros(n)
            for d in range(1, ECHO + 1):
                np.maximum(echo[d:], f[:-d] / 2 ** (d - 1), out=echo[d:])
            cols += [f, echo]
        return np.stack(cols, axis=1) if cols else np.zeros((n, 0))

    def simulate(
        self,
        modes: list[Mode],
        fit: Sequence[ActivationRecord],
        records: Sequence[ActivationRecord],
        trace: Trace,
    ) -> Simulation:
        x_fit = np.concatenate([self.features(modes, r) for r in fit])
        y_fit = np.concatenate([np.asarray(r.activations) for r in fit])
        x_mean, y_mean = x_fit.mean(0), float(y_fit.mean())
        xc = x_fit - x_mean
        gram = xc.T @ xc + self.ridge * len(xc) * np.eye(xc.shape[1])
        beta = np.linalg.solve(gram, xc.T @ (y_fit - y_mean)) if xc.shape[1] else np.zeros(0)
        preds: list[np.ndarray] = []
        per_mode: list[list[np.ndarray]] = [[] for _ in modes]
        for rec in records:
            x = self.features(modes, rec) - x_mean
            preds.append(y_mean + x @ beta)
            for m in range(len(modes)):
                per_mode[m].append(x[:, 2 * m : 2 * m + 2] @ beta[2 * m : 2 * m + 2])
        return Simulation(preds, per_mode)


class OfflineRefiner:
    """Revisions from the worst-fit exemplars: add their peak features, drop components that fire in
    over-predicted texts, split the largest mode, merge the two closest modes."""

    def __init__(
        self, embedder: MiniLMEmbedder, simulator: LexicalSimulator, max_drops: int = 3
    ) -> None:
        self.embedder = embedder
        self.simulator = simulator
        self.max_drops = max_drops

    def propose(
        self,
        modes: list[Mode],
        worst: list[ActivationRecord],
        record: NeuronRecord,
        trace: Trace,
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
            if any(self.simulator.match(comp, r).any() for r in over):
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
        return [[render(m) for m in p if m.components] for p in proposals]

    def _peak_components(
        self, recs: list[ActivationRecord], record: NeuronRecord, known: set[str]
    ) -> list[Component]:
        """Peak features of ``recs`` that also occur in the explain set, weighted by explain-set
        statistics."""
        spec: dict[str, Component] = {}
        for rec in recs:
            for t in _peaks(rec, record.threshold):
                for kind, pattern, text in _features(rec.tokens, t):
                    comp = Component(text, kind, pattern, 1.0, [rec.text_index])
                    if comp.key not in known:
                        spec.setdefault(comp.key, comp)
        explain = record.explain_set
        mean = float(np.mean([a for r in explain for a in r.activations]))
        out = []
        for comp in spec.values():
            hits = np.concatenate(
                [np.asarray(r.activations)[self.simulator.match(comp, r) > 0] for r in explain]
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
    simulator = LexicalSimulator()
    return Roles(
        name="offline",
        decomposer=OfflineDecomposer(),
        clusterer=OfflineClusterer(embedder),
        explainer=OfflineExplainer(),
        simulator=simulator,
        refiner=OfflineRefiner(embedder, simulator),
    )
