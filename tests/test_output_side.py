"""The output side of a neuron (logit lens of its write direction) and of a mask, checked against
hand computations on a tiny Llama."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rangelens import NeuronMask, neuron_logits, next_token_shift, resolve_site
from rangelens.errors import RangelensError


def _hand_logits(model, direction: torch.Tensor) -> torch.Tensor:
    g = model.model.norm.weight.detach().float()
    return model.lm_head.weight.detach().float() @ (g * direction)


def test_mlp_neuron_promotes_the_tokens_of_its_down_proj_column(tiny_llama):
    model = tiny_llama.model
    with torch.no_grad():  # a non-trivial norm weight, so a missing factor would show
        model.model.norm.weight.copy_(torch.linspace(0.2, 2.0, 32))
    site = resolve_site(model, "mlp", 1)
    frame = neuron_logits(tiny_llama, site, [5, 17], k=4)
    for j in (5, 17):
        column = model.model.layers[1].mlp.down_proj.weight[:, j].detach()
        hand = _hand_logits(model, column)
        rows = frame[frame.neuron == j]
        promoted = rows[rows.side == "promoted"].sort_values("rank")
        suppressed = rows[rows.side == "suppressed"].sort_values("rank")
        assert promoted.token_id.tolist() == torch.topk(hand, 4).indices.tolist()
        assert suppressed.token_id.tolist() == torch.topk(-hand, 4).indices.tolist()
        np.testing.assert_allclose(promoted.logit, torch.topk(hand, 4).values, rtol=1e-5)
        np.testing.assert_allclose(suppressed.logit, -torch.topk(-hand, 4).values, rtol=1e-5)


def test_residual_dimension_reads_its_unembedding_column(tiny_llama):
    model = tiny_llama.model
    site = resolve_site(model, "resid", 2)
    frame = neuron_logits(tiny_llama, site, [3], k=3)
    unit = torch.zeros(32)
    unit[3] = 1.0
    hand = _hand_logits(model, unit)
    got = frame[frame.side == "promoted"].sort_values("rank").token_id.tolist()
    assert got == torch.topk(hand, 3).indices.tolist()
    assert frame.token.map(type).eq(str).all()


def test_encoder_has_no_output_side(tiny_lm):
    if tiny_lm.kind != "encoder":
        pytest.skip("decoders have an unembedding")
    site = resolve_site(tiny_lm.model, "resid", 0)
    with pytest.raises(RangelensError, match="no unembedding"):
        neuron_logits(tiny_lm, site, [0])


def test_next_token_shift_of_a_mask_matches_two_forwards(tiny_llama, texts):
    model = tiny_llama.model
    site = resolve_site(model, "resid", 1)
    mask = NeuronMask(site, [0, 1, 2, 3])
    frame = next_token_shift(tiny_llama, mask, texts, k=3, max_length=16)

    # By hand, unpadded: the average next-token distribution over every position of every text.
    def mean_probs(masked: bool) -> torch.Tensor:
        total, n = torch.zeros(model.config.vocab_size), 0
        for t in texts:
            ids = tiny_llama.tokenizer(t, return_tensors="pt", truncation=True, max_length=16)
            with torch.no_grad():
                if masked:
                    with mask.attach(model):
                        p = torch.softmax(model(**ids).logits[0], -1)
                else:
                    p = torch.softmax(model(**ids).logits[0], -1)
            total += p.sum(0)
            n += p.shape[0]
        return total / n

    delta = mean_probs(True) - mean_probs(False)
    up = frame[frame.side == "up"].sort_values("rank")
    assert up.token_id.tolist() == torch.topk(delta, 3).indices.tolist()
    np.testing.assert_allclose(up.delta, torch.topk(delta, 3).values, atol=1e-6)
    down = frame[frame.side == "down"].sort_values("rank")
    assert down.token_id.tolist() == torch.topk(-delta, 3).indices.tolist()
