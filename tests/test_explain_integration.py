"""The offline backend end to end on the real embedded smollm2-135m over a small bbc-news slice."""

from __future__ import annotations

import json

import pytest

from rangelens.data import load_texts
from rangelens.explain import ExemplarConfig, NeuronRecord, explain_neurons, explain_range
from rangelens.explain.api import save_results
from rangelens.models import load_model
from rangelens.sites import resolve_site

pytestmark = pytest.mark.integration
SMALL = ExemplarConfig(n_top=8, n_quantile_bins=2, n_per_bin=3, n_validation=8, n_held_out=8)


@pytest.fixture(scope="module")
def setup():
    lm = load_model("smollm2-135m")
    texts = load_texts("bbc-news", max_per_class=16, seed=0).texts
    return lm, texts, resolve_site(lm.model, "mlp", 2)


def test_offline_end_to_end(setup, tmp_path):
    lm, texts, site = setup
    records, results = explain_neurons(
        lm, texts, site, [5, 77], rounds=1, config=SMALL, max_length=24
    )
    assert [r.neuron for r in records] == [5, 77]
    for rec, res in zip(records, results, strict=True):
        assert rec.top[0].max_activation >= rec.top[-1].max_activation
        assert res.modes and all(m.explanation.startswith("fires on") for m in res.modes)
        assert -1.0 <= res.iterative.held_out <= 1.0 and 0.0 <= res.iterative.auc <= 1.0
        assert res.iterative.validation >= res.single_pass.validation - 0.05
        assert res.history[0].round == 0
    out = save_results(tmp_path / "run", records, results, {"model": "smollm2-135m"})
    summary = json.loads((out / "results.json").read_text())
    assert [n["neuron"] for n in summary["neurons"]] == [5, 77]
    assert NeuronRecord.load(out / "records" / "5.json") == records[0]
    assert not list(tmp_path.glob(".run-*"))  # the temporary directory was renamed away


def test_explain_concept_range(setup):
    lm, texts, site = setup
    record, result = explain_range(
        lm, texts, site, 5, 0.05, 10.0, rounds=1, config=SMALL, max_length=24
    )
    assert record.target.startswith("in_range[")
    assert {a for r in record.held_out for a in r.activations} <= {0.0, 1.0}
    assert result.target == record.target
