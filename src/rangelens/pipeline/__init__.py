"""Stages in pipeline order (capture -> splits -> ranges -> erasure -> explanations -> report),
one runner that decides what to reuse, and the whole-run entry points."""

from rangelens.config.run import RunConfig, example_config, load_config
from rangelens.pipeline.run import (
    AnalysisResult,
    RunResult,
    analyze,
    explain_into,
    explain_run,
    load_analysis,
    run,
)
from rangelens.pipeline.runner import Runner, Stage, StageEvent

__all__ = [
    "AnalysisResult",
    "RunConfig",
    "RunResult",
    "Runner",
    "Stage",
    "StageEvent",
    "analyze",
    "example_config",
    "explain_into",
    "explain_run",
    "load_analysis",
    "load_config",
    "run",
]
