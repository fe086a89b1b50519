"""Figures of the atlas: per-neuron histograms as inline SVG drawn straight from the histogram counts
(hundreds per run, so no plotting library), and the run-level figures with matplotlib, saved as SVG
for the pages and PNG for papers.

Every string placed in hand-written SVG goes through :func:`markupsafe.escape`: concept names come
from the user's dataset and are untrusted. Text that holds right-to-left or directional formatting
characters (a label with U+202E RIGHT-TO-LEFT OVERRIDE) is isolated by :func:`isolate`, in the SVG
and in every page (the atlas templates' ``finalize``), so it cannot reorder the text around it.
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from markupsafe import Markup, escape
from matplotlib import rc_context
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from rangelens.erasure.plots import drawable, literal_text

if TYPE_CHECKING:
    from matplotlib.typing import RcKeyType  # matplotlib >= 3.9

PALETTE = (
    "#4e79a7",
    "#f28e2b",
    "#59a14f",
    "#e15759",
    "#76b7b2",
    "#b07aa1",
    "#edc948",
    "#ff9da7",
    "#9c755f",
    "#7f7f7f",
)
INK, MUTED, GRID = "#1f2933", "#616e7c", "#e4e7eb"
FONT = "system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif"


ISOLATES = ("\u2066", "\u2067", "\u2068")  # LRI, RLI, FSI; each closed by a PDI (U+2069)
_DIRECTIONAL = {"R", "AL", "LRE", "RLE", "LRO", "RLO", "PDF", "LRI", "RLI", "FSI", "PDI"}


def isolate(value: Any) -> Any:
    """A string holding right-to-left or directional formatting characters wrapped in FSI … PDI
    (what ``<bdi>`` does, valid in text, attributes and ``<title>``): overrides inside it end with
    it. A stray PDI that would close the isolate early is dropped. Other values are returned as
    they are (markup, numbers, strings that cannot reorder anything)."""
    if not isinstance(value, str) or isinstance(value, Markup):
        return value
    if not any(unicodedata.bidirectional(ch) in _DIRECTIONAL for ch in value):
        return value
    out, depth = [], 0
    for ch in value:
        if ch == "\u2069":
            if not depth:
                continue
            depth -= 1
        elif ch in ISOLATES:
            depth += 1
        out.append(ch)
    return "\u2068" + "".join(out) + "\u2069" * (depth + 1)


def color(index: int) -> str:
    """The colour of concept ``index`` (the palette repeats after ten concepts)."""
    return PALETTE[index % len(PALETTE)]


def fmt(x: float | None, digits: int = 4) -> str:
    """A compact number: ``digits`` significant figures, scientific only for extreme magnitudes;
    an en dash for None / NaN."""
    if x is None or not math.isfinite(x):
        return "–" if x is None or math.isnan(x) else ("∞" if x > 0 else "−∞")
    if x == 0:
        return "0"
    if abs(x) >= 1e5 or abs(x) < 1e-3:
        return f"{x:.{max(digits - 2, 1)}e}"
    return f"{x:.{digits}g}"


def fixed(x: float | None, decimals: int = 3) -> str:
    """``x`` with a fixed number of decimals (for shares, overlaps, correlations); en dash for
    None / NaN."""
    return "–" if x is None or math.isnan(x) else f"{x:.{decimals}f}"


def percent(x: float | None) -> str:
    """A share as a percentage with one decimal; en dash for None / NaN."""
    return "–" if x is None or math.isnan(x) else f"{100 * x:.1f}%"


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values within ``[lo, hi]``."""
    if not hi > lo:
        return [lo]
    raw = (hi - lo) / n
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(s * magnitude for s in (1, 2, 2.5, 5, 10) if s * magnitude >= raw)
    first = math.ceil(lo / step)
    return [round(k * step, 12) for k in range(first, math.floor(hi / step) + 1)]


def band_text(intervals: Sequence[tuple[float, float]]) -> str:
    """A band as text: ``[a, b] ∪ [c, d]``; ``∅`` for an empty band."""
    return " ∪ ".join(f"[{fmt(lo)}, {fmt(hi)}]" for lo, hi in intervals) or "∅"


