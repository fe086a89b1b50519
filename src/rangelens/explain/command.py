"""``rangelens explain``: a thin typer layer over :mod:`rangelens.explain.api`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from rangelens import cliconfig
from rangelens.artifacts import EXPLANATIONS, check_output_dir
from rangelens.errors import RangelensError, choices, terminal_text
from rangelens.explain.api import BACKENDS, explain_records, make_roles, save_results
from rangelens.explain.clients import (
    LLM,
    MAX_REPLY_MB,
    LLMClient,
    OpenAIClient,
    ResponseCache,
    TransformersClient,
    load_chat_model,
)
from rangelens.explain.exemplars import ExemplarConfig, build_records
from rangelens.explain.inputs import FROM_RUN, ExplainInputs, check_size, resolve_inputs
from rangelens.explain.llm import SIMULATORS, llm_roles
from rangelens.explain.records import NeuronRecord
from rangelens.models import load_model
from rangelens.ranges import ConceptRange, RangeMap
from rangelens.sites import resolve_site


def _neurons(neurons: str | None, run_dir: Path | None, top_k: int) -> list[int]:
    """Neuron ids from ``--neurons``, or the ``top_k`` most salient of a run's range map (rank by
    rank, round-robin over concepts, without duplicates)."""
    if (neurons is None) == (run_dir is None):
        raise RangelensError("give exactly one of --neurons (comma ids) or --run-dir")
    if neurons is not None:
        try:
            return [int(n) for n in neurons.split(",") if n.strip()]
        except ValueError as err:
            raise RangelensError(
                f"--neurons must be comma-separated integers, got {neurons!r}"
            ) from err
    assert run_dir is not None
    return salient_neurons(run_dir, top_k)


def salient_neurons(run_dir: Path, top_k: int) -> list[int]:
    """The ``top_k`` most salient neurons of a run's range map (rank by rank, round-robin over
    concepts, without duplicates)."""
    ranges = RangeMap.load(run_dir / "ranges")
    picked: list[int] = []
    for rank in range(ranges.neurons.shape[1]):
        for n in ranges.neurons[:, rank]:
            if int(n) not in picked and len(picked) < top_k:
                picked.append(int(n))
    return picked


@cliconfig.with_config(ExplainInputs, "inputs", defaults=dict.fromkeys(FROM_RUN))
def explain_command(
    neurons: Annotated[str | None, typer.Option(help="comma-separated neuron ids")] = None,
    run_dir: Annotated[
        Path | None, typer.Option(help="a rangelens run dir: explain its top salient neurons")
    ] = None,
    top_k: Annotated[int, typer.Option(help="neurons (or ranges) taken from --run-dir")] = 10,
    concept: Annotated[
        str | None,
        typer.Option(help="with --run-dir: explain this concept's ranges (in-range tokens)"),
    ] = None,
    backend: Annotated[
        str,
        typer.Option(help=f"one of {', '.join(BACKENDS)} (offline: the lexical baseline, no LLM)"),
    ] = "offline",
    base_url: Annotated[
        str, typer.Option(help="OpenAI-compatible server (openai backend)")
    ] = "http://127.0.0.1:8000/v1",
    llm_model: Annotated[
        str,
        typer.Option(
            help="served model name (openai), or for the local backend a built-in name, a "
            "transformers directory or a .gguf file"
        ),
    ] = "smollm2-135m",
    api_key_env: Annotated[
        str, typer.Option(help="environment variable holding the API key")
    ] = "OPENAI_API_KEY",
    timeout: Annotated[
        float,
        typer.Option(help="seconds one LLM request may take in all, connect to last byte (openai)"),
    ] = 60.0,
    max_reply_mb: Annotated[
        float,
        typer.Option(
            help="largest LLM reply accepted, in MB; larger ones are failed tries (openai)"
        ),
    ] = MAX_REPLY_MB,
    max_attempts: Annotated[
        int, typer.Option(help="tries per LLM step (failed tries are counted, never cached)")
    ] = 3,
    simulator: Annotated[
        str,
        typer.Option(
            help="what scores explanations with an LLM backend: lexical (offline), llm (the LLM "
            "echoes each token with a 0-10 activation predicted from the explanation text) or "
            "llm-list (the LLM lists the words the explanation describes; for small models)"
        ),
    ] = "lexical",
    output: Annotated[
        Path | None,
        typer.Option(help="explanations directory [RUN_DIR/explanations, else ./explanations]"),
    ] = None,
    rounds: Annotated[int, typer.Option(help="refinement rounds")] = 4,
    force: Annotated[
        bool,
        typer.Option(
            help="replace --output even if it holds a rangelens atlas (never a stage or "
            "anything inside a run)"
        ),
    ] = False,
    inputs: dict[str, Any] | None = None,
) -> None:
    """Explain neurons as NeuronScope modes with activation ranges, vs a single-pass baseline."""
    if backend not in BACKENDS:
        raise RangelensError(f"unknown backend {backend!r}; valid: {choices(BACKENDS)}")
    if concept is not None and run_dir is None:
        raise RangelensError("--concept needs --run-dir (the concept's ranges come from it)")
    if simulator not in SIMULATORS:
        raise RangelensError(f"unknown --simulator {simulator!r}; valid: {choices(SIMULATORS)}")
    if simulator != "lexical" and backend == "offline":
        raise RangelensError(f"--simulator {simulator} needs an LLM: --backend openai or local")
    given = resolve_inputs(inputs or {}, run_dir)
    model, seed = given.model, given.seed
    if output is None:
        output = run_dir / "explanations" if run_dir is not None else Path("explanations")
    check_output_dir(output, EXPLANATIONS, force=force, keep=[run_dir] if run_dir else [])
    config = ExemplarConfig(seed=seed)
    data = given.load_data()
    check_size(data, given, config)  # before loading the model or capturing anything
    texts = data.texts
    lm = load_model(model, device=given.device, dtype=given.dtype)
    resolved = resolve_site(lm.model, given.site, given.layer)
    client: LLMClient | None = None
    if backend == "openai":
        client = OpenAIClient(
            base_url,
            llm_model,
            api_key_env=api_key_env,
            timeout=timeout,
            max_reply_mb=max_reply_mb,
        )
    elif backend == "local":
        client = TransformersClient(lm if llm_model == model else load_chat_model(llm_model))
    llm: LLM | None = None
    if client is None:
        roles = make_roles(backend)
    else:
        cache = ResponseCache(output.parent / f".{output.name}-llm-cache")
        llm = LLM(client, cache, max_attempts)
        roles = llm_roles(llm, name=backend, simulator=simulator)
    records: list[NeuronRecord] = []
    if concept is not None:
        assert run_dir is not None
        picked: list[ConceptRange] = RangeMap.load(run_dir / "ranges").ranges(concept)[:top_k]
        for r in picked:
            records += build_records(
                lm,
                texts,
                resolved,
                [r.neuron],
                config=config,
                target_range=(r.lo, r.hi),
                max_length=given.max_length,
                batch_size=given.batch_size,
            )
    else:
        ids = _neurons(neurons, run_dir, top_k)
        records = build_records(
            lm,
            texts,
            resolved,
            ids,
            config=config,
            max_length=given.max_length,
            batch_size=given.batch_size,
        )
    results = explain_records(records, roles, rounds=rounds)
    info = {"model": model, "dataset": given.dataset, "site": resolved.name, "backend": backend}
    save_results(output, records, results, {**info, "concept": concept, "seed": seed}, force=force)
    shown = "offline lexical baseline" if backend == "offline" else backend
    table = Table(title=f"explanations of {resolved.name} ({shown}) -> {output}")
    cols = ("neuron", "target", "iterative r", "single-pass r", "lookup r", "AUC", "modes [range]")
    for col in cols:
        table.add_column(col)
    for e in results:
        modes = "\n".join(
            f"{terminal_text(m.label)} [{m.lo:.2f}, {m.hi:.2f}]"
            if m.lo is not None and m.hi is not None
            else f"{terminal_text(m.label)} [no exemplar: no range]"
            for m in e.modes
        )
        table.add_row(
            str(e.neuron),
            terminal_text(e.target),
            f"{e.iterative.held_out:.3f}",
            f"{e.single_pass.held_out:.3f}",
            f"{e.lookup.held_out:.3f}" if e.lookup is not None else "-",
            f"{e.iterative.auc:.2f}",
            modes,
        )
    Console().print(table)
    if llm is not None:
        report_llm(llm)


def report_llm(llm: LLM, max_failed: float = 0.5) -> None:
    """Print the LLM failure summary; exit 1 when more than ``max_failed`` of the steps failed."""
    stats = llm.stats
    Console(stderr=True).print(stats.summary(), highlight=False, soft_wrap=True)
    if stats.steps and stats.failed_steps > max_failed * stats.steps:
        Console(stderr=True).print(
            f"[bold red]error:[/] {stats.failed_steps} of {stats.steps} LLM steps failed; the "
            "explanations are not trustworthy (check the server, --llm-model, --timeout, "
            "--max-attempts)",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(1)
