"""The NeuronLens analysis half as one resumable pipeline: capture -> statistics -> ranking -> ranges.

Stages write into a run directory (see :mod:`rangelens.artifacts`):

- ``capture/``: per-(concept, neuron) streaming statistics over the training split, pooled features of
  every text (for the probe ranker and the erasure experiment), the split, throughput and memory;
- ``ranges/``: salience scores, rankings, the :class:`~rangelens.ranges.RangeMap`, the distribution table
  (Gaussian-likeness, Bhattacharyya overlap, purity) and its summary, polysemanticity.
"""

from __future__ import annotations

import os
import resource
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import pandas as pd
import torch
from pydantic import Field, field_validator
from safetensors.numpy import load_file, save_file

from rangelens.artifacts import (
    STAGE,
    atomic_dir,
    check_run_dir,
    clean_stale_temps,
    fingerprint,
    mark_stage,
    path_digest,
    read_json,
    reuse_stage,
    run_lock,
    write_json,
    write_run_meta,
    write_table,
)
from rangelens.capture import POSITIONS, iter_activations
from rangelens.data import DataSource, LabeledTexts, resolve_dataset, split
from rangelens.distributed import gather, is_main, local_device, shard, world
from rangelens.errors import RangelensError, choices
from rangelens.models import BUILTIN_MODELS, LoadedModel, ModelSource, cache_dir, load_model
from rangelens.ranges import RangeMap
from rangelens.rangeset import (
    FULL,
    FeatureSource,
    RangeSet,
    RangesPlan,
    band_ratios,
    run_ranges,
)
from rangelens.ranking import RANKING_METHODS
from rangelens.sites import resolve_site
from rangelens.stats import ConceptStats


def input_digest(source: str) -> str:
    """A built-in or hub name as is; a local file/folder by its content digest (see `file_digest`)."""
    path = Path(source).expanduser()
    if source in BUILTIN_MODELS or not path.exists():
        return source
    return path_digest(path, memo=cache_dir() / "digests.json")


class AnalysisConfig(DataSource, ModelSource):
    """Everything that determines an analysis run (saved resolved in ``run.json``)."""

    test_size: float = Field(0.2, gt=0, lt=1, description="share of texts held out for testing")
    site: str = Field("resid", description="resid | mlp | attn | module:<dotted.path>[:input]")
    layer: int = Field(-1, description="block index; negative counts from the end")
    position: str = Field("last", description="last | first | cls | mean | tokens")
    ranking: str = Field(
        "dprime",
        description="dprime | mean_abs (NeuronLens reference code; at the last block it picks "
        "massive-activation dimensions) | probeless | probe",
    )
    tau: float = Field(2.0, gt=0, description="range half-width in standard deviations")
    p: float = Field(0.3, gt=0, le=1, description="share of neurons that are salient per concept")
    taus: list[Annotated[float, Field(gt=0)]] = Field(
        default_factory=list, description="tau sweep: more range maps fitted beside tau"
    )
    ps: list[Annotated[float, Field(gt=0, le=1)]] = Field(
        default_factory=list, description="p sweep: more range maps fitted beside p"
    )
    layers: list[int] = Field(
        default_factory=list, description="layer sweep: more mask sites (site kind of 'site')"
    )
    range_method: Literal["gaussian", "quantile", "density"] = Field(
        "gaussian",
        description="gaussian (mean ± tau·std) | quantile | density (likelihood-ratio bands)",
    )
    density_ratio: float = Field(
        1.0, gt=0, description="density bands: likelihood-ratio threshold concept / rest"
    )
    density_ratios: list[Annotated[float, Field(gt=0)]] = Field(
        default_factory=list,
        description="likelihood-ratio sweep for the erasure 'density' condition, beside density_ratio",
    )
    select: Literal["ranking", "band"] = Field(
        "ranking", description="keep neurons by ranking score, or by band purity × coverage"
    )
    n_bins: int = Field(64, ge=4, description="histogram bins per neuron (streaming statistics)")
    batch_size: int = Field(16, ge=1, description="texts per forward")
    max_length: int = Field(128, ge=1, description="tokens per text (longer texts are truncated)")
    padding_side: Literal["left", "right"] | None = Field(
        None, description="pad batches on this side (default: the tokenizer's)"
    )
    device: str = Field("cpu", description="cpu | cuda | cuda:N")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="weights and activations dtype"
    )

    @field_validator("position")
    @classmethod
    def _position(cls, v: str) -> str:
        if v not in POSITIONS:
            raise ValueError(f"unknown position {v!r}; valid: {choices(POSITIONS)}")
        return v

    @field_validator("ranking")
    @classmethod
    def _ranking(cls, v: str) -> str:
        if v not in RANKING_METHODS:
            raise ValueError(f"unknown ranking {v!r}; valid: {choices(RANKING_METHODS)}")
        return v

    def resolved(self) -> AnalysisConfig:
        """Local dataset/model paths made absolute, so a run records where its inputs are."""
        model = self.model
        if model not in BUILTIN_MODELS and Path(model).expanduser().exists():
            model = str(Path(model).expanduser().resolve())
        return self.model_copy(update={"dataset": resolve_dataset(self.dataset), "model": model})

    def capture_inputs(self) -> dict[str, object]:
        """What determines the capture: content digests of local data and model files (not their
        path spelling), loader options and capture settings."""
        keys = ["test_size", "site", "layer", "position", "n_bins", "max_length", "dtype"]
        return {
            "dataset": input_digest(self.dataset),
            "model": input_digest(self.model),
            **self.loader_options(),
            **{k: getattr(self, k) for k in keys},
        }

    def range_inputs(self) -> dict[str, object]:
        keys = (
            "ranking",
            "tau",
            "p",
            "taus",
            "ps",
            "layers",
            "range_method",
            "density_ratio",
            "density_ratios",
            "select",
            "seed",
        )
        return {k: getattr(self, k) for k in keys}


