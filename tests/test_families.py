"""Family parity: on every family of the site registry, captured resid/mlp/attn equal an independent
reference (plain hooks on an unpadded single-text forward, which uses the model's own position ids),
under left and right padding and batch sizes 1 and 16. Tiny random models from configs, no downloads.

Set RANGELENS_PARITY_TABLE=path to append each family's max relative error per site (JSON lines).
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from rangelens.activations.capture import capture, model_inputs, tokenize
from rangelens.activations.models import LoadedModel
from rangelens.activations.sites import FAMILIES, resolve_site

DECODERS = {t for t in FAMILIES if t not in {"bert", "roberta", "xlm-roberta", "camembert"}} - {
    "electra",
    "deberta-v2",
    "mpnet",
    "distilbert",
}
SIZES = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
EXTRA: dict[str, dict[str, Any]] = {  # families whose configs name sizes differently
    "gpt2": dict(n_embd=32, n_inner=64, n_layer=2, n_head=4),
    "gptj": dict(n_embd=32, n_inner=64, n_layer=2, n_head=4, rotary_dim=4),
    "falcon": dict(num_kv_heads=2, ffn_hidden_size=64),
    "bloom": dict(n_layer=2, n_head=4),
    "opt": dict(ffn_dim=64, word_embed_proj_dim=32),
    "distilbert": dict(dim=32, hidden_dim=64, n_layers=2, n_heads=4),
    "gemma3_text": dict(head_dim=8, sliding_window=4),  # tiny window: the sliding layers matter
    "gemma2": dict(head_dim=8, sliding_window=4),
    "gemma": dict(head_dim=8),
    "deberta-v2": dict(position_biased_input=True),  # absolute positions too, not only relative
}
PHRASES = [
    "The match ended in a draw after extra time.",
    "Shares fell sharply.",
    "A new smartphone with a folding screen was unveiled at the trade show on Monday.",
    "Hi",
    "Interest rates were left unchanged by the central bank, which cited inflation risks.",
    "Parliament votes today on the budget",
]
# 18 texts of 1..~30 tokens: batch size 16 gives two padded batches.
TEXTS = [" ".join(PHRASES[i % 6].split()[: 2 + (5 * i) % 13]) for i in range(18)]


def tiny_family(model_type: str, tokenizer: Any) -> torch.nn.Module:
    """A 2-layer, width-32 random model of ``model_type`` sized for ``tokenizer``."""
    torch.manual_seed(0)
    ids = {
        k: tokenizer.pad_token_id
        for k in ("pad_token_id", "bos_token_id", "eos_token_id", "cls_token_id", "sep_token_id")
    }
    config = AutoConfig.for_model(
        model_type, **SIZES, **EXTRA.get(model_type, {}), **ids, vocab_size=len(tokenizer)
    )
    loader = AutoModelForCausalLM if model_type in DECODERS else AutoModel
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return loader.from_config(config).eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and oversubscribed shared CPUs make them crawl."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_lm(request, decoder_tokenizer, encoder_tokenizer) -> LoadedModel:
    model_type = request.param
    decoder = model_type in DECODERS
    tokenizer = decoder_tokenizer if decoder else encoder_tokenizer
    model = tiny_family(model_type, tokenizer)
    assert model.config.model_type == model_type
    return LoadedModel(model, tokenizer, f"tiny-{model_type}", "decoder" if decoder else "encoder")


def reference(lm: LoadedModel, text: str, paths: dict[str, tuple[str, bool]]) -> dict[str, Any]:
    """Site tensors of one unpadded forward (no mask, no position ids: the model's own defaults),
    read with plain torch hooks (independent of rangelens.activations.hooks)."""
    got: dict[str, torch.Tensor] = {}
    handles = []
    for name, (path, is_input) in paths.items():
        module = lm.model.get_submodule(path)
        if is_input:
            handles.append(
                module.register_forward_pre_hook(lambda _m, a, n=name: got.__setitem__(n, a[0]))
            )
        else:
            handles.append(
                module.register_forward_hook(
                    lambda _m, _a, o, n=name: got.__setitem__(
                        n, o[0] if isinstance(o, tuple) else o
                    )
                )
            )
    ids = lm.tokenizer(text, truncation=True, max_length=128, return_tensors="pt")["input_ids"]
    try:
        with torch.no_grad():
            out = lm.model(input_ids=ids, output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    # (1, seq, d), or (seq, d) from modules that flatten tokens (OPT's MLP)
    sites = {n: (t[0] if t.ndim == 3 else t).numpy() for n, t in got.items()}
    return {"sites": sites, "hidden": out.hidden_states}


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """Largest per-token relative L2 error."""
    return float(
        (np.linalg.norm(a - b, axis=1) / np.maximum(np.linalg.norm(b, axis=1), 1e-12)).max()
    )


def test_family_parity(family_lm: LoadedModel) -> None:
    model = family_lm.model
    sites = [
        resolve_site(model, kind, layer) for kind in ("resid", "mlp", "attn") for layer in (0, 1)
    ]
    paths = {s.name: (s.module_path, s.hook == "input") for s in sites}
    refs = [reference(family_lm, t, paths) for t in TEXTS]
    # The reference itself: block 0's output is hidden_states[1] of the same unpadded forward.
    np.testing.assert_allclose(
        refs[0]["sites"]["resid.0"], refs[0]["hidden"][1][0].numpy(), rtol=1e-5, atol=1e-6
    )
    errors: dict[str, float] = {}
    for side in ("left", "right"):
        for batch_size in (1, 16):
            acts = capture(
                family_lm,
                TEXTS,
                sites,
                position="tokens",
                batch_size=batch_size,
                padding_side=side,
                progress=False,
            )
            for s in sites:
                for i, ref in enumerate(refs):
                    got = acts.acts[s.name][acts.text_rows(i)]
                    assert got.shape == ref["sites"][s.name].shape, (s.name, i)
                    key = f"{s.kind}/{side}"
                    err = rel_err(got, ref["sites"][s.name])
                    errors[key] = max(errors.get(key, 0.0), err)
    table = os.environ.get("RANGELENS_PARITY_TABLE")
    if table:
        with open(table, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"family": model.config.model_type, **errors}) + "\n")
    assert max(errors.values()) < 1e-4, errors


def test_zero_based_positions_are_wrong_for_roberta(encoder_tokenizer) -> None:
    """The parity test can fail: RoBERTa numbered from 0 (the old behaviour) is far off."""
    lm = LoadedModel(tiny_family("roberta", encoder_tokenizer), encoder_tokenizer, "r", "encoder")
    site = resolve_site(lm.model, "resid", 0)
    ref = reference(lm, TEXTS[2], {site.name: (site.module_path, False)})["sites"][site.name]
    batch = tokenize(lm, [TEXTS[2]], padding_side="left")[0]
    kwargs = model_inputs(lm.model, batch)
    kwargs["position_ids"] = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        wrong = lm.model(**kwargs, output_hidden_states=True).hidden_states[1][0].numpy()
    assert rel_err(wrong, ref) > 1e-2
    right = capture(lm, [TEXTS[2]], [site], position="tokens", progress=False).acts[site.name]
    assert rel_err(right, ref) < 1e-5
