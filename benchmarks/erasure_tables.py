"""Erasure tables of finished runs for benchmarks/ERASURE_RESULTS.md (issue 19): per run the
behaviour / information table of every method, the tau curve as paired differences and the verdict.

    python benchmarks/erasure_tables.py RUN_DIR [RUN_DIR ...] > benchmarks/ERASURE_RESULTS.md
"""

from __future__ import annotations

import sys
from pathlib import Path

from rangelens.erasure.files import _markdown, curve_table, load_erasure, method_table


def section(run: Path) -> str:
    result = load_erasure(run / "erasure")
    info = result.info
    seconds = info.get("seconds", {})
    parts = [
        f"## {info['model']} on {info['dataset']}: masks at {info['headline_site']} "
        f"(head reads {info['task_info'].get('site', '?')}), tau = {info['tau']:g}, "
        f"p = {info['p']:g}\n",
        f"{info['n_test_texts']} test texts ({info['protocol']['folds']}-fold), base accuracy "
        f"{info['base_acc']:.3f}, chance for the frozen head's target accuracy "
        f"{info.get('head_chance', float('nan')):.2f}; erasure stage {seconds.get('total', '?')} s "
        f"(classification and probes {seconds.get('classify', '?')} s, perplexity "
        f"{seconds.get('perplexity', '?')} s). Run directory: `{run}`.\n",
        _markdown(method_table(result)),
    ]
    curve = curve_table(info)
    if not curve.empty:
        parts += ["\ntau curve, paired differences range − neuron:\n", _markdown(curve)]
    parts += [*(f"\n> notice: {n}\n" for n in info.get("notices", []))]
    parts.append(f"\n**Verdict.** {info['verdict']}\n")
    return "\n".join(parts)


def main(runs: list[str]) -> None:
    print("# Erasure: behaviour, information, LEACE and the tau curve (issue 19)\n")
    print(
        "Cells are `point [95% bootstrap interval]`, averages over concepts. Frozen head: the "
        "classifier fitted unmasked (behaviour). Retrained probes: refit per fold on the edited "
        "training rows (information). dims: neurons masked, or LEACE's rank. Made by "
        "`benchmarks/erasure_tables.py`.\n"
    )
    for run in runs:
        print(section(Path(run)))


if __name__ == "__main__":
    main(sys.argv[1:])
