"""`rangelens run`: one YAML config end-to-end, resumable stages, and config errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import stage_stamp
from typer.testing import CliRunner

from rangelens.cli import app
from rangelens.pipeline import example_config, load_config, run
from rangelens.ranges.maps import RangeMap
from rangelens.ranges.rangeset import RangeSet


def write_config(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def config_data(tmp_path: Path, corpus: Path, tiny_model_dir: Path) -> dict:
    return {
        "out": str(tmp_path / "run"),
        "analysis": {
            "model": str(tiny_model_dir),
            "dataset": str(corpus),
            "label_column": "topic",
            "max_length": 32,
            "taus": [1.0],
        },
        "erasure": {"ppl_texts": 4, "ppl_max_length": 16, "folds": 2, "bootstrap": 100},
    }


def test_run_end_to_end_and_resume(tmp_path: Path, config_data: dict) -> None:
    path = write_config(tmp_path / "cfg.yaml", {**config_data, "erasure": None})
    first = run(load_config(path), progress=False)  # analysis only, as if stopped before erasure
    assert first.erasure is None
    out = Path(config_data["out"])
    stamp = stage_stamp(out / "capture")

    second = run(load_config(write_config(tmp_path / "full.yaml", config_data)), progress=False)
    assert second.erasure is not None
    assert stage_stamp(out / "capture") == stamp  # the capture was not redone
    table = pd.read_csv(out / "erasure" / "erasure.csv")
    assert set(table["state"]) == {"base", "range", "neuron", "random"}
    ranges = RangeSet.load(out / "ranges")  # the atlas' map is the erased (full split) one
    shown = RangeMap.load(out / "ranges")
    np.testing.assert_array_equal(
        shown.lo, ranges.map(shown.metadata["site_name"], "full", 2.0, 0.3).lo
    )
    assert shown.metadata["rows"].startswith("correctly classified training rows")
    assert first.analysis.range_map.metadata["rows"].startswith("all training rows")
    assert set(table["concept"]) == {"money", "sport", "tech"}
    assert "average" in second.erasure.headline["concept"].tolist()
    erasure_stamp = stage_stamp(out / "erasure")

    assert [str(e) for e in first.events] == [
        "capture: ran (no earlier output)",
        "splits: ran (no earlier output)",
        "ranges: ran (no earlier output)",
    ]
    assert [(e.stage, e.action) for e in second.events] == [
        ("capture", "reused"),
        ("splits", "ran"),  # now with folds and correctly classified rows
        ("ranges", "ran"),
        ("erasure", "ran"),
    ]
    assert second.events[1].why == "inputs changed"
    third = run(load_config(tmp_path / "full.yaml"), progress=False)  # everything current
    assert stage_stamp(out / "erasure") == erasure_stamp
    assert {e.action for e in third.events} == {"reused"}
    pd.testing.assert_frame_equal(third.erasure.headline, second.erasure.headline)


def test_cli_run_prints_table_and_atlas(tmp_path: Path, config_data: dict) -> None:
    path = write_config(tmp_path / "cfg.yaml", config_data)
    res = CliRunner().invoke(app, ["run", str(path)])
    assert res.exit_code == 0, res.output
    for stage in ("capture", "splits", "ranges", "erasure", "atlas"):  # announced as they start
        assert f"{stage}: running (no earlier output)" in res.output, res.output
    assert "erasure" in res.output and "atlas:" in res.output
    assert (
        "Verdict." in res.output
        and "random" in res.output
        and "Concept distributions" in res.output
    )
    assert (Path(config_data["out"]) / "atlas" / "index.html").exists()
    again = CliRunner().invoke(app, ["run", str(path)])  # every stage says what it did
    assert again.exit_code == 0, again.output
    for stage in ("capture", "splits", "ranges", "erasure", "atlas"):
        assert f"{stage}: reused" in again.output, again.output


def test_run_takes_the_generated_options_as_overrides(tmp_path: Path, config_data: dict) -> None:
    path = write_config(tmp_path / "cfg.yaml", {**config_data, "erasure": None})
    res = CliRunner().invoke(app, ["run", str(path), "--max-per-class", "5", "--seed", "3"])
    assert res.exit_code == 0, res.output
    recorded = json.loads((Path(config_data["out"]) / "run.json").read_text())["config"]
    assert recorded["max_per_class"] == 5 and recorded["seed"] == 3
    assert recorded["max_length"] == 32  # the config's value where no option was given
    bad = CliRunner().invoke(app, ["run", str(path), "--folds", "1", "--quiet"])
    assert bad.exit_code == 2 and "folds = 1" in bad.output, bad.output


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"analysis": {"colour": "red"}}, "analysis.colour"),
        ({"erasure": {"tau": 0}}, "tau = 0"),
        ({"erasure": {"p": 1.5}}, "p = 1.5"),
        ({"analysis": {"tau": -1}}, "analysis.tau"),
        ({"analysis": {"layer": "last"}}, "analysis.layer"),
        ({"erasure": {"targets": ["weather"]}}, "weather"),
        ({"erasure": {"concepts": ["weather"]}}, "is now 'targets'"),
        ({"erasure": {"task": "prompt"}}, "prompt"),
        ({"erasure": {"positions": "last"}}, "positions 'last' with ppl_texts 4"),
        ({"erasure": {"mode": "hard", "scale": 0.5}}, "scale 0.5 only applies to mode 'soft'"),
        ({"erasure": {"folds": 20}}, "folds 20 > the 12 texts of the smallest class"),
        ({"erasure": {"tau": 2.0}}, "set analysis.tau"),
    ],
)
def test_bad_configs(tmp_path: Path, config_data: dict, patch: dict, message: str) -> None:
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in config_data.items()}
    data["out"] = str(tmp_path / "bad-run")
    for section, values in patch.items():
        data[section].update(values)
    path = write_config(tmp_path / "bad.yaml", data)
    res = CliRunner().invoke(app, ["run", str(path), "--quiet"])
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], res.output
    if "erasure" in patch and "task" not in patch["erasure"]:  # found before any model work
        assert not (tmp_path / "bad-run").exists()  # nothing written


def test_unreadable_configs(tmp_path: Path) -> None:
    runner = CliRunner()
    missing = runner.invoke(app, ["run", str(tmp_path / "nope.yaml")])
    assert missing.exit_code == 2 and "does not exist" in missing.output
    broken = tmp_path / "broken.yaml"
    broken.write_text("analysis: [unclosed")
    res = runner.invoke(app, ["run", str(broken)])
    assert res.exit_code == 2 and "not valid YAML" in res.output


@pytest.mark.parametrize("model", ["smollm2-135m", "minilm-l6"])
def test_example_configs_validate(model: str) -> None:
    config = load_config(example_config(model))
    assert config.analysis.model == model and config.erasure is not None
