"""Erasure plots for the NeuronLens experiment (Haider et al., arXiv 2502.06809).

Plain functions returning matplotlib figures drawn on the Agg canvas (no pyplot state, no display):
per-concept target erasure vs collateral flips for every masked state, and the tau trade-off, each
with its 95% bootstrap interval.
"""

from __future__ import annotations

import functools
import unicodedata
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import font_manager
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.text import Text
from matplotlib.ticker import FuncFormatter

from rangelens.artifacts import atomic_path

COLORS = {
    "range": "#1f77b4",
    "neuron": "#ff7f0e",
    "random": "#7f7f7f",
    "density": "#2ca02c",
    "leace": "#d62728",
}


def _ppl_axis(ax: Axes, axis: str, values: list[float]) -> str:
    """A perplexity-change axis on which small and huge changes stay apart: symmetric log
    (linear within ±1) when the changes span more than two orders of magnitude."""
    finite = np.abs(np.asarray([v for v in values if np.isfinite(v)]))
    if finite.size and finite.max() > 100 * max(np.median(finite), 1.0):
        (ax.set_xscale if axis == "x" else ax.set_yscale)("symlog", linthresh=1.0)
        plain = FuncFormatter(lambda v, _pos: f"{v:+,.0f}" if v else "0")  # no mathtext
        (ax.xaxis if axis == "x" else ax.yaxis).set_major_formatter(plain)
        return " (symmetric log scale)"
    return ""


OTHER_COLORS = ("#2ca02c", "#9467bd", "#8c564b")


def _color(state: str, k: int) -> str:
    return COLORS.get(state, OTHER_COLORS[k % len(OTHER_COLORS)])


def _figure(width: float, height: float, ncols: int = 1) -> tuple[Figure, list[Axes]]:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def _errors(frame: pd.DataFrame, name: str) -> np.ndarray:
    """``(2, n)`` distances from the point to the interval bounds (0 where missing)."""
    point = frame[name].to_numpy(dtype=float)
    lo = frame.get(f"{name}_lo", frame[name]).to_numpy(dtype=float)
    hi = frame.get(f"{name}_hi", frame[name]).to_numpy(dtype=float)
    return np.nan_to_num(np.vstack([point - lo, hi - point]).clip(min=0))


def erasure_bars(headline: pd.DataFrame, states: list[str], *, title: str = "") -> Figure:
    """Per concept (and the average): target accuracy drop and complement flip rate of every masked
    state, with 95% interval whiskers.

    ``headline`` is :class:`rangelens.erasure.ErasureResult`'s frame. Erasure wants tall solid bars
    (target) and short hatched ones (collateral).
    """
    concepts = [drawable(c) for c in headline["concept"].astype(str)]
    x = np.arange(len(concepts))
    fig, (ax,) = _figure(max(6.0, 1.5 * len(concepts) + 2), 4.0)
    bars = [(s, m, h) for s in states for m, h in (("target_drop", ""), ("complement_flip", "//"))]
    width = 0.8 / len(bars)
    for k, (state, metric, hatch) in enumerate(bars):
        color = _color(state, k)
        ax.bar(
            x + (k - (len(bars) - 1) / 2) * width,
            headline[f"{state}_{metric}"],
            width,
            yerr=_errors(headline, f"{state}_{metric}"),
            color=color if not hatch else "white",
            edgecolor=color,
            ecolor="black",
            capsize=2,
            hatch=hatch,
            label=f"{state}: {metric.replace('_', ' ')}",
        )
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(x, concepts, rotation=30, ha="right")
    ax.set_ylabel("accuracy drop / flip rate (95% CI)")
    ax.set_title(title or "target erasure vs collateral flips")
    ax.legend(fontsize="small")
    return fig


def tau_tradeoff(sweep: pd.DataFrame, states: list[str], *, title: str = "") -> Figure:
    """Average over concepts, against tau: target accuracy drop, complement flip rate and (when
    measured) perplexity change, each with a 95% band; tau-independent states are flat lines.

    ``sweep`` is the ``sweep`` records of :class:`rangelens.erasure.ErasureResult`'s info.
    """
    panels = [("target_drop", "target accuracy drop"), ("complement_flip", "complement flip rate")]
    if any(np.isfinite(sweep.get(f"{s}_ppl_change", pd.Series([np.nan]))).any() for s in states):
        panels.append(("ppl_change", "perplexity change (general text)"))
    fig, axes = _figure(4.5 * len(panels), 4.0, ncols=len(panels))
    taus = sweep["tau"].to_numpy(dtype=float)
    for ax, (metric, label) in zip(axes, panels, strict=True):
        for k, state in enumerate(states):
            name = f"{state}_{metric}"
            color = _color(state, k)
            ax.plot(taus, sweep[name], "-", marker="o", color=color, label=state)
            ax.fill_between(taus, sweep[f"{name}_lo"], sweep[f"{name}_hi"], color=color, alpha=0.2)
        ax.set_xlabel("tau (range half-width in standard deviations)")
        ylabel = "vs base, average over concepts (95% band)"
        if metric == "ppl_change":
            values = [v for s in states for v in sweep[f"{s}_{metric}_hi"].tolist()]
            ylabel = "vs base (95% band)" + _ppl_axis(ax, "y", values)
        ax.set_ylabel(ylabel)
        ax.set_title(label)
        ax.legend(fontsize="small")
    fig.suptitle(title or "tau trade-off")
    return fig


