"""The erasure verdicts: sentences derived from the same 95% intervals they print.

A paired difference whose interval includes 0 is a tie; a figure not measured for a model (the
perplexity change of an encoder) is left out, never printed as ``nan``. Behaviour (the frozen
head's target accuracy drop) and information (what a probe retrained on edited rows still reads,
:mod:`rangelens.erasure.information`) are stated separately: a frozen head that fails while a
retrained probe recovers the concept means the concept is *hidden*, not erased; a frozen head whose
target accuracy falls below chance is *redirected* (the concept's texts are sent to other classes).
"""

from __future__ import annotations

import numpy as np

from rangelens.erasure.metrics import Estimate

# Which direction of each headline effect is better for an eraser: more target drop, less collateral.
BETTER = {"target_drop": 1.0, "complement_drop": -1.0, "complement_flip": -1.0, "ppl_change": -1.0}
COLLATERAL = (
    ("complement_flip", "complement flip rate", 2),
    ("complement_drop", "complement accuracy drop", 2),
    ("ppl_change", "perplexity change", 1),
)
NAMES = {
    "range": "Range masking",
    "neuron": "Neuron masking",
    "density": "Density bands",
    "leace": "LEACE",
    "random": "The random control",
}
PROBE_NAMES = {"linear": "linear", "binary": "concept-vs-rest linear", "mlp": "MLP"}


def possessive(name: str) -> str:
    return f"{name}'" if name.endswith("s") else f"{name}'s"


def show(e: Estimate, signed: bool = False, digits: int = 2) -> str:
    """``point [lo, hi]``."""
    lo, hi = e.interval()
    fmt = f"{{:{'+' if signed else ''}.{digits}f}}"
    return f"{fmt.format(e.point)} [{fmt.format(lo)}, {fmt.format(hi)}]"


def measured(e: Estimate | None) -> bool:
    return e is not None and bool(np.isfinite(e.point))


def call(d: Estimate) -> str:
    """``higher`` / ``lower`` (interval excludes 0), ``tie`` or ``n/a`` (not measured)."""
    lo, hi = d.interval()
    if not np.isfinite(d.point) or not np.isfinite(lo):
        return "n/a"
    return "tie" if lo <= 0 <= hi else "higher" if lo > 0 else "lower"