@dataclass
class CaptureResult:
    """What the capture stage produced (loaded back from disk when the stage is skipped)."""

    stats: ConceptStats
    features: np.ndarray | None  # (n_texts, d) pooled features, None for position='tokens'
    labels: np.ndarray
    train: np.ndarray
    test: np.ndarray
    label_names: list[str]
    info: dict[str, object]


@dataclass
class AnalysisResult:
    """Outputs of :func:`analyze`; everything is also on disk under ``run_dir``."""

    run_dir: Path
    capture: CaptureResult
    scores: np.ndarray
    rangeset: RangeSet
    distribution: pd.DataFrame
    summary: pd.DataFrame
    polysemanticity: pd.DataFrame

    @property
    def range_map(self) -> RangeMap:
        """The headline range map: analysis site, split ``full``, the config's tau and p."""
        site = str(self.capture.info["site"])
        meta = self.rangeset.metadata
        return self.rangeset.map(site, FULL, float(meta["tau"]), float(meta["p"]))


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MB).

    Linux's ``VmHWM`` starts afresh at exec; ``ru_maxrss`` would include the parent's peak at fork.
    """
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def run_capture(
    lm: LoadedModel, data: LabeledTexts, config: AnalysisConfig, *, progress: bool = True
) -> CaptureResult:
    """Capture the site over all texts; statistics stream over the training split only."""
    site = resolve_site(lm.model, config.site, config.layer)
    train, test = split(data, config.test_size, config.seed)
    is_train = np.zeros(len(data), dtype=bool)
    is_train[train] = True
    stats = ConceptStats(data.label_names, site.width, n_bins=config.n_bins)
    keep = config.position != "tokens"
    features = np.zeros((len(data), site.width), dtype=np.float32) if keep else None
    mine = shard(len(data))  # all texts, or this worker's share under torchrun
    n_tokens, start = 0, time.perf_counter()
    for batch in iter_activations(
        lm,
        [data.texts[i] for i in mine],
        [site],
        position=config.position,
        batch_size=config.batch_size,
        max_length=config.max_length,
        padding_side=config.padding_side,
        progress=progress,
    ):
        acts = batch.acts[site.name].numpy()
        rows = mine[batch.rows]
        if features is not None:
            features[mine[batch.index]] = acts
        fit = is_train[rows]
        if fit.any():
            stats.add(acts[fit], data.labels[rows[fit]])
        n_tokens += batch.n_tokens
    stats, features, n_tokens = gather(stats, features, n_tokens)
    seconds = time.perf_counter() - start
    info: dict[str, object] = {
        "site": site.name,
        "module": site.module_path,
        "width": site.width,
        "n_texts": len(data),
        "n_tokens": n_tokens,
        "seconds": round(seconds, 3),
        "tokens_per_second": round(n_tokens / max(seconds, 1e-9), 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "device": str(lm.device),
        "dtype": str(lm.dtype).removeprefix("torch."),
        "workers": world()[1],
    }
    return CaptureResult(stats, features, data.labels, train, test, data.label_names, info)


def _save_capture(result: CaptureResult, directory: Path) -> None:
    result.stats.save(directory / "stats.safetensors")
    arrays = {"labels": result.labels, "train": result.train, "test": result.test}
    if result.features is not None:
        arrays["features"] = result.features
    save_file(arrays, str(directory / "features.safetensors"))
    write_json(directory / "capture.json", {"label_names": result.label_names, **result.info})


def load_capture(directory: Path) -> CaptureResult:
    """Load a finished capture stage."""
    arrays = load_file(str(directory / "features.safetensors"))
    meta = read_json(directory / "capture.json")
    names = meta.pop("label_names")
    return CaptureResult(
        stats=ConceptStats.load(directory / "stats.safetensors"),
        features=arrays.get("features"),
        labels=arrays["labels"],
        train=arrays["train"],
        test=arrays["test"],
        label_names=names,
        info=meta,
    )


def _ranking_table(scores: np.ndarray, top: np.ndarray, names: list[str]) -> pd.DataFrame:
    rows = [
        {"concept": names[c], "rank": r, "neuron": int(j), "score": float(scores[c, j])}
        for c in range(len(names))
        for r, j in enumerate(top[c])
    ]
    return pd.DataFrame(rows)


def load_ranges(
    directory: Path,
) -> tuple[np.ndarray, RangeSet, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Load a finished ranges stage (raises if one of its files is missing or damaged)."""
    RangeMap.load(directory)
    pd.read_csv(directory / "rankings.csv")
    read_json(directory / "summary.json")
    return (
        load_file(str(directory / "scores.safetensors"))["scores"],
        RangeSet.load(directory),
        pd.read_csv(directory / "distribution.csv"),
        pd.read_csv(directory / "summary.csv"),
        pd.read_csv(directory / "polysemanticity.csv"),
    )


