"""The stages of a run, in pipeline order: capture -> splits -> ranges -> erasure ->
explanations (the report reads them all). Each is a :class:`~rangelens.pipeline.runner.Stage`:
its inputs, upstream stages, and how it is computed, saved and loaded.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import torch

from rangelens.activations.distributed import is_main, local_device
from rangelens.activations.models import LoadedModel, load_model
from rangelens.activations.sites import resolve_site
from rangelens.config.analysis import AnalysisConfig
from rangelens.config.erasure import ErasureConfig
from rangelens.config.explain import FROM_RUN, ExplainConfig, ExplainInputs
from rangelens.config.sources import input_digest
from rangelens.data import LabeledTexts
from rangelens.erasure.experiment import run_erasure
from rangelens.erasure.outputs import ErasureResult, load_erasure, write_erasure
from rangelens.erasure.protocol import SPLIT_INPUTS, ErasureProtocol
from rangelens.errors import RangelensError
from rangelens.explain.api import explain_site
from rangelens.explain.results import Explained, load_explained
from rangelens.explain.schedule import PartialResults
from rangelens.pipeline.runner import Stage
from rangelens.ranges.captured import (
    CaptureResult,
    TokenSample,
    load_capture,
    run_capture,
    sample_about,
    save_capture,
)
from rangelens.ranges.fit import FeatureSource, FittedRanges, fit_rangeset, load_ranges
from rangelens.ranges.maps import RangeMap
from rangelens.ranges.splits import Splits, default_splits
from rangelens.rundir import RunDir


class Inputs:
    """What the stages of one run share: its options, its data and its model (each loaded once,
    on first use; a run whose stages are all current loads no model)."""

    def __init__(
        self,
        run_dir: RunDir,
        analysis: AnalysisConfig,
        erasure: ErasureConfig | None = None,
        *,
        lm: LoadedModel | None = None,
        progress: bool = True,
    ) -> None:
        self.run_dir, self.analysis, self.erasure = run_dir, analysis, erasure
        self.progress = progress
        if lm is not None:
            self.__dict__["lm"] = lm

    @cached_property
    def data(self) -> LabeledTexts:
        return self.analysis.load_data()

    @cached_property
    def lm(self) -> LoadedModel:
        a = self.analysis
        device = local_device(a.device)
        return load_model(
            a.model, device=device, dtype=a.dtype, device_map=a.device_map, progress=self.progress
        )

    @cached_property
    def protocol(self) -> ErasureProtocol:
        assert self.erasure is not None
        return ErasureProtocol(
            self.lm, self.data, self.analysis, self.erasure, progress=self.progress
        )


def capture_stage(run: Inputs, *, progress: bool) -> Stage[CaptureResult]:
    """One forward per text (stopped after the site): statistics, pooled features and the
    per-token activations of the texts explanations draw (read by the explanations stage)."""

    def check() -> None:  # bad data or sites fail before anything is announced or written
        assert run.data is not None
        resolve_site(run.lm.model, run.analysis.site, run.analysis.layer)

    def compute() -> CaptureResult:
        torch.manual_seed(run.analysis.seed)
        return run_capture(run.lm, run.data, run.analysis, progress=progress)

    return Stage(
        "capture",
        run.analysis.capture_inputs(),
        compute,
        save_capture,
        load_capture,
        info=lambda cap: {"seconds": cap.info["seconds"]},
        check=check,
    )


def splits_stage(run: Inputs, cap: CaptureResult) -> Stage[Splits]:
    """The rows every range map is fitted on: the analysis split alone, or (with an erasure
    section) also every fold, each restricted to its correctly classified training rows."""
    e = run.erasure
    inputs = None if e is None else {k: getattr(e, k) for k in SPLIT_INPUTS}

    def compute() -> Splits:
        if e is None:
            return default_splits(cap.train, cap.test)
        return run.protocol.splits(cap)

    def save(splits: Splits, directory: Path) -> None:
        splits.save(directory)

    extra = {"padding_side": run.analysis.padding_side}
    return Stage("splits", [inputs, extra], compute, save, Splits.load, upstream=("capture",))


def ranges_stage(run: Inputs, cap: CaptureResult, splits: Splits) -> Stage[FittedRanges]:
    """Every range map (site x split x tau x p; density bands when the erasure masks them)."""
    a, e = run.analysis, run.erasure
    ratios = a.band_ratios() if e is not None and "density" in e.conditions else None
    if a.ranking == "probe" and a.position == "tokens":
        raise RangelensError(
            "ranking 'probe' needs pooled features; use a position other than 'tokens'"
        )

    def compute() -> FittedRanges:
        metadata = {
            "model": a.model,
            "dataset": run.data.name,
            "site": a.site,
            "layer": a.layer,
            "site_name": cap.info["site"],
            "position": a.position,
            "ranking": a.ranking,
            "seed": a.seed,
        }
        source = FeatureSource(
            cap,
            a,
            lambda: run.lm,
            splits.inputs,
            max_length=splits.max_length,
            padding_side=splits.padding_side,
        )
        return fit_rangeset(cap, a, metadata, source=source, splits=splits, ratios=ratios)

    def save(fitted: FittedRanges, directory: Path) -> None:
        fitted.save(directory, cap.label_names)

    inputs = [a.range_inputs(), ratios]
    return Stage("ranges", inputs, compute, save, load_ranges, upstream=("capture", "splits"))


def erasure_stage(
    run: Inputs, cap: CaptureResult, fitted: FittedRanges, *, progress: bool
) -> Stage[ErasureResult]:
    """Range vs neuron masking (and the controls) on every fold's test texts, and perplexity."""
    e = run.erasure
    assert e is not None

    def compute() -> ErasureResult:
        return run_erasure(
            run.lm,
            run.data,
            cap,
            fitted.rangeset,
            run.analysis,
            e,
            protocol=run.protocol,
            progress=progress,
        )

    def save(result: ErasureResult, directory: Path) -> None:
        write_erasure(directory, result, e)

    # stack_rows changes how many forwards run, not what they compute: a finished stage is reused
    inputs = [e.model_dump(exclude={"stack_rows"}), {"padding_side": run.analysis.padding_side}]
    return Stage(
        "erasure", inputs, compute, save, load_erasure, upstream=("capture", "splits", "ranges")
    )


