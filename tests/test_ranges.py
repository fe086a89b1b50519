"""Activation ranges: oracle bounds from numpy, exact save/load, Bhattacharyya and purity checks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy import integrate
from scipy import stats as sps

from rangelens.ranges.distribution import bhattacharyya, distribution_summary, distribution_table
from rangelens.ranges.maps import FORMAT_VERSION, ConceptRange, RangeMap, fit_ranges
from rangelens.ranges.ranking import rank, top_neurons
from rangelens.ranges.stats import ConceptStats

CONCEPTS = ["sports", "world", "science"]


def gaussian_data(
    centres: np.ndarray, n_per: int = 1000, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, ConceptStats]:
    """Per-concept Gaussians: concept c's rows ~ N(centres[c], 1) on every neuron."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(centres)), n_per)
    acts = centres[labels] + rng.normal(size=(labels.size, centres.shape[1]))
    stats = ConceptStats(CONCEPTS[: len(centres)], centres.shape[1])
    stats.add(acts, labels)
    return acts, labels, stats


def one_range_map(
    concept: str, lo: list[float], metadata: dict[str, object] | None = None
) -> RangeMap:
    """A hand-made map with one concept; ``lo`` sets the number of salient neurons."""
    k = len(lo)
    return RangeMap(
        [concept],
        np.zeros((1, k), dtype=np.int64),
        np.array([lo]),
        np.ones((1, k)),
        np.full((1, k), 0.5),
        np.full((1, k), 0.1),
        metadata or {},
    )


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray, ConceptStats]:
    centres = np.random.default_rng(3).normal(scale=2.0, size=(3, 10))
    return gaussian_data(centres)


