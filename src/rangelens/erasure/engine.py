"""Suffix-only evaluation: run the blocks before a mask site once, then only the suffix per mask.

A mask at block L cannot change anything before L, so each batch runs the network prefix once and
caches the hidden state entering the first block that must run; every condition then re-runs the
stock forward with the prefix blocks swapped for pass-through modules returning that cache
(:func:`skip_blocks`). Several masks share one suffix forward: the batch (and the cache) is stacked
K times and mask k edits only the k-th copy (:func:`rangelens.intervene.attach_stacked`); the
outputs are split back per mask. Model code is never forked; the stock forward still builds its
masks and rotary tables. Hooks go through the one primitive,
:class:`rangelens.activations.hooks.Trace` (here, in the masks' ``attach`` and in capture).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from rangelens.activations.capture import model_inputs, tokenize
from rangelens.activations.hooks import Trace, stop_forward
from rangelens.activations.models import LoadedModel
from rangelens.activations.sites import FAMILIES, NeuronSite, blocks
from rangelens.erasure.metrics import Key
from rangelens.errors import RangelensError
from rangelens.intervene import Edit, attach_stacked

T = TypeVar("T")


class _Cached(nn.Module):
    """Stands in for a skipped block: returns the cached hidden state, in the block's output type."""

    def __init__(self, hidden: torch.Tensor, as_tuple: bool) -> None:
        super().__init__()
        self.hidden = hidden
        self.as_tuple = as_tuple

    def forward(self, *args: Any, **_kwargs: Any) -> torch.Tensor | tuple[torch.Tensor]:
        incoming = args[0] if args else None
        if isinstance(incoming, torch.Tensor) and incoming.shape != self.hidden.shape:
            raise RangelensError(
                f"cached hidden state has shape {tuple(self.hidden.shape)} but this forward has "
                f"{tuple(incoming.shape)}; run the conditions on the batch the prefix ran on"
            )
        return (self.hidden,) if self.as_tuple else self.hidden


def suffix_start(model: nn.Module, sites: Sequence[NeuronSite]) -> int:
    """How many leading blocks no mask or readout at ``sites`` depends on (0: run everything).

    A ``resid`` site at layer L is block L's output, so blocks 0..L can be replaced by the cached
    output of block L; ``mlp``/``attn`` sites live inside block L, which must run. Only the mapped
    families (``rangelens.activations.sites.FAMILIES``) are skipped, and only for sites inside the blocks.
    """
    mapped = getattr(model.config, "model_type", None) in FAMILIES
    if not mapped or not sites or any(s.layer is None for s in sites):
        return 0
    return min(s.layer + (s.kind == "resid") for s in sites if s.layer is not None)


@contextmanager
def skip_blocks(
    model: nn.Module, n: int, hidden: torch.Tensor, *, as_tuple: bool = False
) -> Iterator[None]:
    """Swap blocks ``0..n-1`` for pass-throughs returning ``hidden`` (block n-1's output).

    Block n then receives ``hidden`` exactly as in a full forward; embeddings, attention masks and
    rotary tables are still built by the stock forward. Each skipped block gets its own stand-in, so
    a mask hooked at the last skipped block's output (a ``resid`` site) runs once per forward. The
    original blocks are always restored.
    """
    _, layers = blocks(model)
    if not 0 < n <= len(layers):
        raise RangelensError(f"can skip 1..{len(layers)} blocks of this model, not {n}")
    originals = [layers[i] for i in range(n)]
    try:
        for i in range(n):
            layers[i] = _Cached(hidden, as_tuple)
        yield
    finally:
        for i, block in enumerate(originals):
            layers[i] = block


def _prefix(model: nn.Module, inputs: dict[str, torch.Tensor], n: int) -> tuple[torch.Tensor, bool]:
    """Run blocks 0..n-1 once; return block n-1's output and whether the block returns a tuple."""
    path, _ = blocks(model)
    with Trace(model, f"{path}.{n - 1}", stop=True) as trace, stop_forward():
        model(**inputs)
    if trace.value is None:
        raise RangelensError(f"block {n - 1} did not run in the forward; use suffix=False")
    return trace.value, isinstance(trace.output, tuple | list)