@dataclass(frozen=True)
class Series:
    """One concept on one neuron: its histogram on the neuron's shared grid, its fitted Gaussian and,
    where the neuron is salient for it, its ``band``: the range's intervals, left to right (one for
    mu +- tau sigma, none or several for density bands)."""

    concept: str
    index: int
    counts: np.ndarray
    mean: float
    std: float
    band: tuple[tuple[float, float], ...] | None


def histogram_svg(
    edges: np.ndarray, series: Sequence[Series], *, width: int = 720, plot_height: int = 220
) -> Markup:
    """A standalone SVG: each concept's histogram (step outline), its Gaussian ``N(mean, std)``
    scaled to counts, one band row per range below the axis (every interval of the band on it), a legend whose entries toggle a
    concept (with the atlas script), and a hover tooltip per bin listing every concept's count."""
    left, right = 96, 16
    legend = _legend_positions(series, left, width - right)
    top = 14 + 18 * max((y for _, y in legend), default=0) + 16
    bands = [s for s in series if s.band is not None]
    band_top = top + plot_height + 50
    height = band_top + 16 * len(bands) + 4
    x0, x1 = _extent(edges, series)
    span = x1 - x0
    inner = width - left - right
    curve_x = np.linspace(x0, x1, 90)
    bin_width = float(edges[1] - edges[0])  # the grid is uniform
    curves = {
        s.index: float(s.counts.sum()) * bin_width * _normal_pdf(curve_x, s.mean, s.std)
        for s in series
        if s.std > 0
    }
    peak = max((int(s.counts.max()) for s in series), default=0)
    curve_peak = max((float(c.max()) for c in curves.values()), default=0.0)
    y_max = max(peak, min(curve_peak, 1.5 * peak), 1) * 1.1  # tall narrow fits are clipped

    def px(v: float | np.ndarray) -> np.ndarray:
        return left + (np.asarray(v, dtype=np.float64) - x0) / span * inner

    def py(v: float | np.ndarray) -> np.ndarray:
        return top + plot_height - np.asarray(v, dtype=np.float64) / y_max * plot_height

    def pts(xs: np.ndarray, ys: np.ndarray) -> str:  # Python floats format far faster than NumPy's
        return " ".join(map("{:.1f},{:.1f}".format, xs.tolist(), ys.tolist()))

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="hist" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" font-family="{FONT}" font-size="11" fill="{INK}" '
        f'role="img" aria-label="activation histograms by concept">'
    ]
    for t in nice_ticks(0, y_max, 4):
        y = float(py(t))
        out.append(
            f'<line x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}" stroke="{GRID}"/>'
            f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" fill="{MUTED}">{t:g}</text>'
        )
    base = top + plot_height
    for t in nice_ticks(x0, x1, 6):
        x = float(px(t))
        out.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{base}" y2="{base + 4}" stroke="{MUTED}"/>'
            f'<text x="{x:.1f}" y="{base + 16}" text-anchor="middle" fill="{MUTED}">'
            f"{fmt(t)}</text>"
        )
    out.append(
        f'<line x1="{left}" x2="{width - right}" y1="{base}" y2="{base}" stroke="{MUTED}"/>'
        f'<text x="{left + inner / 2:.1f}" y="{base + 32}" text-anchor="middle" fill="{MUTED}">'
        f"activation</text>"
        f'<text transform="translate(14 {top + plot_height / 2:.0f}) rotate(-90)" '
        f'text-anchor="middle" fill="{MUTED}">count</text>'
    )
    for s in series:
        paint = color(s.index)
        name = escape(isolate(s.concept))
        group = [f'<g class="series" data-concept="{s.index}"><title>{name}</title>']
        nonzero = np.flatnonzero(s.counts)
        if nonzero.size:
            a, b = int(nonzero[0]), int(nonzero[-1]) + 1
            xs = np.repeat(px(edges[a : b + 1]), 2)[1:-1]
            ys = np.repeat(py(s.counts[a:b]), 2)
            outline = pts(
                np.concatenate([[xs[0]], xs, [xs[-1]]]), np.concatenate([[base], ys, [base]])
            )
            group.append(
                f'<polygon points="{outline}" fill="{paint}" fill-opacity="0.18" '
                f'stroke="{paint}" stroke-width="1.4" stroke-linejoin="round"/>'
            )
        if s.index in curves:
            fitted = np.minimum(curves[s.index], y_max)
            group.append(
                f'<polyline points="{pts(px(curve_x), py(fitted))}" fill="none" '
                f'stroke="{paint}" stroke-width="1.6" stroke-dasharray="5 3"/>'
            )
        group.append("</g>")
        out.extend(group)
    for row, s in enumerate(bands):
        assert s.band is not None
        y = band_top + 16 * row
        paint = color(s.index)
        x_mean = float(np.clip(px(s.mean), left, width - right))
        out.append(
            f'<g class="band" data-concept="{s.index}"><title>{escape(isolate(s.concept))} '
            f"{'range' if len(s.band) == 1 else 'band'} {escape(band_text(s.band))}, "
            f"mean {fmt(s.mean)}</title>"
            f'<text x="{left - 6}" y="{y + 4}" text-anchor="end" fill="{MUTED}">'
            f"{escape(isolate(_short(s.concept)))}</text>"
        )
        for lo, hi in s.band:
            x_lo, x_hi = np.clip(px(np.array([lo, hi])), left, width - right)
            out.append(
                f'<line x1="{x_lo:.1f}" x2="{x_hi:.1f}" y1="{y}" y2="{y}" stroke="{paint}" '
                f'stroke-width="7" stroke-linecap="round"/>'
            )
        out.append(
            f'<circle cx="{x_mean:.1f}" cy="{y}" r="3.2" fill="#fff" stroke="{paint}" '
            f'stroke-width="1.5"/></g>'
        )
    for s, (x, row) in zip(series, legend, strict=True):
        y = 8 + 18 * row
        out.append(
            f'<g class="legend" data-concept="{s.index}" tabindex="0" role="button">'
            f'<rect x="{x:.1f}" y="{y}" width="12" height="12" rx="2" fill="{color(s.index)}"/>'
            f'<text x="{x + 16:.1f}" y="{y + 10}">{escape(isolate(_short(s.concept, 18)))}</text></g>'
        )
    counts = np.array([s.counts for s in series]).T.tolist()  # (bins, concepts)
    bounds, xs = edges.tolist(), px(edges).tolist()
    for k, row in enumerate(counts):
        if any(row):
            lines = [f"[{fmt(bounds[k])}, {fmt(bounds[k + 1])})"]
            lines += [f"{isolate(s.concept)}: {n}" for s, n in zip(series, row, strict=True) if n]
            out.append(
                f'<rect class="bin" x="{xs[k]:.1f}" y="{top}" width="{xs[k + 1] - xs[k]:.1f}" '
                f'height="{plot_height}" fill="transparent"><title>'
                f"{escape(chr(10).join(lines))}</title></rect>"
            )
    out.append("</svg>")
    return Markup("".join(out))


