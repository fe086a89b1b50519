"""The output side of a neuron and of an intervention, for decoders (the logit-lens view).

:func:`neuron_logits`: the tokens a neuron promotes and suppresses, read from its *write direction*
(what one unit of the neuron adds to the residual stream) through the final norm's weight and the
unembedding, as Neuronpedia / sae_vis show per feature. The write direction of an MLP neuron
(``mlp`` site: the input of the down-projection) is its column of the down-projection; of a
residual or attention-output dimension (``resid`` / ``attn`` sites) the unit vector of that
dimension. The final norm is linearised as its elementwise weight ``g`` (RMSNorm and LayerNorm
divide by a positive scale, which does not change the ranking; LayerNorm also centres, applied to
the direction): ``logits = W_U (g * d)``, with ``W_U`` the output embedding ``(vocab, d_model)``.

:func:`next_token_shift`: the change in the next-token distribution an intervention (a
:class:`~rangelens.intervene.RangeMask`, a steer, anything with ``attach(model)``) causes on
held-out text, averaged over every real position: the tokens it makes more and less likely.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch
from torch import nn

from rangelens.activations.capture import model_inputs, tokenize
from rangelens.activations.hooks import get_module
from rangelens.activations.models import LoadedModel
from rangelens.activations.sites import NeuronSite, final_norm
from rangelens.errors import RangelensError


class Intervention(Protocol):
    def attach(self, model: nn.Module) -> AbstractContextManager[Any]: ...


def unembedding(model: nn.Module) -> torch.Tensor:
    """The output embedding ``W_U`` ``(vocab, d_model)`` of a decoder; a one-line error otherwise."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None or getattr(head, "weight", None) is None:
        raise RangelensError(
            f"{type(model).__name__} has no unembedding (LM head): the output side of a neuron "
            f"needs a decoder with a language-model head"
        )
    return head.weight.detach()


def write_directions(model: nn.Module, site: NeuronSite, neurons: Sequence[int]) -> torch.Tensor:
    """What one unit of each neuron writes into the residual stream, ``(k, d_model)``."""
    hidden = int(getattr(model.config, "hidden_size", 0) or unembedding(model).shape[1])
    index = torch.as_tensor(list(neurons), dtype=torch.long)
    if index.numel() and (index.min() < 0 or index.max() >= site.width):
        raise RangelensError(
            f"neuron out of range for site {site.name} of width {site.width}: "
            f"{int(index[(index < 0) | (index >= site.width)][0])}"
        )
    if site.hook == "output" and site.width == hidden:  # resid, attn, a residual-width module
        return torch.eye(hidden)[index]
    module = get_module(model, site.module_path)
    weight = getattr(module, "weight", None)
    if site.hook == "input" and weight is not None:
        w = weight.detach().float()
        if isinstance(module, nn.Linear) and module.out_features == hidden:
            return w[:, index].T  # Linear weight is (out, in): a neuron's column
        if type(module).__name__ == "Conv1D" and w.shape[1] == hidden:  # GPT-2: (in, out)
            return w[index]
    raise RangelensError(
        f"site {site.name} does not write into the residual stream directly; the output side "
        f"is defined for 'resid', 'attn' and 'mlp' sites (or a module writing d_model values)"
    )


def _norm_weight(model: nn.Module, width: int) -> tuple[torch.Tensor, bool]:
    """The final norm's elementwise weight and whether it centres (LayerNorm)."""
    norm = final_norm(model)
    weight = getattr(norm, "weight", None) if norm is not None else None
    g = weight.detach().float() if isinstance(weight, torch.Tensor) else torch.ones(width)
    if norm is not None and "gemma" in type(norm).__name__.lower():
        g = 1.0 + g  # Gemma's RMSNorm scales by (1 + weight)
    return g, isinstance(norm, nn.LayerNorm)


def direction_logits(model: nn.Module, directions: torch.Tensor) -> torch.Tensor:
    """``(k, vocab)``: each direction through the linearised final norm and the unembedding."""
    w_u = unembedding(model).float()
    d = directions.float().to(w_u.device)
    g, centres = _norm_weight(model, d.shape[1])
    if centres:
        d = d - d.mean(dim=1, keepdim=True)
    return (d * g.to(d.device)) @ w_u.T


