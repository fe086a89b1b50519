"""Fault injection: killed runs resume to identical results, concurrent runs, bad inputs and outputs.

Kills are real ``SIGKILL`` s of a process running ``rangelens run``, delivered at the moment a chosen
artifact is about to be renamed into place (the process wraps ``os.replace`` / ``os.rename``, so the
kill points do not depend on rangelens internals). To import torch once, one child process imports
the CLI and forks a process per kill (before any torch work, so forking is safe). Models are tiny
random Llamas; data a small CSV.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from safetensors.numpy import load_file, save_file
from typer.testing import CliRunner

from rangelens import provenance
from rangelens.activations.models import LoadedModel
from rangelens.artifacts import STAGE, atomic_dir, atomic_path, clean_stale_temps, write_text
from rangelens.cli import app
from rangelens.config import AnalysisConfig
from rangelens.erasure.plots import erasure_bars
from rangelens.erasure.plots import save_figure as save_png
from rangelens.errors import RangelensError
from rangelens.explain import save_results
from rangelens.pipeline import analyze, load_config, run
from rangelens.report import build_atlas, figures
from rangelens.report.atlas import atlas_is_current
from rangelens.report.server import AtlasServer

KILLER = """
import os, signal, sys, time
from pathlib import Path
import rangelens.cli
mode, config, out, targets = sys.argv[1], sys.argv[2], Path(sys.argv[3]), sys.argv[4:]
def wrap(real, target):
    def move(src, dst, *args, **kwargs):
        if Path(dst).name == target:
            if mode == "pause":
                (out.parent / "ready").write_text("")
                time.sleep(120)
            os.kill(os.getpid(), signal.SIGKILL)
        return real(src, dst, *args, **kwargs)
    return move
for target in targets:
    pid = os.fork()
    if pid == 0:
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        os.replace, os.rename = wrap(os.replace, target), wrap(os.rename, target)
        sys.argv = ["rangelens", "run", config, "--quiet"]
        try:
            rangelens.cli.app()
        finally:
            os._exit(3)
    if mode == "pause":
        print(pid, flush=True)
    _, status = os.waitpid(pid, 0)
    marks = (".rangelens-", "-tmp-", "-old-")
    left = sum(1 for p in out.rglob("*") if any(m in p.name for m in marks))
    print(target, os.waitstatus_to_exitcode(status), left, flush=True)
