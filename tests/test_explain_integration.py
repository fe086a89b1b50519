"""The offline backend end to end on the real embedded smollm2-135m over a small bbc-news slice."""

from __future__ import annotations

import json

import pytest

from rangelens.activations.models import load_model
from rangelens.activations.sites import resolve_site
from rangelens.data import load_texts
from rangelens.explain import ExemplarConfig, NeuronRecord, explain_neurons, explain_range
from rangelens.explain.results import save_results
from rangelens.ranges.maps import ConceptRange

pytestmark = pytest.mark.integration
SMALL = ExemplarConfig(
    n_top=8, n_quantile_bins=2, n_per_bin=3, n_feedback=8, n_validation=8, n_held_out=8
)


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
        assert res.modes and all(m.explanation.startswith(m.label) for m in res.modes)
        assert -1.0 <= res.iterative.held_out <= 1.0 and 0.0 <= res.iterative.auc <= 1.0
        assert res.n_candidates == len(res.history) and res.lookup is not None
        assert res.history[0].round == 0
    out = save_results(tmp_path / "run", records, results, {"model": "smollm2-135m"})
    summary = json.loads((out / "results.json").read_text())
    assert [n["neuron"] for n in summary["neurons"]] == [5, 77]
    assert NeuronRecord.load(out / "records" / "5.json") == records[0]
    assert not list(tmp_path.glob(".run-*"))  # the temporary directory was renamed away


def test_explain_concept_range(setup):
    lm, texts, site = setup
    concept = ConceptRange("tech", neuron=5, lo=0.05, hi=10.0, mean=0.5, std=0.2, rank=0)
    record, result = explain_range(lm, texts, site, concept, rounds=1, config=SMALL, max_length=24)
    assert record.target.startswith("in_range[")
    assert {a for r in record.held_out for a in r.activations} <= {0.0, 1.0}
    assert result.target == record.target


def test_local_transformers_client_prefill_logprobs_and_cache(setup, tmp_path):
    from rangelens.explain import LLM, ResponseCache, TransformersClient

    lm, _, _ = setup
    llm = LLM(TransformersClient(lm, max_new_tokens=6), ResponseCache(tmp_path))
    msgs = [{"role": "user", "content": "Name a sport."}]
    reply, _ = llm.ask(msgs, lambda c: c, prefill='{"sport": "', top_logprobs=5)
    assert reply is not None and reply.text.startswith('{"sport": "')
    assert reply.logprobs and "".join(s.token for s in reply.logprobs) == reply.text
    assert all(len(s.top) >= 5 and s.token in s.top for s in reply.logprobs[1:])
    again, _ = llm.ask(msgs, lambda c: c, prefill='{"sport": "', top_logprobs=5)
    assert again == reply and llm.stats.cache_hits == 1 and llm.stats.requests == 1


def test_explain_command_writes_directory(tmp_path):
    from typer.testing import CliRunner

    from rangelens.cli import app

    out = tmp_path / "expl"
    args = ["--neurons", "5,9", "--site", "mlp", "--layer", "2", "--texts-per-class", "24"]
    result = CliRunner().invoke(app, ["explain", *args, "--rounds", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (out / "explanations").iterdir()) == ["5.json", "9.json"]
    assert "single-pass" in result.output and "semantic AUC vs mismatched" in result.output
    assert " vs " in result.output  # each neuron's semantic AUC beside its mismatched floor
