"""Data-parallel capture with torchrun: 2 local gloo workers merge to the single-process result."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from rangelens.activations.models import LoadedModel
from rangelens.ranges.captured import load_capture
from rangelens.ranges.maps import RangeMap


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_two_workers_equal_one_process(tmp_path: Path, tiny_llama: LoadedModel) -> None:
    model_dir = tmp_path / "tiny"
    tiny_llama.model.save_pretrained(model_dir)
    tiny_llama.tokenizer.save_pretrained(model_dir)
    words = {"a": "goal match league", "b": "shares bank profit", "c": "phone chip software"}
    rows = [
        {"text": f"{w} " * (1 + i % 5) + f"item {i}", "label": k}
        for k, w in words.items()
        for i in range(11)
    ]
    corpus = tmp_path / "corpus.csv"
    pd.DataFrame(rows).to_csv(corpus, index=False)
    args = ["analyze", "--model", str(model_dir), "--dataset", str(corpus), "--quiet"]
    # batch size 1: every text's forward is the same computation in both runs, so any difference
    # comes from sharding and merging alone
    args += ["--batch-size", "1", "--position", "mean"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run(
        [sys.executable, "-m", "rangelens.cli", *args, "--out", str(tmp_path / "one")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert single.returncode == 0, single.stderr
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1"]
    torchrun += ["--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    torchrun += ["--master_port", str(free_port()), "-m", "rangelens.cli"]
    multi = subprocess.run(
        [*torchrun, *args, "--out", str(tmp_path / "two")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert multi.returncode == 0, multi.stderr[-2000:]
    one, two = (
        load_capture(tmp_path / "one" / "capture"),
        load_capture(tmp_path / "two" / "capture"),
    )
    assert two.info["workers"] == 2 and one.info["workers"] == 1
    assert two.info["n_tokens"] == one.info["n_tokens"]
    np.testing.assert_array_equal(two.stats.count, one.stats.count)
    for name in ("mean", "var", "skew", "kurtosis", "min", "max", "mean_abs"):
        a, b = getattr(two.stats, name), getattr(one.stats, name)
        scale = np.maximum(np.abs(b), 1e-3)
        assert (np.abs(a - b) / scale).max() < 1e-6, name
    assert two.features is not None and one.features is not None
    np.testing.assert_array_equal(two.features, one.features)
    r1, r2 = RangeMap.load(tmp_path / "one" / "ranges"), RangeMap.load(tmp_path / "two" / "ranges")
    np.testing.assert_array_equal(r1.neurons, r2.neurons)
