"""Results of a run as pandas DataFrames, where a table is the natural shape."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from rangelens.erasure.outputs import EFFECTS, ErasureResult, load_erasure
from rangelens.errors import RangelensError
from rangelens.rundir import RunDir

EFFECT_COLUMNS = ["concept", "condition", "effect", "estimate", "lo", "hi"]


def _erasure(source: Any) -> ErasureResult:
    if isinstance(source, ErasureResult):
        return source
    erasure = getattr(source, "erasure", None)  # a RunResult
    if isinstance(erasure, ErasureResult):
        return erasure
    if isinstance(source, str | Path):
        where = RunDir(source)
        directory = where.erasure if where.is_run() else Path(source)
        if not (directory / "erasure.json").is_file():
            raise RangelensError(
                f"{str(source)!r} has no erasure results; run `rangelens run CONFIG` (or "
                f"`rangelens demo`) with an erasure section"
            )
        return load_erasure(directory)
    raise RangelensError(
        f"effects() takes a run directory, an erasure directory, a RunResult or an ErasureResult; "
        f"got {type(source).__name__}"
    )


def effects(source: Any) -> pd.DataFrame:
    """The erasure experiment's headline per concept, one row per (concept, condition, effect):
    ``estimate`` with its 95% bootstrap interval ``lo`` / ``hi``. Concepts include ``"average"``;
    effects are ``target_drop``, ``complement_drop``, confidence drops, ``complement_flip`` and
    ``ppl_change``; conditions are the run's (``range``, ``neuron``, ``random``, ...) and the
    paired differences (``range-neuron``, ...). ``source``: a run directory, its ``erasure/``
    directory, a :class:`~rangelens.pipeline.RunResult` or an ``ErasureResult``::

        frame = effects("runs/demo")
        frame.pivot_table(index="concept", columns="condition", values="estimate")
    """
    result = _erasure(source)
    headline = result.headline
    conditions = [str(c) for c in result.info.get("conditions", [])]
    pairs = sorted(
        {
            name.removeprefix("diff_").split("_")[0]
            + "-"
            + name.removeprefix("diff_").split("_")[1]
            for name in headline.columns
            if name.startswith("diff_") and not name.endswith(("_lo", "_hi"))
        }
    )
    rows = []
    for row in headline.to_dict(orient="records"):
        for condition in [*conditions, *pairs]:
            prefix = f"diff_{condition.replace('-', '_')}" if "-" in condition else condition
            for effect in EFFECTS:
                name = f"{prefix}_{effect}"
                if name not in row:
                    continue
                rows.append(
                    {
                        "concept": row["concept"],
                        "condition": condition,
                        "effect": effect,
                        "estimate": row[name],
                        "lo": row.get(f"{name}_lo"),
                        "hi": row.get(f"{name}_hi"),
                    }
                )
    return pd.DataFrame(rows, columns=EFFECT_COLUMNS)
