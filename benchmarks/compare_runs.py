"""Compare two run directories by content, timings and paths excluded: the erasure figures
(``erasure.json`` headline and info, ``erasure.parquet``), every saved range map (arrays and
metadata under ``ranges/maps``) and the explanations (``results.json`` and every neuron's
explanation). Used to show that a refactor leaves a run's numbers unchanged::

    python benchmarks/compare_runs.py runs/demo-before runs/demo-after

Prints one line per compared item and exits 1 if anything differs.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from safetensors.numpy import load_file

# Fields that record when, where or how fast, not what was measured.
VOLATILE = {"seconds", "finished", "updated", "built", "tokens_per_second", "peak_rss_mb", "total"}
PATHS = {"model", "dataset", "run_dir"}


def _clean(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items() if k not in VOLATILE | PATHS}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return value


def _json(path: Path) -> Any:
    return _clean(json.loads(path.read_text()))


def _diff(a: Any, b: Any, where: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{where}.{k}: only in one run" for k in sorted(set(a) ^ set(b))]
        for k in sorted(set(a) & set(b)):
            out += _diff(a[k], b[k], f"{where}.{k}")
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [
            d
            for i, (x, y) in enumerate(zip(a, b, strict=True))
            for d in _diff(x, y, f"{where}[{i}]")
        ]
    return [] if a == b else [f"{where}: {a!r} != {b!r}"]


def compare(a: Path, b: Path) -> list[str]:
    problems: list[str] = []

    def check(name: str, found: list[str]) -> None:
        print(f"{'same' if not found else 'DIFFERENT'}  {name}")
        problems.extend(f"{name}{d}" for d in found[:5])

    ea, eb = _json(a / "erasure" / "erasure.json"), _json(b / "erasure" / "erasure.json")
    check("erasure.json headline", _diff(ea["headline"], eb["headline"]))
    check("erasure.json info", _diff(ea["info"], eb["info"]))
    ta, tb = (pd.read_parquet(d / "erasure" / "erasure.parquet") for d in (a, b))
    same_table = ta.shape == tb.shape and ta.equals(tb)
    check("erasure.parquet", [] if same_table else [": tables differ"])
    maps_a = sorted(p.relative_to(a) for p in (a / "ranges" / "maps").rglob("*") if p.is_file())
    maps_b = sorted(p.relative_to(b) for p in (b / "ranges" / "maps").rglob("*") if p.is_file())
    check("ranges/maps file list", [] if maps_a == maps_b else [": file lists differ"])
    for rel in maps_a:
        if rel.suffix == ".safetensors":
            xa, xb = load_file(str(a / rel)), load_file(str(b / rel))
            same = xa.keys() == xb.keys() and all(
                np.array_equal(xa[k], xb[k], equal_nan=True) for k in xa
            )
            found = [] if same else [": arrays differ"]
        else:
            found = _diff(_json(a / rel), _json(b / rel))
        if found:
            check(str(rel), found)
    print(f"compared {len(maps_a)} files under ranges/maps")
    check(
        "explanations/results.json",
        _diff(*(_json(d / "explanations" / "results.json") for d in (a, b))),
    )
    for path in sorted((a / "explanations" / "explanations").glob("*.json")):
        other = b / "explanations" / "explanations" / path.name
        check(f"explanations/{path.name}", _diff(_json(path), _json(other)))
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    args = parser.parse_args()
    problems = compare(args.before, args.after)
    for line in problems:
        print(line)
    print("IDENTICAL" if not problems else f"{len(problems)} differences")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
