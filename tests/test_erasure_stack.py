"""Several masks in one batched suffix forward (issue 19): a stacked forward gives every mask the
outputs of its own forward, each edit touches only its own rows, and the experiment builds only the
masks a figure reads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_erasure import erase, max_row_error, outputs

from rangelens.activations.capture import model_inputs, record, stop_forward, tokenize
from rangelens.activations.models import LoadedModel
from rangelens.activations.sites import NeuronSite, blocks, resolve_site
from rangelens.erasure import experiment
from rangelens.erasure.engine import Group, run_conditions, split_rows, stacked, suffix_start
from rangelens.erasure.tasks import token_nll
from rangelens.errors import RangelensError
from rangelens.intervene import Edit, LeaceEdit, NeuronMask, RangeMask, attach_stacked

TEXTS = [
    "The match ended in a draw after extra time.",
    "Shares fell sharply.",
    "A new smartphone with a folding screen was unveiled at the trade show on Monday.",
    "Parliament votes today.",
    "Hi",
]


def every_condition(site: NeuronSite, acts: torch.Tensor) -> list[Edit | None]:
    """The base and one edit of every kind the experiment builds: range (all tokens, last token
    with a replacement), neuron (hard, soft), density bands (two intervals per neuron), random
    neurons and LEACE (all tokens, last token); ``acts`` ``(tokens, width)`` set their ranges."""
    values = acts.double().numpy()
    neurons = np.arange(0, site.width, 3)
    lo, hi = np.quantile(values[:, neurons], [0.25, 0.75], axis=0)
    q = np.quantile(values[:, neurons], [0.05, 0.2, 0.6, 0.8], axis=0)
    band_lo, band_hi = np.stack([q[0], q[2]], axis=1), np.stack([q[1], q[3]], axis=1)
    rng = np.random.default_rng(0)
    random = np.sort(rng.choice(site.width, size=len(neurons), replace=False))
    features = rng.normal(size=(200, site.width)) * values.std(0) + values.mean(0)
    concept = np.arange(200) % 2 == 1
    features[concept] += 2.0 * values.std(0)
    return [
        None,
        RangeMask(site, neurons, lo, hi),
        RangeMask(site, neurons, lo, hi, replacement=0.5, positions="last"),
        NeuronMask(site, neurons),
        NeuronMask(site, neurons, mode="soft", scale=0.5),
        RangeMask(site, neurons, band_lo, band_hi),
        NeuronMask(site, random, replacement=values.mean(0)[random]),
        LeaceEdit.fit(site, features, concept),
        LeaceEdit.fit(site, features, concept, positions="last"),
    ]


def setting(lm: LoadedModel, kind: str, layer: int, padding: str):
    model = lm.model
    site = resolve_site(model, kind, layer)
    head = resolve_site(model, "resid", -1)
    batch = tokenize(lm, TEXTS, batch_size=len(TEXTS), max_length=32, padding_side=padding)[0]
    kwargs = model_inputs(model, batch)
    with torch.inference_mode(), record(model, [site]) as store, stop_forward():
        model(**kwargs)
    acts = store[site.name][batch.attention_mask.bool()]
    return site, head, kwargs, every_condition(site, acts)


@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize(("kind", "layer"), [("resid", 1), ("mlp", 1)])
def test_stacked_forwards_equal_one_forward_per_mask(
    tiny_lm: LoadedModel, kind: str, layer: int, padding: str
) -> None:
    model = tiny_lm.model
    site, head, kwargs, masks = setting(tiny_lm, kind, layer, padding)
    start = suffix_start(model, [site, head])
    assert start == (layer + 1 if kind == "resid" else layer)
    forward = outputs(model, head)
    calls: list[int] = []
    handle = blocks(model)[1][-1].register_forward_hook(lambda *_: calls.append(1))
    try:
        with torch.inference_mode():
            one = run_conditions(model, kwargs, masks, forward, start=start)
            assert len(calls) == len(masks)
            for stack in (4, len(masks)):  # uneven chunks (4, 4, 1) and all masks in one forward
                calls.clear()
                many = run_conditions(model, kwargs, masks, forward, start=start, stack=stack)
                assert len(calls) == -(-len(masks) // stack)  # one suffix forward per chunk
                for (ref_out, ref_head), (out, feat) in zip(one, many, strict=True):
                    assert out.shape == ref_out.shape and feat.shape == ref_head.shape
                    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
                    torch.testing.assert_close(feat, ref_head, rtol=1e-5, atol=1e-5)
    finally:
        handle.remove()
    for i in range(1, len(masks)):  # every edit changes the output: the parity is not vacuous
        assert max_row_error(one[i][0], one[0][0]) > 1e-4, masks[i]


@pytest.mark.parametrize("padding", ["left", "right"])
def test_stacked_perplexity_equals_one_forward_per_mask(
    tiny_llama: LoadedModel, padding: str
) -> None:
    model = tiny_llama.model
    site, _, kwargs, masks = setting(tiny_llama, "mlp", 1, padding)
    start = suffix_start(model, [site])
    with torch.inference_mode():
        one = run_conditions(model, kwargs, masks, lambda k: token_nll(model, k), start=start)
        many = run_conditions(
            model, kwargs, masks, lambda k: token_nll(model, k), start=start, stack=len(masks)
        )
    for (ref_nll, ref_n), (nll, n) in zip(one, many, strict=True):
        np.testing.assert_array_equal(n, ref_n)
        np.testing.assert_allclose(nll, ref_nll, rtol=1e-5)
    assert not np.allclose(one[1][0], one[0][0])


@pytest.mark.parametrize("padding", ["left", "right"])
def test_each_stacked_edit_changes_only_its_own_rows_exactly(
    tiny_lm: LoadedModel, padding: str
) -> None:
    """A mask at a skipped block's output edits the cached value, the same input stacked or not:
    each mask's slice of the stacked value is bit for bit that mask's edit alone."""
    model = tiny_lm.model
    site, _, kwargs, masks = setting(tiny_lm, "resid", 1, padding)

    def at_site(kw: dict[str, torch.Tensor]) -> torch.Tensor:
        with record(model, [site]) as store, stop_forward():
            model(**kw)
        return store[site.name]

    with torch.inference_mode():
        alone = run_conditions(model, kwargs, masks, at_site, start=2)
        together = run_conditions(model, kwargs, masks, at_site, start=2, stack=len(masks))
    for mask, a, t in zip(masks, alone, together, strict=True):
        assert torch.equal(a, t), mask
    assert all(not torch.equal(a, alone[0]) for a in alone[1:])


def test_stacked_edits_at_several_sites_leave_other_slices_alone(tiny_llama: LoadedModel) -> None:
    model = tiny_llama.model
    early, late = resolve_site(model, "resid", 0), resolve_site(model, "mlp", 2)
    head = resolve_site(model, "resid", -1)
    batch = tokenize(tiny_llama, TEXTS, batch_size=len(TEXTS), max_length=32)[0]
    kwargs = model_inputs(model, batch)
    masks: list[Edit | None] = [NeuronMask(early, [0, 1, 2]), None, NeuronMask(late, [3, 4])]
    forward = outputs(model, head)
    with torch.inference_mode():
        one = run_conditions(model, kwargs, masks, forward)
        many = run_conditions(model, kwargs, masks, forward, stack=3)
    for (ref, _), (out, _) in zip(one, many, strict=True):
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_outputs_that_cannot_be_split_by_rows_are_refused(tiny_llama: LoadedModel) -> None:
    parts = split_rows((torch.arange(6), np.arange(12).reshape(6, 2)), 3)
    assert [p[0].tolist() for p in parts] == [[0, 1], [2, 3], [4, 5]]
    assert parts[2][1].tolist() == [[8, 9], [10, 11]]
    with pytest.raises(RangelensError, match="cannot split a forward output of type float"):
        split_rows(1.5, 2)
    with pytest.raises(RangelensError, match="into 4 masks' rows"):
        split_rows(torch.zeros(6), 4)
    with pytest.raises(RangelensError, match="different batch sizes"):
        stacked({"input_ids": torch.zeros(2, 3), "position_ids": torch.zeros(1, 3)}, 2)
    site = resolve_site(tiny_llama.model, "resid", 0)
    batch = tokenize(tiny_llama, TEXTS, batch_size=len(TEXTS))[0]
    kwargs = model_inputs(tiny_llama.model, batch)
    unstacked = attach_stacked(tiny_llama.model, [NeuronMask(site, [0]), None])
    wrong = pytest.raises(RangelensError, match="needs a batch of k·B rows")
    with torch.inference_mode(), wrong, unstacked:
        tiny_llama.model(**kwargs)  # 5 rows for 2 edits


def test_the_experiment_gives_the_same_figures_stacked_or_not(
    tiny_llama: LoadedModel, tmp_path: Path
) -> None:
    """Masks at mlp.1 with the head on the last block: every condition runs suffix forwards (and
    perplexity forwards), one per mask or stacked."""
    common = {
        "analysis": {"site": "mlp", "layer": 1, "taus": [1.0, 3.0]},
        "folds": 2,
        "conditions": ["range", "neuron", "density", "leace", "random"],
        "probes": ["linear"],
    }
    one = erase(tiny_llama, tmp_path / "one", stack_rows=1, **common)
    many = erase(tiny_llama, tmp_path / "many", **common)
    assert one.info["classify"]["forwards"] == many.info["classify"]["forwards"]
    assert one.info["classify"]["cached_features"] == []  # the masks did run forwards
    a, b = one.table.select_dtypes("number"), many.table.select_dtypes("number")
    assert list(a.columns) == list(b.columns) and len(a) == len(b) > 0
    np.testing.assert_allclose(b.to_numpy(), a.to_numpy(), rtol=1e-6, atol=1e-9, equal_nan=True)
    assert one.info["verdict"] == many.info["verdict"]


def test_density_masks_are_built_only_where_a_figure_reads_them(
    tiny_llama: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Non-headline ratios feed only the ratio sweep (headline site and p): at another p only the
    headline ratio is built, and every figure still finds its masks."""
    built: list[tuple] = []
    groups = experiment._groups

    def recorded(*args: Any, **kwargs: Any) -> list[Group]:  # the real function, its masks noted
        found = groups(*args, **kwargs)
        built.extend(k for g in found for k in g.masks if k[0] == "density")
        return found

    monkeypatch.setattr(experiment, "_groups", recorded)
    result = erase(
        tiny_llama,
        tmp_path,
        {"taus": [], "ps": [0.5], "density_ratios": [2.0]},
        folds=2,
        conditions=["range", "density"],
        probes=[],
    )
    points = {(k[3], k[4]) for k in built}  # (ratio, p)
    assert points == {(1.0, 0.3), (2.0, 0.3), (1.0, 0.5)}
    assert [row["ratio"] for row in result.info["ratio_sweep"]] == [1.0, 2.0]
    table = result.table
    assert table.loc[(table.state == "density") & (table.p == 0.5), "target_drop"].notna().all()
