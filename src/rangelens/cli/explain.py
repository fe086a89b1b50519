"""``rangelens explain``: a run's explanations stage (reused when current), or explanations of any
neurons of any model and site written to ``--out``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rangelens.config.explain import ExplainConfig, ExplainInputs, RunSource
from rangelens.errors import RangelensError


def explain_command(given: dict[str, Any], *, force: bool = False, quiet: bool = False) -> None:
    run_dir = RunSource(**{k: v for k, v in given.items() if k in RunSource.model_fields}).run_dir
    out = given.get("out")
    config = ExplainConfig(**{k: v for k, v in given.items() if k in ExplainConfig.model_fields})
    read = {k: v for k, v in given.items() if k in ExplainInputs.model_fields}
    if run_dir is None and config.concept is not None:
        raise RangelensError("--concept needs --run-dir (the concept's ranges come from it)")
    if run_dir is None and not config.neurons:
        raise RangelensError("give --neurons (comma-separated ids) or --run-dir")
    from rangelens.artifacts import EXPLANATIONS, check_output_dir
    from rangelens.cli.show import print_explanations, report_llm, stage_line
    from rangelens.pipeline import explain_into, explain_run
    from rangelens.rundir import RunDir

    if run_dir is not None and out is None:  # the run's explanations stage
        where = RunDir(run_dir).explanations
        check_output_dir(where, EXPLANATIONS, force=force, keep=[run_dir])
        explained = explain_run(run_dir, config, read, report=None if quiet else stage_line)
    else:
        where = Path(out) if out is not None else Path("explanations")
        explained = explain_into(where, config, read, run_dir, force=force, progress=not quiet)
    print_explanations(explained, where)
    if explained.llm is not None:
        report_llm(explained.llm)
