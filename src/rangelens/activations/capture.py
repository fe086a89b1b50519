"""Record activations at named sites through forward hooks on stock `transformers` models.

Texts are batched by length (less padding), positions are computed from the attention mask in each model's
own convention so results are identical under left or right padding and any batch size, and the forward stops as soon as every requested
site has fired (no layer after the deepest site runs, as TransformerLens' ``stop_at_layer``).
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from rangelens.activations.hooks import TraceDict, stop_forward
from rangelens.activations.models import LoadedModel, input_device
from rangelens.activations.sites import NeuronSite
from rangelens.errors import RangelensError, choices

POSITIONS = ("last", "first", "cls", "mean", "tokens")
PADDING_SIDES = ("left", "right")


class Recorded(Mapping[str, torch.Tensor]):
    """Site name -> tensor of the latest forward (a read-only view of a :class:`TraceDict`)."""

    def __init__(self, traces: TraceDict) -> None:
        self._traces = traces

    def clear(self) -> None:
        self._traces.clear()

    def __getitem__(self, name: str) -> torch.Tensor:
        value = self._traces[name].value
        if value is None:
            raise KeyError(name)
        return value

    def __iter__(self) -> Iterator[str]:
        return (n for n in self._traces if self._traces[n].value is not None)

    def __len__(self) -> int:
        return sum(1 for _ in self)


@contextmanager
def record(
    model: nn.Module, sites: Sequence[NeuronSite], *, stop: bool = True
) -> Iterator[Recorded]:
    """Trace ``sites`` through :class:`~rangelens.activations.hooks.TraceDict`; yields site name -> tensor.

    With ``stop``, the forward is aborted once every site has been recorded; callers run the forward
    inside :func:`stop_forward`. Hooks are always removed on exit.
    """
    points = {s.name: (s.module_path, s.hook == "input") for s in sites}
    with TraceDict(model, points, stop=stop) as traces:
        yield Recorded(traces)


@dataclass
class TokenBatch:
    """One padded batch: ``index`` are positions of its texts in the caller's list."""

    index: np.ndarray
    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())


def tokenize(
    lm: LoadedModel,
    texts: Sequence[str],
    *,
    batch_size: int = 16,
    max_length: int = 128,
    padding_side: str | None = None,
) -> list[TokenBatch]:
    """Tokenize (truncating to ``max_length``), group texts of similar length, pad each batch."""
    side = padding_side or lm.tokenizer.padding_side
    if side not in PADDING_SIDES:
        raise RangelensError(f"unknown padding side {side!r}; valid: {choices(PADDING_SIDES)}")
    if not _accepts_position_ids(lm.model):
        side = "right"  # positions cannot be passed: keep every row's real tokens at columns 0..n-1
    if batch_size < 1:
        raise RangelensError(f"batch_size must be >= 1, got {batch_size}")
    ids = lm.tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    empty = [i for i, x in enumerate(ids) if len(x) == 0]
    if empty:
        raise RangelensError(f"text {empty[0]} tokenizes to zero tokens; remove empty texts")
    order = sorted(range(len(ids)), key=lambda i: (len(ids[i]), i))
    pad = int(lm.tokenizer.pad_token_id)
    batches = []
    for start in range(0, len(order), batch_size):
        index = np.array(order[start : start + batch_size], dtype=np.int64)
        width = max(len(ids[i]) for i in index)
        input_ids = torch.full((len(index), width), pad, dtype=torch.long)
        mask = torch.zeros((len(index), width), dtype=torch.long)
        for row, i in enumerate(index):
            n = len(ids[i])
            cols = slice(width - n, width) if side == "left" else slice(0, n)
            input_ids[row, cols] = torch.tensor(ids[i])
            mask[row, cols] = 1
        batches.append(TokenBatch(index, input_ids, mask))
    return batches


def _accepts_position_ids(model: nn.Module) -> bool:
    return "position_ids" in inspect.signature(model.forward).parameters


def _position_padding_idx(model: nn.Module) -> int | None:
    """The ``padding_idx`` of a RoBERTa-style learned position table (XLM-R, CamemBERT, MPNet, ...),
    whose real tokens are numbered from ``padding_idx + 1`` and pads get ``padding_idx``; None for
    models numbering positions from 0."""
    if model not in _PADDING_IDX:
        found = None
        for module in model.modules():
            table, pad = (
                getattr(module, "position_embeddings", None),
                getattr(module, "padding_idx", None),
            )
            if (
                isinstance(table, nn.Embedding)
                and isinstance(pad, int)
                and table.padding_idx == pad
            ):
                found = pad
                break
        _PADDING_IDX[model] = found
    return _PADDING_IDX[model]


