"""The analysis pipeline and `rangelens analyze`: run directories, resumption, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import stage_stamp
from typer.testing import CliRunner

from rangelens.cli import app
from rangelens.config import AnalysisConfig
from rangelens.pipeline import analyze
from rangelens.ranges.captured import load_capture
from rangelens.ranges.maps import RangeMap
from rangelens.ranges.stats import ConceptStats


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rangelens.cli", *args], capture_output=True, text=True, timeout=600
    )


def test_analyze_local_model_and_file(tmp_path: Path, corpus: Path, tiny_model_dir: Path) -> None:
    config = AnalysisConfig(
        model=str(tiny_model_dir), dataset=str(corpus), label_column="topic", p=0.25, max_length=32
    )
    out = tmp_path / "run"
    result = analyze(config, out, progress=False)
    assert result.range_map.neurons.shape == (3, 8)  # 25% of 32 neurons per concept
    loaded = RangeMap.load(out / "ranges")
    np.testing.assert_array_equal(loaded.lo, result.range_map.lo)
    assert loaded.metadata["model"] == str(tiny_model_dir) and loaded.metadata["tau"] == 2.0
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["label_column"] == "topic" and "torch" in run["versions"]
    cap = load_capture(out / "capture")
    assert cap.features is not None and cap.features.shape == (36, 32)
    assert len(cap.train) + len(cap.test) == 36
    # statistics cover exactly the training split, and equal a direct computation from features
    direct = ConceptStats(cap.label_names, 32)
    direct.add(cap.features[cap.train], cap.labels[cap.train])
    np.testing.assert_allclose(cap.stats.mean, direct.mean, rtol=1e-10)
    lo = direct.mean - 2 * direct.std
    top0 = result.range_map.neurons[0]
    np.testing.assert_allclose(result.range_map.lo[0], lo[0, top0], rtol=1e-10)
    for name in ("rankings.csv", "distribution.csv", "summary.csv", "polysemanticity.csv"):
        assert not pd.read_csv(out / "ranges" / name).empty


def test_resume_skips_capture_and_refits_ranges(
    tmp_path: Path, corpus: Path, tiny_model_dir: Path
) -> None:
    out = tmp_path / "run"
    base = {"model": str(tiny_model_dir), "dataset": str(corpus), "label_column": "topic"}
    analyze(AnalysisConfig(**base), out, progress=False)
    stamp = stage_stamp(out / "capture")
    second = analyze(AnalysisConfig(**base, tau=1.0), out, progress=False)
    assert stage_stamp(out / "capture") == stamp  # capture not redone
    assert RangeMap.load(out / "ranges").metadata["tau"] == 1.0
    assert second.range_map.metadata["tau"] == 1.0


def test_cli_analyze_and_errors(tmp_path: Path, corpus: Path, tiny_model_dir: Path) -> None:
    out = tmp_path / "cli-run"
    common = ["--model", str(tiny_model_dir), "--dataset", str(corpus), "--label-column", "topic"]
    ok = cli("analyze", *common, "--out", str(out), "--quiet", "--ranking", "dprime")
    assert ok.returncode == 0, ok.stderr
    assert "concept ranges" in ok.stdout and (out / "ranges" / "ranges.json").exists()
    cases = [
        (["--layer", "7"], "layer 7 out of range"),
        (["--site", "neurons"], "unknown site 'neurons'"),
        (["--ranking", "magic"], "unknown ranking 'magic'"),
        (["--tau", "0"], "tau"),
        (["--p", "1.5"], "invalid p"),
        (["--label-column", "nope"], "label column 'nope'"),
    ]
    runner = CliRunner()
    for extra, message in cases:  # in-process: same code path, without a torch import per case
        bad = tmp_path / "bad"
        res = runner.invoke(app, ["analyze", *common, "--out", str(bad), "--quiet", *extra])
        assert res.exit_code == 2, (extra, res.output)
        errors = [line for line in res.output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and message in errors[0], res.output
        assert not bad.exists()
    data = ["--dataset", str(corpus), "--label-column", "topic"]
    unknown = runner.invoke(
        app, ["analyze", "--model", "no-such-model-xyz", *data, "--out", str(bad)]
    )
    assert unknown.exit_code == 2 and "no-such-model-xyz" in unknown.output
    assert not bad.exists()
    other = runner.invoke(app, ["analyze", "--model", "minilm-l6", *data, "--out", str(out)])
    assert other.exit_code == 2 and "was made with model" in other.output
    # the real process: a user error exits 2 with one stderr line
    proc = cli("analyze", *common, "--out", str(bad), "--layer", "9")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: layer 9 out of range for a 3-layer model; valid: -3..2"
    ]


@pytest.mark.integration
@pytest.mark.parametrize(
    ("model", "dataset", "position"),
    [("smollm2-135m", "bbc-news", "last"), ("minilm-l6", "rotten-tomatoes", "cls")],
)
def test_builtin_runs(tmp_path: Path, model: str, dataset: str, position: str) -> None:
    out = tmp_path / "run"
    res = cli(
        "analyze",
        "--model",
        model,
        "--dataset",
        dataset,
        "--position",
        position,
        "--max-per-class",
        "12",
        "--max-length",
        "48",
        "--out",
        str(out),
        "--quiet",
    )
    assert res.returncode == 0, res.stderr
    summary = pd.read_csv(out / "ranges" / "summary.csv")
    assert "overall" in summary["concept"].tolist()
    capture_info = json.loads((out / "capture" / "capture.json").read_text())
    assert capture_info["tokens_per_second"] > 0
    # Density bands on the same run: the capture is reused, only the ranges stage re-runs.
    dense = cli(*res.args[3:], "--range-method", "density")
    assert dense.returncode == 0, dense.stderr
    bands = RangeMap.load(out / "ranges")
    assert bands.metadata["method"] == "density" and bands.metadata["ratio"] == 1.0
    assert bands.bands[0].shape[:2] == bands.neurons.shape and (bands.n_intervals > 0).any()
