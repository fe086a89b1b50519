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
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from tqdm.auto import tqdm

from rangelens.activations.models import LoadedModel
from rangelens.activations.sites import NeuronSite, resolve_site
from rangelens.config.analysis import AnalysisConfig
from rangelens.config.erasure import ErasureConfig
from rangelens.data import LabeledTexts
from rangelens.erasure.conditions import CONDITIONS, MaskSpec
from rangelens.erasure.engine import Group
from rangelens.erasure.evaluate import classify, perplexity
from rangelens.erasure.information import fold_information, site_features
from rangelens.erasure.metrics import BASE, EffectEstimator, Key, Outcomes
from rangelens.erasure.outputs import ErasureResult, state_key, summarise, write_erasure
from rangelens.erasure.protocol import ErasureProtocol
from rangelens.erasure.tasks import (
    covers,
)
from rangelens.errors import RangelensError, choices
from rangelens.intervene import Edit
from rangelens.ranges.captured import CaptureResult
from rangelens.ranges.fit import FeatureSource, fit_rangeset
from rangelens.ranges.rangeset import RangeSet
from rangelens.ranges.splits import FULL

T = TypeVar("T")


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
    analysis: AnalysisConfig,
    points: list[tuple[float, float]] | None = None,
    features: dict[str, np.ndarray] | None = None,
    labels: np.ndarray | None = None,
) -> list[Group]:
    """Every condition's mask at every site, (tau, p) (default: every saved point) and concept,
    built from the split's maps; fitted edits (LEACE) from the split's training rows of
    ``features`` (per site, pooled features of every data row) and ``labels``. Per-ratio masks
    (density bands) only where a figure reads them: the headline ratio everywhere, the other
    ratios (the ratio sweep) at the headline site and p."""
    index = list(ranges.splits).index(split)
    train = ranges.splits[split].train
    groups = []
    for s, site in enumerate(sites):
        at_site = (features or {}).get(site.name)
        fit_x = at_site[train] if at_site is not None else None
        fit_y = labels[train] if labels is not None and at_site is not None else None
        masks: dict[Key, Edit | None] = {}
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
                    (analysis.seed, index, s, c, round(p * 1e6)),
                    features=fit_x,
                    labels=fit_y,
                )
                for name in config.conditions:
                    condition = CONDITIONS[name]
                    if condition.per_ratio:  # one mask per saved likelihood ratio
                        swept = s == 0 and p == analysis.p
                        for ratio in _ratios(ranges, name):
                            at: Key = (name, c, site.name, ratio, p)
                            if at not in masks and (swept or ratio == analysis.density_ratio):
                                bands = ranges.band_map(site.name, split, ratio, p)
                                masks[at] = condition.build(replace(spec, bands=bands))
                        continue
                    key = (name, c, site.name, tau if condition.per_tau else None, p)
                    if key not in masks:
                        masks[key] = condition.build(spec)
        groups.append(Group(site, masks))
    groups[0].masks = {BASE: None, **groups[0].masks}  # shares the first site's prefix
    return groups