def _token(tokenizer: Any, token_id: int) -> str:
    return str(tokenizer.decode([token_id]))


def neuron_logits(
    lm: LoadedModel, site: NeuronSite, neurons: Sequence[int], k: int = 10
) -> pd.DataFrame:
    """The ``k`` tokens each neuron promotes and suppresses most (its write direction through the
    final norm and the unembedding).

    One row per (neuron, side, rank): ``neuron``, ``side`` (``promoted`` / ``suppressed``),
    ``rank`` (0 = strongest), ``token_id``, ``token`` and ``logit`` (the direct logit of one unit of
    the neuron, up to the norm's positive scale)::

        site = resolve_site(lm.model, "mlp", 15)
        neuron_logits(lm, site, [231, 1268], k=5)
    """
    if k < 1:
        raise RangelensError(f"k must be >= 1, got {k}")
    with torch.no_grad():
        logits = direction_logits(lm.model, write_directions(lm.model, site, neurons)).cpu()
    k = min(k, logits.shape[1])
    rows = []
    for i, j in enumerate(neurons):
        for side, values in (("promoted", logits[i]), ("suppressed", -logits[i])):
            top = torch.topk(values, k)
            for rank, (v, t) in enumerate(
                zip(top.values.tolist(), top.indices.tolist(), strict=True)
            ):
                sign = 1.0 if side == "promoted" else -1.0
                rows.append(
                    {
                        "neuron": int(j),
                        "side": side,
                        "rank": rank,
                        "token_id": int(t),
                        "token": _token(lm.tokenizer, int(t)),
                        "logit": sign * float(v),
                    }
                )
    return pd.DataFrame(rows, columns=["neuron", "side", "rank", "token_id", "token", "logit"])


def _mean_next_token_probs(
    lm: LoadedModel, texts: Sequence[str], max_length: int, batch_size: int
) -> tuple[torch.Tensor, int]:
    """Sum over real positions of the next-token distribution, and the number of positions."""
    total, n = None, 0
    for batch in tokenize(lm, texts, batch_size=batch_size, max_length=max_length):
        kwargs = model_inputs(lm.model, batch)
        probs = torch.softmax(lm.model(**kwargs).logits.float(), dim=-1)
        real = kwargs["attention_mask"].bool()
        summed = probs[real].sum(0).cpu()
        total = summed if total is None else total + summed
        n += int(real.sum())
    if total is None:
        raise RangelensError("no texts given; next_token_shift needs held-out texts")
    return total, n


def next_token_shift(
    lm: LoadedModel,
    intervention: Intervention,
    texts: Sequence[str],
    *,
    k: int = 10,
    max_length: int = 64,
    batch_size: int = 8,
) -> pd.DataFrame:
    """The tokens an intervention makes more and less likely on ``texts`` (held-out text).

    The next-token distribution is averaged over every real position of every text, with and
    without ``intervention`` attached; rows are the ``k`` largest increases (``side`` ``up``) and
    decreases (``down``) of that average probability: ``token_id``, ``token``, ``base``,
    ``edited`` and ``delta`` (edited - base)::

        mask = RangeMask.from_range_map(site, ranges, "sports")
        next_token_shift(lm, mask, general_text(50), k=10)
    """
    if k < 1:
        raise RangelensError(f"k must be >= 1, got {k}")
    with torch.inference_mode():
        base, n = _mean_next_token_probs(lm, texts, max_length, batch_size)
        with intervention.attach(lm.model):
            edited, _ = _mean_next_token_probs(lm, texts, max_length, batch_size)
    base, edited = base / n, edited / n
    delta = edited - base
    rows = []
    for side, order in (("up", torch.topk(delta, k)), ("down", torch.topk(-delta, k))):
        for rank, t in enumerate(order.indices.tolist()):
            rows.append(
                {
                    "side": side,
                    "rank": rank,
                    "token_id": int(t),
                    "token": _token(lm.tokenizer, int(t)),
                    "base": float(base[t]),
                    "edited": float(edited[t]),
                    "delta": float(delta[t]),
                }
            )
    frame = pd.DataFrame(rows)
    frame.attrs["positions"] = n
    frame.attrs["total_variation"] = float(np.abs(delta.numpy()).sum() / 2)
    return frame
