"""Erasure figures with 95% bootstrap intervals over texts (percentile bootstrap, Efron 1979).

Per condition the experiment records, for every evaluated test text (once per k-fold repeat), the
predicted class and the gold-label probability, and per general text the summed next-token NLL and
token count. Every figure is a mean over texts (or, for perplexity, a ratio of sums), so one set of
resampling weights gives all of them jointly: the paired difference range - neuron and the average
over concepts come from the same resamples. Classification texts are resampled within their class
(stratified); general texts plainly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

Key = tuple[str, int | None, str | None, float | None, float | None]  # state, concept, site, tau, p
BASE: Key = ("base", None, None, None, None)


def base_key(concept: int) -> Key:
    """The unmasked state seen by a per-concept probe (the ``binary`` concept-vs-rest probe)."""
    return ("base", concept, None, None, None)


DROPS = ("target_drop", "complement_drop", "target_conf_drop", "complement_conf_drop")
HEADLINE = ("target_drop", "complement_drop", "complement_flip", "ppl_change")
LEVEL = 0.95


@dataclass
class Outcomes:
    """Classification outcomes: per condition, per evaluation (text x repeat) ``pred`` and gold
    probability ``gold``; ``text`` (row of each evaluation) and ``labels`` (its gold class)."""

    text: np.ndarray
    labels: np.ndarray
    pred: dict[Key, np.ndarray]
    gold: dict[Key, np.ndarray]
    # The information question (rangelens.erasure.information), where pooled features allow it:
    probe: dict[tuple[str, Key], np.ndarray] = field(default_factory=dict)  # retrained probes
    norm: dict[Key, np.ndarray] = field(default_factory=dict)  # L2 change of each test row


@dataclass
class Perplexities:
    """Per condition, per general text: summed next-token NLL and number of predicted tokens."""

    nll: dict[Key, np.ndarray]
    tokens: np.ndarray


@dataclass
class Estimate:
    """A point estimate and its bootstrap resamples ``(B,)``."""

    point: float
    boot: np.ndarray

    def __sub__(self, other: Estimate) -> Estimate:
        return Estimate(self.point - other.point, self.boot - other.boot)

    def interval(self) -> tuple[float, float]:
        if not np.isfinite(self.boot).any():
            return float("nan"), float("nan")
        tail = (1 - LEVEL) / 2 * 100
        lo, hi = np.nanpercentile(self.boot, [tail, 100 - tail])
        return float(lo), float(hi)

    def cells(self, name: str) -> dict[str, float]:
        lo, hi = self.interval()
        return {name: self.point, f"{name}_lo": lo, f"{name}_hi": hi}


def mean_of(estimates: list[Estimate]) -> Estimate:
    return Estimate(
        float(np.mean([e.point for e in estimates])), np.mean([e.boot for e in estimates], axis=0)
    )


def stratified_weights(labels: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """``(B, n)`` resampling counts of ``n`` texts, resampled within each class."""
    rng = np.random.default_rng(seed)
    weights = np.zeros((n_boot, len(labels)))
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        uniform = np.full(len(members), 1 / len(members))
        weights[:, members] = rng.multinomial(len(members), uniform, size=n_boot)
    return weights


class EffectEstimator:
    """Every per-concept effect estimate of one experiment (points and bootstrap resamples)."""

    def __init__(
        self, outcomes: Outcomes, ppl: Perplexities | None, n_boot: int, seed: int
    ) -> None:
        self.o, self.ppl = outcomes, ppl
        texts, first = np.unique(outcomes.text, return_index=True)
        per_text = stratified_weights(outcomes.labels[first], n_boot, seed)
        self.weights = per_text[:, np.searchsorted(texts, outcomes.text)]  # (B, evaluations)
        if ppl is not None:
            g = len(ppl.tokens)
            rng = np.random.default_rng(seed + 1)
            self.ppl_weights = rng.multinomial(g, np.full(g, 1 / g), size=n_boot).astype(float)

    def _mean(self, values: np.ndarray, select: np.ndarray) -> Estimate:
        if not select.any():
            return Estimate(float("nan"), np.full(len(self.weights), np.nan))
        w = self.weights[:, select]
        v = values[select].astype(float)
        with np.errstate(invalid="ignore", divide="ignore"):
            return Estimate(float(v.mean()), (w @ v) / w.sum(axis=1))

    def level(self, key: Key, concept: int, metric: str) -> Estimate:
        """``target_acc`` / ``complement_acc`` / ``target_conf`` / ``complement_conf`` of a state."""
        group, kind = metric.split("_")
        select = (self.o.labels == concept) if group == "target" else (self.o.labels != concept)
        values = self.o.pred[key] == self.o.labels if kind == "acc" else self.o.gold[key]
        return self._mean(values, select)

    def flip(self, key: Key, concept: int) -> Estimate:
        """Share of other-concept texts whose prediction differs from the unmasked one."""
        return self._mean(self.o.pred[key] != self.o.pred[BASE], self.o.labels != concept)

    def information(self, probe: str, key: Key, concept: int) -> dict[str, Estimate]:
        """A retrained ``probe``'s figures on the edited test rows: ``recall`` (target recall,
        share of the concept's texts predicted as the concept) and ``balanced`` (concept vs rest
        balanced accuracy: the mean of that recall and the share of other texts not predicted as
        the concept; chance 0.5)."""
        if (probe, key) not in self.o.probe and key == BASE:
            key = base_key(concept)
        pred = self.o.probe[(probe, key)]
        target = self.o.labels == concept
        recall = self._mean(pred == concept, target)
        specificity = self._mean(pred != concept, ~target)
        balanced = Estimate(
            (recall.point + specificity.point) / 2, (recall.boot + specificity.boot) / 2
        )
        return {"recall": recall, "balanced": balanced}

    def probes(self) -> list[str]:
        return list(dict.fromkeys(p for p, _ in self.o.probe))

    def edit_norm(self, key: Key) -> Estimate:
        """Mean L2 norm of the edit of a test row at the masked site (every test text)."""
        if key not in self.o.norm:
            return Estimate(float("nan"), np.full(len(self.weights), np.nan))
        return self._mean(self.o.norm[key], np.ones(len(self.o.labels), dtype=bool))

    def perplexity(self, key: Key) -> Estimate:
        if self.ppl is None or key not in self.ppl.nll:
            return Estimate(float("nan"), np.full(len(self.weights), np.nan))
        nll, n = self.ppl.nll[key], self.ppl.tokens
        return Estimate(
            float(np.exp(nll.sum() / n.sum())),
            np.exp((self.ppl_weights @ nll) / (self.ppl_weights @ n)),
        )

    def effects(self, key: Key, concept: int) -> dict[str, Estimate]:
        """Drops base - masked, the complement flip rate and the perplexity change masked - base."""
        out = {}
        for drop in DROPS:
            metric = drop.removesuffix("_drop")
            metric = metric if metric.endswith("conf") else f"{metric}_acc"
            out[drop] = self.level(BASE, concept, metric) - self.level(key, concept, metric)
        out["complement_flip"] = self.flip(key, concept)
        out["ppl_change"] = self.perplexity(key) - self.perplexity(BASE)
        out["target_acc"] = self.level(key, concept, "target_acc")
        for probe in self.probes():
            if (probe, key) in self.o.probe or (
                key == BASE and (probe, base_key(concept)) in self.o.probe
            ):
                for name, e in self.information(probe, key, concept).items():
                    out[f"{probe}_probe_{name}"] = e
        if key in self.o.norm:
            out["edit_norm"] = self.edit_norm(key)
        return out
