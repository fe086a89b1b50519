"""The forwards behind :mod:`rangelens.report.token_shift`: the next-token shift of each planned
neuron's range mask and whole-neuron mask on the plan's held-out texts.

Cost: batches outer, masks inner. Per batch the blocks before the site run once and each mask
re-runs only the blocks after it (:func:`rangelens.erasure.engine.run_conditions`); edited forwards
stop at the LM head's input, and the head (the costliest layer of a small model with a large
vocabulary) runs only at the positions whose final hidden state the mask changed, so a range that
rarely fires costs little. If the head's output is not the model's logits (e.g. Gemma's soft-capping;
checked on the first batch), every edited forward runs to the model's logits instead.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rangelens.activations.capture import model_inputs, tokenize
from rangelens.activations.hooks import Trace, stop_forward
from rangelens.activations.models import LoadedModel
from rangelens.activations.sites import NeuronSite
from rangelens.erasure.engine import run_conditions, suffix_start
from rangelens.errors import RangelensError
from rangelens.intervene import NeuronMask, RangeMask
from rangelens.intervene.logits import unembedding
from rangelens.report.token_shift import (
    MAX_LENGTH,
    NeuronShift,
    Shift,
    ShiftPlan,
    TokenChange,
)

BATCH_SIZE = 8
CHUNK = 32  # neurons per pass over the texts: bounds the (2 * CHUNK, vocab) accumulators


def _masks(plan: ShiftPlan, site: NeuronSite) -> dict[int, tuple[RangeMask, NeuronMask]]:
    """Per target neuron: its one-neuron range mask and whole-neuron mask, sliced from the concept's
    mask so both use the run's replacement values."""
    by_concept: dict[int, RangeMask] = {}
    out = {}
    for j, t in plan.targets.items():
        full = by_concept.get(t.concept)
        if full is None:
            full = RangeMask.from_range_map(
                site, plan.range_map, t.concept, stats=plan.stats, **plan.mask
            )
            by_concept[t.concept] = full
        r = slice(t.rank, t.rank + 1)
        options = {k: plan.mask[k] for k in ("positions", "mode", "scale")}
        out[j] = (
            RangeMask(
                site, [j], full.lo[r], full.hi[r], replacement=full.replacement[r], **options
            ),
            NeuronMask(site, [j], replacement=full.replacement[r], **options),
        )
    return out


def _head_path(model: nn.Module) -> tuple[str, nn.Module]:
    """The LM head's module path and module (the output embedding of a decoder)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    for name, module in model.named_modules():
        if name and isinstance(head, nn.Module) and module is head:
            return name, head
    raise RangelensError(f"{type(model).__name__} has no LM head module: no next-token shift")


class _Accumulator:
    """Sums over the real positions of every batch: the base distribution, and per mask the change
    of the distribution."""

    def __init__(self, vocab: int, n_masks: int) -> None:
        self.base = torch.zeros(vocab, dtype=torch.float64)
        self.delta = torch.zeros(n_masks, vocab, dtype=torch.float64)
        self.positions = 0


class _Forwards:
    """The forward run by :func:`run_conditions` for the base (first call per batch) and then each
    mask: the base keeps its probabilities and final hidden states;
    a mask adds its change at the positions whose hidden state differs from the base's."""

    def __init__(self, lm: LoadedModel, site: NeuronSite, acc: _Accumulator) -> None:
        self.model = lm.model
        self.site = site
        self.acc = acc
        self.head_path, self.head = _head_path(lm.model)
        self.direct: bool | None = None  # whether head(hidden) is the model's logits
        self.index = -1
        self.real = torch.zeros(0, dtype=torch.bool)
        self.hidden = torch.zeros(0)
        self.prob = torch.zeros(0)  # (batch * seq, vocab) base probabilities
        self.site_values = torch.zeros(0)

    def start(self, real: torch.Tensor) -> None:
        self.real, self.index = real, -1

    def __call__(self, inputs: dict[str, torch.Tensor]) -> None:
        self.index += 1
        if self.index == 0:
            self._base(inputs)
            return
        if self.direct:
            with (
                Trace(self.model, self.head_path, input=True, stop=True) as trace,
                stop_forward(),
            ):
                self.model(**inputs)
            assert trace.value is not None
            changed = (trace.value != self.hidden).any(-1) & self.real
            logits = self.head(trace.value[changed])
        else:
            changed = self.real
            logits = self.model(**inputs).logits[changed]
        edited = torch.softmax(logits.float(), dim=-1).sum(0)
        base = changed.reshape(1, -1).to(self.prob.dtype) @ self.prob  # summed, no copy
        self.acc.delta[self.index - 1] += (edited - base[0]).double().cpu()

    def _base(self, inputs: dict[str, torch.Tensor]) -> None:
        is_input = self.site.hook == "input"
        with (
            Trace(self.model, self.head_path, input=True) as head,
            Trace(self.model, self.site.module_path, input=is_input) as site,
        ):
            logits = self.model(**inputs).logits.float()
        assert head.value is not None and site.value is not None
        if self.direct is None:  # compare at the last column: cheap, and any transform shows
            mine = self.head(head.value[:, -1:]).float()
            self.direct = bool(torch.allclose(mine, logits[:, -1:], rtol=1e-4, atol=1e-4))
        self.hidden = head.value
        self.prob = torch.softmax(logits, dim=-1).reshape(-1, logits.shape[-1])
        self.site_values = site.value.reshape(*self.real.shape, site.value.shape[-1])
        self.acc.base += self.prob[self.real.reshape(-1)].sum(0).double().cpu()
        self.acc.positions += int(self.real.sum())


