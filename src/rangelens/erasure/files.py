"""The erasure stage's files: writing them, reading them back, and the text cells shown from them."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rangelens.artifacts import atomic_path, read_json, write_json, write_table, write_text
from rangelens.config.erasure import ErasureConfig
from rangelens.erasure.metrics import HEADLINE
from rangelens.erasure.plots import erasure_bars, pareto, save_figure, tau_tradeoff
from rangelens.errors import RangelensError

FORMAT_VERSION = "rangelens.erasure/2"


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
    frame = pd.DataFrame(out)
    return frame.drop(columns=[c for c in frame.columns if (frame[c] == "–").all()])


METHOD_COLUMNS = (
    ("frozen-head target drop", "target_drop", 2),
    ("frozen-head target acc", "target_acc", 2),
    ("retrained linear recall", "linear_probe_recall", 2),
    ("linear balanced acc", "linear_probe_balanced", 2),
    ("c-vs-rest linear balanced acc", "binary_probe_balanced", 2),
    ("retrained MLP recall", "mlp_probe_recall", 2),
    ("MLP balanced acc", "mlp_probe_balanced", 2),
    ("complement flip", "complement_flip", 2),
    ("complement drop", "complement_drop", 2),
    ("ΔPPL", "ppl_change", 1),
    ("edit norm", "edit_norm", 2),
)


def method_table(result: ErasureResult, concept: str = "average") -> pd.DataFrame:
    """Behaviour and information per method at the headline point: one row per state (the
    unmasked base first), ``point [lo, hi]`` cells; figures measured for no state are left out
    (perplexity of an encoder), and ``dims`` is the dimensions each edit touches (mean over folds
    and concepts: neurons masked, LEACE's rank)."""
    row = result.headline.set_index("concept").loc[concept].to_dict()
    dims = result.info.get("classify", {}).get("dimensions", {})
    out = []
    base: dict[str, Any] = {"method": "unmasked"}
    for title, name, digits in METHOD_COLUMNS:
        if name.endswith("_probe_recall") or name.endswith("_probe_balanced"):
            base[title] = interval_text(row, f"base_{name}", digits)
        elif name == "target_acc":
            base[title] = interval_text(row, "base_target_acc", digits)
        else:
            base[title] = "–"
    base["dims"] = "0"
    out.append(base)
    for s in result.info["conditions"]:
        cells: dict[str, Any] = {"method": s}
        for title, name, digits in METHOD_COLUMNS:
            cells[title] = interval_text(row, f"{s}_{name}", digits)
        cells["dims"] = f"{dims[s]:g}" if s in dims else "–"
        out.append(cells)
    frame = pd.DataFrame(out)
    empty = [c for c in frame.columns if (frame[c] == "–").all()]
    return frame.drop(columns=empty)


def curve_table(info: dict[str, Any]) -> pd.DataFrame:
    """The tau curve as paired differences range − neuron (average over concepts), text cells."""
    rows = []
    for entry in info.get("sweep", []):
        if "diff_range_neuron_target_drop" not in entry:
            continue
        cells: dict[str, Any] = {"tau": f"{entry['tau']:g}"}
        for metric in HEADLINE:
            digits = 1 if "ppl" in metric else 2
            cells[f"Δ {metric.replace('_', ' ')}"] = interval_text(
                entry, f"diff_range_neuron_{metric}", digits
            )
            cells[f"range {metric.replace('_', ' ')}"] = interval_text(
                entry, f"range_{metric}", digits
            )
        rows.append(cells)
    frame = pd.DataFrame(rows)
    empty = [c for c in frame.columns if (frame[c] == "–").all()]
    return frame.drop(columns=empty)


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
        + "".join(f"> **Notice:** {n}\n>\n" for n in info.get("notices", []))
        + f"\n**Verdict.** {info['verdict']}\n\n"
        + "## Behaviour and information per method (average over concepts)\n\n"
        + "Frozen head: the classifier trained unmasked (behaviour). Retrained probes: refit on "
        + "the edited training rows of each fold, scored on its edited test rows (information); "
        + "balanced accuracy is concept vs rest (chance 0.5). dims: neurons masked, or LEACE's "
        + "rank; edit norm: mean L2 change of a test row at the masked site.\n\n"
        + _markdown(method_table(result))
        + "\n## Per concept\n\n"
        + _markdown(compact_headline(result))
        + (
            "\n## tau curve, paired differences range − neuron (average over concepts)\n\n"
            + _markdown(curve_table(info))
            if not curve_table(info).empty
            else ""
        )
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