def pareto(
    sweep: pd.DataFrame, ratio_sweep: pd.DataFrame, states: list[str], *, title: str = ""
) -> Figure:
    """Every method on one target-drop vs collateral chart (average over concepts, 95% intervals
    as error bars): range masking along its tau sweep, density bands along their likelihood-ratio
    sweep, neuron masking and the random control as points. Left: against the complement flip rate;
    right (when measured): against the perplexity change. Up and left is better.

    ``sweep`` / ``ratio_sweep``: the ``sweep`` / ``ratio_sweep`` records of
    :class:`rangelens.erasure.ErasureResult`'s info.
    """
    panels = [("complement_flip", "complement flip rate (collateral)")]
    if any(np.isfinite(sweep.get(f"{s}_ppl_change", pd.Series([np.nan]))).any() for s in states):
        panels.append(("ppl_change", "perplexity change on general text"))
    fig, axes = _figure(5.0 * len(panels), 4.4, ncols=len(panels))
    for ax, (metric, label) in zip(axes, panels, strict=True):
        for k, state in enumerate(states):
            by_ratio = f"{state}_target_drop" in ratio_sweep
            frame, knob, sign = (ratio_sweep, "ratio", "r") if by_ratio else (sweep, "tau", "τ")
            if f"{state}_target_drop" not in frame:
                continue
            swept = by_ratio or frame[f"{state}_target_drop"].nunique() > 1
            rows = frame if swept else frame.iloc[:1]
            x, y = rows[f"{state}_{metric}"], rows[f"{state}_target_drop"]
            color = _color(state, k)
            ax.errorbar(
                x,
                y,
                xerr=_errors(rows, f"{state}_{metric}"),
                yerr=_errors(rows, f"{state}_target_drop"),
                fmt="-o" if swept else "o",
                color=color,
                capsize=2,
                label=state,
            )
            if swept:
                for xi, yi, v in zip(x, y, rows[knob], strict=True):
                    ax.annotate(
                        f"{sign}={v:g}",
                        (xi, yi),
                        fontsize=6,
                        xytext=(3, 3),
                        textcoords="offset points",
                        color=color,
                    )
        if metric == "ppl_change":
            values = [
                v
                for frame in (sweep, ratio_sweep)
                for s in states
                if f"{s}_{metric}_hi" in frame
                for v in frame[f"{s}_{metric}_hi"].tolist()
            ]
            label += _ppl_axis(ax, "x", values)
        ax.set_xlabel(label)
        ax.set_ylabel("target accuracy drop (average over concepts)")
        ax.legend(fontsize="small")
    fig.suptitle(title or "erasure vs collateral (Pareto view)")
    return fig


@functools.lru_cache(maxsize=64)
def _charmap(font_file: str) -> frozenset[int]:
    return frozenset(font_manager.get_font(font_file).get_charmap())


def drawable(text: str, props: FontProperties | None = None) -> str:
    """``text`` with the characters that none of the fonts of ``props`` (default: the current
    default font) can draw, such as an emoji in a label, replaced by U+FFFD: matplotlib would draw
    an empty box and warn about each such glyph every time it draws. Apply it to labels given to
    ``set_xticks`` too (tick texts are made again from those labels when drawn)."""
    props = props if props is not None else FontProperties()
    find = getattr(font_manager.fontManager, "_find_fonts_by_props", None)  # with fallback fonts
    files = find(props) if find is not None else [font_manager.findfont(props)]
    glyphs = frozenset().union(*(_charmap(str(f)) for f in files))
    stand_in = "\ufffd" if 0xFFFD in glyphs else "?"
    return "".join(
        ch if ord(ch) in glyphs or unicodedata.category(ch) in ("Cc", "Cf") else stand_in
        for ch in text
    )


def literal_text(fig: Figure) -> None:
    """Make every text of ``fig`` draw literally: mathtext off (concept names from user data may
    hold ``$``) and characters its fonts lack replaced (:func:`drawable`)."""
    for text in fig.findobj(Text):
        text.set_parse_math(False)
        text.set_text(drawable(text.get_text(), text.get_fontproperties()))


def save_figure(fig: Figure, path: Path, *, dpi: int = 120) -> None:
    """Save a figure as PNG atomically (:func:`rangelens.artifacts.atomic_path`); text is drawn
    literally and without missing-glyph warnings (:func:`literal_text`)."""
    literal_text(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
