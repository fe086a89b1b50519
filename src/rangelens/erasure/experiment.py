"""The NeuronLens erasure experiment (Haider et al., "Neurons Speak in Ranges", arXiv 2502.06809):
does masking a concept's ranges erase it, and at what cost?

For each concept, masked states (:mod:`rangelens.erasure.conditions`: range mask, neuron mask,
random-neuron control) are compared with the unmasked base on every fold's test texts (target
accuracy and gold-label confidence on the concept's texts, which erasure should hurt; complement
accuracy, confidence and flip rate on the other concepts' texts, which should stay) and, for
decoders, on perplexity of held-out general text. The ranges are *loaded* from the ranges stage
(:class:`~rangelens.ranges.rangeset.RangeSet`): per fold for classification, the ``full`` split's for
perplexity (one set of conditions on the general text, not one per fold).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from tqdm.auto import tqdm

from rangelens.activations.capture import model_inputs, tokenize
from rangelens.activations.models import LoadedModel
from rangelens.activations.sites import NeuronSite, blocks, resolve_site
from rangelens.config.analysis import AnalysisConfig
from rangelens.config.erasure import ErasureConfig
from rangelens.data import LabeledTexts, general_text
from rangelens.erasure.conditions import CONDITIONS, MaskSpec
from rangelens.erasure.engine import run_conditions, suffix_start
from rangelens.erasure.metrics import BASE, EffectEstimator, Key, Outcomes, Perplexities
from rangelens.erasure.outputs import ErasureResult, summarise, write_erasure
from rangelens.erasure.protocol import ErasureProtocol
from rangelens.erasure.tasks import ClassificationTask, Classifier, has_lm_head, token_nll
from rangelens.errors import RangelensError, choices
from rangelens.intervene import RangeMask
from rangelens.ranges.captured import CaptureResult
from rangelens.ranges.fit import FeatureSource, fit_rangeset
from rangelens.ranges.rangeset import RangeSet
from rangelens.ranges.splits import FULL

T = TypeVar("T")


@dataclass
class _Group:
    """Conditions whose masks sit at one site, so they share one prefix per batch."""

    site: NeuronSite
    masks: dict[Key, RangeMask | None]


def _sites(lm: LoadedModel, analysis: AnalysisConfig, ranges: RangeSet) -> list[NeuronSite]:
    wanted = [analysis.layer, *analysis.layers]
    found = {s.name: s for s in (resolve_site(lm.model, analysis.site, w) for w in wanted)}
    missing = [s for s in ranges.sites if s not in found]
    if missing or list(found) != ranges.sites:
        raise RangelensError(
            f"the range set holds sites {choices(ranges.sites)} but the analysis config gives "
            f"{choices(found)}; pass the ranges fitted with this config"
        )
    return list(found.values())


def _ratios(ranges: RangeSet, condition: str) -> list[float]:
    if not ranges.ratios:
        raise RangelensError(
            f"condition {condition!r} masks density bands, but the range set holds none; fit the "
            f"ranges with this erasure config (rangelens run does)"
        )
    return ranges.ratios


def _groups(
    ranges: RangeSet,
    sites: list[NeuronSite],
    split: str,
    concepts: list[int],
    config: ErasureConfig,
    seed: int,
    points: list[tuple[float, float]] | None = None,
) -> list[_Group]:
    """Every condition's mask at every site, (tau, p) (default: every saved point) and concept,
    built from the split's maps."""
    index = list(ranges.splits).index(split)
    groups = []
    for s, site in enumerate(sites):
        masks: dict[Key, RangeMask | None] = {}
        for tau, p in points or ranges.points:
            range_map = ranges.map(site.name, split, tau, p)
            for c in concepts:
                values = ranges.replacement(site.name, split, config.replacement, c)
                spec = MaskSpec(
                    site,
                    range_map,
                    c,
                    values,
                    config.positions,
                    config.mode,
                    config.scale,
                    (seed, index, s, c, round(p * 1e6)),
                )
                for name in config.conditions:
                    condition = CONDITIONS[name]
                    if condition.per_ratio:  # one mask per saved likelihood ratio
                        for ratio in _ratios(ranges, name):
                            at: Key = (name, c, site.name, ratio, p)
                            if at not in masks:
                                bands = ranges.band_map(site.name, split, ratio, p)
                                masks[at] = condition.build(replace(spec, bands=bands))
                        continue
                    key = (name, c, site.name, tau if condition.per_tau else None, p)
                    if key not in masks:
                        masks[key] = condition.build(spec)
        groups.append(_Group(site, masks))
    groups[0].masks = {BASE: None, **groups[0].masks}  # shares the first site's prefix
    return groups


