"""End-to-end runs from one YAML config: capture -> ranges -> the erasure experiment ->
explanations of the top salient neurons (optional).

Resumable: every stage directory records a fingerprint of its inputs, and a stage whose outputs exist
with unchanged inputs is skipped, so an interrupted run picks up where it stopped.
"""

from __future__ import annotations

import importlib.resources
import time
import typing
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rangelens.analysis import AnalysisConfig, AnalysisResult, CaptureResult, analyze
from rangelens.artifacts import STAGE, atomic_dir, fingerprint, mark_stage, reuse_stage, run_lock
from rangelens.erasure import (
    ErasureConfig,
    ErasureProtocol,
    ErasureResult,
    load_erasure,
    run_erasure,
)
from rangelens.erasure.protocol import RANGE_INPUTS, check_protocol
from rangelens.errors import RangelensError, choices
from rangelens.explain.stage import ExplainStageConfig, run_explain_stage
from rangelens.models import load_model
from rangelens.rangeset import FeatureSource, RangesPlan, Split


class RunConfig(BaseModel):
    """A whole run: where it goes, the analysis, the erasure experiment (``null`` skips it) and the
    explanations of the top salient neurons (absent or ``null``: none)."""

    model_config = ConfigDict(extra="forbid")

    out: Path = Field(Path("runs/demo"), description="run directory")
    analysis: AnalysisConfig = Field(default_factory=AnalysisConfig)  # type: ignore[arg-type]
    erasure: ErasureConfig | None = Field(default_factory=ErasureConfig)  # type: ignore[arg-type]
    explain: ExplainStageConfig | None = Field(
        None, description="explain the top salient neurons (offline lexical baseline)"
    )


def load_config(path: str | Path) -> RunConfig:
    """Read and validate a YAML run config (unknown keys and wrong types are errors)."""
    path = Path(path)
    if path.is_dir():
        raise RangelensError(
            f"{str(path)!r} is a directory, not a YAML run config (examples: rangelens/configs/; "
            f"to view a run directory: `rangelens report {path}`)"
        )
    if not path.is_file():
        raise RangelensError(f"config file {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise RangelensError(
            f"config file {str(path)!r} is not valid YAML{where}: {err.problem or err.context}"
        ) from err
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise RangelensError(
            f"config file {str(path)!r} is not valid YAML: {err}".splitlines()[0]
        ) from err
    if raw is None:
        raise RangelensError(
            f"config file {str(path)!r} is empty; give at least `out:` and `analysis:` "
            f"(examples: rangelens/configs/)"
        )
    if not isinstance(raw, dict):
        raise RangelensError(f"config file {str(path)!r} must hold a mapping of settings")
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        unknown = [e for e in err.errors() if e["type"] == "extra_forbidden"]
        if not unknown:
            raise
        loc = unknown[0]["loc"]
        key = ".".join(str(p) for p in loc)
        raise RangelensError(
            f"unknown key {key!r} in {str(path)!r}; valid: {choices(_valid_keys(loc[:-1]))}"
        ) from err


def _valid_keys(loc: tuple[int | str, ...]) -> list[str]:
    """The field names of the (nested) config model at ``loc`` of :class:`RunConfig`."""
    model: type[BaseModel] = RunConfig
    for part in loc:
        annotation = model.model_fields[str(part)].annotation
        model = next(
            a
            for a in (*typing.get_args(annotation), annotation)
            if isinstance(a, type) and issubclass(a, BaseModel)
        )
    return list(model.model_fields)


def example_config(model: str) -> Path:
    """The packaged example config for a built-in model (``smollm2-135m`` or ``minilm-l6``)."""
    resource = importlib.resources.files("rangelens") / "configs" / f"{model}.yaml"
    return Path(str(resource))


@dataclass
class RunResult:
    run_dir: Path
    analysis: AnalysisResult
    erasure: ErasureResult | None
    seconds: float
    explanations: Path | None = None


def run(config: RunConfig, *, progress: bool = True) -> RunResult:
    """Run (or resume) every stage of ``config`` into ``config.out``; the model loads at most once.

    Stages: capture -> ranges (every range map, fitted once; with an erasure section on each
    split's correctly classified training rows) -> erasure (loads those maps). Stages are
    reused only if their files load; ``config.out`` is locked meanwhile.
    """
    with run_lock(config.out):
        return _run(config, progress)


def _run(config: RunConfig, progress: bool) -> RunResult:
    start = time.perf_counter()
    a, e = config.analysis, config.erasure
    stage = config.out / "erasure"
    inputs = e.model_dump() if e is not None else None
    erasure_fp = fingerprint(a.capture_inputs(), a.range_inputs(), inputs)
    erasure = reuse_stage(stage, erasure_fp, load_erasure) if e is not None else None
    erasure_due = e is not None and erasure is None
    data = a.load_data()
    if e is not None:
        check_protocol(data, e)  # bad protocol options fail before anything is written
    lm = load_model(a.model, device=a.device, dtype=a.dtype) if erasure_due else None
    protocol = ErasureProtocol(lm, data, a, e, progress=progress) if lm and e else None
    plan = protocol.plan() if protocol is not None else None
    if e is not None and plan is None:  # erasure current: the ranges fingerprint needs the plan
        plan = RangesPlan({k: getattr(e, k) for k in RANGE_INPUTS}, _never)
    analysis = analyze(a, config.out, lm=lm, plan=plan, progress=progress)
    if e is not None and lm is not None:
        with atomic_dir(stage, STAGE) as tmp:
            erasure = run_erasure(
                lm,
                data,
                analysis.capture,
                analysis.rangeset,
                a,
                e,
                tmp,
                protocol=protocol,
                progress=progress,
            )
            mark_stage(tmp, "erasure", erasure_fp)
    explained = None
    if config.explain is not None:
        explained = run_explain_stage(config.out, a, config.explain, lm)
    return RunResult(config.out, analysis, erasure, time.perf_counter() - start, explained)


def _never(_cap: CaptureResult) -> tuple[FeatureSource, list[Split]]:
    raise RangelensError("the ranges stage is out of date while the erasure stage is current")