def _shift(base: torch.Tensor, delta: torch.Tensor, k: int, decode: Any, n: int) -> Shift:
    base, delta = base / n, delta / n
    edited = base + delta
    tiny = torch.finfo(torch.float64).tiny  # rounding must not turn a probability into log(0)
    kl = torch.xlogy(base, base) - torch.xlogy(base, edited.clamp_min(tiny))

    def changes(order: torch.Tensor) -> list[TokenChange]:
        return [
            TokenChange(str(decode([t])), float(base[t]), float(edited[t])) for t in order.tolist()
        ]

    return Shift(
        changes(torch.topk(delta, k).indices),
        changes(torch.topk(-delta, k).indices),
        float(delta.abs().sum() / 2),
        float(kl.sum()),
    )


def range_shifts(
    lm: LoadedModel,
    site: NeuronSite,
    plan: ShiftPlan,
    *,
    k: int = 10,
    batch_size: int = BATCH_SIZE,
    max_length: int = MAX_LENGTH,
    chunk: int = CHUNK,
) -> dict[int, NeuronShift]:
    """The next-token shift of each target's range mask and whole-neuron mask on ``plan.texts``
    (see the module docstring), ``chunk`` neurons per pass over the texts."""
    if plan.targets and not plan.texts:
        raise RangelensError("no held-out texts: the next-token shift needs some")
    masks = _masks(plan, site)
    batches = tokenize(lm, plan.texts, batch_size=batch_size, max_length=max_length)
    order = list(masks)
    out: dict[int, NeuronShift] = {}
    for first in range(0, len(order), chunk):
        some = {j: masks[j] for j in order[first : first + chunk]}
        out.update(_chunk_shifts(lm, site, plan, some, batches, k))
    return out


def _chunk_shifts(
    lm: LoadedModel,
    site: NeuronSite,
    plan: ShiftPlan,
    masks: dict[int, tuple[RangeMask, NeuronMask]],
    batches: list[Any],
    k: int,
) -> dict[int, NeuronShift]:
    order = list(masks)
    edits = [m for j in order for m in masks[j]]  # range, neuron, range, neuron, ...
    vocab = int(unembedding(lm.model).shape[0])
    acc = _Accumulator(vocab, len(edits))
    forwards = _Forwards(lm, site, acc)
    inside = torch.zeros(len(order), dtype=torch.float64)
    start = suffix_start(lm.model, [site])
    with torch.inference_mode():
        for batch in batches:
            inputs = model_inputs(lm.model, batch)
            forwards.start(inputs["attention_mask"].bool())
            run_conditions(lm.model, inputs, [None, *edits], forwards, start=start)
            values = forwards.site_values[forwards.real].double().cpu()
            for i, j in enumerate(order):
                x, fired = values[:, j], torch.zeros(values.shape[0], dtype=torch.bool)
                lo, hi = masks[j][0].lo.reshape(-1), masks[j][0].hi.reshape(-1)
                for a, b in zip(lo.tolist(), hi.tolist(), strict=True):
                    fired |= (x >= a) & (x <= b)  # the NaN slots of a band match nothing
                inside[i] += int(fired.sum())
    n, decode = acc.positions, lm.tokenizer.decode
    out = {}
    for i, j in enumerate(order):
        t = plan.targets[j]
        out[j] = NeuronShift(
            concept=plan.range_map.concepts[t.concept],
            rank=t.rank,
            band=list(plan.range_map.ranges(t.concept)[t.rank].intervals),
            in_range=float(inside[i] / n),
            positions=n,
            range=_shift(acc.base, acc.delta[2 * i], k, decode, n),
            neuron=_shift(acc.base, acc.delta[2 * i + 1], k, decode, n),
        )
    return out