def test_gaussian_bounds_equal_mean_plus_minus_tau_std(data) -> None:
    acts, labels, stats = data
    scores = rank("mean_abs", stats)
    ranges = fit_ranges(stats, scores, tau=2.5, p=0.3, metadata={"model": "toy"})
    np.testing.assert_array_equal(ranges.neurons, top_neurons(scores, 0.3))
    assert ranges.neurons.shape == (3, 3)
    for c in range(3):
        rows = acts[labels == c][:, ranges.neurons[c]]
        mu, sigma = rows.mean(0), rows.std(0)
        np.testing.assert_allclose(ranges.lo[c], mu - 2.5 * sigma, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(ranges.hi[c], mu + 2.5 * sigma, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(ranges.mean[c], mu, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(ranges.std[c], sigma, rtol=1e-9)
    assert ranges.metadata == {"model": "toy", "tau": 2.5, "p": 0.3, "method": "gaussian"}


def test_zero_spread_gives_finite_point_range() -> None:
    labels = np.repeat([0, 1], 20)
    acts = np.random.default_rng(0).normal(size=(40, 4))
    acts[:, 2] = np.where(labels == 0, 1.5, -0.5)
    stats = ConceptStats(["a", "b"], 4)
    stats.add(acts, labels)
    ranges = fit_ranges(stats, np.tile([0.0, 0.0, 1.0, 0.0], (2, 1)), p=0.25)
    np.testing.assert_array_equal(ranges.neurons, [[2], [2]])
    np.testing.assert_allclose(ranges.lo[:, 0], [1.5, -0.5])
    np.testing.assert_array_equal(ranges.lo, ranges.hi)
    assert np.all(np.isfinite(ranges.lo))


def test_infinite_tau_covers_the_whole_neuron(data) -> None:
    _, _, stats = data
    ranges = fit_ranges(stats, rank("mean_abs", stats), tau=float("inf"))
    assert np.all(ranges.lo == -np.inf) and np.all(ranges.hi == np.inf)


def test_quantile_bounds_close_to_numpy_quantiles(data) -> None:
    acts, labels, stats = data
    ranges = fit_ranges(stats, rank("dprime", stats), method="quantile", coverage=0.9)
    assert ranges.metadata["method"] == "quantile" and ranges.metadata["coverage"] == 0.9
    for c in range(3):
        rows = acts[labels == c][:, ranges.neurons[c]]
        np.testing.assert_allclose(ranges.lo[c], np.quantile(rows, 0.05, axis=0), atol=0.15)
        np.testing.assert_allclose(ranges.hi[c], np.quantile(rows, 0.95, axis=0), atol=0.15)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tau": 0.0}, r"tau must be > 0.*got 0\.0"),
        ({"tau": -1.0}, r"tau must be > 0.*got -1\.0"),
        ({"p": 0.0}, r"p must be in \(0, 1\]; got 0\.0"),
        ({"p": 1.2}, r"p must be in \(0, 1\]; got 1\.2"),
        ({"method": "box"}, r"'box'.*'gaussian', 'quantile', 'density'"),
        ({"select": "best"}, r"unknown selection 'best'; valid: 'ranking', 'band'"),
        ({"method": "density", "ratio": 0.0}, r"threshold must be a finite number > 0; got 0\.0"),
        ({"method": "quantile", "coverage": 1.0}, r"coverage must be in \(0, 1\); got 1\.0"),
    ],
)
def test_fit_ranges_rejects_bad_arguments(data, kwargs, message) -> None:
    _, _, stats = data
    with pytest.raises(ValueError, match=message):
        fit_ranges(stats, rank("mean_abs", stats), **kwargs)


def test_fit_ranges_rejects_empty_concepts_and_bad_score_shapes(data) -> None:
    _, _, stats = data
    with pytest.raises(ValueError, match=r"expected \(3, 10\)"):
        fit_ranges(stats, np.ones((3, 9)))
    empty = ConceptStats(["a", "b"], 4)
    empty.add(np.ones((3, 4)), np.zeros(3, dtype=np.int64))
    with pytest.raises(ValueError, match="without any rows.*'b'"):
        fit_ranges(empty, np.ones((2, 4)))


def test_save_load_roundtrip_is_exact(data, tmp_path: Path) -> None:
    _, _, stats = data
    metadata = {"model": "gpt2", "layer": 11, "site": {"kind": "resid"}, "versions": ["x", 1.5]}
    ranges = fit_ranges(stats, rank("probeless", stats), tau=2.0, p=0.5, metadata=metadata)
    ranges.save(tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "ranges.json",
        "ranges.safetensors",
    ]
    assert json.loads((tmp_path / "out" / "ranges.json").read_text())["format"] == FORMAT_VERSION
    loaded = RangeMap.load(tmp_path / "out")
    assert loaded.concepts == ranges.concepts
    assert loaded.metadata == ranges.metadata
    for name in ("neurons", "lo", "hi", "mean", "std", "band_lo", "band_hi"):
        original, restored = getattr(ranges, name), getattr(loaded, name)
        assert restored.dtype == original.dtype and restored.shape == original.shape
        assert restored.tobytes() == original.tobytes()


def test_save_rejects_unserialisable_metadata_before_writing(tmp_path: Path) -> None:
    ranges = one_range_map("a", [0.0], {"bad": object()})
    with pytest.raises(TypeError):
        ranges.save(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_load_rejects_missing_files_and_unknown_formats(data, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a saved range map"):
        RangeMap.load(tmp_path)
    _, _, stats = data
    fit_ranges(stats, rank("mean_abs", stats)).save(tmp_path)
    header = json.loads((tmp_path / "ranges.json").read_text())
    (tmp_path / "ranges.json").write_text(json.dumps({**header, "format": "other/9"}))
    with pytest.raises(
        ValueError, match=r"'other/9'.*'rangelens\.ranges/1', 'rangelens\.ranges/2'"
    ):
        RangeMap.load(tmp_path)


def test_range_map_rejects_mismatched_shapes() -> None:
    ranges = one_range_map("a", [0.0, 1.0])
    with pytest.raises(ValueError, match=r"lo has shape \(1, 2\); expected \(1, 1\)"):
        RangeMap(["a"], ranges.neurons[:, :1], ranges.lo, ranges.hi, ranges.mean, ranges.std)


def test_ranges_concept_lookup_and_frame(data) -> None:
    _, _, stats = data
    ranges = fit_ranges(stats, rank("mean_abs", stats), p=0.2)
    world = ranges.ranges("world")
    assert world == ranges.ranges(1)
    assert [r.rank for r in world] == [0, 1]
    first = world[0]
    assert isinstance(first, ConceptRange)
    assert first.neuron == ranges.neurons[1, 0] and first.lo == ranges.lo[1, 0]
    assert first.contains(first.mean) is True
    assert first.contains(first.hi + 1.0) is False
    np.testing.assert_array_equal(
        first.contains(np.array([first.lo, first.mean, first.hi, first.lo - 1])),
        [True, True, True, False],
    )
    frame = ranges.to_frame()
    assert list(frame.columns) == [
        "concept", "neuron", "rank", "lo", "hi", "mean", "std", "n_intervals",
    ]  # fmt: skip
    assert (frame["n_intervals"] == 1).all()
    assert len(frame) == 6 and frame["concept"].tolist()[:2] == ["sports", "sports"]
    for bad in ("politics", 3, -1):
        with pytest.raises(ValueError, match=rf"unknown concept {bad!r}; valid: 'sports', 'world'"):
            ranges.concept_index(bad)


def test_bhattacharyya_identical_far_and_point_masses() -> None:
    np.testing.assert_allclose(bhattacharyya(1.3, 0.7, 1.3, 0.7), 1.0)
    assert bhattacharyya(0.0, 1.0, 50.0, 1.0) < 1e-100
    np.testing.assert_array_equal(
        bhattacharyya(np.array([0.0, 0.0, 0.0]), 0.0, np.array([0.0, 1.0, 0.0]), [0.0, 0.0, 1.0]),
        [1.0, 0.0, 0.0],
    )
    assert bhattacharyya(np.zeros((2, 3)), 1.0, 0.0, np.ones(3)).shape == (2, 3)


def test_bhattacharyya_matches_numeric_integral() -> None:
    rng = np.random.default_rng(11)
    mu1, mu2 = rng.normal(size=2)
    s1, s2 = rng.uniform(0.3, 2.0, size=2)
    integral, _ = integrate.quad(
        lambda x: np.sqrt(sps.norm.pdf(x, mu1, s1) * sps.norm.pdf(x, mu2, s2)), -np.inf, np.inf
    )
    np.testing.assert_allclose(bhattacharyya(mu1, s1, mu2, s2), integral, rtol=1e-7)


@given(
    st.floats(-1e3, 1e3),
    st.floats(0.0, 1e3),
    st.floats(-1e3, 1e3),
    st.floats(0.0, 1e3),
)
def test_bhattacharyya_is_symmetric_and_in_unit_interval(mu1, s1, mu2, s2) -> None:
    forward, backward = bhattacharyya(mu1, s1, mu2, s2), bhattacharyya(mu2, s2, mu1, s1)
    assert 0.0 <= forward <= 1.0
    assert forward == backward


def test_separated_concepts_are_pure_and_overlap_little() -> None:
    centres = np.array([[0.0] * 6, [20.0] * 6, [-20.0] * 6])
    _, _, stats = gaussian_data(centres)
    ranges = fit_ranges(stats, rank("dprime", stats), tau=2.0, p=0.5)
    table = distribution_table(stats, ranges)
    assert list(table.columns) == [
        "concept", "neuron", "rank", "mean", "std", "skew", "excess_kurtosis", "lo", "hi",
        "bhattacharyya_max", "bhattacharyya_mean", "purity", "coverage", "n_intervals",
    ]  # fmt: skip
    assert len(table) == 9
    assert table["purity"].min() > 0.98
    assert table["bhattacharyya_max"].max() < 1e-6
    np.testing.assert_allclose(table["coverage"], 0.9545, atol=0.04)
    np.testing.assert_allclose(table["skew"], 0.0, atol=0.3)
    np.testing.assert_allclose(table["excess_kurtosis"], 0.0, atol=0.5)


def test_identical_concepts_have_purity_one_over_c_and_full_overlap() -> None:
    _, _, stats = gaussian_data(np.zeros((3, 5)), n_per=2000)
    table = distribution_table(stats, fit_ranges(stats, rank("mean_abs", stats), p=1.0))
    np.testing.assert_allclose(table["purity"], 1 / 3, atol=0.05)
    assert table["bhattacharyya_mean"].min() > 0.99


def test_distribution_summary_has_concepts_and_overall(data) -> None:
    _, _, stats = data
    table = distribution_table(stats, fit_ranges(stats, rank("mean_abs", stats), p=0.4))
    summary = distribution_summary(table)
    assert summary["concept"].tolist() == [*CONCEPTS, "overall"]
    overall = summary.set_index("concept").loc["overall"]
    assert overall["n_neurons"] == len(table)
    assert overall["median_purity"] == pytest.approx(table["purity"].median())
    assert overall["mean_coverage"] == pytest.approx(table["coverage"].mean())
    assert {"median_skew", "median_excess_kurtosis", "median_bhattacharyya_max"} <= set(summary)


def test_distribution_table_requires_matching_concepts(data) -> None:
    _, _, stats = data
    ranges = one_range_map("x", [0.0])
    with pytest.raises(ValueError, match="differ from the stats concepts"):
        distribution_table(stats, ranges)