def _run_groups(
    lm: LoadedModel,
    texts: list[str],
    groups: list[_Group],
    forward: Callable[[dict[str, torch.Tensor]], T],
    starts: list[int],
    *,
    batch_size: int,
    max_length: int,
    padding_side: str | None,
    bar: Any,
) -> dict[Key, list[tuple[np.ndarray, T]]]:
    """Every mask of ``groups`` on every batch of ``texts`` (group g skips ``starts[g]`` blocks):
    per condition the ``(text index, output)`` of each batch."""
    results: dict[Key, list[tuple[np.ndarray, T]]] = {k: [] for g in groups for k in g.masks}
    if not groups or not texts:
        return results
    batches = tokenize(
        lm, texts, batch_size=batch_size, max_length=max_length, padding_side=padding_side
    )
    bar.total += len(results) * len(batches)
    bar.refresh()
    for batch in batches:
        kwargs = model_inputs(lm.model, batch)
        for group, start in zip(groups, starts, strict=True):
            keys = list(group.masks)
            outputs = run_conditions(
                lm.model, kwargs, [group.masks[k] for k in keys], forward, start=start
            )
            for key, out in zip(keys, outputs, strict=True):
                results[key].append((batch.index, out))
            bar.update(len(keys))
    return results


def _starts(
    lm: LoadedModel, groups: list[_Group], readout: list[NeuronSite], suffix: bool
) -> list[int]:
    return [suffix_start(lm.model, [*readout, g.site]) if suffix else 0 for g in groups]


def _skipping(lm: LoadedModel, groups: list[_Group], starts: list[int]) -> dict[str, Any]:
    """Per mask site: how many blocks each condition's forward skipped and re-ran."""
    n = len(blocks(lm.model)[1])
    return {
        g.site.name: {"skipped_blocks": s, "rerun_blocks": n - s}
        for g, s in zip(groups, starts, strict=True)
    }


def _classify(
    lm: LoadedModel,
    task: ClassificationTask,
    classifier: Classifier,
    rows: np.ndarray,
    groups: list[_Group],
    config: ErasureConfig,
    batch_size: int,
    bar: Any,
) -> tuple[dict[Key, np.ndarray], dict[str, Any]]:
    """Class log-probabilities of ``rows`` under every condition, and how they were computed: from
    cached pooled features where the masks allow it (with ``suffix``), else by forwards that skip
    the blocks before each mask site."""
    logps: dict[Key, np.ndarray] = {}
    cached: list[_Group] = []
    pooled = classifier.pooled
    if pooled is not None and config.suffix:
        cached = [g for g in groups if all(pooled.covers(m) for m in g.masks.values())]
        logps = {k: pooled.log_proba(rows, m) for g in cached for k, m in g.masks.items()}
    run = [g for g in groups if g not in cached]
    starts = _starts(lm, run, task.sites, config.suffix)
    outputs = _run_groups(
        lm,
        [task.inputs[i] for i in rows],
        run,
        classifier.readout,
        starts,
        batch_size=batch_size,
        max_length=task.max_length,
        padding_side=task.padding_side,
        bar=bar,
    )
    for key, pairs in outputs.items():
        logps[key] = np.zeros((len(rows), pairs[0][1].shape[1]))
        for index, out in pairs:
            logps[key][index] = out.cpu().numpy()
    how = {"cached_features": [g.site.name for g in cached], "forwards": _skipping(lm, run, starts)}
    return logps, how


def _perplexity(
    lm: LoadedModel,
    groups: list[_Group],
    config: ErasureConfig,
    analysis: AnalysisConfig,
    bar: Any,
) -> tuple[Perplexities | None, dict[str, Any]]:
    """Per-text NLL on general text under every condition of the ``full`` split's ranges."""
    if not has_lm_head(lm) or config.ppl_texts == 0:
        return None, {"skipped": "ppl_texts = 0" if has_lm_head(lm) else "no LM head"}
    general = general_text(config.ppl_texts, seed=analysis.seed)
    starts = _starts(lm, groups, [], config.suffix)
    sums = _run_groups(
        lm,
        general,
        groups,
        partial(token_nll, lm.model),
        starts,
        batch_size=analysis.batch_size,
        max_length=config.ppl_max_length,
        padding_side=None,
        bar=bar,
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
        "forwards": _skipping(lm, groups, starts),
    }
    return Perplexities(nll, tokens), how


def _classify_folds(
    lm: LoadedModel,
    data: LabeledTexts,
    cap: CaptureResult,
    ranges: RangeSet,
    sites: list[NeuronSite],
    protocol: ErasureProtocol,
    config: ErasureConfig,
    bar: Any,
) -> tuple[Outcomes, dict[str, Any]]:
    """Every condition on every fold's test texts, with that fold's classifier and ranges."""
    task = protocol.task(cap)
    text: list[np.ndarray] = []
    pred: dict[Key, list[np.ndarray]] = {}
    gold: dict[Key, list[np.ndarray]] = {}
    how: dict[str, Any] = {}
    for split in ranges.splits.values():
        if split.name == FULL:
            continue
        rows = np.setdiff1d(split.test, task.reserved)
        groups = _groups(
            ranges, sites, split.name, protocol.concepts, config, protocol.analysis.seed
        )
        classifier = protocol.classifier(cap, split)
        batch = protocol.analysis.batch_size
        logps, how = _classify(lm, task, classifier, rows, groups, config, batch, bar)
        text.append(rows)
        for key, logp in logps.items():
            pred.setdefault(key, []).append(logp.argmax(axis=1))
            gold.setdefault(key, []).append(np.exp(logp[np.arange(len(rows)), data.labels[rows]]))
    every = np.concatenate(text)
    outcomes = Outcomes(
        every,
        data.labels[every],
        {k: np.concatenate(v) for k, v in pred.items()},
        {k: np.concatenate(v) for k, v in gold.items()},
    )
    return outcomes, how


