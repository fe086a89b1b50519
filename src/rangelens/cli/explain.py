"""``rangelens explain``: explain a run's neurons (its explanations stage, reused when current) or
any neurons of any model and site into ``--out``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rangelens.config.explain import ExplainConfig, ExplainInputs, RunSource
from rangelens.errors import RangelensError


def explain_command(given: dict[str, Any], *, force: bool = False, quiet: bool = False) -> None:
    from rangelens.activations.models import load_model
    from rangelens.activations.sites import resolve_site
    from rangelens.artifacts import EXPLANATIONS, check_output_dir
    from rangelens.cli.show import print_explanations, report_llm, stage_line
    from rangelens.explain.api import explain_site
    from rangelens.explain.results import save_results
    from rangelens.pipeline import explain_run
    from rangelens.ranges.maps import RangeMap
    from rangelens.rundir import RunDir

    run_dir = RunSource(**{k: v for k, v in given.items() if k in RunSource.model_fields}).run_dir
    out = given.get("out")
    config = ExplainConfig(**{k: v for k, v in given.items() if k in ExplainConfig.model_fields})
    read = {k: v for k, v in given.items() if k in ExplainInputs.model_fields}
    if run_dir is None and config.concept is not None:
        raise RangelensError("--concept needs --run-dir (the concept's ranges come from it)")
    if run_dir is None and not config.neurons:
        raise RangelensError("give --neurons (comma-separated ids) or --run-dir")
    if run_dir is not None and out is None:  # the run's explanations stage
        where = RunDir(run_dir).explanations
        check_output_dir(where, EXPLANATIONS, force=force, keep=[run_dir])
        explained = explain_run(run_dir, config, read, report=None if quiet else stage_line)
    else:
        where = Path(out) if out is not None else Path("explanations")
        check_output_dir(where, EXPLANATIONS, force=force, keep=[run_dir] if run_dir else [])
        recorded = RunDir(run_dir).config() if run_dir is not None else {}
        if run_dir is not None:
            RunDir(run_dir).require()
        inputs = ExplainInputs(
            **{
                k: v for k, v in recorded.items() if k in ExplainInputs.model_fields and k != "seed"
            },
            **read,
        )
        texts = inputs.load_data(max_per_class=config.texts_per_class, balance=False).texts
        lm = load_model(inputs.model, device=inputs.device, dtype=inputs.dtype)
        site = resolve_site(lm.model, inputs.site, inputs.layer)
        headline = RangeMap.load(RunDir(run_dir).ranges) if run_dir is not None else None
        ranges = []
        if config.concept is not None and headline is not None:
            ranges = headline.ranges(config.concept)[: config.top_k]
        neurons = [] if ranges else list(config.neurons or [])
        if not neurons and not ranges and headline is not None:
            neurons = headline.top_neurons(config.top_k)
        meta = {"model": inputs.model, "dataset": inputs.dataset, "site": site.name}
        explained = explain_site(
            lm,
            texts,
            site,
            config,
            neurons=neurons,
            ranges=ranges,
            seed=inputs.seed,
            max_length=inputs.max_length,
            batch_size=inputs.batch_size,
            cache_dir=where.parent / f".{where.name}-llm-cache",
            metadata={**meta, "concept": config.concept, "seed": inputs.seed},
        )
        save_results(
            where,
            list(explained.records.values()),
            list(explained.explanations.values()),
            explained.metadata,
            force=force,
        )
    print_explanations(explained, where)
    if explained.llm is not None:
        report_llm(explained.llm)
