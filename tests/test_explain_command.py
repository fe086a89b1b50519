"""Neuron selection of ``rangelens explain`` (ids, or a run directory's range map)."""

from __future__ import annotations

import numpy as np
from typer.testing import CliRunner

from rangelens.cli import app
from rangelens.ranges.maps import RangeMap


def test_neuron_ids_and_errors() -> None:
    runner = CliRunner()
    bad = runner.invoke(app, ["explain", "--neurons", "3,x"])
    assert bad.exit_code == 2 and "neurons" in bad.output and "'x'" in bad.output, bad.output
    none = runner.invoke(app, ["explain"])
    assert none.exit_code == 2 and "give --neurons" in none.output, none.output
    concept = runner.invoke(app, ["explain", "--neurons", "1", "--concept", "a"])
    assert concept.exit_code == 2 and "--concept needs --run-dir" in concept.output


def test_top_salient_neurons_round_robin(tmp_path) -> None:
    neurons = np.array([[4, 9, 1], [9, 2, 7]])
    zeros = np.zeros(neurons.shape)
    RangeMap(["a", "b"], neurons, zeros, zeros + 1, zeros, zeros).save(tmp_path / "ranges")
    assert RangeMap.load(tmp_path / "ranges").top_neurons(4) == [4, 9, 2, 1]
    assert RangeMap.load(tmp_path / "ranges").top_neurons(10) == [4, 9, 2, 1, 7]