def _check_capture(data: LabeledTexts, cap: CaptureResult) -> None:
    if len(cap.labels) != len(data) or not np.array_equal(cap.labels, data.labels):
        raise RangelensError(
            f"the capture's {len(cap.labels)} labels differ from dataset {data.name!r} "
            f"({len(data)} texts); pass the capture made on this data"
        )
    if list(cap.label_names) != list(data.label_names):
        raise RangelensError(
            f"capture concepts {choices(cap.label_names)} differ from the dataset's "
            f"{choices(data.label_names)}; pass the capture made on this data"
        )


def run_erasure(
    lm: LoadedModel,
    data: LabeledTexts,
    cap: CaptureResult,
    ranges: RangeSet,
    analysis: AnalysisConfig,
    config: ErasureConfig,
    out_dir: Path | None = None,
    *,
    protocol: ErasureProtocol | None = None,
    progress: bool = True,
) -> ErasureResult:
    """Run the erasure experiment on the saved ``ranges`` (the ranges stage's, fitted with the same
    ``protocol``); with ``out_dir``, also write its files there (see :func:`write_erasure`)."""
    started = time.perf_counter()
    _check_capture(data, cap)
    protocol = protocol or ErasureProtocol(lm, data, analysis, config)
    concepts = protocol.concepts
    sites = _sites(lm, analysis, ranges)
    seconds: dict[str, float] = {}
    bar = tqdm(total=0, desc="erasure", unit="forward", disable=not progress, leave=False)
    with torch.inference_mode(), bar:
        clock = time.perf_counter()
        task = protocol.task(cap)
        outcomes, how = _classify_folds(lm, data, cap, ranges, sites, protocol, config, bar)
        seconds["classify"] = time.perf_counter() - clock
        clock = time.perf_counter()
        at = None if config.ppl_sweep else [(float(analysis.tau), float(analysis.p))]
        full = _groups(ranges, sites, FULL, concepts, config, analysis.seed, at)
        ppl, ppl_how = _perplexity(lm, full, config, analysis, bar)
        seconds["perplexity"] = time.perf_counter() - clock
    estimator = EffectEstimator(outcomes, ppl, config.bootstrap, analysis.seed)
    random_neurons = {
        f"{site}/{c}": m.neurons.tolist()
        for (state, c, site, _, p), m in full[0].masks.items()
        if state == "random" and m is not None and p == analysis.p
    }
    info: dict[str, Any] = {
        "task": config.task,
        "model": lm.name,
        "dataset": data.name,
        "task_info": task.info,
        "classify": how,
        "perplexity": ppl_how,
        "protocol": {
            "folds": config.folds,
            "repeats": config.repeats,
            "evaluation": "repeated stratified k-fold: every text is a test text once per repeat",
            "ranges": {n: s.rows for n, s in ranges.splits.items()},
            "n_fit": {n: len(s.fit) for n, s in ranges.splits.items()},
            "correct_share": protocol.correct_share,
            "perplexity_ranges": "split 'full' (analysis training split)",
            "reserved_rows": task.reserved.tolist(),
        },
        "ranges": "ranges/maps/<site>/<split>/tau<t>_p<p> (loaded from the ranges stage)",
        "random_neurons_full": random_neurons,
        "sites": [s.name for s in sites],
        "headline_site": sites[0].name,
        "tau": analysis.tau,
        "p": analysis.p,
        "points": [list(pt) for pt in ranges.points],
        "ratios": ranges.ratios,
        "density_ratio": analysis.density_ratio,
        "conditions": config.conditions,
        "suffix": config.suffix,
    }
    result = summarise(estimator, data, concepts, analysis, config, info)
    result.info["seconds"] = {
        **{k: round(v, 3) for k, v in seconds.items()},
        "total": round(time.perf_counter() - started, 3),
    }
    if out_dir is not None:
        write_erasure(Path(out_dir), result, config)
    return result


def erasure_ranges(protocol: ErasureProtocol, cap: CaptureResult) -> RangeSet:
    """The range set the ranges stage fits for ``protocol`` (in memory; the pipeline saves it in
    ``ranges/``): for scripts and tests that run the experiment without a run directory."""
    splits = protocol.splits(cap)
    source = FeatureSource(
        cap,
        protocol.analysis,
        protocol.lm,
        splits.inputs,
        max_length=splits.max_length,
        padding_side=splits.padding_side,
    )
    analysis = protocol.analysis
    bands = analysis.band_ratios() if "density" in protocol.config.conditions else None
    return fit_rangeset(cap, analysis, {}, source=source, splits=splits, ratios=bands).rangeset
