"""The capture keeps per-token activations of the explanations' texts, so explaining the run's own
site runs no second forward (tiny model, tiny corpus)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import TOPICS

from rangelens.activations.capture import capture
from rangelens.activations.models import LoadedModel, load_model
from rangelens.activations.sites import resolve_site
from rangelens.config.analysis import AnalysisConfig
from rangelens.config.explain import ExplainConfig
from rangelens.pipeline import load_config, run
from rangelens.pipeline.stages import explain_with
from rangelens.ranges.captured import load_capture


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """20 texts per class (explanations need 32 texts or more)."""
    rows = [
        {"text": f"{t} ({i})", "topic": label}
        for label, texts in TOPICS.items()
        for i in range(10)
        for t in texts
    ]
    path = tmp_path / "topics.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


class Forwards:
    """Counts forwards of a model (a pre-hook on the top module)."""

    def __init__(self, lm: LoadedModel) -> None:
        self.n = 0
        self.handle = lm.model.register_forward_pre_hook(self._count)

    def _count(self, *_args: object) -> None:
        self.n += 1


def _config(tmp_path: Path, corpus: Path, model: Path, explain: dict | None, **analysis) -> Path:
    data = {
        "out": str(tmp_path / "run"),
        "analysis": {
            "model": str(model),
            "dataset": str(corpus),
            "label_column": "topic",
            "max_length": 16,
            "batch_size": 4,
            "token_texts_per_class": 16,
            **analysis,
        },
        "erasure": None,
        "explain": explain,
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("site", ["resid", "mlp"])
def test_explanations_of_the_runs_site_read_the_capture(
    tmp_path: Path, corpus: Path, tiny_model_dir: Path, site: str
) -> None:
    explain = {"top_k": 2, "rounds": 1, "texts_per_class": 12}
    lm = load_model(str(tiny_model_dir))
    run(load_config(_config(tmp_path, corpus, tiny_model_dir, None, site=site)), lm=lm)
    cap = load_capture(tmp_path / "run" / "capture")
    assert cap.tokens is not None and cap.info["token_sample"]["n_texts"] == 3 * 16
    forwards = Forwards(lm)
    path = _config(tmp_path, corpus, tiny_model_dir, explain, site=site)
    result = run(load_config(path), lm=lm, progress=False)
    assert [str(e) for e in result.events][:3] == [
        "capture: reused",
        "splits: reused",
        "ranges: reused",
    ]
    assert forwards.n == 0  # the explanations read the capture's tokens: no forward at all
    summary = json.loads((tmp_path / "run" / "explanations" / "results.json").read_text())

    # The same explanations through a capture pass of their own (the path without a sample).
    a = load_config(path).analysis.resolved()
    fitted = result.analysis.range_map
    again = explain_with(lm, a, load_config(path).explain, fitted, tmp_path / "cache")
    assert forwards.n > 0
    own = {n: r.to_dict() for n, r in again.records.items()}
    saved = tmp_path / "run" / "explanations" / "explanations"
    for entry in summary["neurons"]:
        n = entry["neuron"]
        stored = json.loads((saved.parent / "records" / f"{n}.json").read_text())
        assert stored == json.loads(json.dumps(own[n]))
        assert json.loads((saved / f"{n}.json").read_text()) == json.loads(
            json.dumps(again.explanations[n].to_dict())
        )


def test_sample_equals_a_token_capture_of_its_texts(
    tmp_path: Path, corpus: Path, tiny_model_dir: Path
) -> None:
    lm = load_model(str(tiny_model_dir))
    path = _config(tmp_path, corpus, tiny_model_dir, None, position="mean")
    run(load_config(path), lm=lm, progress=False)
    sample = load_capture(tmp_path / "run" / "capture").tokens
    assert sample is not None
    a = load_config(path).analysis.resolved()
    texts = a.load_data(max_per_class=12, balance=False)  # a smaller cap: a subset of the sample
    site = resolve_site(lm.model, a.site, a.layer)
    about = dict(sample.about)
    read = sample.activations_for(texts, about)
    assert read is not None and read.token_ids is not None and read.offsets is not None
    direct = capture(lm, texts.texts, [site], position="tokens", max_length=16, progress=False)
    assert direct.offsets is not None and direct.token_ids is not None
    np.testing.assert_array_equal(read.offsets, direct.offsets)
    np.testing.assert_array_equal(read.token_ids, direct.token_ids)
    np.testing.assert_allclose(read.acts[site.name], direct.acts[site.name], rtol=0, atol=1e-5)
    # Made at another max_length, or missing a text: not used.
    assert sample.activations_for(texts, {**about, "max_length": "8"}) is None
    more = a.load_data(max_per_class=18, balance=False)
    assert sample.activations_for(more, about) is None


def test_explaining_another_layer_runs_its_own_capture(
    tmp_path: Path, corpus: Path, tiny_model_dir: Path
) -> None:
    lm = load_model(str(tiny_model_dir))
    path = _config(
        tmp_path, corpus, tiny_model_dir, {"top_k": 1, "rounds": 0, "texts_per_class": 12}
    )
    result = run(load_config(path), lm=lm, progress=False)
    tokens = load_capture(tmp_path / "run" / "capture").tokens
    config, headline = load_config(path).explain, result.analysis.range_map
    assert config is not None and tokens is not None and tokens.about["site"] == "resid.2"
    layer0 = load_config(path).analysis.resolved().model_copy(update={"layer": 0})
    forwards = Forwards(lm)
    given = explain_with(lm, layer0, config, headline, tmp_path / "c1", tokens)
    assert forwards.n > 0 and given.metadata["site"] == "resid.0"
    own = explain_with(lm, layer0, config, headline, tmp_path / "c2")
    assert {n: r.to_dict() for n, r in given.records.items()} == {
        n: r.to_dict() for n, r in own.records.items()
    }


def test_the_default_sample_holds_the_default_explanation_texts() -> None:
    assert AnalysisConfig().token_texts_per_class == ExplainConfig().texts_per_class
