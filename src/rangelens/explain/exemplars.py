"""Build :class:`NeuronRecord` exemplars for many neurons from one token-level capture pass.

As in Bills et al. (2023) and NeuronScope (Liu et al., arXiv 2601.03671): the top-activating texts
and samples stratified across activation quantiles are shown to the explainer; a feedback set, a
validation (acceptance) set and a held-out set (each half top-activating, half random, so both
activating and non-activating texts are scored) come from disjoint pools of texts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from rangelens.activations.capture import Activations, capture
from rangelens.activations.models import LoadedModel
from rangelens.activations.sites import NeuronSite
from rangelens.errors import RangelensError
from rangelens.explain.records import ActivationRecord, NeuronRecord


@dataclass(frozen=True)
class ExemplarConfig:
    """How many exemplars of each kind; ``skip_first`` drops position 0 (the decoder attention sink,
    whose outlier activations would dominate every score)."""

    n_top: int = 20
    n_quantile_bins: int = 4
    n_per_bin: int = 5
    n_feedback: int = 16
    n_validation: int = 16
    n_held_out: int = 20
    activating_fraction: float = 0.2
    skip_first: bool = True
    seed: int = 0


def scaled_config(n_texts: int, seed: int = 0) -> ExemplarConfig:
    """The default :class:`ExemplarConfig`, shrunk to fit ``n_texts`` texts (about 60% of them
    used; at least 32 texts are needed)."""
    if n_texts < 32:
        raise RangelensError(
            f"explanations need at least 32 texts, got {n_texts}: use more --texts-per-class "
            f"or a larger dataset"
        )
    d = ExemplarConfig()
    return ExemplarConfig(
        n_top=min(d.n_top, n_texts // 8),
        n_per_bin=min(d.n_per_bin, max(1, n_texts // 32)),
        n_feedback=min(d.n_feedback, n_texts // 8),
        n_validation=min(d.n_validation, n_texts // 8),
        n_held_out=min(d.n_held_out, n_texts // 6),
        seed=seed,
    )


def token_strings(lm: LoadedModel, token_ids: np.ndarray) -> list[str]:
    """Each token id decoded on its own (``'Ġgoal'`` -> ``' goal'``)."""
    unique = np.unique(token_ids)
    decoded = lm.tokenizer.batch_decode([[int(i)] for i in unique])
    table = dict(zip(unique.tolist(), decoded, strict=True))
    return [table[int(i)] for i in token_ids]


def _text_scores(signal: np.ndarray, bounds: list[tuple[int, int]]) -> np.ndarray:
    """Rank key per text: its maximum, ties broken by its mean (for 0/1 range indicators)."""
    return np.array([signal[a:b].max() + 1e-3 * signal[a:b].mean() for a, b in bounds])


def _top_and_random(
    pool: np.ndarray, scores: np.ndarray, n: int, rng: np.random.Generator
) -> np.ndarray:
    ranked = pool[np.argsort(-scores[pool], kind="stable")]
    n_top = min(n // 2, len(ranked))
    rest = ranked[n_top:]
    return np.concatenate([ranked[:n_top], rng.permutation(rest)[: n - n_top]])


def records_from_activations(
    values: np.ndarray,
    token_ids: np.ndarray,
    tokens: Sequence[str],
    offsets: np.ndarray,
    neurons: Sequence[int],
    *,
    model: str,
    site: str,
    layer: int | None,
    config: ExemplarConfig = ExemplarConfig(),
    target_range: tuple[float, float] | None = None,
    concepts: Sequence[str] | None = None,
) -> list[NeuronRecord]:
    """Split texts into disjoint explain / feedback / validation / held-out pools and pick
    exemplars per neuron.

    ``values`` is ``(n_tokens, len(neurons))`` with text i at rows ``offsets[i]:offsets[i + 1]``.
    With ``target_range``, each neuron's signal becomes the 0/1 indicator of ``lo <= a <= hi``.
    ``concepts[i]`` is text i's class (kept on its records to name modes by concept).
    """
    if concepts is not None and len(concepts) != len(offsets) - 1:
        raise RangelensError(f"{len(concepts)} concepts for {len(offsets) - 1} texts")
    n_texts = len(offsets) - 1
    start = 1 if config.skip_first else 0
    bounds = [(int(offsets[i]) + start, int(offsets[i + 1])) for i in range(n_texts)]
    keep = np.array([b > a for a, b in bounds])
    needed = config.n_top + config.n_quantile_bins * config.n_per_bin
    needed += config.n_feedback + config.n_validation + config.n_held_out
    if keep.sum() < needed:
        raise RangelensError(
            f"need at least {needed} texts with {start + 1}+ tokens for exemplars, got {keep.sum()}"
        )
    rng = np.random.default_rng(config.seed)
    order = rng.permutation(np.flatnonzero(keep))
    n_val = max(config.n_validation, round(0.15 * len(order)))
    n_fb = max(config.n_feedback, round(0.15 * len(order)))
    n_held = max(config.n_held_out, round(0.2 * len(order)))
    held_pool, val_pool = order[:n_held], order[n_held : n_held + n_val]
    fb_pool = order[n_held + n_val : n_held + n_val + n_fb]
    explain_pool = order[n_held + n_val + n_fb :]
    if len(explain_pool) < config.n_top + config.n_quantile_bins * config.n_per_bin:
        raise RangelensError(
            f"too few texts ({keep.sum()}) for explain/feedback/validation/held-out pools"
        )

    records = []
    for col, neuron in enumerate(neurons):
        raw = values[:, col].astype(np.float64)
        signal = (
            raw
            if target_range is None
            else ((raw >= target_range[0]) & (raw <= target_range[1])).astype(np.float64)
        )
        scores = _text_scores(signal, bounds)

        def rec(i: int, signal: np.ndarray = signal) -> ActivationRecord:
            a, b = bounds[i]
            return ActivationRecord(
                tokens=list(tokens[a:b]),
                token_ids=[int(t) for t in token_ids[a:b]],
                activations=[float(x) for x in signal[a:b]],
                text_index=int(i),
                concept=None if concepts is None else str(concepts[i]),
            )

        ranked = explain_pool[np.argsort(-scores[explain_pool], kind="stable")]
        top, rest = ranked[: config.n_top], ranked[config.n_top :]
        bins = np.array_split(rest, config.n_quantile_bins)
        quantiles = [i for chunk in bins for i in rng.permutation(chunk)[: config.n_per_bin]]
        feedback = _top_and_random(fb_pool, scores, config.n_feedback, rng)
        validation = _top_and_random(val_pool, scores, config.n_validation, rng)
        held_out = _top_and_random(held_pool, scores, config.n_held_out, rng)
        maxima = scores[keep]
        records.append(
            NeuronRecord(
                model=model,
                site=site,
                layer=layer,
                neuron=int(neuron),
                top=[rec(i) for i in top],
                quantiles=[rec(i) for i in quantiles],
                feedback=[rec(i) for i in feedback],
                validation=[rec(i) for i in validation],
                held_out=[rec(i) for i in held_out],
                threshold=float(np.quantile(maxima, 1.0 - config.activating_fraction)),
                target="activation"
                if target_range is None
                else f"in_range[{target_range[0]:.6g},{target_range[1]:.6g}]",
                stats={
                    "mean": float(raw.mean()),
                    "std": float(raw.std()),
                    "max": float(raw.max()),
                    "n_texts": float(n_texts),
                },
            )
        )
    return records


def build_records(
    lm: LoadedModel,
    texts: Sequence[str],
    site: NeuronSite,
    neurons: Sequence[int],
    *,
    config: ExemplarConfig = ExemplarConfig(),
    target_range: tuple[float, float] | None = None,
    max_length: int = 64,
    batch_size: int = 16,
    progress: bool = False,
    concepts: Sequence[str] | None = None,
    activations: Activations | None = None,
) -> list[NeuronRecord]:
    """Capture ``site`` once at every token (unless ``activations`` holds that capture of
    ``texts`` already) and build one :class:`NeuronRecord` per neuron (``concepts``: each text's
    class, see :func:`records_from_activations`)."""
    bad = [n for n in neurons if not 0 <= n < site.width]
    if bad:
        raise RangelensError(
            f"neuron {bad[0]} out of range for site {site.name} (0..{site.width - 1})"
        )
    acts = activations or capture(
        lm,
        texts,
        [site],
        position="tokens",
        max_length=max_length,
        batch_size=batch_size,
        progress=progress,
    )
    assert acts.token_ids is not None and acts.offsets is not None
    values = acts.acts[site.name][:, list(neurons)]
    return records_from_activations(
        values,
        acts.token_ids,
        token_strings(lm, acts.token_ids),
        acts.offsets,
        neurons,
        model=lm.name,
        site=site.kind,
        layer=site.layer,
        config=config,
        target_range=target_range,
        concepts=concepts,
    )
