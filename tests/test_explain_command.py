"""Neuron selection of ``rangelens explain`` (ids or a run directory's range map)."""

from __future__ import annotations

import numpy as np
import pytest

from rangelens.errors import RangelensError
from rangelens.explain.command import _neurons
from rangelens.ranges import RangeMap


def test_neuron_ids_and_errors(tmp_path):
    assert _neurons("3, 7,11", None, 5) == [3, 7, 11]
    with pytest.raises(RangelensError, match="comma-separated"):
        _neurons("3,x", None, 5)
    with pytest.raises(RangelensError, match="exactly one"):
        _neurons(None, None, 5)
    with pytest.raises(RangelensError, match="not a saved range map"):
        _neurons(None, tmp_path, 5)


def test_top_salient_neurons_from_run_dir(tmp_path):
    neurons = np.array([[4, 9, 1], [9, 2, 7]])
    zeros = np.zeros(neurons.shape)
    RangeMap(["a", "b"], neurons, zeros, zeros + 1, zeros, zeros).save(tmp_path / "ranges")
    assert _neurons(None, tmp_path, 4) == [4, 9, 2, 1]
