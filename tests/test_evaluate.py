"""The NeuronLens erasure experiment: suffix-only forwards, tasks, the full run, and bad input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, BertModel

from rangelens.analysis import AnalysisConfig, CaptureResult, analyze, run_capture
from rangelens.capture import model_inputs, pool, record, stop_forward, tokenize
from rangelens.data import LabeledTexts, load_texts
from rangelens.errors import RangelensError
from rangelens.evaluate import (
    ErasureConfig,
    ErasureResult,
    fit_head,
    load_erasure,
    prompt_task,
    run_conditions,
    run_erasure,
    skip_blocks,
    suffix_start,
)
from rangelens.intervene import NeuronMask, RangeMask
from rangelens.models import LoadedModel
from rangelens.sites import NeuronSite, blocks, resolve_site

FILES = (
    "erasure.csv",
    "erasure.parquet",
    "headline.md",
    "erasure.json",
    "erasure_bars.png",
    "tau_tradeoff.png",
)
KEYWORDS = {"money": "bank", "sport": "football", "tech": "computer"}
FILLER = ["the", "a", "of", "in", "on", "with", "and", "today", "report", "said", "new", "old"]


def tiny_bert_model(tokenizer: Any, cls: type = BertModel, **config: Any) -> LoadedModel:
    torch.manual_seed(0)
    bert = BertConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        vocab_size=len(tokenizer),
        **config,
    )
    return LoadedModel(cls(bert).eval(), tokenizer, f"tiny-{cls.__name__}", "encoder")


@pytest.fixture(scope="module")
def tiny_bert(encoder_tokenizer: Any) -> LoadedModel:
    return tiny_bert_model(encoder_tokenizer)


def keyword_corpus(per_class: int = 14) -> LabeledTexts:
    """Filler words between two class keywords: separable even for random models."""
    rng = np.random.default_rng(0)
    texts, labels = [], []
    for label, word in enumerate(KEYWORDS.values()):
        for _ in range(per_class):
            filler = " ".join(rng.choice(FILLER, int(rng.integers(3, 8))))
            texts.append(f"{word} {filler} {word}")
            labels.append(label)
    return LabeledTexts(texts, np.array(labels), list(KEYWORDS), "keywords")


def prepared(
    lm: LoadedModel, **analysis: object
) -> tuple[LabeledTexts, AnalysisConfig, CaptureResult]:
    data = keyword_corpus()
    defaults: dict[str, object] = {"max_length": 16}
    if lm.kind == "encoder":
        defaults["position"] = "mean"
    config = AnalysisConfig(**{**defaults, **analysis})
    return data, config, run_capture(lm, data, config, progress=False)


def erase(lm: LoadedModel, out: Path, **options: object) -> ErasureResult:
    data, analysis, cap = prepared(lm)
    defaults: dict[str, object] = {"taus": [1.0, 2.0], "ppl_max_length": 16}
    if lm.kind == "decoder":
        defaults["ppl_texts"] = 4
    else:
        defaults["head_position"] = "mean"
    config = ErasureConfig(**{**defaults, **options})
    return run_erasure(lm, data, cap, analysis, config, out, progress=False)


def max_row_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(0, -2), b.double().flatten(0, -2)
    return float(((a - b).norm(dim=-1) / b.norm(dim=-1).clamp_min(1e-12)).max())


# ------------------------------------------------------------------------------ suffix-only engine


def outputs(model: nn.Module, head: NeuronSite):
    """A forward returning the model's final output and the last-token feature at ``head``."""

    def forward(kwargs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        with record(model, [head], stop=False) as store:
            out = model(**kwargs)
        final = out.logits if hasattr(out, "logits") else out.last_hidden_state
        return final, pool(store[head.name], kwargs["attention_mask"], "last")

    return forward


@pytest.mark.parametrize(("kind", "layer"), [("resid", 0), ("resid", 1), ("resid", 2), ("mlp", 1)])
def test_suffix_only_equals_full_forwards(
    tiny_lm: LoadedModel, texts: list[str], kind: str, layer: int
) -> None:
    model = tiny_lm.model
    site = resolve_site(model, kind, layer)
    head = resolve_site(model, "resid", -1)
    batch = tokenize(tiny_lm, texts, batch_size=len(texts))[0]
    kwargs = model_inputs(model, batch)
    with torch.inference_mode(), record(model, [site]) as store, stop_forward():
        model(**kwargs)
    values = store[site.name][batch.attention_mask.bool()]
    neurons = np.arange(0, site.width, 3)
    lo, hi = np.quantile(values[:, neurons].numpy(), [0.25, 0.75], axis=0)
    masks = [
        None,
        RangeMask(site, neurons, lo, hi),
        RangeMask(site, neurons, lo, hi, replacement=0.5, positions="last"),
        NeuronMask(site, neurons),
    ]
    start = suffix_start(model, [site, head])
    assert start == (layer + 1 if kind == "resid" else layer)
    calls: list[int] = []
    first = blocks(model)[1][0]
    handle = first.register_forward_hook(lambda *_: calls.append(1))
    try:
        with torch.inference_mode():
            full = run_conditions(model, kwargs, masks, outputs(model, head))
            n_full = len(calls)
            suffix = run_conditions(model, kwargs, masks, outputs(model, head), start=start)
    finally:
        handle.remove()
    assert n_full == len(masks)
    assert len(calls) - n_full == (1 if start > 0 else len(masks))  # the prefix ran once
    for (full_out, full_head), (out, feat) in zip(full, suffix, strict=True):
        assert max_row_error(out, full_out) < 1e-4
        assert max_row_error(feat, full_head) < 1e-4
    assert max_row_error(full[1][0], full[0][0]) > 1e-3  # the masks do change the output
    assert max_row_error(full[3][0], full[0][0]) > 1e-3


def test_blocks_restored_after_the_context_even_on_errors(tiny_lm: LoadedModel) -> None:
    model = tiny_lm.model
    layers = blocks(model)[1]
    before = list(layers)
    # transformers installs its own output-capturing hooks once output_hidden_states was used
    hooks_before = [(dict(m._forward_hooks), dict(m._forward_pre_hooks)) for m in model.modules()]
    hidden = torch.zeros(1, 2, tiny_lm.hidden_size)
    with pytest.raises(RuntimeError, match="boom"), skip_blocks(model, 2, hidden):
        assert layers[0] is not before[0] and layers[2] is before[2]
        raise RuntimeError("boom")
    assert list(layers) == before

    batch = tokenize(tiny_lm, ["one two three"])[0]
    site = resolve_site(model, "resid", 1)

    def failing(_kwargs: dict[str, torch.Tensor]) -> None:
        raise RuntimeError("readout failed")

    with torch.inference_mode(), pytest.raises(RuntimeError, match="readout failed"):
        run_conditions(model, model_inputs(model, batch), [NeuronMask(site, [0])], failing, start=2)
    assert list(layers) == before
    hooks_after = [(dict(m._forward_hooks), dict(m._forward_pre_hooks)) for m in model.modules()]
    assert hooks_after == hooks_before


def test_module_sites_and_unmapped_models_run_full_forwards(tiny_llama: LoadedModel) -> None:
    model = tiny_llama.model
    module = resolve_site(model, "module:model.layers.1.mlp")
    assert suffix_start(model, [module]) == 0
    assert suffix_start(model, []) == 0


# ------------------------------------------------------------------------------------------ tasks


@pytest.mark.parametrize("n_classes", [2, 4])
def test_head_separates_separable_features(n_classes: int) -> None:
    rng = np.random.default_rng(0)
    centers = rng.normal(scale=3.0, size=(n_classes, 16)) + 100.0  # far from 0: tests the centring
    labels = rng.integers(0, n_classes, 400)
    features = centers[labels] + rng.normal(size=(400, 16))
    head = fit_head(features[:300], labels[:300], n_classes)
    assert head.weight.shape == (n_classes, 16)
    logp = head.log_proba(features[300:]).numpy()
    assert (logp.argmax(axis=1) == labels[300:]).mean() > 0.95
    np.testing.assert_allclose(np.exp(logp).sum(axis=1), 1.0, rtol=1e-12)


def test_head_needs_every_class() -> None:
    with pytest.raises(RangelensError, match=r"classes \[2\]"):
        fit_head(np.zeros((4, 3)), np.array([0, 1, 0, 1]), 3)


def test_prompt_scores_label_tokens_like_a_plain_forward(tiny_llama: LoadedModel) -> None:
    data, analysis, _ = prepared(tiny_llama)
    config = ErasureConfig(task="prompt", few_shot=3)
    task = prompt_task(tiny_llama, data, np.arange(0, len(data), 2), config, analysis)
    assert task.padding_side == "left" and task.inputs[1].count("Label:") == 4
    rows = np.array([1, 5, 20, 33])
    ids = [
        tiny_llama.tokenizer(" " + n, add_special_tokens=False)["input_ids"][0] for n in KEYWORDS
    ]
    with torch.inference_mode():
        batch = tokenize(tiny_llama, [task.inputs[i] for i in rows], padding_side="left")[0]
        got = task.readout(model_inputs(tiny_llama.model, batch))
        for row, i in enumerate(batch.index):
            alone = tiny_llama.tokenizer(task.inputs[rows[i]], return_tensors="pt")["input_ids"]
            logits = tiny_llama.model(alone).logits[0, -1, ids]
            expected = torch.log_softmax(logits.double(), dim=-1)
            torch.testing.assert_close(got[row], expected, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------------- experiment


def test_run_erasure_writes_every_file_and_matches_full_forwards(
    tiny_lm: LoadedModel, tmp_path: Path
) -> None:
    result = erase(tiny_lm, tmp_path / "suffix")
    taus, n_concepts, n_states = 2, len(KEYWORDS), 3
    assert result.table.shape[0] == n_concepts * n_states * taus
    assert {"target_acc", "complement_conf", "ppl", "delta_target_acc"} <= set(result.table)
    assert result.headline["concept"].tolist() == [*KEYWORDS, "average"]
    assert result.info["test_acc"] > 0.9  # the head separates the keyword classes
    assert result.info["n_correct_train"] <= result.info["n_train"]
    cached = tiny_lm.kind == "decoder"  # the decoder head reads the masked site's last token
    assert result.info["classify"]["cached_features"] == (["resid.2"] if cached else [])
    if not cached:  # the encoder head reads a mean, so only the final block's output is reused
        assert result.info["classify"]["forwards"]["resid.2"]["skipped_blocks"] == 3
    for name in FILES:
        assert (tmp_path / "suffix" / name).stat().st_size > 0
    saved = json.loads((tmp_path / "suffix" / "erasure.json").read_text())
    assert saved["format"] == "rangelens.erasure/1" and saved["config"]["tau"] == 2.0
    loaded = load_erasure(tmp_path / "suffix")
    pd.testing.assert_frame_equal(loaded.table, result.table)
    pd.testing.assert_frame_equal(loaded.headline, result.headline)
    assert loaded.info["n_test"] == result.info["n_test"]
    has_ppl = tiny_lm.kind == "decoder"
    assert result.table["ppl"].notna().all() == has_ppl
    base = result.table[result.table["state"] == "base"]
    assert (base.filter(like="delta_").fillna(0) == 0).all().all()

    full = erase(tiny_lm, tmp_path / "full", suffix=False)
    assert full.info["classify"]["forwards"] == {
        "resid.2": {"skipped_blocks": 0, "rerun_blocks": 3}
    }
    numeric = result.table.select_dtypes("number").columns
    np.testing.assert_allclose(full.table[numeric], result.table[numeric], rtol=1e-4, atol=1e-6)


def test_layer_sweep_and_a_site_inside_a_block(tiny_llama: LoadedModel, tmp_path: Path) -> None:
    data, analysis, cap = prepared(tiny_llama, site="mlp", layer=1)
    config = ErasureConfig(taus=[2.0], layers=[0, 1], ppl_texts=2, ppl_max_length=16)
    suffix = run_erasure(tiny_llama, data, cap, analysis, config, tmp_path / "a", progress=False)
    assert set(suffix.table["site"]) == {"mlp.0", "mlp.1"}
    forwards = suffix.info["perplexity"]["forwards"]
    assert {k: v["skipped_blocks"] for k, v in forwards.items()} == {"mlp.1": 1, "mlp.0": 0}
    assert suffix.info["classify"]["cached_features"] == []
    full_config = config.model_copy(update={"suffix": False})
    full = run_erasure(tiny_llama, data, cap, analysis, full_config, tmp_path / "b", progress=False)
    numeric = suffix.table.select_dtypes("number").columns
    np.testing.assert_allclose(full.table[numeric], suffix.table[numeric], rtol=1e-4, atol=1e-6)


def test_token_position_statistics_are_recaptured(tiny_llama: LoadedModel, tmp_path: Path) -> None:
    data, analysis, cap = prepared(tiny_llama, position="tokens")
    assert cap.features is None
    config = ErasureConfig(taus=[2.0], ppl_texts=0)
    result = run_erasure(tiny_llama, data, cap, analysis, config, tmp_path, progress=False)
    assert result.info["task_info"]["position"] == "last"
    neuron = result.table[result.table["state"] == "neuron"]
    assert (neuron["delta_target_conf"] != 0).all()


def test_ranges_that_cover_nothing_leave_every_metric_at_base(
    tiny_llama: LoadedModel, tmp_path: Path
) -> None:
    result = erase(tiny_llama, tmp_path, tau=1e-12, taus=[1e-12])
    ranged = result.table[result.table["state"] == "range"]
    assert (ranged.filter(like="delta_") == 0).all().all()
    neuron = result.table[result.table["state"] == "neuron"]
    assert (neuron["delta_target_conf"] < 0).all()  # while masking the whole neurons does act


def test_neuron_mask_of_every_neuron_erases_the_targets(
    tiny_llama: LoadedModel, tmp_path: Path
) -> None:
    result = erase(tiny_llama, tmp_path, p=1.0, ps=[1.0], taus=[2.0], ppl_texts=0)
    at = result.table.set_index(["state", "concept"])
    assert (at.loc["base", "target_acc"] == 1.0).all()
    # every feature is zero: the head predicts one class for every text
    assert (at.loc["neuron", "target_acc"] == 0.0).sum() == len(KEYWORDS) - 1
    assert result.headline.set_index("concept").loc["average", "neuron_target_acc_drop"] > 0.6


def test_finetuned_sequence_classifier(encoder_tokenizer: Any, tmp_path: Path) -> None:
    labels = {0: "Tech", 1: "other", 2: "SPORT", 3: "Money"}  # matched case-insensitively
    lm = tiny_bert_model(encoder_tokenizer, BertForSequenceClassification, id2label=labels)
    data, analysis, cap = prepared(lm)
    # "fine-tune": fit the classifier layer on the pooler output, in the model's label order
    batch = tokenize(lm, data.texts, batch_size=len(data), max_length=16)[0]
    with torch.no_grad():
        bert = lm.model.get_submodule("bert")
        pooled = bert(**model_inputs(lm.model, batch)).pooler_output
    head = fit_head(pooled.numpy(), data.labels[batch.index], len(KEYWORDS))
    rows = [3, 2, 0]  # money, sport, tech
    classifier = lm.model.get_submodule("classifier")
    assert isinstance(classifier, nn.Linear)
    with torch.no_grad():
        classifier.weight.zero_()
        classifier.bias.fill_(-30.0)
        classifier.weight[rows] = torch.as_tensor(head.weight, dtype=torch.float32)
        classifier.bias[rows] = torch.as_tensor(head.bias, dtype=torch.float32)
    options = ErasureConfig(task="finetuned", taus=[2.0], ppl_texts=0)
    result = run_erasure(lm, data, cap, analysis, options, tmp_path, progress=False)
    assert result.info["task"] == "finetuned" and result.table.shape[0] == 9
    assert result.info["test_acc"] > 0.8
    assert result.info["classify"]["forwards"]["resid.2"]["skipped_blocks"] == 3
    assert np.isnan(result.table["ppl"]).all()


def test_bad_options_raise_one_line_errors() -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"tau": 0}, "tau = 0"),
        ({"tau": -1.5}, "greater than 0"),
        ({"taus": [1.0, -2.0]}, "taus[1] = -2.0"),
        ({"p": 1.5}, "p = 1.5"),
        ({"ps": [0.0]}, "ps[0] = 0.0"),
        ({"task": "zero-shot"}, "'head', 'prompt' or 'finetuned'"),
        ({"replacement": "median"}, "'zero', 'mean' or 'complement_mean'"),
        ({"scale": 0.5}, "only applies to mode 'soft'"),
        ({"prompt_template": "no text here"}, "{text}"),
        ({"tua": 2.0}, "valid options: 'task'"),
    ]
    for kwargs, message in cases:
        with pytest.raises(RangelensError) as err:
            ErasureConfig(**kwargs)
        assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


