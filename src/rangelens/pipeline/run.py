"""Whole runs: :func:`analyze` (capture -> splits -> ranges), :func:`run` (every stage of a YAML
config, then the atlas) and :func:`explain_run` (the explanations stage of an existing run).

Resumable and safe to re-run: every stage is reused when its inputs are unchanged and its files
load (see :mod:`rangelens.pipeline.runner`); the run directory is locked meanwhile; a run that
fails before writing leaves nothing behind.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rangelens.activations.models import LoadedModel, load_model
from rangelens.artifacts import EXPLANATIONS, check_output_dir, clean_stale_temps
from rangelens.config.analysis import AnalysisConfig
from rangelens.config.explain import ExplainConfig, ExplainInputs
from rangelens.config.run import RunConfig
from rangelens.erasure.outputs import ErasureResult
from rangelens.erasure.protocol import check_protocol
from rangelens.errors import RangelensError
from rangelens.explain.results import Explained, save_results
from rangelens.explain.schedule import PartialResults
from rangelens.pipeline.runner import Runner, StageEvent
from rangelens.pipeline.stages import (
    Inputs,
    capture_stage,
    erasure_stage,
    explain_with,
    explanations_stage,
    ranges_stage,
    splits_stage,
)
from rangelens.ranges.captured import CaptureResult, load_capture, load_tokens
from rangelens.ranges.fit import FittedRanges, load_ranges
from rangelens.ranges.maps import RangeMap
from rangelens.report.atlas import atlas_is_current, build_atlas
from rangelens.rundir import RunDir

Report = Callable[[StageEvent], None]


@dataclass
class AnalysisResult:
    """Outputs of :func:`analyze`; everything is also on disk under ``run_dir``."""

    run_dir: Path
    capture: CaptureResult
    ranges: FittedRanges

    @property
    def range_map(self) -> RangeMap:
        """The headline range map: analysis site, split ``full``, the config's tau and p."""
        return self.ranges.range_map

    rangeset = property(lambda self: self.ranges.rangeset)
    scores = property(lambda self: self.ranges.scores)
    distribution = property(lambda self: self.ranges.distribution)
    summary = property(lambda self: self.ranges.summary)
    polysemanticity = property(lambda self: self.ranges.polysemanticity)


@dataclass
class RunResult:
    run_dir: Path
    analysis: AnalysisResult
    erasure: ErasureResult | None
    seconds: float
    explanations: Path | None = None
    atlas: Path | None = None
    events: list[StageEvent] = field(default_factory=list)


def analyze(
    config: AnalysisConfig,
    run_dir: str | Path,
    *,
    lm: LoadedModel | None = None,
    progress: bool = True,
    report: Report | None = None,
) -> AnalysisResult:
    """Run (or resume) the analysis into ``run_dir``: capture, splits (the analysis split) and
    ranges (fitted on all training rows)."""
    whole = RunConfig(out=Path(run_dir), analysis=config, erasure=None)
    return run(whole, lm=lm, progress=progress, report=report).analysis


def run(
    config: RunConfig,
    *,
    lm: LoadedModel | None = None,
    progress: bool = True,
    report: Report | None = None,
    atlas: bool = False,
) -> RunResult:
    """Run (or resume) every stage of ``config`` into its run directory; the model loads at most
    once, and only if a stage needs it. With ``atlas``, also (re)build the atlas when out of date.
    Under torchrun every worker captures its shard; only rank 0 writes (and takes the lock)."""
    start = time.perf_counter()
    run_dir = RunDir(config.run_dir)
    writer = os.environ.get("RANK", "0") == "0"
    with run_dir.lock() if writer else nullcontext():
        a = config.analysis.resolved()
        run_dir.check(a.model)
        clean_stale_temps(run_dir.root)
        inputs = Inputs(run_dir, a, config.erasure, lm=lm, progress=progress)
        if config.erasure is not None:
            check_protocol(inputs.data, config.erasure)  # bad options fail before any write
        runner = Runner(
            run_dir,
            write=writer,
            before_write=lambda: run_dir.write_meta(a.model_dump(), a.seed),
            report=report,
        )
        cap = runner(capture_stage(inputs, progress=progress and writer))
        splits = runner(splits_stage(inputs, cap))
        fitted = runner(ranges_stage(inputs, cap, splits))
        erasure = None
        if config.erasure is not None:
            erasure = runner(erasure_stage(inputs, cap, fitted, progress=progress))
        explained = None
        if config.explain is not None:
            runner(explanations_stage(inputs, fitted.range_map, config.explain, cap.tokens))
            explained = run_dir.explanations
        built = _atlas(run_dir, runner) if atlas and writer else None
    return RunResult(
        run_dir.root,
        AnalysisResult(run_dir.root, cap, fitted),
        erasure,
        time.perf_counter() - start,
        explained,
        built,
        runner.events,
    )


