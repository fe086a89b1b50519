"""Steering a run's model toward one of its concepts: base, range steering and the mean-difference
baseline, side by side (``rangelens steer``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from rangelens.activations.models import LoadedModel, load_model
from rangelens.activations.sites import resolve_site
from rangelens.intervene.steer import DirectionSteer, RangeSteer, generate
from rangelens.ranges.captured import load_capture
from rangelens.ranges.maps import RangeMap
from rangelens.rundir import RunDir


def run_steers(
    run_dir: str | Path,
    concept: str,
    *,
    lm: LoadedModel | None = None,
    value: str = "mean",
    q: float = 0.5,
    alpha: float = 1.0,
) -> tuple[LoadedModel, RangeSteer, DirectionSteer]:
    """The run's model and its two steers toward ``concept``: its salient neurons set inside its
    ranges (the headline map) and ``alpha`` times its mean difference."""
    where = RunDir(run_dir)
    where.require()
    config = where.config()
    if lm is None:
        lm = load_model(
            str(config["model"]),
            device=str(config.get("device", "cpu")),
            dtype=str(config.get("dtype", "float32")),
            device_map=config.get("device_map"),
        )
    site = resolve_site(lm.model, str(config.get("site", "resid")), config.get("layer", -1))
    ranges = RangeMap.load(where.ranges)
    stats = load_capture(where.capture).stats
    steer = RangeSteer.from_range_map(site, ranges, concept, stats=stats, value=value, q=q)
    direction = DirectionSteer.mean_difference(site, stats, concept, alpha)
    return lm, steer, direction


def steer_run(
    run_dir: str | Path,
    concept: str,
    prompts: Sequence[str],
    *,
    lm: LoadedModel | None = None,
    value: str = "mean",
    q: float = 0.5,
    alpha: float = 1.0,
    baseline: bool = True,
    max_new_tokens: int = 32,
) -> pd.DataFrame:
    """Greedy continuations of ``prompts`` by the run's model: unsteered (``base``), steered with
    ``concept``'s ranges (``range``: its salient neurons set to its mean or ``q`` quantile at every
    position) and, with ``baseline``, along its mean difference (``direction``). One row per
    (prompt, method): ``prompt``, ``method``, ``text``::

        steer_run("runs/demo", "sport", ["The weekend was"], max_new_tokens=20)
    """
    lm, steer, direction = run_steers(run_dir, concept, lm=lm, value=value, q=q, alpha=alpha)
    methods: dict[str, Any] = {"base": None, "range": steer}
    if baseline:
        methods["direction"] = direction
    rows = []
    for method, edit in methods.items():
        texts = generate(lm, list(prompts), steer=edit, max_new_tokens=max_new_tokens)
        rows += [
            {"prompt": p, "method": method, "text": t} for p, t in zip(prompts, texts, strict=True)
        ]
    return pd.DataFrame(rows, columns=["prompt", "method", "text"])
