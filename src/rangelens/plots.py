"""Erasure plots for the NeuronLens experiment (Haider et al., arXiv 2502.06809).

Plain functions returning matplotlib figures drawn on the Agg canvas (no pyplot state, no display):
per-concept target vs collateral accuracy drops for range vs neuron masking, and the tau trade-off.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.text import Text

from rangelens.artifacts import atomic_path

RANGE_COLOR = "#1f77b4"
NEURON_COLOR = "#ff7f0e"


def _figure(width: float, height: float, ncols: int = 1) -> tuple[Figure, list[Axes]]:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def erasure_bars(headline: pd.DataFrame, *, title: str = "") -> Figure:
    """Per concept (and the average): target and complement accuracy drops, range vs neuron masking.

    ``headline`` is :func:`rangelens.evaluate.headline_table`'s frame. Erasure wants tall solid bars
    (target) and short hatched ones (collateral).
    """
    concepts = headline["concept"].astype(str).tolist()
    x = np.arange(len(concepts))
    fig, (ax,) = _figure(max(6.0, 1.3 * len(concepts) + 2), 4.0)
    bars = [
        ("range", "target", RANGE_COLOR, ""),
        ("range", "complement", RANGE_COLOR, "//"),
        ("neuron", "target", NEURON_COLOR, ""),
        ("neuron", "complement", NEURON_COLOR, "//"),
    ]
    width = 0.8 / len(bars)
    for k, (state, group, color, hatch) in enumerate(bars):
        ax.bar(
            x + (k - (len(bars) - 1) / 2) * width,
            headline[f"{state}_{group}_acc_drop"],
            width,
            color=color if not hatch else "white",
            edgecolor=color,
            hatch=hatch,
            label=f"{state} mask: {group}",
        )
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(x, concepts, rotation=30, ha="right")
    ax.set_ylabel("accuracy drop vs base")
    ax.set_title(title or "target vs collateral accuracy drop")
    ax.legend(fontsize="small")
    return fig


def tau_tradeoff(table: pd.DataFrame, *, p: float, site: str, title: str = "") -> Figure:
    """Average over concepts, against tau: range masking's target and complement accuracy and
    confidence drops, neuron masking (independent of tau) as horizontal references, and the
    perplexity change when the table has perplexities.

    ``table`` is :func:`rangelens.evaluate.run_erasure`'s long table; ``site`` picks its mask site.
    """
    at = table[(table["p"] == p) & (table["site"] == site)]
    metrics = ("target_acc", "complement_acc", "target_conf", "complement_conf", "ppl")
    columns = [f"delta_{m}" for m in metrics]
    ranged = at[at["state"] == "range"].groupby("tau")[columns].mean()
    neuron = at[at["state"] == "neuron"][columns].mean()
    panels = [("acc", "accuracy drop"), ("conf", "gold-label confidence drop")]
    has_ppl = bool(np.isfinite(ranged["delta_ppl"]).any())
    fig, axes = _figure(4.5 * (len(panels) + has_ppl), 4.0, ncols=len(panels) + has_ppl)
    taus = ranged.index.to_numpy(dtype=float)
    for ax, (metric, label) in zip(axes, panels, strict=False):
        for group, style in (("target", "-"), ("complement", "--")):
            col = f"delta_{group}_{metric}"
            drop = 0.0 - ranged[col]
            ax.plot(taus, drop, style, marker="o", color=RANGE_COLOR, label=f"range: {group}")
            ax.axhline(
                0.0 - neuron[col], linestyle=style, color=NEURON_COLOR, label=f"neuron: {group}"
            )
        ax.set_xlabel("tau (range half-width in standard deviations)")
        ax.set_ylabel("vs base, average over concepts")
        ax.set_title(label)
        ax.legend(fontsize="small")
    if has_ppl:
        ax = axes[-1]
        ax.plot(taus, ranged["delta_ppl"], "-", marker="o", color=RANGE_COLOR, label="range")
        ax.axhline(neuron["delta_ppl"], color=NEURON_COLOR, label="neuron")
        ax.set_xlabel("tau (range half-width in standard deviations)")
        ax.set_ylabel("vs base, average over concepts")
        ax.set_title("perplexity change (general text)")
        ax.legend(fontsize="small")
    fig.suptitle(title or f"tau trade-off at {site}, p = {p:g}")
    return fig


def save_figure(fig: Figure, path: Path, *, dpi: int = 120) -> None:
    """Save a figure as PNG atomically (:func:`rangelens.artifacts.atomic_path`); text is drawn
    literally (concept names from user data may hold ``$``, which mathtext would parse)."""
    for text in fig.findobj(Text):
        text.set_parse_math(False)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