def _atlas(run_dir: RunDir, runner: Runner) -> Path:
    """The report step: rebuild the atlas only when what it shows changed."""
    if atlas_is_current(run_dir.root, run_dir.atlas):
        event = StageEvent("atlas", "reused")
    else:
        fresh = not (run_dir.atlas / "atlas.json").is_file()
        event = StageEvent("atlas", "ran", "no earlier output" if fresh else "the run changed")
        if runner.report is not None:
            runner.report(StageEvent("atlas", "running", event.why))
        build_atlas(run_dir.root)
    runner.events.append(event)
    if runner.report is not None:
        runner.report(event)
    return run_dir.atlas


def explain_run(
    run_dir: str | Path,
    config: ExplainConfig,
    overrides: dict[str, Any] | None = None,
    *,
    report: Report | None = None,
    progress: bool = False,
) -> Explained:
    """The explanations stage of an existing run (``RUN_DIR/explanations``), reused when current.
    ``overrides`` change what is read (model, dataset, site, ...; default: the run's)."""
    where = RunDir(run_dir)
    where.require()
    recorded = {k: v for k, v in where.config().items() if k in AnalysisConfig.model_fields}
    analysis = AnalysisConfig(**{**recorded, **(overrides or {})})
    with where.lock():
        runner = Runner(where, report=report)
        for name in ("capture", "ranges"):
            fp = where.fingerprint(name)
            if fp is None:
                raise RangelensError(
                    f"run {str(where.root)!r} has no finished {name} stage; run it first "
                    f"(`rangelens analyze --out {where.root}`)"
                )
            runner.fingerprints[name] = fp
        inputs = Inputs(where, analysis, None, progress=progress)
        headline = RangeMap.load(where.ranges)  # only the map the neurons come from
        tokens = load_tokens(where.capture)
        return runner(explanations_stage(inputs, headline, config, tokens))


def explain_into(
    out: str | Path,
    config: ExplainConfig,
    read: dict[str, Any] | None = None,
    run_dir: str | Path | None = None,
    *,
    force: bool = False,
    progress: bool = False,
) -> Explained:
    """Explanations written to ``out`` (not a stage of a run): of any model and site given by
    ``read``, or of a run's (``run_dir``: its recorded inputs, its salient neurons and ranges;
    ``progress``: bars and load lines). Finished neurons are kept in ``.OUT-partial`` beside it
    until ``out`` is written (resume)."""
    where = RunDir(run_dir) if run_dir is not None else None
    if where is not None:
        where.require()
    check_output_dir(Path(out), EXPLANATIONS, force=force, keep=[where.root] if where else [])
    recorded = where.config() if where is not None else {}
    fields = {k: v for k, v in recorded.items() if k in ExplainInputs.model_fields and k != "seed"}
    inputs = ExplainInputs(**{**fields, **(read or {})})
    lm = load_model(
        inputs.model,
        device=inputs.device,
        dtype=inputs.dtype,
        device_map=inputs.device_map,
        progress=progress,
    )
    headline = RangeMap.load(where.ranges) if where is not None else None
    out = Path(out)
    tokens = load_tokens(where.capture) if where is not None else None
    partial = out.parent / f".{out.name}-partial"
    cache = out.parent / f".{out.name}-llm-cache"
    explained = explain_with(
        lm, inputs, config, headline, cache, tokens, partial=partial, progress=progress
    )
    save_results(
        out,
        list(explained.records.values()),
        list(explained.explanations.values()),
        explained.metadata,
        force=force,
    )
    PartialResults.remove(partial)
    return explained


def load_analysis(run_dir: str | Path) -> AnalysisResult:
    """A finished analysis read back from ``run_dir`` (capture and ranges)."""
    where = RunDir(run_dir)
    where.require()
    return AnalysisResult(where.root, load_capture(where.capture), load_ranges(where.ranges))