def stacked(inputs: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Forward kwargs for ``k`` copies of the batch, one after the other along the batch axis."""
    if k == 1:
        return inputs
    rows = {v.shape[0] for v in inputs.values() if isinstance(v, torch.Tensor)}
    if len(rows) > 1:
        raise RangelensError(
            f"forward arguments have different batch sizes {sorted(rows)}; stacking masks needs "
            f"one row per text in every tensor argument (use stack_rows = batch_size)"
        )
    return {
        name: v.repeat(k, *(1,) * (v.ndim - 1)) if isinstance(v, torch.Tensor) else v
        for name, v in inputs.items()
    }


def split_rows(out: Any, k: int) -> list[Any]:
    """A stacked forward's output as ``k`` outputs, one per row slice: tensors and arrays split
    along their first axis, tuples and lists element by element."""
    if isinstance(out, torch.Tensor | np.ndarray) and out.ndim > 0 and out.shape[0] % k == 0:
        n = out.shape[0] // k
        return [out[i * n : (i + 1) * n] for i in range(k)]
    if isinstance(out, tuple | list):
        parts = [split_rows(x, k) for x in out]
        return [type(out)(p[i] for p in parts) for i in range(k)]
    raise RangelensError(
        f"cannot split a forward output of type {type(out).__name__} (shape "
        f"{getattr(out, 'shape', None)}) into {k} masks' rows; return tensors or arrays with "
        f"one row per text, or tuples of them"
    )


def run_conditions(
    model: nn.Module,
    inputs: dict[str, torch.Tensor],
    masks: Sequence[Edit | None],
    forward: Callable[[dict[str, torch.Tensor]], T],
    *,
    start: int = 0,
    stack: int = 1,
) -> list[T]:
    """``forward(inputs)`` under each mask (None: no mask), in order.

    With ``start > 0`` (see :func:`suffix_start`) blocks ``0..start-1`` run once for all masks and
    only the suffix runs per mask; ``start = 0`` runs full forwards. Masks are attached inside the
    swap, so a mask on a skipped block's output edits the cached value. ``stack`` masks share one
    forward of ``stack`` copies of the batch, mask k on copy k, and ``forward``'s output (tensors
    or arrays with one row per text, or tuples of them) is split back per mask; ``stack = 1``
    runs one forward per mask.
    """
    if stack < 1:
        raise RangelensError(f"stack must be >= 1 masks per forward, not {stack}")
    cached = _prefix(model, inputs, start) if start > 0 else None
    results: list[T] = []
    for first in range(0, len(masks), stack):
        chunk = masks[first : first + stack]
        k = len(chunk)
        with ExitStack() as context:
            if cached is not None:
                hidden = cached[0] if k == 1 else cached[0].repeat(k, *(1,) * (cached[0].ndim - 1))
                context.enter_context(skip_blocks(model, start, hidden, as_tuple=cached[1]))
            context.enter_context(attach_stacked(model, chunk))
            out = forward(stacked(inputs, k))
        results.extend([out] if k == 1 else split_rows(out, k))
    return results


def masks_per_forward(stack_rows: int, batch_size: int) -> int:
    """How many masks one stacked forward holds: as many batches as fit in ``stack_rows`` rows."""
    return max(1, stack_rows // batch_size)


@dataclass
class Group:
    """Conditions whose masks sit at one site, so they share one prefix per batch."""

    site: NeuronSite
    masks: dict[Key, Edit | None]


def run_groups(
    lm: LoadedModel,
    texts: list[str],
    groups: list[Group],
    forward: Callable[[dict[str, torch.Tensor]], T],
    starts: list[int],
    *,
    batch_size: int,
    max_length: int,
    padding_side: str | None,
    bar: Any,
    stack_rows: int = 1,
) -> dict[Key, list[tuple[np.ndarray, T]]]:
    """Every mask of ``groups`` on every batch of ``texts`` (group g skips ``starts[g]`` blocks),
    masks stacked into forwards of at most ``stack_rows`` rows (see :func:`masks_per_forward`):
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
                lm.model,
                kwargs,
                [group.masks[k] for k in keys],
                forward,
                start=start,
                stack=masks_per_forward(stack_rows, len(batch.index)),
            )
            for key, out in zip(keys, outputs, strict=True):
                results[key].append((batch.index, out))
            bar.update(len(keys))
    return results


def starts_for(
    lm: LoadedModel, groups: list[Group], readout: list[NeuronSite], suffix: bool
) -> list[int]:
    return [suffix_start(lm.model, [*readout, g.site]) if suffix else 0 for g in groups]


def skipping(lm: LoadedModel, groups: list[Group], starts: list[int]) -> dict[str, Any]:
    """Per mask site: how many blocks each condition's forward skipped and re-ran."""
    n = len(blocks(lm.model)[1])
    return {
        g.site.name: {"skipped_blocks": s, "rerun_blocks": n - s}
        for g, s in zip(groups, starts, strict=True)
    }


def forecast(
    lm: LoadedModel,
    texts: list[str],
    groups: list[Group],
    starts: list[int],
    n_texts: int,
    *,
    batch_size: int,
    max_length: int,
    padding_side: str | None,
    stack_rows: int = 1,
) -> tuple[int, float]:
    """How many suffix forwards (each of up to :func:`masks_per_forward` masks on one batch) the
    masks of ``groups`` need over ``n_texts`` texts, and about how many seconds, from one timed
    full forward of a batch of ``texts`` (a stacked forward costing as many unstacked ones as it
    holds masks: the compute is the same)."""
    n_batches = -(-n_texts // batch_size)
    k = masks_per_forward(stack_rows, batch_size)
    n_forwards = sum(-(-len(g.masks) // k) for g in groups) * n_batches
    if not texts or not groups:
        return n_forwards, 0.0
    batch = tokenize(
        lm,
        texts[:batch_size],
        batch_size=batch_size,
        max_length=max_length,
        padding_side=padding_side,
    )[0]
    clock = time.perf_counter()
    lm.model(**model_inputs(lm.model, batch))
    full = time.perf_counter() - clock
    n_blocks = len(blocks(lm.model)[1])
    per = [full * (n_blocks - s) / n_blocks for s in starts]
    seconds = sum(len(g.masks) * n_batches * t for g, t in zip(groups, per, strict=True))
    return n_forwards, seconds
