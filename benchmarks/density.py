"""Density bands vs mu +- tau sigma ranges vs neuron masking vs random neurons, in one erasure run.

For each setting, one ``rangelens run`` (the packaged config plus the ``density`` condition and a
likelihood-ratio sweep) gives all four conditions on the same k-fold splits, the same salient
neurons and the same bootstrap resamples; this script then writes ``benchmarks/DENSITY_RESULTS.md``
(headline tables with 95% intervals, the Pareto verdicts, both sweeps, band statistics) and copies
each run's ``pareto.png`` beside it.

Usage: ``python benchmarks/density.py [--settings demo minilm] [--out runs/density]``.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd

from rangelens.artifacts import write_text
from rangelens.erasure.outputs import interval_text
from rangelens.pipeline import example_config, load_config, run
from rangelens.provenance import library_versions
from rangelens.ranges.bands import band_purity_coverage
from rangelens.ranges.splits import FULL

HERE = Path(__file__).parent
RATIOS = [0.5, 4.0]  # beside the headline density_ratio 1
TAUS = [1.0, 3.0]  # beside the headline tau 2 (the packaged configs sweep more; CPU time)
SETTINGS = {
    "demo": (
        "smollm2-135m",
        "SmolLM2-135M, BBC News, resid at the last block, last token (the demo)",
    ),
    "minilm": ("minilm-l6", "all-MiniLM-L6-v2, Rotten Tomatoes, resid at the last block, CLS"),
}
STATES = ("density", "range", "neuron", "random")
METRICS = ("target_drop", "complement_drop", "complement_flip", "ppl_change")


def run_setting(name: str, out: Path) -> tuple[object, float]:
    model, _ = SETTINGS[name]
    config = load_config(example_config(model))
    config.out = out / name
    config.analysis.density_ratios = RATIOS
    config.analysis.taus = TAUS
    assert config.erasure is not None
    config.erasure.conditions = ["range", "neuron", "random", "density"]
    start = time.perf_counter()
    result = run(config, progress=False)
    return result, time.perf_counter() - start


def _cell(row: dict | pd.Series, name: str) -> str:
    text = interval_text(row, name, 1 if "ppl" in name else 3)
    return "n/a" if text == "–" else text


def headline_table(result: object) -> str:
    row = result.erasure.headline.set_index("concept").loc["average"]  # type: ignore[attr-defined]
    lines = [
        "| condition | target drop | complement drop | flip rate | ΔPPL |",
        "|:---|---:|---:|---:|---:|",
    ]
    labels = {
        "density": "density bands (ratio > 1)",
        "range": "μ ± τσ ranges (τ = 2)",
        "neuron": "neuron masking",
        "random": "random neurons (control)",
    }
    for state in STATES:
        cells = [_cell(row, f"{state}_{m}") for m in METRICS]
        lines.append(f"| {labels[state]} | " + " | ".join(cells) + " |")
    diffs = []
    for a, b in (("density", "range"), ("density", "neuron"), ("range", "neuron")):
        cells = [_cell(row, f"diff_{a}_{b}_{m}") for m in METRICS]
        diffs.append(f"| {a} − {b} (paired) | " + " | ".join(cells) + " |")
    return "\n".join(lines + diffs) + "\n"


def sweep_table(records: list[dict], knob: str, states: list[str]) -> str:
    frame = pd.DataFrame(records)
    lines = [f"| {knob} | state | target drop | flip rate | ΔPPL |", "|---:|:---|---:|---:|---:|"]
    for row in frame.to_dict(orient="records"):
        for s in states:
            if f"{s}_target_drop" not in row:
                continue
            cells = [
                _cell(row, f"{s}_{m}") for m in ("target_drop", "complement_flip", "ppl_change")
            ]
            lines.append(f"| {row[knob]:g} | {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def band_stats(result: object) -> str:
    """Shape of the bands on the analysis split: intervals, empty bands, purity and coverage of
    the density bands vs the mu +- 2 sigma ranges (training rows of the analysis split)."""
    analysis = result.analysis  # type: ignore[attr-defined]
    rangeset = analysis.rangeset
    site = str(analysis.capture.info["site"])
    tau, p = float(rangeset.metadata["tau"]), float(rangeset.metadata["p"])
    stats = analysis.capture.stats
    lines = [
        "| ranges | median intervals | empty bands | median purity | median coverage |",
        "|:---|---:|---:|---:|---:|",
    ]
    for label, rm in (
        ("density, ratio 1", rangeset.band_map(site, FULL, 1.0, p)),
        (f"μ ± {tau:g}σ", rangeset.map(site, FULL, tau, p)),
    ):
        purity, coverage = band_purity_coverage(stats, rm.neurons, *rm.bands)
        lines.append(
            f"| {label} | {np.median(rm.n_intervals):g} | {(rm.n_intervals == 0).mean():.1%} | "
            f"{np.nanmedian(purity):.3f} | {np.median(coverage):.3f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--out", type=Path, default=Path("runs/density"))
    args = parser.parse_args()
    versions = library_versions()
    parts = [
        "# Density bands vs μ ± τσ ranges vs neuron masking vs random neurons\n\n"
        "Produced by `python benchmarks/density.py` on "
        f"{platform.processor() or platform.machine()} ({platform.system()}), CPU only, "
        f"torch {versions.get('torch', '?')}, transformers {versions.get('transformers', '?')}. "
        "Each setting is one `rangelens run` of the packaged config with "
        "`erasure.conditions: [range, neuron, random, density]` and "
        f"`analysis.density_ratios: {RATIOS}` (headline `density_ratio: 1`), "
        f"`analysis.taus: {TAUS}` (headline τ = 2): every condition uses "
        "the same 5-fold splits, the same salient neurons (ranking `dprime`, p = 0.3), the same "
        "replacement and the same bootstrap resamples, so the paired differences are exact "
        "comparisons. Density bands are fitted by the ranges stage per fold on the correctly "
        "classified training rows, like the ranges. Averages over concepts; brackets: 95% "
        "bootstrap intervals over texts; a difference whose interval includes 0 is a tie. "
        "Drops are base − masked, flip rate is the share of other-concept texts whose "
        "prediction changed, ΔPPL is masked − base on general text (n/a for encoders). "
        "Wall times are on a 2-core machine shared with other jobs: indicative only.\n"
    ]
    for name in args.settings:
        result, seconds = run_setting(name, args.out)
        info = result.erasure.info  # type: ignore[attr-defined]
        shutil.copyfile(
            args.out / name / "erasure" / "pareto.png", HERE / f"density_pareto_{name}.png"
        )
        parts.append(
            f"\n## {SETTINGS[name][1]}\n\n"
            f"Base accuracy {info['base_acc']:.3f} (chance {info['chance']:.2f}), "
            f"{info['n_test_texts']} test texts, base perplexity "
            + (f"{info['base_ppl']:.1f}" if np.isfinite(info["base_ppl"]) else "n/a (encoder)")
            + f"; erasure stage {info['seconds']['total'] / 60:.1f} min "
            f"(this call: {seconds / 60:.1f} min, finished stages are reused).\n\n"
            + headline_table(result)
            + f"\n**Verdict (rangelens).** {info['verdict']}\n\n"
            + f"![Pareto view](density_pareto_{name}.png)\n\n"
            + "### Bands on the analysis split\n\n"
            + band_stats(result)
            + "\n### τ sweep (μ ± τσ ranges; neuron and random do not depend on τ)\n\n"
            + sweep_table(info["sweep"], "tau", ["range", "neuron", "random"])
            + "\n### Likelihood-ratio sweep (density bands)\n\n"
            + sweep_table(info["ratio_sweep"], "ratio", ["density"])
        )
    write_text(HERE / "DENSITY_RESULTS.md", "".join(parts))


if __name__ == "__main__":
    main()
