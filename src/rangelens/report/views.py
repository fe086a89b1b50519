"""Page contexts of the atlas that are plain tables and views: the erasure page, any table, token
highlighting of exemplar records, per-(concept, neuron) moments and the concept palette."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from rangelens.erasure.outputs import interval_text
from rangelens.explain.records import ActivationRecord, NeuronRecord
from rangelens.report import figures
from rangelens.report.contents import RunContents

N_TOP_EXEMPLARS, N_QUANTILE_EXEMPLARS = 8, 6  # token-level exemplars shown per explained neuron
HEAT_LEVELS = 9


def erasure_context(run: RunContents) -> dict[str, Any]:
    """The erasure page: headline and tau sweep with intervals, the erased ranges, the table."""
    erasure = run.erasure
    if erasure is None:
        return {"erasure": None}
    summary = erasure.summary
    info = summary.get("info", {})
    states = list(info.get("conditions", []))
    rows = summary.get("headline", [])
    metrics = ("target_drop", "complement_drop", "complement_flip", "ppl_change")
    headline = pd.DataFrame(
        [
            {
                "concept": r["concept"],
                "base acc": interval_text(r, "base_target_acc"),
                **{
                    f"{s} {m.replace('_', ' ')}": interval_text(r, f"{s}_{m}", 1 + ("ppl" not in m))
                    for s in states
                    for m in metrics
                },
                **{
                    f"range−neuron {m.replace('_', ' ')}": interval_text(
                        r, f"diff_range_neuron_{m}", 1 + ("ppl" not in m)
                    )
                    for m in metrics
                    if f"diff_range_neuron_{m}" in r
                },
            }
            for r in rows
        ]
    )
    sweep = pd.DataFrame(
        [
            {
                "tau": r["tau"],
                **{
                    f"{s} {m.replace('_', ' ')}": interval_text(r, f"{s}_{m}", 1 + ("ppl" not in m))
                    for s in states
                    for m in metrics
                    if f"{s}_{m}" in r
                },
            }
            for r in info.get("sweep", [])
        ]
    )
    erased: list[dict[str, Any]] = []
    if run.ranges is not None:
        rm = run.ranges.range_map
        for c, name in enumerate(rm.concepts):
            ranges = [
                (int(j), float(rm.lo[c, r]), float(rm.hi[c, r]))
                for r, j in enumerate(rm.neurons[c, :12])
            ]
            erased.append({"concept": name, "k": rm.neurons.shape[1], "ranges": ranges})
    return {
        "erasure": erasure,
        "config": summary.get("config", {}),
        "info": info,
        "headline": table_context(headline, grouped=False),
        "sweep": table_context(sweep, grouped=False),
        "erased": erased,
        "rows": run.ranges.range_map.metadata.get("rows") if run.ranges else None,
        "table": table_context(erasure.table, grouped=False) if erasure.table is not None else None,
    }


MOMENTS = ("count", "mean", "std", "min", "max", "skew")


def concept_moments(run: RunContents) -> dict[str, np.ndarray] | None:
    """Per-(concept, neuron) statistics, histogram counts ``(C, d, n_bins)`` and bin edges
    ``(d, n_bins + 1)``, computed once for all neuron pages."""
    if run.capture is None:
        return None
    stats = run.capture.stats
    state = stats.state_dict()
    offsets = state["hist_start"][:, None] + np.arange(stats.n_bins + 1)
    out = {name: np.asarray(getattr(stats, name)) for name in MOMENTS}
    out["count"] = np.broadcast_to(out["count"][:, None], out["mean"].shape)
    out["hist_counts"] = state["hist_counts"]
    out["edges"] = np.ldexp(offsets.astype(np.float64), state["hist_exp"][:, None])
    return out


def token_views(record: NeuronRecord) -> dict[str, list[list[dict[str, Any]]]]:
    """Exemplars as token lists with a heat level (sign and magnitude relative to the largest
    absolute activation shown) for highlighting."""
    top, quantiles = record.top[:N_TOP_EXEMPLARS], record.quantiles[:N_QUANTILE_EXEMPLARS]
    scale = max((abs(a) for r in (*top, *quantiles) for a in r.activations), default=0.0) or 1.0

    def view(r: ActivationRecord) -> list[dict[str, Any]]:
        peak = r.peak
        return [
            {
                "text": tok,
                "value": a,
                "heat": f"{'p' if a >= 0 else 'n'}{round(HEAT_LEVELS * abs(a) / scale)}",
                "peak": k == peak,
            }
            for k, (tok, a) in enumerate(zip(r.tokens, r.activations, strict=True))
        ]

    return {"top": [view(r) for r in top], "quantiles": [view(r) for r in quantiles]}


def mode_views(e: Any, record: NeuronRecord | None) -> list[dict[str, Any]]:
    """Each mode of an explanation with its label, range and its two strongest contexts as token
    lists with a heat level (the peak token marked), for the Explanations tab."""
    from rangelens.explain.results import mode_contexts

    out = []
    for m in e.modes:
        contexts = mode_contexts(m, record) if record is not None else []
        scale = max((abs(a) for c in contexts for a in c.activations), default=0.0) or 1.0
        out.append(
            {
                "mode": m,
                "contexts": [
                    [
                        {
                            "text": piece,
                            "value": a,
                            "heat": f"{'p' if a >= 0 else 'n'}{round(HEAT_LEVELS * abs(a) / scale)}",
                            "peak": k == c.peak,
                        }
                        for k, (piece, a) in enumerate(zip(c.pieces, c.activations, strict=True))
                    ]
                    for c in contexts
                ],
            }
        )
    return out


def table_context(frame: pd.DataFrame, *, grouped: bool = True) -> dict[str, Any] | None:
    """A table for the ``data_table`` macro; ``grouped``: columns ``base_*``, ``range_*`` and
    ``neuron_*`` go under a header row naming their state."""
    if frame.empty:
        return None
    groups: list[list[Any]] = []
    labels = []
    for col in frame.columns:
        head, _, rest = str(col).partition("_")
        group = head if grouped and head in ("base", "range", "neuron") and rest else ""
        if groups and groups[-1][0] == group:
            groups[-1][1] += 1
        else:
            groups.append([group, 1])
        labels.append((rest if group else str(col)).replace("_", " "))
    return {
        "groups": groups,
        "labels": labels,
        "numeric": [pd.api.types.is_numeric_dtype(frame[c]) for c in frame.columns],
        "rows": frame.to_dict(orient="split")["data"],
    }


def palette_css(n_concepts: int) -> str:
    """Concept colour classes ``.c0``, ``.c1``, ... (shared with the SVG and matplotlib figures)."""
    return "".join(f".c{c}{{--concept:{figures.color(c)}}}\n" for c in range(max(n_concepts, 1)))
