"""Capture through hooks: equality with HF hidden states, padding/batch invariance, early stop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rangelens.activations.capture import capture, model_inputs, record, tokenize
from rangelens.activations.models import LoadedModel
from rangelens.activations.sites import blocks, final_norm, resolve_site
from rangelens.errors import RangelensError


def row_rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """Largest per-row relative L2 error (float32 matmuls differ slightly across batch shapes)."""
    return float(
        (np.linalg.norm(a - b, axis=1) / np.maximum(np.linalg.norm(b, axis=1), 1e-12)).max()
    )


def hidden_states(lm: LoadedModel, text: str) -> tuple[torch.Tensor, ...]:
    enc = lm.tokenizer([text], return_tensors="pt")
    with torch.no_grad():
        out = lm.model(**enc, output_hidden_states=True)
    return out.hidden_states


def test_resid_equals_hidden_states(tiny_lm: LoadedModel, texts: list[str]) -> None:
    n = tiny_lm.n_layers
    sites = [resolve_site(tiny_lm.model, "resid", i) for i in range(n)]
    acts = capture(tiny_lm, texts[:2], sites, position="tokens", progress=False)
    hs = hidden_states(tiny_lm, texts[0])
    rows = acts.text_rows(0)
    for i, site in enumerate(sites):
        got = torch.from_numpy(acts.acts[site.name][rows])
        want = hs[i + 1][0]
        if i == n - 1 and (norm := final_norm(tiny_lm.model)) is not None:
            got = norm(got)  # decoders apply the final norm before the last hidden_states entry
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("position", ["last", "first", "mean", "tokens"])
def test_padding_side_and_batch_size_invariance(
    tiny_lm: LoadedModel, texts: list[str], position: str
) -> None:
    sites = [
        resolve_site(tiny_lm.model, "resid", -1),
        resolve_site(tiny_lm.model, "mlp", 1),
        resolve_site(tiny_lm.model, "attn", 0),
    ]
    ref = capture(tiny_lm, texts, sites, position=position, batch_size=1, progress=False)
    for side in ("left", "right"):
        got = capture(
            tiny_lm,
            texts,
            sites,
            position=position,
            batch_size=16,
            padding_side=side,
            progress=False,
        )
        for name in ref.acts:
            assert got.acts[name].shape == ref.acts[name].shape
            assert row_rel_err(got.acts[name], ref.acts[name]) < 1e-4, (side, name)


def test_positions_agree_with_token_rows(tiny_lm: LoadedModel, texts: list[str]) -> None:
    site = [resolve_site(tiny_lm.model, "resid", 1)]
    toks = capture(tiny_lm, texts, site, position="tokens", padding_side="left", progress=False)
    name = site[0].name
    for position, reduce in (
        ("last", lambda r: r[-1]),
        ("first", lambda r: r[0]),
        ("mean", lambda r: r.mean(0)),
    ):
        pooled = capture(
            tiny_lm, texts, site, position=position, padding_side="left", progress=False
        )
        for i in range(len(texts)):
            want = reduce(toks.acts[name][toks.text_rows(i)])
            np.testing.assert_allclose(pooled.acts[name][i], want, rtol=1e-4, atol=1e-5)


def test_token_ids_and_offsets(tiny_lm: LoadedModel, texts: list[str]) -> None:
    acts = capture(
        tiny_lm, texts, [resolve_site(tiny_lm.model, "resid", 0)], position="tokens", progress=False
    )
    assert acts.offsets is not None and acts.token_ids is not None
    for i, text in enumerate(texts):
        ids = tiny_lm.tokenizer(text, truncation=True, max_length=128)["input_ids"]
        assert acts.token_ids[acts.text_rows(i)].tolist() == ids


def test_truncation_to_max_length(tiny_llama: LoadedModel) -> None:
    text = "word " * 300
    acts = capture(
        tiny_llama,
        [text],
        [resolve_site(tiny_llama.model, "resid", 0)],
        position="tokens",
        max_length=16,
        progress=False,
    )
    assert acts.acts["resid.0"].shape[0] == 16


def test_resid_is_sum_of_attn_and_mlp_output(tiny_llama: LoadedModel, texts: list[str]) -> None:
    """Llama blocks: resid[L] = resid[L-1] + attn[L] + down_proj(mlp[L]) — the sites are consistent."""
    model = tiny_llama.model
    names = [("resid", 0), ("attn", 1), ("mlp", 1), ("resid", 1)]
    sites = [resolve_site(model, s, i) for s, i in names]
    acts = capture(tiny_llama, texts, sites, position="tokens", progress=False).acts
    down = model.get_submodule(sites[2].module_path.removesuffix(""))
    with torch.no_grad():
        mlp_out = down(torch.from_numpy(acts["mlp.1"])).numpy()
    np.testing.assert_allclose(
        acts["resid.1"], acts["resid.0"] + acts["attn.1"] + mlp_out, rtol=1e-4, atol=1e-5
    )
    assert acts["mlp.1"].shape[1] == model.config.intermediate_size


def test_forward_stops_after_deepest_site(tiny_lm: LoadedModel, texts: list[str]) -> None:
    _, layers = blocks(tiny_lm.model)
    calls: list[int] = []
    handles = [
        layer.register_forward_hook(lambda *_a, i=i: calls.append(i))
        for i, layer in enumerate(layers)
    ]
    try:
        capture(
            tiny_lm,
            texts,
            [resolve_site(tiny_lm.model, "resid", 0), resolve_site(tiny_lm.model, "mlp", 1)],
            progress=False,
        )
    finally:
        for h in handles:
            h.remove()
    assert calls and max(calls) <= 1  # layer 2 never ran
    assert set(calls) == {0, 1} or set(calls) == {0}


def test_hooks_removed_even_on_error(tiny_llama: LoadedModel, texts: list[str]) -> None:
    model = tiny_llama.model
    site = resolve_site(model, "resid", 0)
    module = model.get_submodule(site.module_path)
    with pytest.raises(RuntimeError), record(model, [site], stop=False):
        assert len(module._forward_hooks) == 1
        raise RuntimeError("boom")
    assert len(module._forward_hooks) == 0
    capture(tiny_llama, texts, [site], progress=False)
    assert len(module._forward_hooks) == 0


def test_module_site_and_batch_inputs(tiny_llama: LoadedModel, texts: list[str]) -> None:
    site = resolve_site(tiny_llama.model, "module:model.layers.1.post_attention_layernorm")
    acts = capture(tiny_llama, texts, [site], progress=False)
    assert acts.acts[site.name].shape == (len(texts), tiny_llama.hidden_size)
    batch = tokenize(tiny_llama, texts, batch_size=3, padding_side="left")[-1]
    kwargs = model_inputs(tiny_llama.model, batch)
    pos = kwargs["position_ids"]
    assert (pos[batch.attention_mask.bool()] >= 0).all()
    assert pos[0, -1] == batch.attention_mask[0].sum() - 1  # left padding: last real token position


@pytest.mark.parametrize(
    ("site", "layer", "message"),
    [
        ("resid", 3, "layer 3 out of range"),
        ("resid", -4, "layer -4 out of range"),
        ("neurons", 0, "unknown site 'neurons'"),
        ("module:model.nope", 0, "module 'model.nope' not found"),
    ],
)
def test_bad_sites(tiny_llama: LoadedModel, site: str, layer: int, message: str) -> None:
    with pytest.raises(RangelensError, match=message):
        resolve_site(tiny_llama.model, site, layer)


def test_bad_position_and_padding(tiny_llama: LoadedModel, texts: list[str]) -> None:
    site = [resolve_site(tiny_llama.model, "resid", 0)]
    with pytest.raises(RangelensError, match="unknown position 'middle'"):
        capture(tiny_llama, texts, site, position="middle", progress=False)
    with pytest.raises(RangelensError, match="unknown padding side 'up'"):
        capture(tiny_llama, texts, site, padding_side="up", progress=False)


@pytest.mark.integration
def test_real_decoder_resid_matches_hidden_states(smollm: LoadedModel) -> None:
    text = "The central bank raised interest rates to curb inflation."
    sites = [resolve_site(smollm.model, "resid", i) for i in (0, 14, -1)]
    acts = capture(smollm, [text], sites, position="tokens", progress=False).acts
    hs = hidden_states(smollm, text)
    torch.testing.assert_close(torch.from_numpy(acts["resid.0"]), hs[1][0], rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(torch.from_numpy(acts["resid.14"]), hs[15][0], rtol=1e-4, atol=1e-3)
    norm = final_norm(smollm.model)
    assert norm is not None
    with torch.no_grad():
        last = norm(torch.from_numpy(acts["resid.29"]))
    torch.testing.assert_close(last, hs[-1][0], rtol=1e-4, atol=1e-3)


@pytest.mark.integration
def test_real_decoder_padding_invariance(smollm: LoadedModel, texts: list[str]) -> None:
    sites = [resolve_site(smollm.model, "resid", -1), resolve_site(smollm.model, "mlp", 10)]
    ref = capture(smollm, texts, sites, position="tokens", batch_size=1, progress=False)
    for side in ("left", "right"):
        got = capture(
            smollm,
            texts,
            sites,
            position="tokens",
            batch_size=16,
            padding_side=side,
            progress=False,
        )
        for name in ref.acts:
            assert row_rel_err(got.acts[name], ref.acts[name]) < 1e-4, (side, name)


@pytest.mark.integration
def test_real_encoder_cls_and_mean(minilm: LoadedModel, texts: list[str]) -> None:
    site = [resolve_site(minilm.model, "resid", -1)]
    hs = hidden_states(minilm, texts[0])
    cls = capture(minilm, texts, site, position="cls", progress=False).acts["resid.5"]
    np.testing.assert_allclose(cls[0], hs[-1][0, 0].numpy(), rtol=1e-4, atol=1e-5)
    left = capture(minilm, texts, site, position="mean", padding_side="left", progress=False)
    right = capture(minilm, texts, site, position="mean", padding_side="right", progress=False)
    assert row_rel_err(left.acts["resid.5"], right.acts["resid.5"]) < 1e-4


def test_half_precision_models_capture_in_their_dtype(
    tiny_llama: LoadedModel, texts: list[str]
) -> None:
    """bf16 models run in bf16 (the GPU setting); captures come back as float32 close to fp32."""
    import copy

    half = LoadedModel(
        copy.deepcopy(tiny_llama.model).to(torch.bfloat16), tiny_llama.tokenizer, "half", "decoder"
    )
    site = [resolve_site(tiny_llama.model, "resid", -1)]
    ref = capture(tiny_llama, texts, site, progress=False).acts["resid.2"]
    got = capture(half, texts, site, progress=False).acts["resid.2"]
    assert half.dtype == torch.bfloat16 and got.dtype == np.float32
    assert row_rel_err(got, ref) < 0.05