def _normal_pdf(x: np.ndarray, mean: float, std: float) -> np.ndarray:
    return np.exp(-0.5 * ((x - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi))


def _legend_positions(
    series: Sequence[Series], start: float, end: float
) -> list[tuple[float, int]]:
    """``(x, row)`` of each legend entry, wrapping onto a new row at ``end``."""
    out, x, row = [], start, 0
    for s in series:
        step = 28 + 6.5 * len(_short(s.concept, 18))
        if x > start and x + step > end:
            x, row = start, row + 1
        out.append((x, row))
        x += step
    return out


def _extent(edges: np.ndarray, series: Sequence[Series]) -> tuple[float, float]:
    """The x-range to draw: every concept's non-empty bins and every range band, padded 3%."""
    used = np.flatnonzero(np.any([s.counts > 0 for s in series], axis=0))
    ends = [float(edges[used[0]]), float(edges[used[-1] + 1])] if used.size else []
    ends += [v for s in series for pair in s.band or () for v in pair if math.isfinite(v)]
    lo, hi = (min(ends), max(ends)) if ends else (float(edges[0]), float(edges[-1]))
    pad = 0.03 * (hi - lo) if hi > lo else max(abs(lo), 1.0) * 0.05
    return lo - pad, hi + pad


def _short(text: str, n: int = 13) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


# ---------------------------------------------------------------------------- run-level figures


STYLE: dict[RcKeyType, Any] = {
    "font.size": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.edgecolor": MUTED,
    "axes.labelcolor": INK,
    "xtick.color": MUTED,
    "ytick.color": MUTED,
    "svg.fonttype": "none",
}


def _figure(width: float, height: float, ncols: int = 1) -> tuple[Figure, list[Axes]]:
    """A figure with the atlas style and ``ncols`` axes (no pyplot state)."""
    fig = Figure(figsize=(width, height), layout="constrained")
    with rc_context(STYLE):
        return fig, [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]


def overlap_figure(concepts: Sequence[str], salient: np.ndarray, gaussian: np.ndarray) -> Figure:
    """Two concept x concept heatmaps: Jaccard overlap of salient-neuron sets, and the median
    Bhattacharyya coefficient between the row concept's Gaussian and the column concept's on the
    row concept's salient neurons."""
    n = len(concepts)
    size = max(2.6, 1.0 + 0.4 * n)
    fig, axes = _figure(2 * size + 1.6, size + 0.5, 2)
    panels = (
        (salient, "salient-neuron overlap\n(Jaccard)"),
        (gaussian, "distribution overlap\n(median Bhattacharyya)"),
    )
    for ax, (matrix, title) in zip(axes, panels, strict=True):
        image = ax.imshow(matrix, vmin=0, vmax=1, cmap="Blues")
        ax.set_xticks(range(n), [drawable(_short(c)) for c in concepts], rotation=40, ha="right")
        ax.set_yticks(range(n), [drawable(_short(c)) for c in concepts])
        ax.set_title(title, fontsize=9)
        ax.spines[:].set_visible(False)
        if n <= 12:
            for (r, c), v in np.ndenumerate(matrix):
                ax.text(
                    c,
                    r,
                    f"{v:.2f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if v > 0.6 else INK,
                )
        fig.colorbar(image, ax=ax, shrink=0.8)
    return fig


def polysemanticity_figure(
    concepts: Sequence[str], shared: np.ndarray, n_concepts: np.ndarray
) -> Figure:
    """Left: per concept, the share of its salient neurons also salient for another concept.
    Right: how many salient neurons are salient for 1, 2, ... concepts."""
    fig, (left, right) = _figure(7, 1.2 + 0.25 * len(concepts), 2)
    left.barh(range(len(concepts)), shared, color=[color(i) for i in range(len(concepts))])
    left.set_yticks(range(len(concepts)), [drawable(_short(c)) for c in concepts])
    left.invert_yaxis()
    left.set_xlim(0, 1)
    left.set_xlabel("share of salient neurons shared with another concept")
    values, counts = np.unique(n_concepts, return_counts=True)
    right.bar(values, counts, color=PALETTE[0])
    right.set_xticks(range(1, len(concepts) + 1))
    right.set_xlabel("concepts a salient neuron is salient for")
    right.set_ylabel("neurons")
    return fig


def explanation_scores_figure(
    single_pass: np.ndarray, iterative: np.ndarray, neurons: Sequence[int]
) -> Figure:
    """Held-out correlation of the iterative (NeuronScope) explanation against the single-pass
    baseline, one point per neuron, with the diagonal."""
    fig, (ax,) = _figure(3.6, 3.4)
    lo = min(0.0, float(np.min(single_pass, initial=0)), float(np.min(iterative, initial=0)))
    ax.plot([lo, 1], [lo, 1], color=GRID, lw=1, zorder=0)
    ax.scatter(single_pass, iterative, s=22, color=PALETTE[0], edgecolor="white", lw=0.5)
    if len(neurons) <= 30:
        for x, y, n in zip(single_pass, iterative, neurons, strict=True):
            ax.annotate(
                str(n), (x, y), xytext=(3, 3), textcoords="offset points", fontsize=7, color=MUTED
            )
    ax.set_xlim(lo, 1)
    ax.set_ylim(lo, 1)
    ax.set_xlabel("single-pass held-out correlation")
    ax.set_ylabel("iterative (NeuronScope) held-out correlation")
    return fig


def save_figure(fig: Figure, directory: Path, name: str) -> None:
    """Write ``name.svg`` (for the pages) and ``name.png`` (150 dpi, for papers). Text is drawn
    literally: concept names come from user data and may hold ``$``, which mathtext would parse,
    or characters the fonts lack (emoji), which are replaced (:func:`rangelens.erasure.plots.literal_text`)."""
    directory.mkdir(parents=True, exist_ok=True)
    with rc_context(STYLE):
        literal_text(fig)
        fig.savefig(directory / f"{name}.svg", metadata={"Date": None})
        fig.savefig(directory / f"{name}.png", dpi=150)
