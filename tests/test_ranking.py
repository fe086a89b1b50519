"""Neuron rankers: each finds a planted salient neuron; scores match numpy oracles on raw data."""

from __future__ import annotations

import numpy as np
import pytest

from rangelens.ranges.ranking import RANKING_METHODS, polysemanticity, rank, top_neurons
from rangelens.ranges.stats import ConceptStats

N_CONCEPTS, D, PLANTED_NEURON, PLANTED_CONCEPT = 3, 12, 3, 1


def planted(n: int = 600, d: int = D, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Standard normal activations; neuron 3 is shifted by +4 on concept 1's rows."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % N_CONCEPTS
    acts = rng.normal(size=(n, d))
    acts[labels == PLANTED_CONCEPT, PLANTED_NEURON] += 4.0
    return acts, labels


def stats_of(acts: np.ndarray, labels: np.ndarray, n_concepts: int = N_CONCEPTS) -> ConceptStats:
    stats = ConceptStats([f"c{i}" for i in range(n_concepts)], acts.shape[1])
    stats.add(acts, labels)
    return stats


@pytest.mark.parametrize("method", RANKING_METHODS)
def test_each_ranker_puts_planted_neuron_first(method: str) -> None:
    acts, labels = planted()
    scores = rank(method, stats_of(acts, labels), acts, labels, seed=0)
    assert scores.shape == (N_CONCEPTS, D)
    assert np.all(np.isfinite(scores))
    assert top_neurons(scores, 1 / D)[PLANTED_CONCEPT, 0] == PLANTED_NEURON


def test_stat_rankers_match_numpy_oracles() -> None:
    acts, labels = planted()
    stats = stats_of(acts, labels)
    means = np.stack([acts[labels == c].mean(0) for c in range(N_CONCEPTS)])
    stds = np.stack([acts[labels == c].std(0) for c in range(N_CONCEPTS)])
    mean_abs = np.stack([np.abs(acts[labels == c]).mean(0) for c in range(N_CONCEPTS)])
    probeless = np.abs(means[:, None, :] - means[None, :, :]).sum(1)
    rest_mean = np.stack([acts[labels != c].mean(0) for c in range(N_CONCEPTS)])
    rest_std = np.stack([acts[labels != c].std(0) for c in range(N_CONCEPTS)])
    dprime = np.abs(means - rest_mean) / np.sqrt((stds**2 + rest_std**2) / 2)
    np.testing.assert_allclose(rank("mean_abs", stats), mean_abs, rtol=1e-9)
    np.testing.assert_allclose(rank("probeless", stats), probeless, rtol=1e-9)
    np.testing.assert_allclose(rank("dprime", stats), dprime, rtol=1e-9)


@pytest.mark.parametrize("method", RANKING_METHODS)
def test_concepts_without_rows_score_zero(method: str) -> None:
    acts, labels = planted()
    stats = ConceptStats(["c0", "c1", "c2", "unused"], D)
    stats.add(acts, labels)
    scores = rank(method, stats, acts, labels)
    assert np.all(scores[3] == 0.0)
    assert top_neurons(scores, 1 / D)[PLANTED_CONCEPT, 0] == PLANTED_NEURON


def test_dprime_guards_zero_spread() -> None:
    labels = np.repeat([0, 1], 50)
    acts = np.zeros((100, 3))
    acts[:, 1] = np.where(labels == 0, 1.0, 2.0)  # two distinct point masses
    acts[:, 2] = np.random.default_rng(0).normal(size=100)
    scores = rank("dprime", stats_of(acts, labels, n_concepts=2))
    assert np.all(np.isfinite(scores))
    assert np.all(scores[:, 0] == 0.0)  # identical point masses: nothing separates them
    assert np.all(scores[:, 1] > 1e12)  # perfectly separated: large but finite
    assert np.all(scores[:, 1] > scores[:, 2])


def test_probe_is_deterministic_for_a_seed() -> None:
    acts, labels = planted(n=2000, d=64)
    stats = stats_of(acts, labels)
    first = rank("probe", stats, acts, labels, seed=7)
    np.testing.assert_array_equal(first, rank("probe", stats, acts, labels, seed=7))
    assert np.argmax(first[PLANTED_CONCEPT]) == PLANTED_NEURON


def test_probe_with_two_concepts_shares_one_weight_vector() -> None:
    acts, labels = planted()
    keep = labels < 2
    scores = rank("probe", stats_of(acts[keep], labels[keep], 2), acts[keep], labels[keep])
    np.testing.assert_array_equal(scores[0], scores[1])


def test_probe_needs_features_and_labels() -> None:
    acts, labels = planted()
    with pytest.raises(ValueError, match=r"'probe' needs features.*'mean_abs'"):
        rank("probe", stats_of(acts, labels))
    with pytest.raises(ValueError, match=r"expected \(n, 12\)"):
        rank("probe", stats_of(acts, labels), acts[:, :5], labels)
    with pytest.raises(ValueError, match=r"integers in \[0, 3\)"):
        rank("probe", stats_of(acts, labels), acts, labels + 1)


def test_unknown_method_names_it_and_the_choices() -> None:
    acts, labels = planted()
    with pytest.raises(ValueError, match=r"'nope'.*'dprime', 'mean_abs', 'probeless', 'probe'"):
        rank("nope", stats_of(acts, labels))


@pytest.mark.parametrize(("p", "k"), [(0.3, 4), (0.01, 1), (1.0, 12), (0.5, 6)])
def test_top_neurons_shape_and_order(p: float, k: int) -> None:
    scores = np.random.default_rng(1).normal(size=(N_CONCEPTS, D))
    top = top_neurons(scores, p)
    assert top.shape == (N_CONCEPTS, k)
    assert top.dtype == np.int64
    for c in range(N_CONCEPTS):
        np.testing.assert_array_equal(top[c], np.argsort(-scores[c])[:k])
        assert np.all(np.diff(scores[c, top[c]]) <= 0)


def test_top_neurons_breaks_ties_by_lower_index() -> None:
    np.testing.assert_array_equal(top_neurons(np.array([[1.0, 2.0, 2.0, 0.0]]), 0.5), [[1, 2]])


@pytest.mark.parametrize("p", [0.0, -0.1, 1.5, float("nan")])
def test_top_neurons_rejects_p_outside_unit_interval(p: float) -> None:
    with pytest.raises(ValueError, match=r"p must be in \(0, 1\]; got"):
        top_neurons(np.ones((2, 5)), p)


def test_polysemanticity_hand_computed() -> None:
    top = np.array([[0, 1, 2], [2, 3, 4], [4, 2, 9], [5, 6, 7]])
    # c0 shares {2}; c1 shares {2, 4}; c2 shares {4, 2}; c3 shares nothing.
    np.testing.assert_allclose(polysemanticity(top), [1 / 3, 2 / 3, 2 / 3, 0.0])
