"""Erasure figures with 95% bootstrap intervals over texts (percentile bootstrap, Efron 1979).

Per condition the experiment records, for every evaluated test text (once per k-fold repeat), the
predicted class and the gold-label probability, and per general text the summed next-token NLL and
token count. Every figure is a mean over texts (or, for perplexity, a ratio of sums), so one set of
resampling weights gives all of them jointly: the paired difference range - neuron and the average
over concepts come from the same resamples. Classification texts are resampled within their class
(stratified); general texts plainly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

Key = tuple[str, int | None, str | None, float | None, float | None]  # state, concept, site, tau, p
BASE: Key = ("base", None, None, None, None)
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
        return out


def verdict(headline: dict[str, dict[str, Estimate]], n_concepts: int, n_texts: int) -> str:
    """One paragraph: did range masking match neuron masking's erasure, was its collateral lower,
    and what did the random-neuron control do. A difference whose interval includes 0 is a tie."""
    if "range" not in headline or "neuron" not in headline:
        return "Range and neuron masking were not both run; no comparison."
    r, n = headline["range"], headline["neuron"]

    def show(e: Estimate, signed: bool = False, digits: int = 2) -> str:
        lo, hi = e.interval()
        fmt = f"{{:{'+' if signed else ''}.{digits}f}}"
        return f"{fmt.format(e.point)} [{fmt.format(lo)}, {fmt.format(hi)}]"

    def compare(metric: str) -> tuple[str, Estimate]:
        d = r[metric] - n[metric]
        lo, hi = d.interval()
        if not np.isfinite(d.point):
            return "n/a", d
        return ("tie" if lo <= 0 <= hi else "higher" if lo > 0 else "lower"), d

    erase, d_erase = compare("target_drop")
    said = {"tie": "matched", "higher": "exceeded", "lower": "fell short of", "n/a": "n/a"}[erase]
    parts = [
        f"Range masking {said} neuron masking's erasure: target accuracy drop "
        f"{show(r['target_drop'])} vs {show(n['target_drop'])} (difference "
        f"{show(d_erase, True)}{', a tie' if erase == 'tie' else ''})."
    ]
    flip, d_flip = compare("complement_flip")
    drop, d_drop = compare("complement_drop")
    ppl, d_ppl = compare("ppl_change")
    lower = [x for x in (flip, ppl) if x != "n/a"]
    if lower and all(x == "lower" for x in lower):
        collateral = "Its collateral was lower"
    elif any(x == "higher" for x in lower):
        collateral = "Its collateral was not lower"
    elif any(x == "lower" for x in lower):
        collateral = "Its collateral was partly lower"
    else:
        collateral = "Its collateral was not distinguishable from neuron masking's"
    text = (
        f"{collateral}: complement flip rate {show(r['complement_flip'])} vs "
        f"{show(n['complement_flip'])} (difference {show(d_flip, True)}), complement accuracy "
        f"drop {show(r['complement_drop'])} vs {show(n['complement_drop'])} (difference "
        f"{show(d_drop, True)})"
    )
    if ppl != "n/a":
        text += (
            f", perplexity change {show(r['ppl_change'], True, 1)} vs "
            f"{show(n['ppl_change'], True, 1)} (difference {show(d_ppl, True, 1)})"
        )
    parts.append(text + ".")
    if "random" in headline:
        x = headline["random"]
        above = (n["target_drop"] - x["target_drop"]).interval()[0] > 0
        control = "above" if above else "not above"
        parts.append(
            f"The random-neuron control (as many neurons, drawn at random) dropped target accuracy "
            f"by {show(x['target_drop'])} with flip rate {show(x['complement_flip'])}; neuron "
            f"masking's erasure is {control} this control."
        )
    parts.append(
        f"(Averages over {n_concepts} concepts; {n_texts} test texts; 95% bootstrap intervals "
        f"over texts; a difference whose interval includes 0 is a tie.)"
    )
    return " ".join(parts)


# Which direction of each headline effect is better for an eraser: more target drop, less collateral.
BETTER = {"target_drop": 1.0, "complement_drop": -1.0, "complement_flip": -1.0, "ppl_change": -1.0}


def dominance(a: dict[str, Estimate], b: dict[str, Estimate]) -> tuple[str, dict[str, str]]:
    """Pareto comparison of state ``a`` with ``b`` on the headline effects, from the paired
    differences' 95% intervals: per effect ``better`` / ``worse`` / ``tie`` (interval includes 0)
    or ``n/a``; overall ``dominates`` (none worse, one better), ``dominated``, ``trade-off`` or
    ``tie``."""
    calls = {}
    for metric, sign in BETTER.items():
        d = a[metric] - b[metric]
        lo, hi = d.interval()
        if not np.isfinite(d.point) or not np.isfinite(lo):
            calls[metric] = "n/a"
        elif lo <= 0 <= hi:
            calls[metric] = "tie"
        else:
            calls[metric] = "better" if (lo > 0) == (sign > 0) else "worse"
    found = set(calls.values())
    if "better" in found and "worse" not in found:
        return "dominates", calls
    if "worse" in found and "better" not in found:
        return "dominated", calls
    return ("trade-off" if "better" in found else "tie"), calls


def density_verdict(headline: dict[str, dict[str, Estimate]], ratio: float) -> str:
    """Sentences on density bands against range masking and neuron masking (Pareto view)."""
    if "density" not in headline:
        return ""
    d = headline["density"]
    words = {
        "dominates": "Pareto-dominate",
        "dominated": "are Pareto-dominated by",
        "trade-off": "trade off against",
        "tie": "are indistinguishable from",
    }
    parts = []
    for other, label in (("range", "μ ± τσ range masking"), ("neuron", "neuron masking")):
        if other not in headline:
            continue
        overall, calls = dominance(d, headline[other])
        detail = ", ".join(f"{m.replace('_', ' ')} {c}" for m, c in calls.items() if c != "n/a")
        diff = d["target_drop"] - headline[other]["target_drop"]
        lo, hi = diff.interval()
        parts.append(
            f"Density bands (likelihood ratio > {ratio:g}) {words[overall]} {label} "
            f"(target drop {d['target_drop'].point:.2f} vs {headline[other]['target_drop'].point:.2f}, "
            f"difference {diff.point:+.2f} [{lo:+.2f}, {hi:+.2f}]; {detail})."
        )
    return " ".join(parts)
