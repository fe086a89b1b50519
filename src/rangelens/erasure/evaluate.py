"""How the experiment evaluates its conditions: class log-probabilities of test rows (from cached
pooled features where the masks allow it, else by suffix forwards) and next-token NLL of general
text."""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from rangelens.activations.models import LoadedModel
from rangelens.config.analysis import AnalysisConfig
from rangelens.config.erasure import ErasureConfig
from rangelens.data import general_text
from rangelens.erasure.engine import (
    Group,
    forecast,
    masks_per_forward,
    run_groups,
    skipping,
    starts_for,
)
from rangelens.erasure.metrics import Key, Perplexities
from rangelens.erasure.tasks import ClassificationTask, Classifier, has_lm_head, token_nll
from rangelens.errors import choices


def classify(
    lm: LoadedModel,
    task: ClassificationTask,
    classifier: Classifier,
    rows: np.ndarray,
    groups: list[Group],
    config: ErasureConfig,
    batch_size: int,
    bar: Any,
    forecast_texts: int = 0,
) -> tuple[dict[Key, np.ndarray], dict[str, Any]]:
    """Class log-probabilities of ``rows`` under every condition, and how they were computed: from
    cached pooled features where the masks allow it (with ``suffix``), else by forwards that skip
    the blocks before each mask site."""
    logps: dict[Key, np.ndarray] = {}
    cached: list[Group] = []
    pooled = classifier.pooled
    if pooled is not None and config.suffix:
        cached = [g for g in groups if all(pooled.covers(m) for m in g.masks.values())]
        logps = {k: pooled.log_proba(rows, m) for g in cached for k, m in g.masks.items()}
    run = [g for g in groups if g not in cached]
    starts = starts_for(lm, run, task.sites, config.suffix)
    notices = []
    if run and forecast_texts:
        n, seconds = forecast(
            lm,
            [task.inputs[i] for i in rows],
            run,
            starts,
            forecast_texts,
            batch_size=batch_size,
            max_length=task.max_length,
            padding_side=task.padding_side,
            stack_rows=config.stack_rows,
        )
        reads = task.info.get("site", "the task's readout")
        k = masks_per_forward(config.stack_rows, batch_size)
        notices.append(
            f"masks at {choices([g.site.name for g in run])} are not at the site the head reads "
            f"({reads}): every masked condition re-runs the model from block "
            f"{min(starts)} on, about {n} suffix forwards of {batch_size} texts × up to {k} "
            f"masks, ~"
            f"{seconds / 60:.1f} min here (estimated from one timed forward). That answers the "
            f"behavioural question (the final representation's head); to ask about the masked "
            f"site itself, set erasure.head_site / head_layer to it (no forward then)"
        )
        tqdm.write(f"notice: {notices[-1]}")
    outputs = run_groups(
        lm,
        [task.inputs[i] for i in rows],
        run,
        classifier.readout,
        starts,
        batch_size=batch_size,
        max_length=task.max_length,
        padding_side=task.padding_side,
        bar=bar,
        stack_rows=config.stack_rows,
    )
    for key, pairs in outputs.items():
        logps[key] = np.zeros((len(rows), pairs[0][1].shape[1]))
        for index, out in pairs:
            logps[key][index] = out.cpu().numpy()
    how = {
        "cached_features": [g.site.name for g in cached],
        "forwards": skipping(lm, run, starts),
        "notices": notices,
    }
    return logps, how


def perplexity(
    lm: LoadedModel,
    groups: list[Group],
    config: ErasureConfig,
    analysis: AnalysisConfig,
    bar: Any,
) -> tuple[Perplexities | None, dict[str, Any]]:
    """Per-text NLL on general text under every condition of the ``full`` split's ranges."""
    if not has_lm_head(lm) or config.ppl_texts == 0:
        return None, {"skipped": "ppl_texts = 0" if has_lm_head(lm) else "no LM head"}
    general = general_text(config.ppl_texts, seed=analysis.seed)
    starts = starts_for(lm, groups, [], config.suffix)
    sums = run_groups(
        lm,
        general,
        groups,
        partial(token_nll, lm.model),
        starts,
        batch_size=analysis.batch_size,
        max_length=config.ppl_max_length,
        padding_side=None,
        bar=bar,
        stack_rows=config.stack_rows,
    )
    nll: dict[Key, np.ndarray] = {}
    tokens = np.zeros(len(general))
    for key, pairs in sums.items():
        nll[key] = np.zeros(len(general))
        for index, (per_text, counts) in pairs:
            nll[key][index] = per_text
            tokens[index] = counts
    how = {
        "n_texts": len(general),
        "n_tokens": int(tokens.sum()),
        "ranges": "split 'full' (the analysis training split), one set for all folds",
        "points": "every (tau, p)" if config.ppl_sweep else "the headline tau and p only",
        "forwards": skipping(lm, groups, starts),
    }
    return Perplexities(nll, tokens), how
