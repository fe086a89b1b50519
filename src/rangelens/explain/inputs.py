"""What ``rangelens explain`` reads: model, data and capture settings, taken from ``--run-dir``'s
``run.json`` unless given, so explanations follow a run made from the user's own data.

:class:`ExplainInputs` is the config model the explain CLI's input options are generated from
(:mod:`rangelens.cliconfig`); its defaults apply when neither the option nor the run gives a value.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from rangelens.artifacts import read_json
from rangelens.data import DataSource, LabeledTexts
from rangelens.errors import RangelensError
from rangelens.explain.exemplars import ExemplarConfig
from rangelens.models import ModelSource
from rangelens.ranges import RangeMap

# Taken from the run when not given: everything that says what was analysed and how it was read
# (not how many texts: explanations sample their own).
FROM_RUN = (
    "model",
    *(k for k in DataSource.model_fields if k not in ("max_per_class", "balance", "seed")),
    "site",
    "layer",
    "max_length",
    "batch_size",
    "device",
    "dtype",
)


class ExplainInputs(DataSource, ModelSource):
    """The model, texts and site ``explain`` captures (defaults: --run-dir's, else these)."""

    max_per_class: int | None = Field(60, ge=1, description="texts per class")
    site: str = Field("mlp", description="resid | mlp | attn | module:<dotted.path>[:input]")
    layer: int = Field(15, description="block index; negative counts from the end")
    max_length: int = Field(64, ge=1, description="tokens per text (longer texts are truncated)")
    batch_size: int = Field(16, ge=1, description="texts per forward")
    device: str = Field("cpu", description="cpu | cuda | cuda:N")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="weights and activations dtype"
    )


def run_inputs(run_dir: Path | None) -> dict[str, Any]:
    """The :data:`FROM_RUN` values a run recorded (its resolved config), else its range metadata."""
    if run_dir is None:
        return {}
    meta = run_dir / "run.json"
    if meta.is_file():
        config = read_json(meta).get("config", {})
    elif (run_dir / "ranges").is_dir():
        config = RangeMap.load(run_dir / "ranges").metadata
    else:
        raise RangelensError(
            f"--run-dir {str(run_dir)!r} is not a rangelens run (no run.json); give a run directory"
        )
    return {k: config[k] for k in FROM_RUN if k in config}


def resolve_inputs(given: dict[str, Any], run_dir: Path | None) -> ExplainInputs:
    """Options given on the command line, else the run's, else the defaults."""
    return ExplainInputs(**{**run_inputs(run_dir), **given})


def min_texts(config: ExemplarConfig) -> int:
    """The fewest texts (with 2+ tokens) whose explain / feedback / validation / held-out pools fit
    ``config`` — the pool split of :func:`rangelens.explain.exemplars.records_from_activations`."""
    exemplars = config.n_top + config.n_quantile_bins * config.n_per_bin
    n = exemplars + config.n_feedback + config.n_validation + config.n_held_out
    while True:
        val = max(config.n_validation, round(0.15 * n))
        feedback = max(config.n_feedback, round(0.15 * n))
        held = max(config.n_held_out, round(0.2 * n))
        if n - val - feedback - held >= exemplars:
            return n
        n += 1


def check_size(data: LabeledTexts, inputs: ExplainInputs, config: ExemplarConfig) -> None:
    """Refuse, before any capture, a dataset too small for the exemplar pools."""
    need = min_texts(config)
    if len(data) < need:
        per_class = -(-need // max(len(data.label_names), 1))
        raise RangelensError(
            f"dataset {data.name!r} gives {len(data)} texts (max_per_class {inputs.max_per_class} "
            f"over {len(data.label_names)} classes); explanations need at least {need}: use "
            f"--max-per-class {per_class} or more, or a larger dataset"
        )
