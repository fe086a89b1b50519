"""The explanations stage of `rangelens run` / `rangelens demo` (tiny model, tiny corpus)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from conftest import stage_stamp

from rangelens.explain.loop import NeuronExplanation
from rangelens.pipeline import load_config, run


def test_run_explains_top_salient_neurons_and_resumes(
    tmp_path: Path, corpus: Path, tiny_model_dir: Path
) -> None:
    out = tmp_path / "run"
    data = {
        "out": str(out),
        "analysis": {
            "model": str(tiny_model_dir),
            "dataset": str(corpus),
            "label_column": "topic",
            "max_length": 16,
        },
        "erasure": None,
        "explain": {"top_k": 2, "rounds": 1, "texts_per_class": 12},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    result = run(load_config(path), progress=False)
    assert result.explanations == out / "explanations"
    summary = json.loads((out / "explanations" / "results.json").read_text())
    assert summary["metadata"]["backend"] == "offline (lexical baseline)"
    assert len(summary["neurons"]) == 2
    for entry in summary["neurons"]:
        e = NeuronExplanation.load(
            out / "explanations" / "explanations" / f"{entry['neuron']}.json"
        )
        assert e.lookup is not None and e.n_candidates >= 1
    stamp = stage_stamp(out / "explanations")
    run(load_config(path), progress=False)  # current: not redone
    assert stage_stamp(out / "explanations") == stamp
