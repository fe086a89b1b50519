"""The explanations stage of a run: the top salient neurons explained by the offline lexical
baseline into ``RUN_DIR/explanations`` (what the atlas's Explanations tab shows).

Resumable like the other stages: the directory records a fingerprint of its inputs and is rewritten
only when they change.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from rangelens.analysis import AnalysisConfig
from rangelens.artifacts import (
    EXPLANATIONS,
    atomic_dir,
    fingerprint,
    mark_stage,
    read_json,
    stage_is_current,
)
from rangelens.explain.api import explain_records, make_roles, write_results
from rangelens.explain.command import salient_neurons
from rangelens.explain.exemplars import build_records, scaled_config
from rangelens.models import LoadedModel, load_model
from rangelens.sites import resolve_site


class ExplainStageConfig(BaseModel):
    """Which neurons a run explains, and how (the offline lexical baseline: no LLM)."""

    model_config = ConfigDict(extra="forbid")

    top_k: int = Field(6, ge=1, le=200, description="top salient neurons explained")
    backend: Literal["offline"] = Field("offline", description="offline: the lexical baseline")
    rounds: int = Field(2, ge=0, le=10, description="refinement rounds")
    max_per_class: int = Field(60, ge=10, description="texts per class for the exemplars")


def run_explain_stage(
    run_dir: Path,
    analysis: AnalysisConfig,
    config: ExplainStageConfig,
    lm: LoadedModel | None = None,
) -> Path:
    """Explain the run's ``top_k`` most salient neurons (token-level activations at the analysed
    site) unless the stage is current; returns the stage directory."""
    stage = run_dir / "explanations"
    ranges = run_dir / "ranges" / "stage.json"
    upstream = read_json(ranges).get("fingerprint") if ranges.is_file() else None
    fp = fingerprint(analysis.capture_inputs(), upstream, config.model_dump())
    if stage_is_current(stage, fp):
        return stage
    neurons = salient_neurons(run_dir, config.top_k)
    lm = lm or load_model(analysis.model, device=analysis.device, dtype=analysis.dtype)
    site = resolve_site(lm.model, analysis.site, analysis.layer)
    capped = analysis.model_copy(update={"max_per_class": config.max_per_class, "balance": False})
    texts = capped.load_data().texts
    records = build_records(
        lm,
        texts,
        site,
        neurons,
        config=scaled_config(len(texts), analysis.seed),
        max_length=analysis.max_length,
    )
    results = explain_records(records, make_roles(config.backend), rounds=config.rounds)
    with atomic_dir(stage, EXPLANATIONS) as tmp:
        meta = {
            "model": analysis.model,
            "dataset": analysis.dataset,
            "site": site.name,
            "backend": "offline (lexical baseline)",
            "seed": analysis.seed,
        }
        write_results(tmp, records, results, meta)
        mark_stage(tmp, "explanations", fp)
    return stage
