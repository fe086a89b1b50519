"""The capture stage's product: per-(concept, neuron) streaming statistics over the training split,
pooled features of every text, the split, throughput and memory, and the per-token activations
of a capped sample of texts (what explanations of the site read); one forward per text, stopped
after the site.

On disk (``RUN_DIR/capture/``): ``stats.safetensors`` (:class:`ConceptStats`),
``features.safetensors`` (labels, train/test rows, pooled features), ``tokens.safetensors``
(:class:`TokenSample`) and ``capture.json``.
"""

from __future__ import annotations

import hashlib
import resource
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from rangelens.artifacts import read_json, write_json
from rangelens.config.analysis import AnalysisConfig
from rangelens.config.sources import input_digest
from rangelens.data import DataWarning, LabeledTexts, split
from rangelens.ranges.stats import ConceptStats

if TYPE_CHECKING:
    from rangelens.activations.capture import Activations
    from rangelens.activations.models import LoadedModel

TOKENS_FORMAT = "rangelens.tokens/1"


def text_keys(data: LabeledTexts) -> list[bytes]:
    """A 16-byte digest of each text with its class: what identifies a text across loads of a
    dataset with different caps."""
    return [
        hashlib.blake2b(f"{data.label_names[int(y)]}\0{t}".encode(), digest_size=16).digest()
        for t, y in zip(data.texts, data.labels, strict=True)
    ]


@dataclass
class TokenSample:
    """Per-token activations (float32, every neuron) of the capture's site for a capped sample of
    its texts: text i's tokens are rows ``offsets[i]:offsets[i + 1]`` of ``values``; ``keys`` (see
    :func:`text_keys`) say which texts they are. ``about`` records what produced them (site,
    model, max_length, dtype); explanations use them only when those match. ``values`` loads on
    first use."""

    keys: np.ndarray  # (n_texts, 16) uint8
    offsets: np.ndarray  # (n_texts + 1,) int64
    token_ids: np.ndarray  # (n_tokens,) int64
    about: dict[str, str]
    path: Path | None = None
    loaded: np.ndarray | None = field(default=None, repr=False)  # (n_tokens, width) float32

    @property
    def values(self) -> np.ndarray:
        if self.loaded is None:
            assert self.path is not None
            with safe_open(str(self.path), framework="numpy") as f:
                self.loaded = f.get_tensor("values")
        return self.loaded

    def activations_for(self, data: LabeledTexts, about: dict[str, str]) -> Activations | None:
        """The token activations of ``data``'s texts in its order (as
        :func:`rangelens.activations.capture.capture` at ``position='tokens'`` returns them),
        or None when the sample was made differently or lacks one of the texts."""
        from rangelens.activations.capture import Activations

        if about != self.about:
            return None
        where = {bytes(k): i for i, k in enumerate(self.keys)}
        found = [where.get(k) for k in text_keys(data)]
        if any(i is None for i in found):
            return None
        spans = [np.arange(self.offsets[i], self.offsets[i + 1]) for i in found if i is not None]
        rows = np.concatenate(spans)
        offsets = np.concatenate([[0], np.cumsum([len(r) for r in spans])])
        site = self.about["site"]
        return Activations({site: self.values[rows]}, "tokens", self.token_ids[rows], offsets)

    def save(self, path: Path) -> None:
        arrays = {"keys": self.keys, "offsets": self.offsets, "token_ids": self.token_ids}
        save_file(
            {**arrays, "values": self.values}, str(path), {"format": TOKENS_FORMAT, **self.about}
        )

    @classmethod
    def open(cls, path: Path) -> TokenSample:
        """The sample saved at ``path``, its values left on disk until used."""
        with safe_open(str(path), framework="numpy") as f:
            meta = dict(f.metadata() or {})
            if meta.pop("format", None) != TOKENS_FORMAT:
                raise ValueError(f"{path} is not a {TOKENS_FORMAT} file")
            arrays = {k: f.get_tensor(k) for k in ("keys", "offsets", "token_ids")}
        return cls(arrays["keys"], arrays["offsets"], arrays["token_ids"], meta, path)


def sample_about(model: str, site: str, max_length: int, dtype: str) -> dict[str, str]:
    """What a :class:`TokenSample` depends on besides its texts (``model``: its input digest)."""
    return {"site": site, "model": model, "max_length": str(max_length), "dtype": dtype}


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
    tokens: TokenSample | None = None  # per-token activations of the explanations' texts


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
    from rangelens.activations.capture import CaptureBatch, by_text, iter_activations
    from rangelens.activations.distributed import gather, shard, world
    from rangelens.activations.sites import resolve_site

    site = resolve_site(lm.model, config.site, config.layer)
    sample = token_sample_rows(data, config) if world()[1] == 1 else np.zeros(0, np.int64)
    sampled: list[CaptureBatch] = []
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
        sample=sample,
    ):
        if batch.sampled is not None:
            sampled.append(batch.sampled)
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
    tokens = None
    if len(sample):
        per_token = by_text(sampled, [site.name], sample)
        assert per_token.token_ids is not None and per_token.offsets is not None
        about = sample_about(input_digest(config.model), site.name, config.max_length, config.dtype)
        keys = np.array([list(k) for k in text_keys(data.subset(sample))], dtype=np.uint8)
        values = per_token.acts[site.name]
        tokens = TokenSample(keys, per_token.offsets, per_token.token_ids, about, None, values)
        info["token_sample"] = {
            "n_texts": len(sample),
            "n_tokens": int(per_token.offsets[-1]),
            "megabytes": round(values.nbytes / 2**20, 1),
        }
    return CaptureResult(stats, features, data.labels, train, test, data.label_names, info, tokens)


def token_sample_rows(data: LabeledTexts, config: AnalysisConfig) -> np.ndarray:
    """The capture rows whose per-token activations are kept: the texts explanations of the run
    draw (``config.load_data`` capped at ``token_texts_per_class`` per class, unbalanced: the
    explanations' own selection), in that selection's order. With the seeded per-class sampling
    of :func:`rangelens.data.load_texts` a smaller cap selects a subset of a larger one, so these
    are among the capture's texts; any that are not are left out (explanations needing them run
    their own capture)."""
    if config.token_texts_per_class == 0:
        return np.zeros(0, dtype=np.int64)
    with warnings.catch_warnings():  # the capture's own load already gave the data notices
        warnings.simplefilter("ignore", DataWarning)
        chosen = config.load_data(max_per_class=config.token_texts_per_class, balance=False)
    rows: dict[bytes, list[int]] = {}
    for i, key in enumerate(text_keys(data)):
        rows.setdefault(key, []).append(i)
    found = [rows[k].pop(0) for k in text_keys(chosen) if rows.get(k)]
    return np.array(found, dtype=np.int64)


def save_capture(result: CaptureResult, directory: Path) -> None:
    result.stats.save(directory / "stats.safetensors")
    arrays = {"labels": result.labels, "train": result.train, "test": result.test}
    if result.features is not None:
        arrays["features"] = result.features
    save_file(arrays, str(directory / "features.safetensors"))
    if result.tokens is not None:
        result.tokens.save(directory / "tokens.safetensors")
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
        tokens=load_tokens(directory),
    )


def load_tokens(directory: Path) -> TokenSample | None:
    """The capture's :class:`TokenSample` (values left on disk until used); None when it kept
    none (``token_texts_per_class`` 0, torchrun, or a run made before the sample existed)."""
    path = directory / "tokens.safetensors"
    return TokenSample.open(path) if path.is_file() else None