def _listing(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def collateral(a: dict[str, Estimate], b: dict[str, Estimate], name_a: str, name_b: str) -> str:
    """One sentence comparing the collateral of ``a`` with ``b`` on every measured collateral
    figure: lower / higher / not distinguishable per figure, then the figures themselves."""
    calls: dict[str, str] = {}
    details = []
    for metric, label, digits in COLLATERAL:
        if not (measured(a.get(metric)) and measured(b.get(metric))):
            continue
        d = a[metric] - b[metric]
        calls[label] = call(d)
        signed = metric == "ppl_change"
        details.append(
            f"{label} {show(a[metric], signed, digits)} vs {show(b[metric], signed, digits)} "
            f"(difference {show(d, True, digits)})"
        )
    if not calls:
        return ""
    lower = [m for m, c in calls.items() if c == "lower"]
    higher = [m for m, c in calls.items() if c == "higher"]
    ties = [m for m, c in calls.items() if c == "tie"]
    if not lower and not higher:
        judged = f"was not distinguishable from {possessive(name_b)}"
    else:
        said = []
        if lower:
            said.append(f"lower on {_listing(lower)}")
        if higher:
            said.append(f"higher on {_listing(higher)}")
        judged = f"was {' but '.join(said)} than {possessive(name_b)}"
        if ties:
            judged += f" (a tie on {_listing(ties)})"
    return f"{possessive(name_a)} collateral {judged}: {'; '.join(details)}."


def erasure_call(a: dict[str, Estimate], b: dict[str, Estimate], name_a: str, name_b: str) -> str:
    d = a["target_drop"] - b["target_drop"]
    c = call(d)
    said = {"tie": "matched", "higher": "exceeded", "lower": "fell short of", "n/a": "n/a"}[c]
    return (
        f"{name_a} {said} {possessive(name_b)} erasure: target accuracy drop {show(a['target_drop'])} vs "
        f"{show(b['target_drop'])} (difference {show(d, True)}{', a tie' if c == 'tie' else ''})."
    )


def information(
    state: str, e: dict[str, Estimate], base: dict[str, Estimate], chance: float
) -> str:
    """Behaviour and information of one state: erased, hidden, redirected or not erased, with the
    frozen head's drop and what each retrained probe recovers (vs its unmasked figure)."""
    name = NAMES.get(state, state)
    drop = call(e["target_drop"]) == "higher"
    acc = e.get("target_acc")
    redirected = acc is not None and measured(acc) and acc.interval()[1] < chance
    probes = [p for p in PROBE_NAMES if measured(e.get(f"{p}_probe_balanced"))]
    if not probes:
        return ""
    readable = [p for p in probes if e[f"{p}_probe_balanced"].interval()[0] > 0.5]
    recovered = "; ".join(
        f"a retrained {PROBE_NAMES[p]} probe recovers target recall "
        f"{show(e[f'{p}_probe_recall'])} (unmasked {show(base[f'{p}_probe_recall'])}), "
        f"concept-vs-rest balanced accuracy {show(e[f'{p}_probe_balanced'])}"
        for p in probes
    )
    if not readable:
        what = "erased for every retrained probe (balanced accuracy not above chance 0.5)"
    elif len(readable) < len(probes):
        gone = [PROBE_NAMES[p] for p in probes if p not in readable]
        what = f"erased for the {_listing(gone)} probe only, hidden from the others"
    elif drop:
        what = "hidden, not erased: the frozen head fails but the concept stays decodable"
    else:
        what = "not erased: neither the frozen head nor a retrained probe loses the concept"
    head = f"frozen-head target accuracy drop {show(e['target_drop'])}"
    if redirected and acc is not None:
        what = "redirected, " + what
        head += (
            f", to {show(acc)}, below chance {chance:.2f}: the concept's texts are sent to "
            f"other classes rather than made unreadable"
        )
    return f"{name}: {what} ({head}; {recovered})."


def verdict(
    headline: dict[str, dict[str, Estimate]],
    n_concepts: int,
    n_texts: int,
    *,
    base: dict[str, Estimate] | None = None,
    chance: float = 0.0,
) -> str:
    """One paragraph: range vs neuron masking's erasure and collateral, the random control (its
    erasure, and collateral ties with range masking), then behaviour and information of every
    state. ``base``: the unmasked probes' average figures; ``chance``: the frozen head's chance
    target accuracy (1 / number of classes)."""
    parts = []
    r, n = headline.get("range"), headline.get("neuron")
    if r is not None and n is not None:
        parts.append(erasure_call(r, n, "Range masking", "neuron masking"))
        parts.append(collateral(r, n, "Range masking", "neuron masking"))
    else:
        parts.append("Range and neuron masking were not both run; no comparison between them.")
    if "random" in headline:
        x = headline["random"]
        parts.append(
            f"The random-neuron control (as many neurons, drawn at random) dropped target "
            f"accuracy by {show(x['target_drop'])} with flip rate {show(x['complement_flip'])}."
        )
        if n is not None:
            above = call(n["target_drop"] - x["target_drop"]) == "higher"
            parts.append(f"Neuron masking's erasure is {'above' if above else 'not above'} it.")
        for state in ("range", "density"):
            if state in headline:
                parts.append(collateral(headline[state], x, NAMES[state], "the random control"))
    if "leace" in headline and r is not None:
        parts.append(erasure_call(r, headline["leace"], "Range masking", "LEACE"))
        parts.append(collateral(r, headline["leace"], "Range masking", "LEACE"))
    if base is not None:
        parts += [information(s, e, base, chance) for s, e in headline.items()]
    parts.append(
        f"(Averages over {n_concepts} concepts; {n_texts} test texts; 95% bootstrap intervals "
        f"over texts; a difference whose interval includes 0 is a tie.)"
    )
    return " ".join(p for p in parts if p)


def curve(diffs: dict[float, dict[str, Estimate]], headline_tau: float) -> str:
    """The tau curve as paired differences range - neuron: per tau the erasure call, and the taus
    (if any) that match or exceed neuron masking's erasure with lower collateral."""
    if not diffs:
        return ""
    said = {"tie": "tie", "higher": "exceeds", "lower": "falls short", "n/a": "n/a"}
    points, good = [], []
    for tau, d in sorted(diffs.items()):
        c = call(d["target_drop"])
        lower = [
            label for metric, label, _ in COLLATERAL if metric in d and call(d[metric]) == "lower"
        ]
        higher = [m for m, _, _ in COLLATERAL if m in d and call(d[m]) == "higher"]
        points.append(f"τ = {tau:g}: {said[c]} ({show(d['target_drop'], True)})")
        if c in ("tie", "higher") and lower and not higher:
            good.append(f"{tau:g} (lower {_listing(lower)})")
    found = (
        f"τ with erasure matching or exceeding neuron masking's and lower collateral: "
        f"{', '.join(good)}"
        if good
        else "no τ matches neuron masking's erasure with lower collateral"
    )
    return (
        f"Over the τ curve (target drop, range − neuron, paired; headline τ = {headline_tau:g}): "
        f"{'; '.join(points)}. {found}."
    )


def dominance(a: dict[str, Estimate], b: dict[str, Estimate]) -> tuple[str, dict[str, str]]:
    """Pareto comparison of state ``a`` with ``b`` on the headline effects, from the paired
    differences' 95% intervals: per effect ``better`` / ``worse`` / ``tie`` (interval includes 0)
    or ``n/a``; overall ``dominates`` (none worse, one better), ``dominated``, ``trade-off`` or
    ``tie``."""
    calls = {}
    for metric, sign in BETTER.items():
        c = call(a[metric] - b[metric])
        calls[metric] = (
            c if c in ("n/a", "tie") else "better" if (c == "higher") == (sign > 0) else "worse"
        )
    found = set(calls.values())
    if "better" in found and "worse" not in found:
        return "dominates", calls
    if "worse" in found and "better" not in found:
        return "dominated", calls
    return ("trade-off" if "better" in found else "tie"), calls


def density_verdict(headline: dict[str, dict[str, Estimate]], ratio: float) -> str:
    """Sentences on density bands against range masking and neuron masking (Pareto view of the
    frozen head's figures; the information sentences say whether the concept is gone)."""
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
        parts.append(
            f"Density bands (likelihood ratio > {ratio:g}) {words[overall]} {label} on the "
            f"frozen head's figures (target drop {d['target_drop'].point:.2f} vs "
            f"{headline[other]['target_drop'].point:.2f}, difference {show(diff, True)}; {detail})."
        )
    return " ".join(parts)
