"""Options of ``rangelens steer``: which run, which concept, which prompt, how to steer."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from rangelens.config.sources import Options

SteerValue = Literal["mean", "quantile"]


class SteerOptions(Options):
    """Steer generation toward a concept with its ranges (and the mean-difference baseline)."""

    run_dir: Path = Field(description="the run whose model, site, ranges and statistics steer")
    concept: str = Field(description="the concept to steer toward (a label of the run)")
    prompt: str = Field(description="the prompt to continue")
    value: SteerValue = Field(
        "mean", description="value each salient neuron is set to: the concept's mean or quantile q"
    )
    q: float = Field(
        0.5, ge=0, le=1, description="quantile of the concept's values (value quantile)"
    )
    max_new_tokens: int = Field(32, ge=1, le=1024, description="tokens to generate")
    alpha: float = Field(
        1.0, description="scale of the mean-difference baseline (mu_concept - mu_rest)"
    )
    baseline: bool = Field(True, description="also steer along the concept's mean difference")