_PADDING_IDX: weakref.WeakKeyDictionary[nn.Module, int | None] = weakref.WeakKeyDictionary()


def position_ids(model: nn.Module, attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids in the model's own convention, counted over real tokens only.

    Each row gets the positions it would have unpadded: 0, 1, ... for most models (stock HF decoders
    number from the first *column*, which left padding would shift), ``padding_idx + 1, ...`` with pads
    at ``padding_idx`` for RoBERTa-style tables (as their ``create_position_ids_from_input_ids``).
    """
    counts = attention_mask.long().cumsum(-1)
    pad = _position_padding_idx(model)
    if pad is not None:
        return counts * attention_mask.long() + pad
    return (counts - 1).clamp(min=0)


def model_inputs(model: nn.Module, batch: TokenBatch) -> dict[str, torch.Tensor]:
    """Forward kwargs on the device of the model's embedding, with position ids derived from the attention mask
    (see :func:`position_ids`); models without a ``position_ids`` argument get right-padded batches
    from :func:`tokenize`, where columns equal positions."""
    device = input_device(model)
    kwargs = {
        "input_ids": batch.input_ids.to(device),
        "attention_mask": batch.attention_mask.to(device),
    }
    params = inspect.signature(model.forward).parameters
    if "position_ids" in params:
        kwargs["position_ids"] = position_ids(model, batch.attention_mask).to(device)
    if "use_cache" in params:
        kwargs["use_cache"] = False  # type: ignore[assignment]
    return kwargs


def pool(hidden: torch.Tensor, mask: torch.Tensor, position: str) -> torch.Tensor:
    """Reduce (batch, seq, d) to (batch, d) at ``position``, or to (real tokens, d) for ``tokens``.

    Modules that flatten tokens (OPT's MLP: ``(batch * seq, d)``) are reshaped back first.
    """
    mask = mask.to(hidden.device)
    if hidden.ndim == 2 and hidden.shape[0] == mask.numel():
        hidden = hidden.reshape(*mask.shape, hidden.shape[-1])
    if position == "tokens":
        return hidden[mask.bool()]
    if position == "mean":
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1)
    cols = torch.arange(mask.shape[1], device=mask.device)
    if position == "last":
        idx = (mask * cols).argmax(1)
    elif position in ("first", "cls"):
        idx = mask.argmax(1)
    else:
        raise RangelensError(f"unknown position {position!r}; valid: {choices(POSITIONS)}")
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]


@dataclass
class CaptureBatch:
    """Activations of one batch. For ``tokens``, rows are real tokens in text order."""

    index: np.ndarray  # (n,) text indices
    acts: dict[str, torch.Tensor]  # site name -> (n, d) float32 on CPU; (n_tokens, d) for tokens
    n_tokens: int
    token_ids: torch.Tensor | None = None  # (n_tokens,) for tokens
    token_text: np.ndarray | None = None  # (n_tokens,) text index of each token row
    sampled: CaptureBatch | None = None  # per-token activations of the batch's sampled texts

    @property
    def rows(self) -> np.ndarray:
        """Text index of every activation row (one per text, or one per token)."""
        return self.index if self.token_text is None else self.token_text


def _per_token(
    store: Recorded, sites: Sequence[NeuronSite], batch: TokenBatch, keep: np.ndarray
) -> CaptureBatch:
    """The activations of every real token of the batch rows ``keep`` (in batch order): the
    ``tokens`` pooling of those rows alone, from the forward that already ran."""
    mask = batch.attention_mask[keep]
    acts = {}
    for s in sites:
        hidden = store[s.name]
        if hidden.ndim == 2 and hidden.shape[0] == batch.attention_mask.numel():  # flattened
            hidden = hidden.reshape(*batch.attention_mask.shape, hidden.shape[-1])
        rows = torch.from_numpy(keep).to(hidden.device)
        acts[s.name] = pool(hidden[rows], mask, "tokens").float().cpu()
    real = mask.bool()
    index = batch.index[keep]
    text = np.repeat(index, real.sum(1).numpy())
    return CaptureBatch(index, acts, int(mask.sum()), batch.input_ids[keep][real], text)


def iter_activations(
    lm: LoadedModel,
    texts: Sequence[str],
    sites: Sequence[NeuronSite],
    *,
    position: str = "last",
    batch_size: int = 16,
    max_length: int = 128,
    padding_side: str | None = None,
    progress: bool = True,
    sample: np.ndarray | None = None,
) -> Iterator[CaptureBatch]:
    """Yield activations batch by batch (length-grouped order); memory stays one batch.

    ``sample``: indices of texts whose per-token activations are also yielded
    (``CaptureBatch.sampled``), read from the same forward whatever ``position`` pools."""
    if position not in POSITIONS:
        raise RangelensError(f"unknown position {position!r}; valid: {choices(POSITIONS)}")
    if not sites:
        raise RangelensError("no sites to capture; give at least one site")
    batches = tokenize(
        lm, texts, batch_size=batch_size, max_length=max_length, padding_side=padding_side
    )
    bar = tqdm(total=len(texts), desc="capture", unit="text", disable=not progress, leave=False)
    sampled = np.zeros(len(texts), dtype=bool)
    if sample is not None:
        sampled[sample] = True
    with torch.inference_mode(), record(lm.model, sites) as store:
        for batch in batches:
            store.clear()
            with stop_forward():
                lm.model(**model_inputs(lm.model, batch))
            acts = {
                s.name: pool(store[s.name], batch.attention_mask, position).float().cpu()
                for s in sites
            }
            token_ids = token_text = None
            if position == "tokens":
                real = batch.attention_mask.bool()
                token_ids = batch.input_ids[real]
                token_text = np.repeat(batch.index, real.sum(1).numpy())
            keep = np.flatnonzero(sampled[batch.index])
            extra = _per_token(store, sites, batch, keep) if len(keep) else None
            bar.update(len(batch.index))
            yield CaptureBatch(batch.index, acts, batch.n_tokens, token_ids, token_text, extra)
    bar.close()


@dataclass
class Activations:
    """All activations in the caller's text order. For ``tokens``, ``offsets[i]:offsets[i+1]`` are
    text i's rows and ``token_ids`` their ids."""

    acts: dict[str, np.ndarray]
    position: str
    token_ids: np.ndarray | None = None
    offsets: np.ndarray | None = None

    def text_rows(self, i: int) -> slice:
        if self.offsets is None:
            return slice(i, i + 1)
        return slice(int(self.offsets[i]), int(self.offsets[i + 1]))


def capture(
    lm: LoadedModel,
    texts: Sequence[str],
    sites: Sequence[NeuronSite],
    *,
    position: str = "last",
    batch_size: int = 16,
    max_length: int = 128,
    padding_side: str | None = None,
    progress: bool = True,
) -> Activations:
    """Capture every site for every text into memory (use :func:`iter_activations` to stream)."""
    chunks: list[CaptureBatch] = list(
        iter_activations(
            lm,
            texts,
            sites,
            position=position,
            batch_size=batch_size,
            max_length=max_length,
            padding_side=padding_side,
            progress=progress,
        )
    )
    names = [s.name for s in sites]
    if position != "tokens":
        order = np.argsort(np.concatenate([c.index for c in chunks]))
        acts = {n: torch.cat([c.acts[n] for c in chunks]).numpy()[order] for n in names}
        return Activations(acts, position)
    return by_text(chunks, names, np.arange(len(texts)))


def by_text(chunks: Sequence[CaptureBatch], names: Sequence[str], order: np.ndarray) -> Activations:
    """Token-level ``chunks`` as :class:`Activations` of the texts ``order`` (text indices, each
    present in the chunks), in that order, each text's tokens contiguous."""
    text_of = np.concatenate([c.rows for c in chunks])
    rank = np.full(int(max(text_of.max(), order.max())) + 1, -1, dtype=np.int64)
    rank[order] = np.arange(len(order))
    key = rank[text_of]
    perm = np.argsort(key, kind="stable")
    offsets = np.concatenate([[0], np.cumsum(np.bincount(key, minlength=len(order)))])
    acts = {n: torch.cat([c.acts[n] for c in chunks]).numpy()[perm] for n in names}
    ids = torch.cat([c.token_ids for c in chunks if c.token_ids is not None]).numpy()[perm]
    return Activations(acts, "tokens", ids, offsets)
