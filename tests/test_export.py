"""Shareable results (`rangelens export`) round-trip through a folder, and the atlas shows each
neuron's output side, on a real run of a tiny Llama saved as a local model folder."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

import rangelens
from rangelens.activations.models import LoadedModel, load_model
from rangelens.cli import app
from rangelens.config import AnalysisConfig, ErasureConfig, RunConfig
from rangelens.errors import RangelensError
from rangelens.pipeline import run as run_pipeline

TOPICS = {
    "sport": ["The striker scored twice in the league match", "A late goal won the cup final"],
    "money": ["Shares fell as the bank raised interest rates", "Profits rose at the retail group"],
    "tech": ["The new phone has a faster chip and camera", "Software update fixes a bug"],
}


def topics_csv(directory: Path) -> str:
    """``directory/topics.csv``: each TOPICS text ten times (numbered), labelled by its topic."""
    rows = [
        {"text": f"{t} ({i})", "topic": label}
        for label, texts in TOPICS.items()
        for i in range(10)
        for t in texts
    ]
    pd.DataFrame(rows).to_csv(directory / "topics.csv", index=False)
    return str(directory / "topics.csv")


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory, tiny_llama: LoadedModel) -> Path:
    root = tmp_path_factory.mktemp("export")
    model_dir = root / "tiny-llama"
    tiny_llama.model.save_pretrained(model_dir)
    tiny_llama.tokenizer.save_pretrained(model_dir)
    config = AnalysisConfig(
        model=str(model_dir),
        dataset=topics_csv(root),
        label_column="topic",
        p=0.2,
        max_length=32,
        taus=[1.0],
    )
    erasure = ErasureConfig(folds=2, bootstrap=100, ppl_texts=0)
    run_pipeline(RunConfig(out=root / "run", analysis=config, erasure=erasure), progress=False)
    return root / "run"


def test_atlas_neuron_pages_show_the_output_side(small_run: Path, tmp_path: Path) -> None:
    atlas = rangelens.build_atlas(small_run, tmp_path / "atlas")
    ranges = rangelens.RangeMap.load(small_run / "ranges")
    j = int(ranges.neurons[0, 0])
    page = (atlas / "neurons" / f"{j}.html").read_text(encoding="utf-8")
    assert 'id="output-side"' in page
    lm = load_model(str(json.loads((small_run / "run.json").read_text())["config"]["model"]))
    site = rangelens.resolve_site(lm.model, "resid", -1)
    top = rangelens.neuron_logits(lm, site, [j], k=10)
    first = top[(top.side == "promoted") & (top["rank"] == 0)].token.item()
    from markupsafe import escape

    assert str(escape(first.replace(" ", "␣"))) in page
    off = rangelens.build_atlas(small_run, tmp_path / "plain", output_side="off")
    assert 'id="output-side"' not in (off / "neurons" / f"{j}.html").read_text(encoding="utf-8")


def test_atlas_neuron_pages_show_the_next_token_shift(small_run: Path, tmp_path: Path) -> None:
    from markupsafe import escape

    from rangelens.report.contents import load_run, shift_plan
    from rangelens.report.shift_forwards import range_shifts

    atlas = rangelens.build_atlas(small_run, tmp_path / "atlas")
    run = load_run(small_run)
    plan = shift_plan(run)
    assert not isinstance(plan, str)
    # Held-out texts only: the run's test split, which the headline ranges were not fitted on.
    assert set(plan.texts) <= {run.texts.texts[i] for i in run.capture.test}
    assert not set(plan.texts) & {run.texts.texts[i] for i in run.capture.train}
    lm = load_model(str(run.config["model"]))
    site = rangelens.resolve_site(lm.model, "resid", -1)
    shifts = range_shifts(lm, site, plan)
    assert set(shifts) == set(plan.targets) and shifts  # every salient page neuron
    for j in list(shifts)[:3]:
        page = (atlas / "neurons" / f"{j}.html").read_text(encoding="utf-8")
        section = page[page.index('id="next-token-shift"') :]
        shift = shifts[j]
        assert f"salience rank {shift.rank}" in section and "test split" in section
        assert f"{shift.positions} tokens" in section
        changed = [t for t in shift.range.up if t.delta != 0]
        if changed:
            assert str(escape(changed[0].token.replace(" ", "␣"))) in section
        else:
            assert "changed no next-token prediction" in section
        assert re.search(r"\bnan\b", section, re.IGNORECASE) is None
    off = rangelens.build_atlas(small_run, tmp_path / "plain", output_side="off")
    plain = (off / "neurons" / f"{next(iter(shifts))}.html").read_text(encoding="utf-8")
    assert 'id="next-token-shift"' not in plain
    assert "Output side and next-token shift: not computed (output_side off)" in plain


def test_encoder_atlas_says_it_has_no_next_token_distribution(
    tmp_path: Path, encoder_tokenizer
) -> None:
    from conftest import tiny_model

    model_dir = tmp_path / "tiny-bert"
    tiny_model("bert", len(encoder_tokenizer)).save_pretrained(model_dir)
    encoder_tokenizer.save_pretrained(model_dir)
    config = AnalysisConfig(
        model=str(model_dir),
        dataset=topics_csv(tmp_path),
        label_column="topic",
        p=0.2,
        max_length=16,
    )
    run_pipeline(RunConfig(out=tmp_path / "run", analysis=config, erasure=None), progress=False)
    atlas = rangelens.build_atlas(tmp_path / "run", tmp_path / "atlas")
    j = int(rangelens.RangeMap.load(tmp_path / "run" / "ranges").neurons[0, 0])
    page = (atlas / "neurons" / f"{j}.html").read_text(encoding="utf-8")
    assert 'id="next-token-shift"' not in page and 'id="output-side"' not in page
    assert "an encoder has no unembedding and no next-token distribution" in page
    assert re.search(r"\bnan\b", page, re.IGNORECASE) is None


def test_export_round_trips_through_a_folder(small_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "shared"
    res = CliRunner().invoke(app, ["export", str(small_run), str(out)])
    assert res.exit_code == 0, res.output
    card = (out / "README.md").read_text(encoding="utf-8")
    assert card.startswith("---\n") and "erasure_effects.parquet" in card
    shared = rangelens.load_export(out)
    original = rangelens.RangeMap.load(small_run / "ranges")
    assert shared.range_map is not None
    np.testing.assert_array_equal(shared.range_map.neurons, original.neurons)
    np.testing.assert_array_equal(shared.range_map.lo, original.lo)
    pd.testing.assert_frame_equal(
        shared.effects.reset_index(drop=True), rangelens.effects(small_run).reset_index(drop=True)
    )
    pd.testing.assert_frame_equal(shared.tables["ranges"], original.to_frame())
    j = int(original.neurons[0, 0])
    neuron = shared.neurons[j]
    assert neuron["index"] == j and len(neuron["pos_str"]) == 10 and neuron["ranges"]
    shift = neuron["next_token_shift"]
    assert "test split" in shift["texts"] and shift["concept"] in original.concepts
    assert len(shift["range"]["up"]) == 10 and shift["neuron"]["total_variation"] >= 0
    # Per-text activations stay private unless asked for; the run inside loads as a run.
    analysis = rangelens.load_analysis(shared.run_dir)
    assert analysis.capture.features is None and analysis.capture.tokens is None
    assert (small_run / "capture" / "tokens.safetensors").is_file()  # the run itself keeps them
    np.testing.assert_array_equal(analysis.range_map.hi, original.hi)
    # `rangelens report OUT` reads the export as the run it holds.
    res = CliRunner().invoke(app, ["report", str(out), "--out", str(tmp_path / "atlas")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "atlas" / "neurons" / f"{j}.html").is_file()
    # An export is replaced by a new export, never a run or a foreign folder.
    rangelens.export_run(small_run, out)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    with pytest.raises(RangelensError, match="not made by rangelens"):
        rangelens.export_run(small_run, foreign)
    with pytest.raises(RangelensError, match="holds the run"):
        rangelens.export_run(small_run, small_run)


def test_effects_frame_matches_the_headline(small_run: Path) -> None:
    frame = rangelens.effects(small_run)
    from rangelens.erasure.outputs import load_erasure

    headline = load_erasure(small_run / "erasure").headline
    row = headline[headline.concept == "sport"].iloc[0]
    got = frame[
        (frame.concept == "sport") & (frame.condition == "range") & (frame.effect == "target_drop")
    ].iloc[0]
    assert got.estimate == row["range_target_drop"] and got.lo == row["range_target_drop_lo"]
    assert {"range-neuron"} <= set(frame.condition)


def test_load_export_of_an_unreachable_hub_id_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RangelensError, match="hub cannot be reached") as err:
        rangelens.load_export("someone/no-such-export")
    assert "\n" not in str(err.value)


def test_steer_command_prints_base_and_steered(small_run: Path) -> None:
    res = CliRunner().invoke(
        app,
        [
            "steer",
            "--run-dir",
            str(small_run),
            "--concept",
            "sport",
            "--prompt",
            "The match",
            "--max-new-tokens",
            "3",
        ],
    )
    assert res.exit_code == 0, res.output
    for label in ("base (unsteered)", "range steering", "mean-difference steering"):
        assert label in res.output
    frame = rangelens.steer_run(
        small_run,
        "sport",
        ["The match", "Shares"],
        value="quantile",
        q=0.9,
        baseline=False,
        max_new_tokens=2,
    )
    assert frame.method.tolist() == ["base", "base", "range", "range"]
    res = CliRunner().invoke(
        app, ["steer", "--run-dir", str(small_run), "--concept", "nope", "--prompt", "x"]
    )
    assert res.exit_code == 2 and "nope" in res.output and len(res.output.strip().splitlines()) == 1


def test_density_mask_masks_exactly_the_density_bands(small_run: Path) -> None:
    from rangelens.ranges.bands import density_bands

    analysis = rangelens.load_analysis(small_run)
    stats, ranges = analysis.capture.stats, analysis.range_map
    lm = load_model(str(json.loads((small_run / "run.json").read_text())["config"]["model"]))
    site = rangelens.resolve_site(lm.model, "resid", -1)
    mask = rangelens.density_mask(site, ranges, stats, "sport", ratio=1.0)
    band_lo, band_hi = density_bands(stats, ranges.neurons, 1.0)
    c = ranges.concept_index("sport")
    np.testing.assert_array_equal(mask.neurons, ranges.neurons[c])
    lo = np.asarray(mask.lo).reshape(len(mask.neurons), -1)
    width = lo.shape[1]
    np.testing.assert_array_equal(lo, band_lo[c][:, :width])
    assert np.isnan(band_lo[c][:, width:]).all()
