"""``rangelens report`` and ``rangelens serve``: thin typer layers over :mod:`rangelens.report`
(imported when a command runs, so registering them keeps the CLI's start-up light)."""

from __future__ import annotations

import time
import webbrowser
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console


def _size_mb(directory: Path) -> float:
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file()) / 1e6


def report_command(
    run_dir: Annotated[Path, typer.Argument(help="a rangelens run directory")],
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="atlas directory (default: RUN_DIR/atlas)")
    ] = None,
    explanations: Annotated[
        Path | None,
        typer.Option(help="explanations directory (default: RUN_DIR/explanations)"),
    ] = None,
    open_browser: Annotated[
        bool, typer.Option("--open", help="open the atlas in a web browser")
    ] = False,
    force: Annotated[
        bool,
        typer.Option(
            help="replace --out even if it holds rangelens explanations (never a stage or "
            "anything inside a run)"
        ),
    ] = False,
) -> None:
    """Write the self-contained HTML neuron atlas of a run (works offline, from file://).

    An existing --out is replaced only if it is an atlas or empty; never the run directory or a
    directory rangelens did not make."""
    from rangelens.report.atlas import build_atlas

    start = time.perf_counter()
    atlas = build_atlas(run_dir, out, explanations=explanations, force=force)
    index = atlas / "index.html"
    Console().print(
        f"[bold green]atlas:[/] {index} ({_size_mb(atlas):.1f} MB, "
        f"{time.perf_counter() - start:.1f} s)",
        highlight=False,
        soft_wrap=True,
    )
    if open_browser:
        webbrowser.open(index.resolve().as_uri())


def serve_command(
    run_dir: Annotated[Path, typer.Argument(help="a rangelens run directory")],
    host: Annotated[
        str, typer.Option(help="address to bind (loopback by default; others expose the atlas)")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port (0: any free port)")] = 8000,
) -> None:
    """Serve the run's atlas read-only over HTTP (built first if missing or out of date)."""
    from rangelens.report.server import serve

    serve(run_dir, host=host, port=port)
