"""The NeuronLens erasure experiment: suffix-only forwards, tasks, k-fold with intervals and controls,
saved ranges, perplexity against Hugging Face's own loss, and bad input."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, BertModel

from rangelens.activations.capture import model_inputs, pool, record, stop_forward, tokenize
from rangelens.activations.models import LoadedModel
from rangelens.activations.sites import NeuronSite, blocks, resolve_site
from rangelens.config import AnalysisConfig, RunConfig
from rangelens.data import LabeledTexts, general_text, load_texts
from rangelens.erasure import (
    ErasureConfig,
    ErasureProtocol,
    ErasureResult,
    erasure_ranges,
    load_erasure,
    run_erasure,
)
from rangelens.erasure.engine import run_conditions, skip_blocks, suffix_start
from rangelens.erasure.metrics import EffectEstimator, Outcomes
from rangelens.erasure.tasks import fit_head, prompt_task, token_nll
from rangelens.errors import RangelensError
from rangelens.intervene import NeuronMask, RangeMask
from rangelens.pipeline import run
from rangelens.ranges.captured import CaptureResult, run_capture
from rangelens.ranges.rangeset import RangeSet
from rangelens.ranges.splits import FULL

FILES = (
    "erasure.csv",
    "headline.csv",
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
    lm: LoadedModel, data: LabeledTexts | None = None, **analysis: object
) -> tuple[LabeledTexts, AnalysisConfig, CaptureResult]:
    data = data or keyword_corpus()
    defaults: dict[str, object] = {"max_length": 16, "taus": [1.0]}
    if lm.kind == "encoder":
        defaults["position"] = "mean"
    config = AnalysisConfig(**{**defaults, **analysis})
    return data, config, run_capture(lm, data, config, progress=False)


def erase(
    lm: LoadedModel,
    out: Path,
    analysis: dict[str, object] | None = None,
    data: LabeledTexts | None = None,
    ranges: RangeSet | None = None,
    **options: object,
) -> ErasureResult:
    data, config, cap = prepared(lm, data, **(analysis or {}))
    defaults: dict[str, object] = {"ppl_max_length": 16, "bootstrap": 200, "folds": 3}
    if lm.kind == "decoder":
        defaults["ppl_texts"] = 4
    else:
        defaults["head_position"] = "mean"
    options = {**defaults, **options}
    erasure = ErasureConfig(**options)
    protocol = ErasureProtocol(lm, data, config, erasure)
    ranges = ranges or erasure_ranges(protocol, cap)
    return run_erasure(
        lm, data, cap, ranges, config, erasure, out, protocol=protocol, progress=False
    )


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
        NeuronMask(site, neurons, mode="soft", scale=0.5),  # not idempotent: must run once
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
    assert len(task.reserved) == 3 and set(task.reserved) <= set(range(0, len(data), 2))
    rows = np.array([1, 5, 20, 33])
    ids = [
        tiny_llama.tokenizer(" " + n, add_special_tokens=False)["input_ids"][0] for n in KEYWORDS
    ]
    with torch.inference_mode():
        batch = tokenize(tiny_llama, [task.inputs[i] for i in rows], padding_side="left")[0]
        got = task.fit(np.arange(len(data))).readout(model_inputs(tiny_llama.model, batch))
        for row, i in enumerate(batch.index):
            alone = tiny_llama.tokenizer(task.inputs[rows[i]], return_tensors="pt")["input_ids"]
            logits = tiny_llama.model(alone).logits[0, -1, ids]
            expected = torch.log_softmax(logits.double(), dim=-1)
            torch.testing.assert_close(got[row], expected, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------------- experiment


def test_run_erasure_writes_every_file_and_matches_full_forwards(
    tiny_lm: LoadedModel, tmp_path: Path
) -> None:
    result = erase(tiny_lm, tmp_path / "suffix", ppl_sweep=True)
    taus, n_concepts, n_states = 2, len(KEYWORDS), 4  # base, range, neuron, random
    assert result.table.shape[0] == n_concepts * n_states * taus
    assert {"target_acc", "ppl", "target_drop_lo", "complement_flip_hi"} <= set(result.table)
    assert result.headline["concept"].tolist() == [*KEYWORDS, "average"]
    assert result.info["n_test_texts"] == len(keyword_corpus())  # k-fold: every text tested once
    assert result.info["base_acc"] > 0.9  # the head separates the keyword classes
    for name in ("range_target_drop", "random_complement_flip", "diff_range_neuron_target_drop"):
        lo, point, hi = (result.headline[f"{name}{x}"] for x in ("_lo", "", "_hi"))
        assert (lo <= point + 1e-12).all() and (point <= hi + 1e-12).all()
    assert any("fewer than 30 test texts" in w for w in result.info["warnings"])
    assert "Range masking" in result.info["verdict"] and "[" in result.info["verdict"]
    cached = tiny_lm.kind == "decoder"  # the decoder head reads the masked site's last token
    assert result.info["classify"]["cached_features"] == (["resid.2"] if cached else [])
    if not cached:  # the encoder head reads a mean, so only the final block's output is reused
        assert result.info["classify"]["forwards"]["resid.2"]["skipped_blocks"] == 3
    for name in FILES:
        assert (tmp_path / "suffix" / name).stat().st_size > 0
    saved = json.loads((tmp_path / "suffix" / "erasure.json").read_text())
    assert saved["format"] == "rangelens.erasure/2" and saved["info"]["tau"] == 2.0
    loaded = load_erasure(tmp_path / "suffix")
    pd.testing.assert_frame_equal(loaded.table, result.table)
    pd.testing.assert_frame_equal(loaded.headline, result.headline)
    has_ppl = tiny_lm.kind == "decoder"
    assert result.table["ppl"].notna().all() == has_ppl
    base = result.table[result.table["state"] == "base"]
    assert (base.filter(regex="drop|flip|change").fillna(0) == 0).all().all()

    full = erase(tiny_lm, tmp_path / "full", suffix=False, ppl_sweep=True)
    assert full.info["classify"]["forwards"] == {
        "resid.2": {"skipped_blocks": 0, "rerun_blocks": 3}
    }
    numeric = result.table.select_dtypes("number").columns
    np.testing.assert_allclose(full.table[numeric], result.table[numeric], rtol=1e-4, atol=1e-6)


def test_layer_sweep_and_a_site_inside_a_block(tiny_llama: LoadedModel, tmp_path: Path) -> None:
    analysis = {"site": "mlp", "layer": 1, "layers": [0], "taus": []}
    suffix = erase(tiny_llama, tmp_path / "a", analysis, ppl_texts=2)
    assert set(suffix.table["site"]) == {"mlp.0", "mlp.1"}
    forwards = suffix.info["perplexity"]["forwards"]
    assert {k: v["skipped_blocks"] for k, v in forwards.items()} == {"mlp.1": 1, "mlp.0": 0}
    assert suffix.info["classify"]["cached_features"] == []
    full = erase(tiny_llama, tmp_path / "b", analysis, ppl_texts=2, suffix=False)
    numeric = suffix.table.select_dtypes("number").columns
    np.testing.assert_allclose(full.table[numeric], suffix.table[numeric], rtol=1e-4, atol=1e-6)


def test_token_position_statistics_are_recaptured(tiny_llama: LoadedModel, tmp_path: Path) -> None:
    result = erase(tiny_llama, tmp_path, {"position": "tokens", "taus": []}, ppl_texts=0)
    assert result.info["task_info"]["position"] == "last"
    neuron = result.table[result.table["state"] == "neuron"]
    assert (neuron["target_conf_drop"] != 0).all()


def test_perplexity_only_at_the_headline_unless_swept(
    tiny_llama: LoadedModel, tmp_path: Path
) -> None:
    result = erase(tiny_llama, tmp_path, folds=2, conditions=["range", "neuron"], ppl_sweep=False)
    ranged = result.table[result.table["state"] == "range"].set_index("tau")
    assert ranged.loc[2.0, "ppl"].notna().all() and ranged.loc[1.0, "ppl"].isna().all()
    neuron = result.table[result.table["state"] == "neuron"]
    assert neuron["ppl"].notna().all()  # the same mask at every tau
    assert result.info["perplexity"]["points"] == "the headline tau and p only"


def test_the_experiment_erases_the_saved_ranges(tiny_llama: LoadedModel, tmp_path: Path) -> None:
    data, analysis, cap = prepared(tiny_llama, taus=[])
    config = ErasureConfig(ppl_texts=2, ppl_max_length=16, bootstrap=100, folds=3)
    protocol = ErasureProtocol(tiny_llama, data, analysis, config)
    erasure_ranges(protocol, cap).save(tmp_path / "ranges")
    ranges = RangeSet.load(tmp_path / "ranges")
    assert ranges.splits[FULL].rows.startswith("correctly classified training rows")
    assert list(ranges.splits) == [FULL, "fold0", "fold1", "fold2"]
    tests = np.concatenate([s.test for n, s in ranges.splits.items() if n != FULL])
    assert sorted(tests.tolist()) == list(range(len(data)))  # every text is test once
    for split in ranges.splits.values():
        assert set(split.fit.tolist()) <= set(split.train.tolist())
    before = run_erasure(
        tiny_llama, data, cap, ranges, analysis, config, tmp_path / "a", progress=False
    )
    for key, range_map in ranges.maps.items():  # ranges far away from every activation
        band_lo, band_hi = range_map.bands  # the bands are the ranges (format /2)
        ranges.maps[key] = replace(
            range_map,
            lo=range_map.lo + 1e6,
            hi=range_map.hi + 1e6,
            band_lo=band_lo + 1e6,
            band_hi=band_hi + 1e6,
        )
    after = run_erasure(
        tiny_llama, data, cap, ranges, analysis, config, tmp_path / "b", progress=False
    )
    state = after.table["state"]
    effects = after.table.filter(regex="drop$|flip$|change$")
    assert (effects[state == "range"] == 0).all().all()
    assert (before.table[before.table["state"] == "range"]["ppl_change"] != 0).any()
    pd.testing.assert_frame_equal(
        effects[state == "neuron"],
        before.table.filter(regex="drop$|flip$|change$")[state == "neuron"],
    )


def test_random_control_draws_as_many_other_neurons(
    tiny_llama: LoadedModel, tmp_path: Path
) -> None:
    result = erase(tiny_llama, tmp_path, {"taus": []}, ppl_texts=2)
    drawn = result.info["random_neurons_full"]
    data, analysis, cap = prepared(tiny_llama, taus=[])
    k = round(0.3 * tiny_llama.hidden_size)
    assert len(drawn) == len(KEYWORDS) and all(len(v) == len(set(v)) for v in drawn.values())
    assert {len(v) for v in drawn.values()} == {k} or k == 0
    again = erase(tiny_llama, tmp_path / "again", {"taus": []}, ppl_texts=2)
    assert again.info["random_neurons_full"] == drawn  # seeded


def test_ranges_that_cover_nothing_leave_every_metric_at_base(
    tiny_llama: LoadedModel, tmp_path: Path
) -> None:
    result = erase(tiny_llama, tmp_path, {"tau": 1e-12, "taus": []})
    ranged = result.table[result.table["state"] == "range"]
    assert (ranged.filter(regex="drop|flip|change") == 0).all().all()
    neuron = result.table[result.table["state"] == "neuron"]
    assert (neuron["target_conf_drop"] > 0).all()  # while masking the whole neurons does act


def test_neuron_mask_of_every_neuron_erases_the_targets(
    tiny_llama: LoadedModel, tmp_path: Path
) -> None:
    result = erase(tiny_llama, tmp_path, {"p": 1.0, "taus": []}, ppl_texts=0)
    at = result.table.set_index(["state", "concept"])
    assert (at.loc["base", "target_acc"] == 1.0).all()
    # every feature is zero: the head predicts one class for every text
    assert (at.loc["neuron", "target_acc"] == 0.0).sum() == len(KEYWORDS) - 1
    assert result.headline.set_index("concept").loc["average", "neuron_target_drop"] > 0.6


def test_a_classifier_at_chance_is_flagged(tiny_llama: LoadedModel, tmp_path: Path) -> None:
    words = keyword_corpus()
    shuffled = np.random.default_rng(1).permutation(words.labels)  # labels unrelated to the text
    data = LabeledTexts(words.texts, shuffled, words.label_names, "noise")
    result = erase(tiny_llama, tmp_path, {"taus": []}, data=data, ppl_texts=0)
    assert any("of chance" in w for w in result.info["warnings"]), result.info["warnings"]


def test_bootstrap_intervals_cover_a_known_rate() -> None:
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 400)
    base = labels.copy()
    masked = np.where(rng.random(800) < 0.3, 1 - labels, labels)  # 30% of predictions flip
    gold = np.ones(800)
    keys = {("base", None, None, None, None): base, ("range", 0, "s", 1.0, 0.3): masked}
    outcomes = Outcomes(np.arange(800), labels, keys, dict.fromkeys(keys, gold))
    figures = EffectEstimator(outcomes, None, 2000, 0)
    flip = figures.flip(("range", 0, "s", 1.0, 0.3), 0)
    lo, hi = flip.interval()
    se = np.sqrt(0.3 * 0.7 / 400)
    assert lo < flip.point < hi and abs((hi - lo) - 2 * 1.96 * se) < 0.3 * 2 * 1.96 * se
    same = figures.effects(("range", 0, "s", 1.0, 0.3), 0)["target_drop"]
    assert (same - same).interval() == (0.0, 0.0)  # a paired difference of a state with itself


def test_perplexity_equals_hugging_face_labels_loss(tiny_lm: LoadedModel, texts: list[str]) -> None:
    if tiny_lm.kind != "decoder":
        pytest.skip("perplexity needs an LM head")
    model = tiny_lm.model
    batch = tokenize(tiny_lm, texts, batch_size=len(texts), max_length=16)[0]
    with torch.inference_mode():
        nll, n = token_nll(model, model_inputs(model, batch))
        for row, i in enumerate(batch.index):
            ids = tiny_lm.tokenizer(texts[i], return_tensors="pt", truncation=True, max_length=16)
            assert n[row] == ids["input_ids"].shape[1] - 1
            if n[row] == 0:  # a one-token text predicts nothing (HF's loss is NaN there)
                assert nll[row] == 0
                continue
            loss = model(input_ids=ids["input_ids"], labels=ids["input_ids"]).loss
            assert np.isclose(nll[row] / n[row], float(loss), rtol=1e-5, atol=1e-6)
    assert np.exp(nll.sum() / n.sum()) > 1


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
    result = erase(lm, tmp_path, {"taus": []}, task="finetuned", ppl_texts=0, head_position=None)
    assert result.info["task"] == "finetuned" and result.table.shape[0] == 12
    assert result.info["base_acc"] > 0.8
    assert result.info["classify"]["forwards"]["resid.2"]["skipped_blocks"] == 3
    assert np.isnan(result.table["ppl"]).all()


def test_bad_options_raise_one_line_errors() -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"tau": 2.0}, "tau is an analysis option"),
        ({"taus": [1.0]}, "set analysis.taus"),
        ({"folds": 1}, "folds = 1"),
        ({"task": "zero-shot"}, "unknown task 'zero-shot'; valid: 'head', 'prompt', 'finetuned'"),
        ({"replacement": "median"}, "valid: 'zero', 'mean', 'complement_mean'"),
        ({"scale": 0.5}, "only applies to mode 'soft'"),
        ({"positions": "last"}, "positions 'last' with ppl_texts 32"),
        ({"conditions": ["range", "sparse"]}, "unknown condition 'sparse'; valid: 'range'"),
        ({"prompt_template": "no text here"}, "{text}"),
        ({"tua": 2.0}, "unknown option 'tua'; valid: 'task'"),
        ({"concepts": ["a"]}, "erasure option 'concepts' is now 'targets'"),
    ]
    for kwargs, message in cases:
        with pytest.raises(RangelensError) as err:
            ErasureConfig(**kwargs)
        assert message in str(err.value) and "\n" not in str(err.value), str(err.value)
    ErasureConfig(positions="last", ppl_texts=0)  # fine without perplexity


@pytest.mark.parametrize(
    ("model", "options", "message"),
    [
        ("tiny_llama", {"targets": ["weather"]}, "concept 'weather' not in dataset 'keywords'; "),
        ("tiny_llama", {"folds": 20}, "folds 20 > the 14 texts of the smallest class 'money'"),
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
    with pytest.raises(RangelensError) as err:
        erase(lm, tmp_path / "out", **options)
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)
    assert not (tmp_path / "out").exists()


def test_finetuned_labels_must_match_the_data(encoder_tokenizer: Any, tmp_path: Path) -> None:
    lm = tiny_bert_model(encoder_tokenizer, BertForSequenceClassification, num_labels=3)
    with pytest.raises(RangelensError, match="'LABEL_0', 'LABEL_1', 'LABEL_2' do not match"):
        erase(lm, tmp_path, task="finetuned", head_position=None)


# ------------------------------------------------------------------------------------ integration


@pytest.mark.integration
def test_smollm2_bbc_news_head_and_range_erasure(smollm: LoadedModel, tmp_path: Path) -> None:
    analysis = AnalysisConfig(max_per_class=20, max_length=48)
    data = load_texts("bbc-news", max_per_class=20, seed=analysis.seed)
    config = ErasureConfig(ppl_texts=8, ppl_max_length=32, folds=4, bootstrap=200)
    assert len(data) == 100  # the pipeline reads the same texts
    whole = run(RunConfig(out=tmp_path / "run", analysis=analysis, erasure=config), lm=smollm)
    analyzed, result = whole.analysis, whole.erasure
    assert result is not None
    assert analyzed.range_map.metadata["rows"].startswith("correctly classified")
    assert analyzed.range_map.metadata["ranking"] == "dprime"
    assert result.info["base_acc"] >= 0.6  # chance is 0.2
    average = result.headline.set_index("concept").loc["average"]
    assert average["range_target_drop"] > average["range_complement_drop"]
    assert average["range_target_conf_drop"] > average["range_complement_conf_drop"]
    assert np.isfinite(average["range_ppl_change"])


@pytest.mark.integration
def test_smollm2_perplexity_equals_hugging_face_labels_loss(smollm: LoadedModel) -> None:
    texts = general_text(3, seed=0)
    batch = tokenize(smollm, texts, batch_size=3, max_length=32)[0]
    with torch.inference_mode():
        nll, n = token_nll(smollm.model, model_inputs(smollm.model, batch))
        for row, i in enumerate(batch.index):
            ids = smollm.tokenizer(texts[i], return_tensors="pt", truncation=True, max_length=32)
            ids = ids["input_ids"].to(smollm.device)
            loss = smollm.model(input_ids=ids, labels=ids).loss
            assert np.isclose(nll[row] / n[row], float(loss), rtol=1e-5)