@pytest.mark.parametrize(
    ("model", "options", "message"),
    [
        ("tiny_llama", {"concepts": ["weather"]}, "concept 'weather' not in dataset 'keywords'; "),
        ("tiny_bert", {"task": "prompt"}, "task 'prompt' needs a decoder with an LM head; model "),
        ("tiny_bert", {"ppl_texts": 8}, "ppl_texts = 8: perplexity needs a decoder"),
        (
            "tiny_llama",
            {"task": "finetuned"},
            "is a LlamaForCausalLM; valid tasks for it: 'head', ",
        ),
    ],
)
def test_bad_tasks_and_concepts(
    model: str, options: dict[str, Any], message: str, tmp_path: Path, request: Any
) -> None:
    lm = request.getfixturevalue(model)
    data, analysis, cap = prepared(lm)
    with pytest.raises(RangelensError) as err:
        run_erasure(lm, data, cap, analysis, ErasureConfig(**options), tmp_path / "out")
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)
    assert not (tmp_path / "out").exists()


def test_finetuned_labels_must_match_the_data(encoder_tokenizer: Any, tmp_path: Path) -> None:
    lm = tiny_bert_model(encoder_tokenizer, BertForSequenceClassification, num_labels=3)
    data, analysis, cap = prepared(lm)
    with pytest.raises(RangelensError, match="'LABEL_0', 'LABEL_1', 'LABEL_2' do not match"):
        run_erasure(lm, data, cap, analysis, ErasureConfig(task="finetuned"), tmp_path)


# ------------------------------------------------------------------------------------ integration


@pytest.mark.integration
def test_smollm2_bbc_news_head_and_range_erasure(smollm: LoadedModel, tmp_path: Path) -> None:
    analysis = AnalysisConfig(max_per_class=20, max_length=48)
    analyzed = analyze(analysis, tmp_path / "run", lm=smollm, progress=False)
    data = load_texts("bbc-news", max_per_class=20, seed=analysis.seed)
    config = ErasureConfig(taus=[2.0], ppl_texts=8, ppl_max_length=32)
    result = run_erasure(
        smollm, data, analyzed.capture, analysis, config, tmp_path / "erasure", progress=False
    )
    assert result.info["test_acc"] >= 0.6  # chance is 0.2
    average = result.headline.set_index("concept").loc["average"]
    assert average["range_target_acc_drop"] > average["range_complement_acc_drop"]
    assert average["range_target_conf_drop"] > average["range_complement_conf_drop"]
    assert np.isfinite(average["range_ppl_change"])
