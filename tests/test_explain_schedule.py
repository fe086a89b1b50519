"""Neurons explained concurrently (results independent of concurrency), the one limit on requests in
flight, per-neuron results kept and resumed (a killed `explain` resumes), token usage."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import test_explain_clients as scripted
import test_explain_llm as roles_server

from rangelens.errors import RangelensError
from rangelens.explain import ExemplarConfig, make_roles, records_from_activations
from rangelens.explain.api import explain_records
from rangelens.explain.clients import LLM, Usage
from rangelens.explain.offline import offline_roles
from rangelens.explain.records import NeuronRecord
from rangelens.explain.schedule import PartialResults, Schedule

serve = scripted.serve  # the scripted-server fixture
WORDS = ["goal", "match", "team", "cup", "shares", "bank", "market", "phone", "chip", "data"]
SMALL = ExemplarConfig(
    n_top=4, n_quantile_bins=2, n_per_bin=1, n_feedback=4, n_validation=4, n_held_out=6
)


def small_records(n: int) -> list[NeuronRecord]:
    """``n`` neurons over 40 ten-word texts, each firing on two words of its own."""
    rng = np.random.default_rng(0)
    tokens = [f" {w}" for w in rng.choice(WORDS, size=400)]
    ids = np.array([WORDS.index(t.strip()) for t in tokens])
    values = rng.normal(0, 0.05, (len(tokens), n))
    for j in range(n):
        values[:, j] += np.isin(ids, [j % len(WORDS), (3 * j + 1) % len(WORDS)]) * 2.0
    offsets = np.arange(0, 401, 10)
    return records_from_activations(
        values, ids, tokens, offsets, list(range(n)), model="toy", site="mlp", layer=0, config=SMALL
    )


class Tracked:
    """Replies of every role (the judge's and the refiner's invalid: failures to log), each after a
    delay drawn from the prompt's hash so replies come back out of order; counts requests in
    flight at the server."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.busy = self.peak = 0

    def __call__(self, prompt: str) -> str | scripted.Reply:
        with self.lock:
            self.busy += 1
            self.peak = max(self.peak, self.busy)
        time.sleep(hashlib.sha256(prompt.encode()).digest()[0] / 255 * 0.02)
        with self.lock:
            self.busy -= 1
        return roles_server.scripted_roles(prompt)


def explain_at(url: str, concurrency: int, cache: Path, records: list[NeuronRecord]) -> tuple:
    client = scripted.Server.client.__get__(type("S", (), {"url": url})())(
        max_concurrency=concurrency
    )
    roles = make_roles("openai", client, cache_dir=cache, attempts=2)
    llm = roles.explainer.llm  # type: ignore[attr-defined]
    out = explain_records(
        records, roles, rounds=1, semantic=False, schedule=Schedule(concurrency, llm=llm)
    )
    return [e.to_dict() for e in out], llm


def test_results_do_not_depend_on_concurrency_and_in_flight_is_bounded(serve, tmp_path):
    records = small_records(5)
    tracked = Tracked()
    server = serve(tracked)
    one, llm1 = explain_at(server.url, 1, tmp_path / "c1", records)
    assert tracked.peak == 1
    tracked.peak = 0
    many, llm6 = explain_at(server.url, 6, tmp_path / "c6", records)
    assert 1 < tracked.peak <= 6  # neurons and their texts overlap, never beyond the limit
    assert [e["neuron"] for e in many] == [r.neuron for r in records]
    assert any(e["failures"] for e in one)  # failure logs are compared too
    assert many == one
    assert llm6.stats.failures == llm1.stats.failures > 0
    assert llm6.in_flight == 0


def test_usage_is_the_servers_else_estimated_from_characters(serve):
    body = {
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "abcdefgh"}}],
        "usage": {"prompt_tokens": 17, "completion_tokens": 3},
    }
    counted = serve(lambda _p: scripted.Reply(raw=json.dumps(body).encode()))
    llm = LLM(counted.client())
    messages = [{"role": "user", "content": "x" * 40}]
    assert llm.ask(messages, lambda c: c.usage)[0] == Usage(17, 3)
    assert (llm.stats.prompt_tokens, llm.stats.completion_tokens) == (17, 3)
    bare = LLM(serve(lambda _p: "abcdefgh").client())
    assert bare.ask(messages, lambda c: c.usage)[0] == Usage(10, 2, estimated=True)
    assert bare.stats.estimated_requests == 1


def test_kept_neurons_are_loaded_not_recomputed(tmp_path, capsys):
    records = small_records(3)
    roles = offline_roles()
    partial = tmp_path / ".partial"
    first = explain_records(
        records, roles, rounds=1, semantic=False, schedule=Schedule(partial=partial)
    )
    kept = sorted(partial.glob("n*.json"))
    assert len(kept) == 3
    data = json.loads(kept[1].read_text())
    data["explanation"]["modes"][0]["label"] = "TAMPERED"
    kept[1].write_text(json.dumps(data))
    again = explain_records(
        records,
        roles,
        rounds=1,
        semantic=False,
        schedule=Schedule(partial=partial, progress=True),
    )
    assert "resuming: 3 of 3 neurons already explained" in capsys.readouterr().err
    assert [e.to_dict() for e in again][::2] == [e.to_dict() for e in first][::2]
    assert again[1].modes[0].label == "TAMPERED"  # read from its file, not explained again
    other = explain_records(
        records[1:2], roles, rounds=2, semantic=False, schedule=Schedule(partial=partial)
    )
    assert other[0].modes[0].label != "TAMPERED"  # other options: another key, explained anew

    (partial / "notes.txt").write_text("mine")
    PartialResults.remove(partial)
    assert [p.name for p in partial.iterdir()] == ["notes.txt"]  # only rangelens' files removed
    with pytest.raises(RangelensError, match="was not made by rangelens"):
        PartialResults(partial, "")


@pytest.fixture
def topics(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    rows = [
        {"text": "The " + " ".join(rng.choice(WORDS, size=12)) + ".", "label": str(i % 3)}
        for i in range(96)
    ]
    path = tmp_path / "topics.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def _explain(model_dir: Path, csv: Path, out: Path) -> list[str]:
    return [
        sys.executable, "-m", "rangelens.cli", "explain", "--model", str(model_dir),
        "--dataset", str(csv), "--layer", "1", "--neurons", ",".join(map(str, range(10))),
        "--rounds", "1", "--texts-per-class", "32", "--out", str(out),
    ]  # fmt: skip


def _tree(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def test_killed_explain_resumes_without_repeating_finished_neurons(
    tmp_path, tiny_model_dir, topics
):
    out = tmp_path / "out"
    partial = tmp_path / ".out-partial"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(
        _explain(tiny_model_dir, topics, out), env=env, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 300
    while not list(partial.glob("n*.json")) and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "the run ended before it was killed"
    finished = len(list(partial.glob("n*.json")))
    assert 1 <= finished < 10

    resumed = subprocess.run(
        _explain(tiny_model_dir, topics, out), env=env, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming: {finished} of 10 neurons already explained" in resumed.stderr
    assert not partial.exists()  # removed once the results are saved

    whole = subprocess.run(
        _explain(tiny_model_dir, topics, tmp_path / "whole"),
        env=env,
        capture_output=True,
        text=True,
    )
    assert whole.returncode == 0, whole.stderr
    assert "resuming" not in whole.stderr
    assert _tree(out) == _tree(tmp_path / "whole")