def _classify_folds(
    lm: LoadedModel,
    data: LabeledTexts,
    cap: CaptureResult,
    ranges: RangeSet,
    sites: list[NeuronSite],
    protocol: ErasureProtocol,
    config: ErasureConfig,
    bar: Any,
    features: dict[str, np.ndarray],
    position: str,
) -> tuple[Outcomes, dict[str, Any]]:
    """Every condition on every fold's test texts, with that fold's classifier and ranges; and
    where the headline site's pooled features allow it, the information question at the headline
    (tau, p, ratio): retrained probes on edited rows (:mod:`rangelens.erasure.information`)."""
    task = protocol.task(cap)
    a = protocol.analysis
    text: list[np.ndarray] = []
    pred: dict[Key, list[np.ndarray]] = {}
    gold: dict[Key, list[np.ndarray]] = {}
    probe: dict[tuple[str, Key], list[np.ndarray]] = {}
    norm: dict[Key, list[np.ndarray]] = {}
    dims: dict[Key, list[int]] = {}
    how: dict[str, Any] = {}
    notices: list[str] = []
    site = sites[0]
    wanted = {BASE} | {
        state_key(s, c, site.name, a.tau, a.p, a.density_ratio)
        for s in config.conditions
        for c in protocol.concepts
    }
    for split in ranges.splits.values():
        if split.name == FULL:
            continue
        rows = np.setdiff1d(split.test, task.reserved)
        groups = _groups(
            ranges,
            sites,
            split.name,
            protocol.concepts,
            config,
            a,
            None,
            features,
            data.labels,
        )
        classifier = protocol.classifier(cap, split)
        batch = protocol.analysis.batch_size
        ahead = 0 if text else sum(len(s.test) for n, s in ranges.splits.items() if n != FULL)
        logps, how = classify(lm, task, classifier, rows, groups, config, batch, bar, ahead)
        notices += how.pop("notices")
        text.append(rows)
        if config.probes and site.name in features:
            masks = {
                k: m
                for k, m in groups[0].masks.items()
                if k in wanted and covers(site, position, m)
            }
            found = fold_information(
                features[site.name],
                data.labels,
                split.train,
                rows,
                masks,
                list(config.probes),
                n_classes=len(data.label_names),
                C=config.head_C,
                seed=a.seed,
            )
            for pk, values in found.pred.items():
                probe.setdefault(pk, []).append(values)
            for k, values in found.norm.items():
                norm.setdefault(k, []).append(values)
            for k, n in found.dims.items():
                dims.setdefault(k, []).append(n)
        for key, logp in logps.items():
            pred.setdefault(key, []).append(logp.argmax(axis=1))
            gold.setdefault(key, []).append(np.exp(logp[np.arange(len(rows)), data.labels[rows]]))
    every = np.concatenate(text)
    outcomes = Outcomes(
        every,
        data.labels[every],
        {k: np.concatenate(v) for k, v in pred.items()},
        {k: np.concatenate(v) for k, v in gold.items()},
        {k: np.concatenate(v) for k, v in probe.items() if len(v) == len(text)},
        {k: np.concatenate(v) for k, v in norm.items() if len(v) == len(text)},
    )
    dimensions: dict[str, list[int]] = {}
    for k, counts in dims.items():
        dimensions.setdefault(k[0], []).extend(counts)
    how["notices"] = notices
    how["dimensions"] = {s: float(np.mean(v)) for s, v in dimensions.items()}
    how["information"] = (
        f"probes {list(config.probes)} refit per fold on edited pooled features at {site.name}"
        if probe
        else "not measured (no pooled features at the masked site, or probes [])"
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
    bar = tqdm(total=0, desc="erasure", unit="mask×batch", disable=not progress, leave=False)
    with torch.inference_mode(), bar:
        clock = time.perf_counter()
        task = protocol.task(cap)
        first = next(s for s in ranges.splits.values() if s.name != FULL)
        found = site_features(protocol.classifier(cap, first), cap, sites[0], analysis.position)
        features = {sites[0].name: found[0]} if found is not None else {}
        position = found[1] if found is not None else analysis.position
        outcomes, how = _classify_folds(
            lm, data, cap, ranges, sites, protocol, config, bar, features, position
        )
        seconds["classify"] = time.perf_counter() - clock
        clock = time.perf_counter()
        at = None if config.ppl_sweep else [(float(analysis.tau), float(analysis.p))]
        full = _groups(ranges, sites, FULL, concepts, config, analysis, at, features, data.labels)
        ppl, ppl_how = perplexity(lm, full, config, analysis, bar)
        seconds["perplexity"] = time.perf_counter() - clock
    estimator = EffectEstimator(outcomes, ppl, config.bootstrap, analysis.seed)
    neuron_sets = [
        frozenset(m.neurons.tolist())
        for (state, _, site, _, p), m in full[0].masks.items()
        if state == "neuron" and m is not None and p == analysis.p and site == sites[0].name
    ]
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
        "shared_neuron_mask": len(set(neuron_sets)) == 1 and len(neuron_sets) > 1,
        "notices": how.pop("notices", []),
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
