"""A user's own files and models through `rangelens analyze`: header-less TSV with missing labels,
module input sites, GGUF files, options generated from the config, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import stage_stamp
from typer.testing import CliRunner

from rangelens.cli import app
from rangelens.config import AnalysisConfig
from rangelens.data import DataWarning, load_texts
from rangelens.pipeline import analyze

TOPICS = {
    "spam": ['WINNER!! Claim your "free" prize now', "Urgent: call to win cash today"],
    "ham": ["See you at lunch tomorrow", "Can you pick up milk on the way home"],
}


@pytest.fixture
def sms_tsv(tmp_path: Path) -> Path:
    """`label<TAB>text` without a header (as the UCI SMS Spam file), with NA/empty labels and a
    one-example class."""
    lines = [f"{label}\t{t} {i}" for label, ts in TOPICS.items() for i in range(8) for t in ts]
    lines += ["NA\tmissing label row", "\tempty label row", "rare\tonly one of these"]
    path = tmp_path / "SMSSpamCollection"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_headerless_tsv_with_missing_labels(sms_tsv: Path) -> None:
    options = {"sep": "\\t", "header": False, "text_column": "1", "label_column": "0"}
    with pytest.warns(DataWarning) as caught:
        data = load_texts(sms_tsv, **options, min_per_class=2)
    notes = [str(w.message) for w in caught]
    assert any("dropped 2 rows" in n and "missing label" in n for n in notes)
    assert any("fewer than 2 examples: {'rare': 1}" in n for n in notes)
    assert data.label_names == ["ham", "spam"] and data.counts() == {"ham": 16, "spam": 16}
    assert '"free"' in data.texts[data.labels.tolist().index(1)]  # TSV quotes are text
    with pytest.raises(ValueError, match="2 rows with a missing label"):
        load_texts(sms_tsv, **options, missing_labels="error")
    with pytest.raises(ValueError, match="class 'rare' .* fewer than 2 examples"):
        load_texts(sms_tsv, **options)


def test_numeric_labels_with_nan_stay_integers(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    rows = [f"text {i},{i % 2}" for i in range(40)] + ["orphan,"]
    path.write_text("text,label\n" + "\n".join(rows) + "\n")
    with pytest.warns(DataWarning, match="dropped 1 rows"):
        data = load_texts(path)
    assert data.label_names == ["0", "1"]  # not '0.0' / '1.0'


def test_cli_analyze_headerless_tsv_module_input(
    tmp_path: Path, sms_tsv: Path, tiny_model_dir: Path
) -> None:
    out = tmp_path / "run"
    args = [
        "analyze",
        "--model",
        str(tiny_model_dir),
        "--dataset",
        str(sms_tsv),
        "--no-header",
        "--sep",
        "\\t",
        "--text-column",
        "1",
        "--label-column",
        "0",
        "--min-per-class",
        "2",
        "--site",
        "module:model.layers.1.mlp.down_proj:input",
        "--concepts",
        "ham,spam",
        "--max-length",
        "16",
        "--padding-side",
        "left",
        "--out",
        str(out),
        "--quiet",
    ]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert (
        "note: dropped 2 rows" in res.output and "note: concepts with fewer than 20" in res.output
    )
    cap = json.loads((out / "capture" / "capture.json").read_text())
    assert cap["site"] == "module:model.layers.1.mlp.down_proj:input" and cap["width"] == 64
    config = json.loads((out / "run.json").read_text())["config"]
    assert config["dataset"] == str(sms_tsv.resolve()) and config["header"] is False
    assert config["sep"] == "\\t" and config["concepts"] == ["ham", "spam"]
    assert config["padding_side"] == "left" and config["min_per_class"] == 2


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--site", "module:"], "empty module path"),
        (["--site", "module:model"], "output of module 'model' is a BaseModelOutputWithPast"),
        (["--site", "module:model.layers.9:input"], "module 'model.layers.9' not found"),
        (["--missing-labels", "keep"], "unknown missing_labels 'keep'; valid: 'drop', 'error'"),
        (["--min-per-class", "0"], "invalid min_per_class (0)"),
        (["--max-per-class", "lots"], "invalid max_per_class ('lots')"),
        (["--concepts", "ham,eggs"], "concept 'eggs' not in dataset"),
        (["--padding-side", "up"], "unknown padding_side 'up'; valid: 'left', 'right'"),
        (["--label-column", "label"], "label column 'label' not in dataset"),
    ],
)
def test_cli_bad_inputs_one_line_no_run_dir(
    tmp_path: Path, sms_tsv: Path, tiny_model_dir: Path, extra: list[str], message: str
) -> None:
    bad = tmp_path / "bad"
    base = ["--sep", "tab", "--no-header", "--text-column", "1", "--label-column", "0"]
    args = ["analyze", "--model", str(tiny_model_dir), "--dataset", str(sms_tsv), *base]
    res = CliRunner().invoke(app, [*args, "--min-per-class", "2", *extra, "--out", str(bad)])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], res.output
    assert not bad.exists()


def test_fingerprint_follows_content_not_path_spelling(
    tmp_path: Path, tiny_model_dir: Path, corpus: Path, monkeypatch
) -> None:
    out = tmp_path / "run"
    base = {"model": str(tiny_model_dir), "label_column": "topic", "max_length": 16}
    analyze(AnalysisConfig(**base, dataset=str(corpus)), out, progress=False)
    stamp = stage_stamp(out / "capture")
    monkeypatch.chdir(corpus.parent)  # relative spellings of the same file and run: reused
    assert corpus.parent == tmp_path  # and a relative spelling of the run directory
    analyze(AnalysisConfig(**base, dataset=corpus.name), "run", progress=False)
    assert stage_stamp(out / "capture") == stamp
    with corpus.open("a") as fh:  # an edited file: captured again
        fh.write("Brand new text about tech (99),tech\n")
    result = analyze(AnalysisConfig(**base, dataset=str(corpus)), out, progress=False)
    assert stage_stamp(out / "capture") != stamp
    assert int(np.sum(result.capture.labels == 2)) == 13


@pytest.mark.integration
def test_cli_analyze_gguf_file(tmp_path: Path, corpus: Path) -> None:
    from test_models import smollm2_gguf

    out = tmp_path / "run"
    args = ["--dataset", str(corpus), "--label-column", "topic", "--max-length", "16"]
    res = CliRunner().invoke(
        app, ["analyze", "--model", str(smollm2_gguf()), *args, "--out", str(out), "--quiet"]
    )
    assert res.exit_code == 0, res.output
    cap = json.loads((out / "capture" / "capture.json").read_text())
    assert cap["site"] == "resid.29" and cap["width"] == 576


def test_explain_follows_a_run_of_user_data(tmp_path: Path, tiny_model_dir: Path) -> None:
    """`explain --run-dir` re-reads the run's header-less TSV (path, columns, separator) and writes
    into RUN_DIR/explanations; a too-small dataset is refused before any capture."""
    words = {"sport": "goal match team league", "money": "bank shares profit rates"}
    lines = [
        f"{label}\t{' '.join(np.random.default_rng(i).permutation(ws.split()))} {i}"
        for label, ws in words.items()
        for i in range(50)
    ]
    data = tmp_path / "topics.tsv"
    data.write_text("\n".join([*lines, "NA\tno label"]) + "\n")
    run = tmp_path / "run"
    opts = ["--no-header", "--text-column", "1", "--label-column", "0", "--max-length", "12"]
    made = CliRunner().invoke(
        app,
        ["analyze", "--model", str(tiny_model_dir), "--dataset", str(data), *opts]
        + ["--out", str(run), "--quiet"],
    )
    assert made.exit_code == 0, made.output
    small = CliRunner().invoke(app, ["explain", "--run-dir", str(run), "--texts-per-class", "10"])
    assert small.exit_code == 2 and "explanations need at least 32" in small.output, small.output
    assert "--texts-per-class" in small.output and not (run / "explanations").exists()
    res = CliRunner().invoke(
        app, ["explain", "--run-dir", str(run), "--top-k", "2", "--rounds", "0"]
    )
    assert res.exit_code == 0, res.output
    saved = sorted(p.name for p in (run / "explanations" / "explanations").iterdir())
    assert len(saved) == 2 and all(p.endswith(".json") for p in saved)
