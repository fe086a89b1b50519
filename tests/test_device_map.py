"""A model split over devices by accelerate (``device_map``): capture, masks and suffix-only
erasure forwards give what they give on the whole model. On CPU the split puts some modules on
"cpu" and some offloaded to "disk" (their weights on ``meta`` until they run), the embedding
included, so inputs must go to the embedding's execution device, not its weights' device."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import dispatch_model

from rangelens.activations.capture import capture, model_inputs, tokenize
from rangelens.activations.models import LoadedModel, input_device, load_model
from rangelens.activations.sites import resolve_site
from rangelens.erasure.engine import run_conditions, suffix_start
from rangelens.intervene import RangeMask

SPLIT = {
    "model.embed_tokens": "disk",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.layers.2": "cpu",
    "model.norm": "cpu",
    "model.rotary_emb": "cpu",
    "lm_head": "disk",
}
SITES = [("resid", 0), ("mlp", 1), ("attn", 1), ("resid", 1), ("resid", -1)]


@pytest.fixture
def split_llama(tiny_llama: LoadedModel, tmp_path: Path) -> LoadedModel:
    model = copy.deepcopy(tiny_llama.model)
    dispatch_model(model, SPLIT, main_device="cpu", offload_dir=str(tmp_path / "offload"))
    assert model.model.embed_tokens.weight.device.type == "meta"  # offloaded: on disk
    return LoadedModel(model, tiny_llama.tokenizer, tiny_llama.name, tiny_llama.kind)


def test_inputs_go_to_the_embeddings_execution_device(split_llama: LoadedModel) -> None:
    assert next(split_llama.model.parameters()).device.type == "meta"
    assert input_device(split_llama.model) == torch.device("cpu") == split_llama.device


@pytest.mark.parametrize("position", ["tokens", "last"])
def test_capture_on_a_split_model_equals_the_whole_model(
    tiny_llama: LoadedModel, split_llama: LoadedModel, texts: list[str], position: str
) -> None:
    for kind, layer in SITES:
        whole = resolve_site(tiny_llama.model, kind, layer)
        split = resolve_site(split_llama.model, kind, layer)
        assert (split.name, split.width) == (whole.name, whole.width)
        a = capture(tiny_llama, texts, [whole], position=position, progress=False, batch_size=3)
        b = capture(split_llama, texts, [split], position=position, progress=False, batch_size=3)
        np.testing.assert_array_equal(a.acts[whole.name], b.acts[split.name])


def _masked_logits(lm: LoadedModel, texts: list[str], suffix: bool) -> list[torch.Tensor]:
    site = resolve_site(lm.model, "resid", 1)
    rng = np.random.default_rng(0)
    neurons = rng.choice(site.width, 12, replace=False)
    mask = RangeMask(site, neurons, -np.full(12, 0.5), np.full(12, 0.5))
    start = suffix_start(lm.model, [site]) if suffix else 0
    (batch,) = tokenize(lm, texts, batch_size=len(texts))
    inputs = model_inputs(lm.model, batch)
    with torch.inference_mode():
        return run_conditions(
            lm.model, inputs, [None, mask], lambda kw: lm.model(**kw).logits, start=start
        )


@pytest.mark.parametrize("suffix", [False, True])
def test_a_range_mask_on_a_split_model_equals_the_whole_model(
    tiny_llama: LoadedModel, split_llama: LoadedModel, texts: list[str], suffix: bool
) -> None:
    whole = _masked_logits(tiny_llama, texts, suffix)
    split = _masked_logits(split_llama, texts, suffix)
    assert not torch.equal(whole[0], whole[1])  # the mask changes the output
    for a, b in zip(whole, split, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_load_model_with_a_device_map(tiny_model_dir: Path, texts: list[str]) -> None:
    whole = load_model(str(tiny_model_dir))
    mapped = load_model(str(tiny_model_dir), device_map="auto")
    site = resolve_site(whole.model, "mlp", 1)
    a = capture(whole, texts, [site], position="mean", progress=False)
    b = capture(mapped, texts, [site], position="mean", progress=False)
    np.testing.assert_array_equal(a.acts[site.name], b.acts[site.name])