def explain_with(
    lm: LoadedModel,
    read: AnalysisConfig | ExplainInputs,
    config: ExplainConfig,
    headline: RangeMap | None,
    cache_dir: Path,
    tokens: TokenSample | None = None,
    *,
    partial: Path | None = None,
    progress: bool = False,
) -> Explained:
    """Explain ``config.neurons``, else a concept's ranges or the ``top_k`` most salient neurons of
    ``headline`` (a run's map), at ``read``'s site on ``config.texts_per_class`` texts per class.
    Their per-token activations come from ``tokens`` (a run's capture) when it holds these texts
    at this site, model, max_length and dtype; otherwise from a capture pass of their own.
    Finished neurons are kept in ``partial`` until the caller saves the whole (resume)."""
    site = resolve_site(lm.model, read.site, read.layer)
    data = read.load_data(max_per_class=config.texts_per_class, balance=False)
    about = sample_about(input_digest(read.model), site.name, read.max_length, read.dtype)
    stored = tokens.activations_for(data, about) if tokens is not None else None
    ranges = []
    if config.concept is not None and headline is not None:
        ranges = headline.ranges(config.concept)[: config.top_k]
    neurons = [] if ranges else list(config.neurons or [])
    if not neurons and not ranges and headline is not None:
        neurons = headline.top_neurons(config.top_k)
    meta = {"model": read.model, "dataset": read.dataset, "site": site.name, "seed": read.seed}
    return explain_site(
        lm,
        data.texts,
        site,
        config,
        neurons=neurons,
        ranges=ranges,
        seed=read.seed,
        max_length=read.max_length,
        batch_size=read.batch_size,
        cache_dir=cache_dir,
        metadata={**meta, **({"concept": config.concept} if config.concept else {})},
        concepts=[data.label_names[int(i)] for i in data.labels],
        partial=partial,
        progress=progress,
        activations=stored,
    )


def explanations_stage(
    run: Inputs, headline: RangeMap, config: ExplainConfig, tokens: TokenSample | None = None
) -> Stage[Explained]:
    """The top salient neurons of the run's ``headline`` map (or ``config.neurons`` / a concept's
    ranges) explained at the analysed site (see :func:`explain_with`; ``tokens``: the capture's
    sample, read instead of running the model again)."""
    a = run.analysis
    cache = run.run_dir.root / ".explanations-llm-cache"
    # finished neurons, kept until the stage is saved (torchrun workers other than rank 0 keep none)
    partial = run.run_dir.root / ".explanations-partial" if is_main() else None

    def compute() -> Explained:
        return explain_with(
            run.lm, a, config, headline, cache, tokens, partial=partial, progress=run.progress
        )

    def save(explained: Explained, directory: Path) -> None:
        explained.save(directory)
        if partial is not None:
            PartialResults.remove(partial)

    read = {k: getattr(a, k) for k in FROM_RUN}
    read.update(model=input_digest(a.model), dataset=input_digest(a.dataset), seed=a.seed)
    inputs = [config.result_inputs(), read]
    return Stage(
        "explanations", inputs, compute, save, load_explained, upstream=("capture", "ranges")
    )
