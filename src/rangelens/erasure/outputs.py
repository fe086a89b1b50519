"""What the erasure experiment reports and writes: the long table, the headline with intervals, the
tau sweep, warnings, the verdict, files and figures (and reading them back)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from rangelens.config.analysis import AnalysisConfig
from rangelens.config.erasure import ErasureConfig
from rangelens.data import LabeledTexts
from rangelens.erasure.conditions import CONDITIONS
from rangelens.erasure.files import (
    FORMAT_VERSION,
    ErasureResult,
    compact_headline,
    interval_text,
    load_erasure,
    methods_for,
    records,
    write_erasure,
)
from rangelens.erasure.metrics import (
    BASE,
    DROPS,
    HEADLINE,
    EffectEstimator,
    Estimate,
    Key,
    mean_of,
)
from rangelens.erasure.verdicts import curve as _curve
from rangelens.erasure.verdicts import density_verdict, verdict

__all__ = [
    "FORMAT_VERSION",
    "ErasureResult",
    "compact_headline",
    "interval_text",
    "load_erasure",
    "methods_for",
    "records",
    "summarise",
    "write_erasure",
]
LEVELS = ("target_acc", "target_conf", "complement_acc", "complement_conf")
EFFECTS = (*DROPS, "complement_flip", "ppl_change")
PAIRS = (
    ("range", "neuron"),
    ("range", "random"),
    ("neuron", "random"),
    ("density", "range"),
    ("density", "neuron"),
    ("density", "random"),
    ("range", "leace"),
    ("neuron", "leace"),
    ("density", "leace"),
)
PROBE_FIGURES = tuple(
    f"{p}_probe_{m}" for p in ("linear", "binary", "mlp") for m in ("recall", "balanced")
)


def _shared(per_concept: dict[int, dict[str, dict[str, Estimate]]], state: str) -> list[str]:
    """The figures every concept has for ``state`` (in the first concept's order)."""
    first, *rest = per_concept.values()
    return [m for m in first[state] if all(m in other[state] for other in rest)]


def _probe_figures(effects: dict[str, Estimate]) -> dict[str, Estimate]:
    return {m: e for m, e in effects.items() if m in PROBE_FIGURES}


def _notices(info: dict[str, Any], data: LabeledTexts, concepts: list[int]) -> list[str]:
    """What the reader should know about how the run went (not warnings: nothing is wrong)."""
    out = []
    if len(data.label_names) == 2 and info.get("shared_neuron_mask"):
        out.append(
            "binary task: d′ and the other rankings score both concepts' neurons alike, so "
            "'neuron' masks the same neurons for both concepts (one shared mask; the per-concept "
            "figures differ only in which texts are the targets)"
        )
    shares = info["protocol"].get("correct_share", {})
    if shares and all(v == 1.0 for v in shares.values()):
        out.append(
            "range_rows 'correct' changed nothing: the classifier got every training row of "
            "every split right, so ranges were fitted on all training rows"
        )
    return out


def state_key(
    state: str, c: int, site: str, tau: float, p: float, ratio: float | None = None
) -> Key:
    """A state's key; a per-ratio condition (density bands) at likelihood ratio ``ratio``."""
    if state == "base":
        return BASE
    condition = CONDITIONS[state]
    return (state, c, site, ratio if condition.per_ratio else tau if condition.per_tau else None, p)


def _cells(effects: dict[str, Estimate], prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for name, e in effects.items():
        out.update(e.cells(f"{prefix}{name}"))
    return out


def summarise(
    estimator: EffectEstimator,
    data: LabeledTexts,
    concepts: list[int],
    analysis: AnalysisConfig,
    config: ErasureConfig,
    info: dict[str, Any],
) -> ErasureResult:
    """Tables, warnings and verdict from the recorded outcomes."""
    states = ["base", *config.conditions]
    labels = estimator.o.labels
    ratio = float(analysis.density_ratio)  # the headline ratio of per-ratio conditions
    memo: dict[tuple[Key, int], dict[str, Estimate]] = {}

    def effects(key: Key, c: int) -> dict[str, Estimate]:
        if (key, c) not in memo:
            memo[(key, c)] = estimator.effects(key, c)
        return memo[(key, c)]

    n_text = {c: len(np.unique(estimator.o.text[labels == c])) for c in concepts}
    rows = []
    for site in info["sites"]:
        for tau, p in info["points"]:
            for c in concepts:
                for state in states:
                    key = state_key(state, c, site, tau, p, ratio)
                    rows.append(
                        {
                            "concept": data.label_names[c],
                            "state": state,
                            "site": site,
                            "tau": tau,
                            "p": p,
                            **{m: estimator.level(key, c, m).point for m in LEVELS},
                            "ppl": estimator.perplexity(key).point,
                            "n_target": n_text[c],
                            "n_complement": len(np.unique(estimator.o.text[labels != c])),
                            **_cells(effects(key, c)),
                        }
                    )
    table = pd.DataFrame(rows)

    site, tau, p = info["headline_site"], analysis.tau, analysis.p
    per_concept: dict[int, dict[str, dict[str, Estimate]]] = {
        c: {s: effects(state_key(s, c, site, tau, p, ratio), c) for s in config.conditions}
        for c in concepts
    }
    average: dict[str, dict[str, Estimate]] = {
        s: {m: mean_of([per_concept[c][s][m] for c in concepts]) for m in _shared(per_concept, s)}
        for s in config.conditions
    }
    base_info = {c: _probe_figures(effects(BASE, c)) for c in concepts}
    base_average = {m: mean_of([base_info[c][m] for c in concepts]) for m in base_info[concepts[0]]}
    head_rows = []
    entries: list[tuple[int | None, dict[str, dict[str, Estimate]]]] = [
        *per_concept.items(),
        (None, average),
    ]
    for which, by_state in entries:
        levels: dict[str, float] = {}
        if which is None:
            for m in ("target_acc", "complement_acc"):
                levels.update(
                    mean_of([estimator.level(BASE, k, m) for k in concepts]).cells(f"base_{m}")
                )
            levels.update(_cells(base_average, "base_"))
        else:
            for m in ("target_acc", "complement_acc"):
                levels.update(estimator.level(BASE, which, m).cells(f"base_{m}"))
            levels.update(_cells(base_info[which], "base_"))
        row: dict[str, Any] = {
            "concept": data.label_names[which] if which is not None else "average",
            **levels,
            "base_ppl": estimator.perplexity(BASE).point,
            "n_target": n_text[which] if which is not None else int(sum(n_text.values())),
        }
        for s in config.conditions:
            row.update(_cells(by_state[s], f"{s}_"))
        for a, b in PAIRS:
            if a in by_state and b in by_state:
                diffs = {m: by_state[a][m] - by_state[b][m] for m in HEADLINE}
                row.update(_cells(diffs, f"diff_{a}_{b}_"))
        head_rows.append(row)
    headline = pd.DataFrame(head_rows)

    sweep = []
    curve: dict[float, dict[str, Estimate]] = {}
    for t in sorted({pt[0] for pt in info["points"] if pt[1] == p}):
        entry: dict[str, float] = {"tau": t}
        for s in config.conditions:
            mean = {
                m: mean_of([effects(state_key(s, c, site, t, p, ratio), c)[m] for c in concepts])
                for m in HEADLINE
            }
            entry.update(_cells(mean, f"{s}_"))
        if "range" in config.conditions and "neuron" in config.conditions:
            diff = {
                m: mean_of(
                    [
                        effects(state_key("range", c, site, t, p, ratio), c)[m]
                        - effects(state_key("neuron", c, site, t, p, ratio), c)[m]
                        for c in concepts
                    ]
                )
                for m in HEADLINE
            }
            curve[t] = diff
            entry.update(_cells(diff, "diff_range_neuron_"))
        sweep.append(entry)
    ratio_sweep = []  # the tau-free sweep of per-ratio conditions (density bands)
    for r in info.get("ratios", []):
        entry = {"ratio": r}
        for s in config.conditions:
            if CONDITIONS[s].per_ratio:
                mean = {
                    m: mean_of([effects(state_key(s, c, site, tau, p, r), c)[m] for c in concepts])
                    for m in HEADLINE
                }
                entry.update(_cells(mean, f"{s}_"))
        ratio_sweep.append(entry)

    evaluated = estimator.o.pred[BASE] == labels
    base_acc = float(evaluated.mean())
    chance = float(np.bincount(labels).max() / len(labels))
    warnings = []
    if base_acc < chance + config.chance_margin:
        warnings.append(
            f"base accuracy {base_acc:.2f} is within {config.chance_margin:g} of chance "
            f"({chance:.2f}): the classifier barely reads these concepts, so erasure figures "
            f"say little about them"
        )
    few = {data.label_names[c]: n for c, n in n_text.items() if n < config.min_test_texts}
    if few:
        warnings.append(
            f"concepts with fewer than {config.min_test_texts} test texts: "
            + ", ".join(f"{k} ({v})" for k, v in few.items())
            + "; their per-concept figures have wide intervals (standard error near 0.1 at 20)"
        )
    n_texts = len(np.unique(estimator.o.text))
    notices = [*info.get("notices", []), *_notices(info, data, concepts)]
    head_chance = 1 / len(data.label_names)
    said = verdict(
        average,
        len(concepts),
        n_texts,
        base=base_average if base_average else None,
        chance=head_chance,
    )
    info = {
        **info,
        "base_acc": base_acc,
        "chance": chance,
        "n_test_texts": n_texts,
        "n_test_per_concept": {data.label_names[c]: n for c, n in n_text.items()},
        "base_ppl": estimator.perplexity(BASE).point,
        "sweep": sweep,
        "ratio_sweep": ratio_sweep,
        "warnings": warnings,
        "notices": notices,
        "head_chance": head_chance,
        "verdict": " ".join(
            x for x in (said, density_verdict(average, ratio), _curve(curve, float(tau))) if x
        ),
    }
    return ErasureResult(table, headline, info)
