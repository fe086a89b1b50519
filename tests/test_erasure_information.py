"""Erased or hidden: retrained probes on edited rows, LEACE as a condition, verdicts that follow their
own intervals, the paired tau curve and the notices (issue 19)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_erasure import erase, keyword_corpus

from rangelens.activations.capture import model_inputs, pool, record, tokenize
from rangelens.activations.models import LoadedModel
from rangelens.activations.sites import resolve_site
from rangelens.data import LabeledTexts
from rangelens.erasure import ErasureConfig
from rangelens.erasure.information import fold_information, probe_predict
from rangelens.erasure.metrics import BASE, EffectEstimator, Estimate, Outcomes, base_key
from rangelens.erasure.verdicts import collateral, curve, information, verdict
from rangelens.errors import RangelensError
from rangelens.intervene import LeaceEdit, NeuronMask

# ------------------------------------------------------------------- the information figures


def test_probe_recall_and_balanced_accuracy_equal_a_hand_computation() -> None:
    labels = np.array([0, 0, 1, 1, 2, 2])
    key = ("range", 0, "s", 2.0, 0.3)
    pred = {BASE: labels.copy(), key: labels.copy()}
    gold = {k: np.ones(6) for k in pred}
    probe = {("linear", key): np.array([0, 1, 1, 1, 0, 2])}
    o = Outcomes(np.arange(6), labels, pred, gold, probe)
    figures = EffectEstimator(o, None, 200, 0).information("linear", key, 0)
    # concept 0: recall 1/2; other texts not called 0: 3 of 4; balanced (1/2 + 3/4) / 2
    assert figures["recall"].point == pytest.approx(0.5)
    assert figures["balanced"].point == pytest.approx(0.625)
    lo, hi = figures["balanced"].interval()
    assert lo <= 0.625 <= hi
    assert EffectEstimator(o, None, 200, 0).effects(key, 0)["linear_probe_recall"].point == 0.5


def separable(n: int = 120, d: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three classes separated along neuron 0 (class 1 high) and neuron 1 (class 2 high)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3
    x = rng.normal(size=(n, d)).astype(np.float32)
    x[:, 0] += 6.0 * (labels == 1)
    x[:, 1] += 6.0 * (labels == 2)
    return x, labels


def test_retrained_probe_recovers_what_a_mask_hides(tiny_llama: LoadedModel) -> None:
    site = resolve_site(tiny_llama.model, "resid", -1)
    x, y = separable(n=300, d=site.width)
    train, test = np.arange(0, 240), np.arange(240, 300)
    # Masking neuron 0 removes class 1's cue; masking neurons 0 and 1 removes every cue.
    one = NeuronMask(site, [0])
    both = NeuronMask(site, [0, 1])
    found = fold_information(
        x,
        y,
        train,
        test,
        {BASE: None, ("one",): one, ("both",): both},  # type: ignore[dict-item]
        ["linear", "mlp"],
        n_classes=3,
        C=1.0,
        seed=0,
    )
    for kind in ("linear", "mlp"):
        base = found.pred[(kind, BASE)]
        assert (base[y[test] == 1] == 1).mean() > 0.9
        # classes 0 and 1 now differ only by noise: about half of class 1 is called 0
        assert (found.pred[(kind, ("one",))][y[test] == 1] == 1).mean() < 0.75
        assert (found.pred[(kind, ("one",))][y[test] == 2] == 2).mean() > 0.9  # class 2 kept
    # The linear probe is the head's own fit on the edited rows, row for row.
    masked_train = x[train].copy()
    masked_train[:, [0, 1]] = 0
    masked_test = x[test].copy()
    masked_test[:, [0, 1]] = 0
    np.testing.assert_array_equal(
        found.pred[("linear", ("both",))],
        probe_predict("linear", masked_train, y[train], masked_test, 3),
    )
    assert found.dims == {BASE: 0, ("one",): 1, ("both",): 2}
    np.testing.assert_allclose(found.norm[("one",)], np.abs(x[test, 0]), rtol=1e-6)


# ----------------------------------------------------------------------------------- LEACE


def test_leace_removes_linear_decodability(tiny_llama: LoadedModel) -> None:
    site = resolve_site(tiny_llama.model, "resid", -1)
    x, y = separable(n=300, d=site.width)
    train, test = np.arange(0, 240), np.arange(240, 300)
    target = y == 1
    edit = LeaceEdit.fit(site, x[train], target[train])
    assert edit.rank == edit.dimensions == 1
    before = probe_predict("linear", x[train], target[train].astype(int), x[test], 2)
    erased = edit.edit_rows(torch.from_numpy(x)).numpy()
    after = probe_predict("linear", erased[train], target[train].astype(int), erased[test], 2)

    def balanced(pred: np.ndarray) -> float:
        t = target[test]
        return float(((pred[t] == 1).mean() + (pred[~t] == 0).mean()) / 2)

    assert balanced(before) > 0.95
    assert abs(balanced(after) - 0.5) < 0.15
    # On the fitting rows the class means coincide after the edit: nothing linear is left.
    gap = erased[train][target[train]].mean(0) - erased[train][~target[train]].mean(0)
    assert np.abs(gap).max() < 1e-4


def test_leace_hook_edits_the_forward_like_the_cached_rows(tiny_llama: LoadedModel) -> None:
    model = tiny_llama.model
    site = resolve_site(model, "resid", 0)
    x, y = separable(n=60, d=site.width)
    edit = LeaceEdit.fit(site, x, y == 1)
    texts = ["the bank said today", "football on the old report and new"]
    batch = tokenize(tiny_llama, texts, batch_size=2, max_length=16, padding_side="right")[0]
    kwargs = model_inputs(model, batch)
    with torch.inference_mode():
        with record(model, [site], stop=False) as plain:
            model(**kwargs)
        with edit.attach(model), record(model, [site], stop=False) as edited:
            model(**kwargs)
    raw = pool(plain[site.name], kwargs["attention_mask"], "last")
    got = pool(edited[site.name], kwargs["attention_mask"], "last")
    torch.testing.assert_close(got.float(), edit.edit_rows(raw).float(), rtol=1e-4, atol=1e-5)
    with pytest.raises(RangelensError, match="both values"):
        LeaceEdit.fit(site, x, np.zeros(len(x)))


def test_leace_condition_runs_with_information_and_edit_figures(
    tiny_llama: LoadedModel, tmp_path: Path
) -> None:
    result = erase(tiny_llama, tmp_path, folds=2, conditions=["range", "neuron", "leace", "random"])
    avg = result.headline.set_index("concept").loc["average"]
    for state in ("range", "neuron", "leace", "random"):
        for metric in ("target_drop", "linear_probe_recall", "mlp_probe_balanced", "edit_norm"):
            assert np.isfinite(avg[f"{state}_{metric}"]), (state, metric)
            assert avg[f"{state}_{metric}_lo"] <= avg[f"{state}_{metric}_hi"]
        assert np.isfinite(avg[f"{state}_ppl_change"])
    assert np.isfinite(avg["base_linear_probe_recall"])
    assert result.info["classify"]["dimensions"]["leace"] == 1.0
    assert "LEACE" in result.info["verdict"] and "retrained linear probe" in result.info["verdict"]
    assert "nan" not in result.info["verdict"]
    sweep = result.info["sweep"]
    assert all("diff_range_neuron_target_drop_lo" in row for row in sweep)
    assert all(np.isfinite(row["range_ppl_change"]) for row in sweep)  # ppl at every tau
    assert "Over the τ curve" in result.info["verdict"]
    text = (tmp_path / "headline.md").read_text()
    assert "range − neuron" in text and "retrained" in text


def test_a_mask_away_from_the_head_site_is_forecast(
    tiny_llama: LoadedModel, tmp_path: Path
) -> None:
    result = erase(
        tiny_llama,
        tmp_path,
        {"site": "mlp", "layer": 0, "taus": []},
        folds=2,
        conditions=["range"],
        ppl_texts=0,
        probes=["linear"],
    )
    notices = result.info["notices"]
    assert any("suffix forwards" in n and "head_site" in n for n in notices)
    # The information question is asked at the masked site (the capture's features).
    assert "range_linear_probe_recall" in result.headline.columns


# --------------------------------------------------------------------------------- verdicts


def est(point: float, lo: float, hi: float) -> Estimate:
    """An estimate whose bootstrap interval is about [lo, hi]."""
    return Estimate(point, np.linspace(lo, hi, 1001))


def state(**figures: tuple[float, float, float]) -> dict[str, Estimate]:
    base = {
        "target_drop": (0.4, 0.3, 0.5),
        "complement_drop": (0.0, -0.01, 0.01),
        "complement_flip": (0.1, 0.05, 0.15),
        "ppl_change": (float("nan"), float("nan"), float("nan")),
    }
    return {k: est(*v) for k, v in {**base, **figures}.items()}


def test_collateral_follows_each_figure_alone() -> None:
    same = state()
    assert "not distinguishable" in collateral(same, state(), "Its", "neuron masking's")
    # Only the complement accuracy drop differs (the contradiction): it must be said.
    lower = state(complement_drop=(-0.05, -0.08, -0.03))
    said = collateral(lower, same, "Its", "neuron masking")
    assert "lower on complement accuracy drop" in said and "not distinguishable" not in said
    assert "a tie on complement flip rate" in said
    assert "perplexity" not in said and "nan" not in said  # not measured: left out
    higher = state(complement_flip=(0.3, 0.25, 0.35))
    assert "higher on complement flip rate" in collateral(higher, same, "Its", "x")
    mixed = state(complement_flip=(0.3, 0.25, 0.35), complement_drop=(-0.05, -0.08, -0.03))
    assert "lower on complement accuracy drop but higher on complement flip rate" in collateral(
        mixed, same, "Its", "x"
    )
    with_ppl = state(ppl_change=(80.0, 60.0, 100.0))
    said = collateral(with_ppl, state(ppl_change=(200.0, 150.0, 250.0)), "Its", "x")
    assert "lower on perplexity change" in said


def test_verdict_states_range_vs_random_collateral_ties() -> None:
    headline = {
        "range": state(),
        "neuron": state(),
        "random": state(target_drop=(0.0, -0.02, 0.02)),
    }
    said = verdict(headline, 5, 400)
    assert "Range masking's collateral was not distinguishable from the random control's" in said
    assert "Neuron masking's erasure is above it" in said


def test_information_sentence_hidden_erased_redirected() -> None:
    base = {"linear_probe_recall": est(0.8, 0.75, 0.85), "mlp_probe_recall": est(0.8, 0.7, 0.9)}
    hidden = state(
        target_acc=(0.4, 0.35, 0.45),
        linear_probe_recall=(0.78, 0.7, 0.85),
        linear_probe_balanced=(0.85, 0.8, 0.9),
    )
    said = information("range", hidden, base, 0.2)
    assert said.startswith("Range masking: hidden, not erased")
    assert "recovers target recall 0.78 [0.70, 0.85] (unmasked 0.80" in said
    gone = state(
        target_acc=(0.4, 0.35, 0.45),
        linear_probe_recall=(0.2, 0.1, 0.3),
        linear_probe_balanced=(0.5, 0.45, 0.55),
    )
    assert "erased for every retrained probe" in information("leace", gone, base, 0.2)
    below = {**hidden, "target_acc": est(0.05, 0.02, 0.08)}
    said = information("density", below, base, 0.2)
    assert said.startswith("Density bands: redirected, hidden") and "below chance 0.20" in said
    partly = {
        **gone,
        "mlp_probe_recall": est(0.7, 0.6, 0.8),
        "mlp_probe_balanced": est(0.8, 0.75, 0.85),
    }
    assert "erased for the linear probe only" in information("leace", partly, base, 0.2)


def test_curve_names_the_taus_that_tie_with_lower_collateral() -> None:
    diffs = {
        1.0: state(target_drop=(-0.13, -0.17, -0.08), complement_flip=(-0.1, -0.15, -0.05)),
        2.0: state(target_drop=(0.0, -0.02, 0.02), complement_flip=(-0.1, -0.15, -0.05)),
        3.0: state(target_drop=(0.02, 0.004, 0.034), complement_flip=(0.0, -0.02, 0.02)),
    }
    said = curve(diffs, 2.0)
    assert "τ = 1: falls short" in said and "τ = 3: exceeds" in said
    assert "lower collateral: 2 (lower complement flip rate)" in said


def test_probes_option_is_validated() -> None:
    assert ErasureConfig(probes=[]).probes == []
    with pytest.raises(RangelensError, match="probe 'svm'"):
        ErasureConfig(probes=["svm"])
    with pytest.raises(RangelensError, match="leace"):
        ErasureConfig(conditions=["lace"])


def test_binary_tasks_say_the_neuron_mask_is_shared(
    tiny_llama: LoadedModel, tmp_path: Path
) -> None:
    data = keyword_corpus()
    two = np.flatnonzero(data.labels < 2)
    binary = LabeledTexts(
        [data.texts[i] for i in two], data.labels[two], data.label_names[:2], "two"
    )
    result = erase(
        tiny_llama,
        tmp_path,
        {"taus": []},
        data=binary,
        folds=2,
        conditions=["range", "neuron"],
        ppl_texts=0,
        probes=[],
    )
    assert result.info["shared_neuron_mask"]
    notices = " ".join(result.info["notices"])
    assert "binary task" in notices and "one shared mask" in notices
    # The keyword corpus is separable: every training row is classified correctly.
    assert "range_rows 'correct' changed nothing" in notices
    assert "retrained" not in result.info["verdict"]  # probes off: no information sentence


def test_the_concept_vs_rest_probe_is_read_per_concept_at_base() -> None:
    labels = np.array([0, 0, 1, 1])
    key = ("leace", 0, "s", None, 0.3)
    pred = {BASE: labels.copy(), key: labels.copy()}
    probe = {
        ("binary", base_key(0)): np.array([0, 0, -1, -1]),
        ("binary", base_key(1)): np.array([-1, 1, 1, 1]),
        ("binary", key): np.array([0, -1, 0, -1]),
    }
    o = Outcomes(np.arange(4), labels, pred, {k: np.ones(4) for k in pred}, probe)
    e = EffectEstimator(o, None, 100, 0)
    assert e.information("binary", BASE, 0)["balanced"].point == 1.0
    assert e.information("binary", BASE, 1)["balanced"].point == pytest.approx(0.75)
    assert e.information("binary", key, 0)["balanced"].point == pytest.approx(0.5)
    x, y = separable(n=300, d=8)
    hit = probe_predict("binary:1", x[:240], y[:240], x[240:], 3)
    assert set(np.unique(hit)) <= {1, -1} and ((hit == 1) == (y[240:] == 1)).mean() > 0.95


def test_after_leace_no_probe_reads_a_constant_column_back(tiny_llama: LoadedModel) -> None:
    """In sample, LEACE leaves a concept-vs-rest linear probe nothing (its theorem), also when a
    column is constant: standardising it by its rounding noise would read the erased direction
    back (MiniLM's CLS has such a column)."""
    site = resolve_site(tiny_llama.model, "resid", -1)
    x, y = separable(n=300, d=site.width)
    x[:, 5] = 0.37  # constant
    x64 = x.astype(np.float64)
    edit = LeaceEdit.fit(site, x64, y == 1)
    erased = edit.edit_rows(torch.from_numpy(x64)).numpy()
    hit = probe_predict("binary:1", erased, y, erased, 3)
    t = y == 1
    assert ((hit[t] == 1).mean() + (hit[~t] != 1).mean()) / 2 == pytest.approx(0.5, abs=0.05)
