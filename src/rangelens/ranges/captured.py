"""The capture stage's product: per-(concept, neuron) streaming statistics over the training split,
pooled features of every text, the split, throughput and memory (one forward per text; the
forward stops after the site).

On disk (``RUN_DIR/capture/``): ``stats.safetensors`` (:class:`ConceptStats`),
``features.safetensors`` (labels, train/test rows, pooled features) and ``capture.json``.
"""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from safetensors.numpy import load_file, save_file

from rangelens.artifacts import read_json, write_json
from rangelens.config.analysis import AnalysisConfig
from rangelens.data import LabeledTexts, split
from rangelens.ranges.stats import ConceptStats

if TYPE_CHECKING:
    from rangelens.activations.models import LoadedModel


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
    from rangelens.activations.capture import iter_activations
    from rangelens.activations.distributed import gather, shard, world
    from rangelens.activations.sites import resolve_site

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


def save_capture(result: CaptureResult, directory: Path) -> None:
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