"""
TEMP_MARKS = (".rangelens-", "-tmp-", "-old-")


def killer(mode: str, config: Path, *targets: str) -> subprocess.Popen[str]:
    """``rangelens run CONFIG`` once per target, each killed (or paused, for ``mode='pause'``) when
    that target is about to be renamed into place; prints ``target exit-code n-temporaries``."""
    out = load_config(config).out
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, "-c", KILLER, mode, str(config), str(out), *targets]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if any(m in p.name for m in TEMP_MARKS)]


def error_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), output
    return lines[0]


@pytest.fixture
def config_path(tmp_path: Path, corpus: Path, tiny_model_dir: Path) -> Path:
    data = {
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
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def same_run(a: Path, b: Path) -> None:
    """Two runs hold the same results (arrays, tables, ranges), whatever their timings."""
    for name in ("capture/features.safetensors", "capture/stats.safetensors"):
        left, right = load_file(str(a / name)), load_file(str(b / name))
        assert left.keys() == right.keys()
        for key in left:
            np.testing.assert_array_equal(left[key], right[key])
    ranges = ("ranges.safetensors", "ranges.json", "rankings.csv", "distribution.csv")
    for name in ranges:
        assert (a / "ranges" / name).read_bytes() == (b / "ranges" / name).read_bytes()
    pd.testing.assert_frame_equal(
        pd.read_csv(a / "erasure" / "erasure.csv"), pd.read_csv(b / "erasure" / "erasure.csv")
    )


def test_kill_at_each_stage_then_resume_gives_the_same_results(
    tmp_path: Path, config_path: Path
) -> None:
    config = load_config(config_path)
    reference = run(config.model_copy(update={"out": tmp_path / "reference"}), progress=False)
    out = config.out
    targets = ("stats.safetensors", "ranges", "erasure", "atlas")  # mid-capture, then each stage
    stdout, err = killer("kill", config_path, *targets).communicate(timeout=900)
    kills = [line.split() for line in stdout.splitlines()]
    assert [k[:2] for k in kills] == [[t, str(-signal.SIGKILL)] for t in targets], err
    assert all(int(k[2]) > 0 for k in kills), kills  # each kill left a temporary behind
    res = CliRunner().invoke(app, ["run", str(config_path), "--quiet"])
    assert res.exit_code == 0, res.output
    same_run(reference.run_dir, out)
    assert (out / "atlas" / "index.html").is_file()
    assert leftovers(out) == []


def test_a_second_process_on_a_run_directory_gets_a_one_line_error(
    tmp_path: Path, config_path: Path
) -> None:
    proc = killer("pause", config_path, "stats.safetensors")
    try:
        assert proc.stdout is not None
        pid = int(proc.stdout.readline())  # the forked run, paused inside the capture stage
        while not (tmp_path / "ready").exists():
            assert proc.poll() is None, proc.communicate()[1]
            time.sleep(0.1)
        res = CliRunner().invoke(app, ["run", str(config_path), "--quiet"])
        assert res.exit_code == 2
        line = error_line(res.output)
        assert "in use by another rangelens process" in line and f"pid {pid}" in line
    finally:
        os.kill(pid, signal.SIGKILL)
        proc.communicate(timeout=60)


def test_concurrent_writers_of_one_stage_never_fail_or_leave_temporaries(tmp_path: Path) -> None:
    final = tmp_path / "stage"

    def write(i: int) -> None:
        with atomic_dir(final, STAGE) as tmp:
            (tmp / "stage.json").write_text(f'{{"format": "rangelens.stage/1", "i": {i}}}')
            (tmp / "data.txt").write_text(str(i) * 1000)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(write, range(200)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stage"]
    assert sorted(p.name for p in final.iterdir()) == ["data.txt", "stage.json"]


# ------------------------------------------------------------------ damaged or stale stages


@pytest.fixture
def analysis(tmp_path: Path, corpus: Path) -> AnalysisConfig:
    return AnalysisConfig(
        model="tiny-llama", dataset=str(corpus), label_column="topic", max_length=32
    )


def test_damaged_stages_are_redone_with_a_notice(
    tmp_path: Path, analysis: AnalysisConfig, tiny_llama: LoadedModel, capsys
) -> None:
    out = tmp_path / "run"
    first = analyze(analysis, out, lm=tiny_llama, progress=False)
    features = out / "capture" / "features.safetensors"
    features.write_bytes(features.read_bytes()[:100])  # truncated
    (out / "ranges" / "ranges.json").unlink()
    capsys.readouterr()
    second = analyze(analysis, out, lm=tiny_llama, progress=False)
    notes = capsys.readouterr().err
    assert "capture" in notes and "ranges" in notes and "redoing it" in notes
    np.testing.assert_array_equal(first.capture.features, second.capture.features)
    assert (out / "ranges" / "ranges.json").is_file()
    build_atlas(out)  # reads every stage back


HOLD = """
import os, signal, sys, time
from pathlib import Path
from rangelens.artifacts import atomic_dir
final = Path(sys.argv[1])
with atomic_dir(final) as tmp:
    (tmp / "half.html").write_text("x")
    if sys.argv[2] == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    (final.parent / "ready").write_text("")
    time.sleep(120)