def analyze(
    config: AnalysisConfig,
    run_dir: str | Path,
    *,
    lm: LoadedModel | None = None,
    plan: RangesPlan | None = None,
    progress: bool = True,
) -> AnalysisResult:
    """Run (or resume) the analysis into ``run_dir``; finished stages with unchanged inputs are
    skipped. With a ``plan`` (a classification task exists) ranges are fitted on the rows it picks
    (by default the correctly classified training rows, per split), else on all training rows.
    Stages are reused only if their files load. The run directory is locked meanwhile (torchrun
    workers other than rank 0 write nothing and take no lock)."""
    run_dir = Path(run_dir)
    with run_lock(run_dir) if os.environ.get("RANK", "0") == "0" else nullcontext():
        return _analyze(config, run_dir, lm, plan, progress)


def _analyze(
    config: AnalysisConfig,
    run_dir: Path,
    lm: LoadedModel | None,
    plan: RangesPlan | None,
    progress: bool,
) -> AnalysisResult:
    config = config.resolved()
    check_run_dir(run_dir, config.model)
    clean_stale_temps(run_dir)
    torch.manual_seed(config.seed)
    data = config.load_data()
    if config.ranking == "probe" and config.position == "tokens":
        raise RangelensError(
            "ranking 'probe' needs pooled features; use a position other than 'tokens'"
        )
    capture_fp = fingerprint(config.capture_inputs())
    capture_dir = run_dir / "capture"
    cap = reuse_stage(capture_dir, capture_fp, load_capture)
    ranges_fp = fingerprint(capture_fp, config.range_inputs(), plan.inputs if plan else None)
    ranges_dir = run_dir / "ranges"
    ranges = reuse_stage(ranges_dir, ranges_fp, load_ranges)
    if cap is None or (ranges is None and config.layers):  # validate before writing
        device = local_device(config.device)
        lm = lm or load_model(config.model, device=device, dtype=config.dtype)
        resolve_site(lm.model, config.site, config.layer)
    main = is_main()
    if main:
        write_run_meta(run_dir, config.model_dump(), config.seed)
    if cap is None:
        assert lm is not None
        cap = run_capture(lm, data, config, progress=progress and main)
        if main:
            with atomic_dir(capture_dir, STAGE) as tmp:
                _save_capture(cap, tmp)
                mark_stage(tmp, "capture", capture_fp, seconds=cap.info["seconds"])
    if ranges is not None:
        scores, rangeset, table, summary, poly = ranges
        return AnalysisResult(run_dir, cap, scores, rangeset, table, summary, poly)
    metadata = {
        "model": config.model,
        "dataset": data.name,
        "site": config.site,
        "layer": config.layer,
        "site_name": cap.info["site"],
        "position": config.position,
        "ranking": config.ranking,
        "seed": config.seed,
    }
    source, splits = plan.make(cap) if plan else (FeatureSource(cap, config, lm), None)
    # Density bands beside the range maps when the erasure experiment masks them.
    conditions = plan.inputs.get("conditions") if plan is not None else None
    wants_bands = isinstance(conditions, list) and "density" in conditions
    scores, rangeset, table, summary, poly = run_ranges(
        cap,
        config,
        metadata,
        source=source,
        splits=splits,
        ratios=band_ratios(config) if wants_bands else None,
    )
    if main:
        with atomic_dir(ranges_dir, STAGE) as tmp:
            rangeset.save(tmp)
            rangeset.map(source.main, FULL, config.tau, config.p).save(tmp)
            save_file({"scores": scores}, str(tmp / "scores.safetensors"))
            salient = rangeset.map(source.main, FULL, config.tau, config.p).neurons
            write_table(tmp / "rankings.csv", _ranking_table(scores, salient, cap.label_names))
            write_table(tmp / "distribution.csv", table)
            write_table(tmp / "summary.csv", summary)
            write_table(tmp / "polysemanticity.csv", poly)
            write_json(tmp / "summary.json", summary.to_dict(orient="records"))
            mark_stage(tmp, "ranges", ranges_fp)
    return AnalysisResult(run_dir, cap, scores, rangeset, table, summary, poly)
