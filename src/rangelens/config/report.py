"""Options of the outputs: where a command writes, the atlas and its server."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from rangelens.config.sources import Options


class Output(Options):
    """Where a command writes (the one declaration of ``--out``)."""

    out: Path | None = Field(
        None,
        description="output directory (default: runs/<model>-<dataset> for a run, "
        "RUN_DIR/atlas for report, RUN_DIR/explanations or ./explanations for explain)",
        json_schema_extra={"short": "-o"},
    )


class OutputSideOption(Options):
    """Whether the output side of each neuron is computed (it loads the model's weights)."""

    logit_lens: Literal["auto", "on", "off"] = Field(
        "auto",
        description="show the tokens each neuron promotes/suppresses (loads the model's weights; "
        "auto: only a built-in or local model of at most 2 GB)",
    )


class ReportOptions(Output, OutputSideOption):
    """The atlas of a run."""

    explanations: Path | None = Field(
        None, description="explanations directory (default: RUN_DIR/explanations)"
    )
    open: bool = Field(False, description="open the atlas in a web browser")


class ExportOptions(OutputSideOption):
    """A shareable folder of a run (``rangelens export``)."""

    features: bool = Field(
        False, description="include the pooled per-text and the sampled per-token activations"
    )


class ServeOptions(Options):
    """The read-only atlas server."""

    host: str = Field(
        "127.0.0.1", description="address to bind (loopback by default; others expose the atlas)"
    )
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0: any free port)")