"""


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path: Path) -> None:
    final = tmp_path / "atlas"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    died = subprocess.run([sys.executable, "-c", HOLD, str(final), "die"], env=env)
    assert died.returncode == -signal.SIGKILL
    (dead,) = tmp_path.iterdir()
    live = subprocess.Popen([sys.executable, "-c", HOLD, str(final), "hold"], env=env)
    try:
        while not (tmp_path / "ready").exists():
            assert live.poll() is None
            time.sleep(0.1)
        foreign = tmp_path / ".atlas-tmp-user"
        foreign.mkdir()
        with atomic_dir(final) as tmp:
            (tmp / "index.html").write_text("ok")
        names = {p.name for p in tmp_path.iterdir()}
        assert dead.name not in names and foreign.name in names
        assert len(names) == 4  # atlas, ready, foreign and the live process's temporary
    finally:
        live.kill()
        live.wait()
    assert clean_stale_temps(tmp_path) != []  # its process is gone now


def test_files_and_directories_follow_the_umask_and_are_flushed(tmp_path: Path) -> None:
    synced: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(fd)
        real_fsync(fd)

    old_mask = os.umask(0o027)
    os.fsync = fsync  # type: ignore[assignment]
    try:
        write_text(tmp_path / "a.txt", "hello")
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "f.txt").write_text("x")
    finally:
        os.umask(old_mask)
        os.fsync = real_fsync
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o750
    assert len(synced) >= 3  # the file, the directory's file, and the parent directory


# ----------------------------------------------------------------------- --out refusals


@pytest.fixture
def small_run(tmp_path: Path, analysis: AnalysisConfig, tiny_llama: LoadedModel) -> Path:
    out = tmp_path / "run"
    analyze(analysis, out, lm=tiny_llama, progress=False)
    return out


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_report_never_deletes_what_rangelens_did_not_make(small_run: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "thesis.tex").write_text("precious")
    before = snapshot(small_run)
    runner = CliRunner()
    for out in (victim, small_run, tmp_path, small_run / "capture"):
        res = runner.invoke(app, ["report", str(small_run), "--out", str(out)])
        assert res.exit_code == 2, (out, res.output)
        assert "refusing to replace" in error_line(res.output)
    assert (victim / "thesis.tex").read_text() == "precious"
    assert snapshot(small_run) == before
    assert leftovers(tmp_path) == []


def test_report_out_onto_the_current_directory_is_refused(
    small_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    res = CliRunner().invoke(app, ["report", str(small_run), "--out", "."])
    assert res.exit_code == 2 and "refusing" in error_line(res.output)
    assert list(here.iterdir()) == [] and leftovers(tmp_path) == []


def test_force_replaces_only_rangelens_directories(small_run: Path, tmp_path: Path) -> None:
    explained = tmp_path / "explained"
    save_results(explained, [], [], {"model": "tiny"})
    runner = CliRunner()
    refused = runner.invoke(app, ["report", str(small_run), "--out", str(explained)])
    assert refused.exit_code == 2 and "--force" in error_line(refused.output)
    forced = runner.invoke(app, ["report", str(small_run), "--out", str(explained), "--force"])
    assert forced.exit_code == 0, forced.output
    assert (explained / "atlas.json").is_file()
    again = runner.invoke(app, ["report", str(small_run), "--out", str(explained)])
    assert again.exit_code == 0, again.output  # an atlas replaces an atlas
    staged = tmp_path / "staged"  # explanations written by a run's explanations stage
    save_results(staged, [], [], {})
    (staged / "stage.json").write_text('{"format": "rangelens.stage/1", "stage": "explanations"}')
    save_results(staged, [], [], {"model": "tiny"})  # explanations replace explanations
    for out in (small_run, tmp_path):  # never the run, even with --force
        res = runner.invoke(app, ["report", str(small_run), "--out", str(out), "--force"])
        assert res.exit_code == 2 and "refusing" in error_line(res.output)


def test_explain_refuses_a_foreign_output_before_doing_anything(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "notes.md").write_text("mine")
    with pytest.raises(RangelensError, match="refusing to replace"):
        save_results(victim, [], [], {})
    res = CliRunner().invoke(
        app, ["explain", "--model", "no-such-model", "--neurons", "1", "--out", str(victim)]
    )
    assert res.exit_code == 2 and "refusing to replace" in error_line(res.output)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["victim"]
    assert (victim / "notes.md").read_text() == "mine"


@pytest.fixture
def immutable() -> Iterator[list[Path]]:
    """Directories made read-only even for root (``chattr +i``), restored afterwards."""
    made: list[Path] = []
    yield made
    for path in made:
        subprocess.run(["chattr", "-i", str(path)], check=False)
        path.chmod(0o755)


def read_only(path: Path, made: list[Path]) -> None:
    path.chmod(0o555)
    if os.geteuid() == 0:
        if shutil.which("chattr") is None:
            pytest.skip("root without chattr cannot make a read-only directory")
        done = subprocess.run(["chattr", "+i", str(path)], capture_output=True)
        if done.returncode != 0:
            pytest.skip("this file system does not support chattr +i")
    made.append(path)


def test_bad_output_locations_are_one_line_errors(
    small_run: Path, tmp_path: Path, immutable: list[Path]
) -> None:
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    locked = tmp_path / "locked"
    locked.mkdir()
    read_only(locked, immutable)
    runner = CliRunner()
    for out, message in (
        (a_file, "is a file"),
        (a_file / "atlas", "is a file"),
        (locked / "atlas", "cannot write"),
    ):
        res = runner.invoke(app, ["report", str(small_run), "--out", str(out)])
        assert res.exit_code == 2, (out, res.output)
        assert message in error_line(res.output)
    assert a_file.read_text() == "x" and list(locked.iterdir()) == []


def test_serve_on_a_read_only_run_is_a_one_line_error(
    small_run: Path, immutable: list[Path]
) -> None:
    read_only(small_run, immutable)
    res = CliRunner().invoke(app, ["serve", str(small_run), "--port", "0"])
    assert res.exit_code == 2 and "cannot write" in error_line(res.output)


# ------------------------------------------------------------------------------ bad input


def test_a_model_directory_without_weights_is_a_one_line_error(
    tmp_path: Path, tiny_model_dir: Path, corpus: Path
) -> None:
    for weights in tiny_model_dir.glob("*.safetensors"):
        weights.unlink()
    out = tmp_path / "out"
    args = ["analyze", "--model", str(tiny_model_dir), "--dataset", str(corpus), "--out", str(out)]
    res = CliRunner().invoke(app, [*args, "--label-column", "topic", "--quiet"])
    assert res.exit_code == 2 and "cannot be loaded" in error_line(res.output)
    assert not out.exists()


def test_an_empty_folder_as_dataset_is_a_one_line_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    args = ["analyze", "--dataset", str(tmp_path / "empty"), "--out", str(out), "--quiet"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2 and "has no texts" in error_line(res.output)
    assert not out.exists()


def test_serve_on_an_impossible_port_is_a_one_line_error(small_run: Path) -> None:
    res = CliRunner().invoke(app, ["serve", str(small_run), "--port", "99999"])
    assert res.exit_code == 2 and "99999" in error_line(res.output)


def test_labels_with_dollar_signs_draw_literally(
    tmp_path: Path, tiny_llama: LoadedModel, corpus: Path
) -> None:
    frame = pd.read_csv(corpus)
    frame["topic"] = frame["topic"].map({"sport": "$x^$", "money": "costs $5 or $6"}).fillna("t")
    frame.to_csv(corpus, index=False)
    config = AnalysisConfig(
        model="tiny-llama", dataset=str(corpus), label_column="topic", max_length=32
    )
    out = tmp_path / "run"
    analyze(config, out, lm=tiny_llama, progress=False)
    atlas = build_atlas(out)
    assert (atlas / "figures" / "overlap.svg").is_file()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "is empty"),
        ("# only a comment\n", "is empty"),
        ("out: x\nanalysis:\n  model: a\n  dataset: [b\n", "line 5, column 1"),
        ("out: x\nanalysis:\n  colour: red\n", "valid: 'model', 'dataset'"),
    ],
)
def test_config_file_errors_say_what_is_wrong(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    res = CliRunner().invoke(app, ["run", str(path), "--quiet"])
    assert res.exit_code == 2 and message in error_line(res.output)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.yaml"]


def test_run_on_a_directory_points_to_report(small_run: Path) -> None:
    res = CliRunner().invoke(app, ["run", str(small_run)])
    assert res.exit_code == 2 and "rangelens report" in error_line(res.output)


def test_an_atlas_is_current_however_its_run_is_spelled(
    small_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    atlas = build_atlas(small_run.resolve())
    monkeypatch.chdir(tmp_path)
    assert atlas_is_current(Path("run"), Path("run") / "atlas")
    assert atlas_is_current(Path("../") / tmp_path.name / "run", atlas)


def test_idle_connections_are_dropped(small_run: Path) -> None:
    server = AtlasServer(build_atlas(small_run), ("127.0.0.1", 0), idle_timeout=0.2)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with socket.create_connection(server.server_address[:2], timeout=20) as conn:
            conn.sendall(b"GET /index.html HTTP/1.1\r\n")  # never finished
            assert conn.recv(1024) == b""  # the server closed it (a hang would time out)
    finally:
        server.shutdown()
        server.server_close()


def test_missing_labels_are_not_a_traceback(
    tmp_path: Path, corpus: Path, tiny_llama: LoadedModel
) -> None:
    frame = pd.read_csv(corpus)
    frame.loc[0, "topic"], frame.loc[1, "topic"], frame.loc[2, "topic"] = None, "", "NA"
    frame.to_csv(corpus, index=False)
    config = AnalysisConfig(
        model="tiny-llama", dataset=str(corpus), label_column="topic", max_length=32
    )
    result = analyze(config, tmp_path / "run", lm=tiny_llama, progress=False)
    assert sorted(result.capture.label_names) == ["money", "sport", "tech"]
    assert len(result.capture.labels) == len(frame) - 3


def test_an_edited_data_file_is_captured_again(
    tmp_path: Path, analysis: AnalysisConfig, corpus: Path, tiny_llama: LoadedModel
) -> None:
    first = analyze(analysis, tmp_path / "run", lm=tiny_llama, progress=False)
    frame = pd.read_csv(corpus)
    frame["text"] = frame["text"].str.upper()  # same path, same rows, new content
    frame.to_csv(corpus, index=False)
    second = analyze(analysis, tmp_path / "run", lm=tiny_llama, progress=False)
    assert first.capture.features is not None and second.capture.features is not None
    assert not np.array_equal(first.capture.features, second.capture.features)


# ------------------------------------------------------- edits that keep size and mtime


def rewrite_keeping_size_and_mtime(path: Path, data: bytes) -> None:
    """Write ``data`` (same length) in place and set the old times back, as ``cp -p``,
    ``rsync -t`` or ``touch -d`` leave a file."""
    before = path.stat()
    assert len(data) == before.st_size
    path.write_bytes(data)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)


@pytest.mark.parametrize("hash_always_below", [None, 0])  # None: the default threshold
def test_a_digest_sees_an_edit_that_keeps_size_and_mtime(
    tmp_path: Path, hash_always_below: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    if hash_always_below is not None:  # the memo of large files (weights) must not be fooled
        monkeypatch.setattr(provenance, "HASH_ALWAYS_BELOW", hash_always_below)
    data = tmp_path / "data.csv"
    data.write_text("text,label\nhello,a\nworld,b\n")
    memo = tmp_path / "digests.json"
    first = provenance.path_digest(data, memo)
    rewrite_keeping_size_and_mtime(data, b"text,label\nhello,b\nworld,a\n")
    assert provenance.path_digest(data, memo) != first
    assert provenance.path_digest(tmp_path, memo) != provenance.fingerprint([("data.csv", first)])


def test_relabelled_data_with_its_old_mtime_is_captured_again(
    tmp_path: Path, analysis: AnalysisConfig, corpus: Path, tiny_llama: LoadedModel
) -> None:
    first = analyze(analysis, tmp_path / "run", lm=tiny_llama, progress=False)
    frame = pd.read_csv(corpus)
    frame["topic"] = frame["topic"].map({"sport": "money", "money": "sport", "tech": "tech"})
    rewrite_keeping_size_and_mtime(corpus, frame.to_csv(index=False).encode())
    second = analyze(analysis, tmp_path / "run", lm=tiny_llama, progress=False)
    assert first.capture.features is not None and second.capture.features is not None
    assert not np.array_equal(first.capture.features, second.capture.features)  # captured again


def test_force_never_replaces_a_stage_or_anything_inside_another_run(
    small_run: Path, tmp_path: Path
) -> None:
    other = tmp_path / "other"
    shutil.copytree(small_run, other)
    save_results(other / "explained", [], [], {"model": "tiny"})  # explanations inside a run
    loose = tmp_path / "loose-capture"  # a stage directory outside any run
    shutil.copytree(other / "capture", loose)
    before, loose_before = snapshot(other), snapshot(loose)
    runner = CliRunner()
    for out in (other / "capture", other / "ranges", other / "explained", loose):
        res = runner.invoke(app, ["report", str(small_run), "--out", str(out), "--force"])
        assert res.exit_code == 2, (out, res.output)
        line = error_line(res.output)
        assert "refusing to replace" in line and str(out) in line
    res = runner.invoke(app, ["report", str(small_run), "--out", str(other / "capture")])
    assert res.exit_code == 2 and "use --force" not in error_line(res.output)  # it would not help
    assert snapshot(other) == before and snapshot(loose) == loose_before
    assert leftovers(tmp_path) == []


def test_safetensors_artifacts_follow_the_umask(tmp_path: Path) -> None:
    weights = {"w": np.zeros((2, 2), dtype=np.float32)}
    old_mask = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "single.safetensors") as tmp:
            save_file(weights, str(tmp))  # safetensors creates its files -rw-------
        with atomic_dir(tmp_path / "folder") as tmp:
            save_file(weights, str(tmp / "w.safetensors"))
    finally:
        os.umask(old_mask)
    for path in (tmp_path / "single.safetensors", tmp_path / "folder" / "w.safetensors"):
        assert stat.filemode(path.stat().st_mode) == "-rw-r--r--", path
    assert stat.filemode((tmp_path / "folder").stat().st_mode) == "drwxr-xr-x"


# ------------------------------------------------------------------ labels that misbehave

RLO_LABEL = "sport\u202eevil"  # U+202E RIGHT-TO-LEFT OVERRIDE reverses what follows it


def unisolated(text: str) -> str:
    """``text`` without its isolated spans (FSI/LRI/RLI ... PDI, innermost first) and ``<bdi>``."""
    text = re.sub(r"<bdi>.*?</bdi>", "", text, flags=re.S)
    previous = None
    while previous != text:
        previous, text = text, re.sub("[\u2066-\u2068][^\u2066-\u2069]*\u2069", "", text)
    return text


def test_a_right_to_left_override_in_a_label_is_isolated_or_escaped(
    tmp_path: Path, corpus: Path, tiny_model_dir: Path
) -> None:
    frame = pd.read_csv(corpus)
    frame["topic"] = frame["topic"].replace({"sport": RLO_LABEL})
    frame.to_csv(corpus, index=False)
    out = tmp_path / "run"
    args = ["analyze", "--model", str(tiny_model_dir), "--dataset", str(corpus), "--out", str(out)]
    res = CliRunner().invoke(app, [*args, "--label-column", "topic", "--max-length", "32"])
    assert res.exit_code == 0, res.output
    assert "\u202e" not in res.output and "sport\\u202eevil" in res.output  # the terminal table
    pages = {p.name: p.read_text() for p in build_atlas(out).rglob("*.html")}
    assert f"\u2068{RLO_LABEL}\u2069" in pages["concepts.html"]  # e.g. its heading
    for name, page in pages.items():
        assert "\u202e" not in unisolated(page), name


def test_an_emoji_label_draws_without_missing_glyph_warnings(tmp_path: Path) -> None:
    labels = ["sport 🧠", "money 💸", "tech"]
    headline = pd.DataFrame(
        {"concept": [*labels, "average"], "range_target_drop": 0.5, "range_complement_flip": 0.1}
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        figures.save_figure(figures.overlap_figure(labels, np.eye(3), np.eye(3)), tmp_path, "o")
        poly = figures.polysemanticity_figure(labels, np.full(3, 0.5), np.array([1, 2, 2]))
        figures.save_figure(poly, tmp_path, "p")
        save_png(erasure_bars(headline, ["range"], title="erasure of 🧠"), tmp_path / "e.png")
    glyphs = [str(w.message) for w in caught if "glyph" in str(w.message).lower()]
    assert glyphs == [] and (tmp_path / "e.png").is_file()
