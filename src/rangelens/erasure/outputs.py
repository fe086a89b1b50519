"""What the erasure experiment reports and writes: the long table, the headline with intervals, the
tau sweep, warnings, the verdict, files and figures (and reading them back)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rangelens.artifacts import atomic_path, read_json, write_json, write_table, write_text
from rangelens.config.analysis import AnalysisConfig
from rangelens.config.erasure import ErasureConfig
from rangelens.data import LabeledTexts
from rangelens.erasure.conditions import CONDITIONS
from rangelens.erasure.metrics import (
    BASE,
    DROPS,
    HEADLINE,
    EffectEstimator,
    Estimate,
    Key,
    density_verdict,
    mean_of,
    verdict,
)
from rangelens.erasure.plots import erasure_bars, pareto, save_figure, tau_tradeoff
from rangelens.errors import RangelensError

FORMAT_VERSION = "rangelens.erasure/2"
LEVELS = ("target_acc", "target_conf", "complement_acc", "complement_conf")
EFFECTS = (*DROPS, "complement_flip", "ppl_change")
PAIRS = (
    ("range", "neuron"),
    ("range", "random"),
    ("neuron", "random"),
    ("density", "range"),
    ("density", "neuron"),
    ("density", "random"),
)


@dataclass
class ErasureResult:
    """What :func:`~rangelens.erasure.run_erasure` measured (also written to its directory).

    ``table`` (``erasure.csv`` / ``.parquet``): one row per site x (tau, p) x concept x state (base
    and the conditions; tau-independent states repeat across tau) with levels (target_acc,
    target_conf, complement_acc, complement_conf, ppl), n_target, n_complement and the effects
    ``target_drop``, ``complement_drop``, ``target_conf_drop``, ``complement_conf_drop`` (base -
    masked), ``complement_flip`` and ``ppl_change`` (masked - base), each with ``_lo`` / ``_hi``
    95% bootstrap bounds. ``headline``: per concept and ``"average"`` at the analysis site, tau and
    p: base levels, every state's effects and the paired differences ``diff_<a>_<b>_<effect>``.
    ``info``: protocol, accuracies, sweep, warnings, verdict, timings.
    """

    table: pd.DataFrame
    headline: pd.DataFrame
    info: dict[str, Any]
    config: dict[str, Any] = field(default_factory=dict)  # the options, as saved


def _key(state: str, c: int, site: str, tau: float, p: float, ratio: float | None = None) -> Key:
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
                    key = _key(state, c, site, tau, p, ratio)
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
        c: {s: effects(_key(s, c, site, tau, p, ratio), c) for s in config.conditions}
        for c in concepts
    }
    average: dict[str, dict[str, Estimate]] = {
        s: {m: mean_of([per_concept[c][s][m] for c in concepts]) for m in EFFECTS}
        for s in config.conditions
    }
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
        else:
            for m in ("target_acc", "complement_acc"):
                levels.update(estimator.level(BASE, which, m).cells(f"base_{m}"))
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
    for t in sorted({pt[0] for pt in info["points"] if pt[1] == p}):
        entry: dict[str, float] = {"tau": t}
        for s in config.conditions:
            mean = {
                m: mean_of([effects(_key(s, c, site, t, p, ratio), c)[m] for c in concepts])
                for m in HEADLINE
            }
            entry.update(_cells(mean, f"{s}_"))
        sweep.append(entry)
    ratio_sweep = []  # the tau-free sweep of per-ratio conditions (density bands)
    for r in info.get("ratios", []):
        entry = {"ratio": r}
        for s in config.conditions:
            if CONDITIONS[s].per_ratio:
                mean = {
                    m: mean_of([effects(_key(s, c, site, tau, p, r), c)[m] for c in concepts])
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
        "verdict": " ".join(
            x
            for x in (verdict(average, len(concepts), n_texts), density_verdict(average, ratio))
            if x
        ),
    }
    return ErasureResult(table, headline, info)


def _markdown(frame: pd.DataFrame, digits: int = 3) -> str:
    """A GitHub markdown table; NaN shows as an en dash."""

    def cell(v: object) -> str:
        if isinstance(v, float | np.floating):
            return "–" if np.isnan(v) else f"{v:.{digits}f}"
        return str(v)

    numeric = [pd.api.types.is_numeric_dtype(frame[c]) for c in frame.columns]
    lines = [
        "| " + " | ".join(str(c) for c in frame.columns) + " |",
        "|" + "|".join("---:" if n else ":---" for n in numeric) + "|",
    ]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(False)]
    return "\n".join(lines) + "\n"


def interval_text(row: dict[str, Any] | pd.Series, name: str, digits: int = 2) -> str:
    """``point [lo, hi]`` of one headline cell (an en dash when missing)."""
    point = row.get(name)
    if point is None or point != point:
        return "–"
    fmt = f"{{:+.{digits}f}}" if "ppl" in name or "diff" in name else f"{{:.{digits}f}}"
    lo, hi = row.get(f"{name}_lo"), row.get(f"{name}_hi")
    return f"{fmt.format(point)} [{fmt.format(lo)}, {fmt.format(hi)}]"


def compact_headline(result: ErasureResult) -> pd.DataFrame:
    """The headline as text cells: per state target drop, complement drop, flip rate and ppl
    change, each ``point [lo, hi]``."""
    out = []
    for row in result.headline.to_dict(orient="records"):
        cells = {"concept": row["concept"], "base acc": interval_text(row, "base_target_acc")}
        for s in result.info["conditions"]:
            for m in HEADLINE:
                cells[f"{s} {m.replace('_', ' ')}"] = interval_text(
                    row, f"{s}_{m}", 1 if "ppl" in m else 2
                )
        if "diff_range_neuron_target_drop" in row:
            for m in HEADLINE:
                digits = 1 if "ppl" in m else 2
                cells[f"range−neuron {m.replace('_', ' ')}"] = interval_text(
                    row, f"diff_range_neuron_{m}", digits
                )
        out.append(cells)
    return pd.DataFrame(out)


def _write_parquet(path: Path, frame: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)


def records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """JSON-able rows with NaN as null (strict JSON)."""
    records: list[dict[str, Any]] = json.loads(frame.to_json(orient="records"))
    return records


def write_erasure(out_dir: Path, result: ErasureResult, config: ErasureConfig) -> None:
    """Write ``erasure.csv`` / ``.parquet`` (the table), ``headline.csv``, ``headline.md``,
    ``erasure.json`` (format ``rangelens.erasure/2``: config, info, headline), ``erasure_bars.png``
    and ``tau_tradeoff.png``; each file atomically, all after the computation succeeded."""
    out_dir.mkdir(parents=True, exist_ok=True)
    info = result.info
    write_table(out_dir / "erasure.csv", result.table)
    _write_parquet(out_dir / "erasure.parquet", result.table)
    write_table(out_dir / "headline.csv", result.headline)
    site = info["headline_site"]
    warn = "".join(f"> **Warning:** {w}\n>\n" for w in info["warnings"])
    protocol = info["protocol"]
    text = (
        f"# NeuronLens erasure: {info['model']} on {info['dataset']} (task {config.task})\n\n"
        f"Masks at {site}, tau = {info['tau']:g}, p = {info['p']:g}, replacement "
        f"{config.replacement}, positions {config.positions}, mode {config.mode}. "
        f"{protocol['folds']}-fold stratified cross-validation x {protocol['repeats']}: "
        f"{info['n_test_texts']} test texts, base accuracy {info['base_acc']:.3f} "
        f"(chance {info['chance']:.2f}). Ranges: {protocol['ranges'].get('fold0', '')} of each "
        f"fold; perplexity conditions use the {protocol['perplexity_ranges']} ranges. Drops are "
        f"base - masked; flip is the share of other-concept texts whose prediction changed; "
        f"ppl change is masked - base. Brackets: 95% bootstrap intervals over texts.\n\n"
        + (warn + "\n" if warn else "")
        + f"**Verdict.** {info['verdict']}\n\n"
        + _markdown(compact_headline(result))
        + f"\n## tau sweep (average over concepts, p = {info['p']:g})\n\n"
        + _markdown(pd.DataFrame(info["sweep"]))
        + (
            "\n## likelihood-ratio sweep of the density bands (average over concepts)\n\n"
            + _markdown(pd.DataFrame(info["ratio_sweep"]))
            if info.get("ratio_sweep")
            else ""
        )
    )
    write_text(out_dir / "headline.md", text)
    write_json(
        out_dir / "erasure.json",
        {
            "format": FORMAT_VERSION,
            "config": config.model_dump(),
            "info": info,
            "headline": records(result.headline),
        },
    )
    title = f"{info['model']} / {info['dataset']}: {site}, tau = {info['tau']:g}, p = {info['p']:g}"
    save_figure(
        erasure_bars(result.headline, info["conditions"], title=title), out_dir / "erasure_bars.png"
    )
    save_figure(
        tau_tradeoff(
            pd.DataFrame(info["sweep"]), info["conditions"], title=f"{site}, p = {info['p']:g}"
        ),
        out_dir / "tau_tradeoff.png",
    )
    save_figure(
        pareto(
            pd.DataFrame(info["sweep"]),
            pd.DataFrame(info.get("ratio_sweep", [])),
            info["conditions"],
            title=f"{site}, p = {info['p']:g}: erasure vs collateral",
        ),
        out_dir / "pareto.png",
    )


def load_erasure(directory: str | Path) -> ErasureResult:
    """Read back what :func:`write_erasure` wrote into ``directory``."""
    path = Path(directory) / "erasure.json"
    saved = read_json(path)
    if saved.get("format") != FORMAT_VERSION:
        raise RangelensError(
            f"{str(path)!r} has format {saved.get('format')!r}; valid: {FORMAT_VERSION!r}"
        )
    headline = pd.DataFrame(saved["headline"])
    numeric = [c for c in headline.columns if c not in ("concept", "n_target")]
    headline[numeric] = headline[numeric].astype(float)  # null -> NaN
    table = pd.read_parquet(Path(directory) / "erasure.parquet")
    return ErasureResult(table, headline, saved["info"], saved.get("config", {}))


def methods_for(row: dict[str, Any], conditions: list[str]) -> dict[str, Any]:
    """Which method erased one concept best, from its ``headline`` row: ``rows`` (per condition
    its target drop, flip rate and perplexity change as ``point [lo, hi]`` text), ``best`` (the
    largest target drop among the masking methods, the random control excluded) and ``ties``
    (methods whose paired difference with the best includes 0)."""
    rows = [
        {
            "state": s,
            **{m: interval_text(row, f"{s}_{m}", 1 if "ppl" in m else 2) for m in HEADLINE},
        }
        for s in conditions
    ]
    methods = [s for s in conditions if s != "random" and row.get(f"{s}_target_drop") is not None]
    if not methods:
        return {"rows": rows, "best": None, "ties": []}
    best = max(methods, key=lambda s: float(row[f"{s}_target_drop"]))
    ties = []
    for s in methods:
        for a, b in ((s, best), (best, s)):
            lo, hi = (
                row.get(f"diff_{a}_{b}_target_drop_lo"),
                row.get(f"diff_{a}_{b}_target_drop_hi"),
            )
            if s != best and lo is not None and hi is not None and lo <= 0 <= hi:
                ties.append(s)
                break
    return {"rows": rows, "best": best, "ties": ties}
