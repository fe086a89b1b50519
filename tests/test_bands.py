"""Density bands: known answers on synthetic mixtures, band selection, the RangeMap format (old files
still load) and exact multi-interval masking."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import tiny_model
from scipy import optimize
from scipy import stats as sps

from rangelens.activations.capture import record
from rangelens.activations.sites import resolve_site
from rangelens.errors import RangelensError
from rangelens.intervene import RangeMask, apply_ranges
from rangelens.ranges.bands import intervals_above, silverman_bandwidth
from rangelens.ranges.distribution import distribution_table
from rangelens.ranges.maps import FORMAT_VERSION, RangeMap, fit_ranges
from rangelens.ranges.ranking import rank
from rangelens.ranges.stats import ConceptStats
from rangelens.report.figures import Series, histogram_svg

V1_FIXTURE = Path(__file__).parent / "data" / "ranges_v1"  # written by the format-/1 code


def mixture(columns: list[list[object]], n: int = 3000, seed: int = 0) -> ConceptStats:
    """Stats of ``len(columns[0])`` concepts: ``columns[j][c]`` is concept c's law on neuron j, a
    mean (unit-variance normal) or a tuple of means (an equal mixture of unit normals)."""
    rng = np.random.default_rng(seed)
    n_concepts = len(columns[0])
    labels = np.repeat(np.arange(n_concepts), n)
    acts = rng.normal(size=(labels.size, len(columns)))
    for j, laws in enumerate(columns):
        for c, law in enumerate(laws):
            means = np.atleast_1d(np.asarray(law, dtype=np.float64))
            acts[labels == c, j] += rng.choice(means, n)
    stats = ConceptStats([f"c{c}" for c in range(n_concepts)], len(columns))
    stats.add(acts, labels)
    return stats


def density_map(stats: ConceptStats, **kwargs: object) -> RangeMap:
    return fit_ranges(stats, rank("dprime", stats), method="density", p=1.0, **kwargs)  # type: ignore[arg-type]


def band_of(ranges: RangeMap, concept: int, neuron: int) -> list[tuple[float, float]]:
    (match,) = [r for r in ranges.ranges(concept) if r.neuron == neuron]
    return list(match.intervals)


def mixture_crossing() -> float:
    """Where N(0, 1) meets the equal mixture of N(-4, 1) and N(4, 1) (positive root)."""
    pdf = sps.norm.pdf
    return optimize.brentq(lambda x: pdf(x) - 0.5 * (pdf(x - 4) + pdf(x + 4)), 0.5, 3.5)


# ------------------------------------------------------------------------------- known answers


def test_two_separated_gaussians_split_at_the_likelihood_ratio_threshold() -> None:
    stats = mixture([[-3.0, 3.0], [3.0, -3.0]], n=20000)
    ranges = density_map(stats)
    (lo, hi), *more = band_of(ranges, 1, 0)
    assert not more and hi == np.inf and lo == pytest.approx(0.0, abs=0.1)
    (lo, hi), *more = band_of(ranges, 0, 0)
    assert not more and lo == -np.inf and hi == pytest.approx(0.0, abs=0.1)
    # log f_1 / f_0 = 6x for N(3, 1) vs N(-3, 1): the band of ratio e^3 starts at x = 0.5
    # (kernel smoothing widens both laws by under 7% here).
    (lo, hi), *_ = band_of(density_map(stats, ratio=float(np.exp(3.0))), 1, 0)
    assert hi == np.inf and lo == pytest.approx(0.5, abs=0.1)
    assert ranges.metadata["method"] == "density" and ranges.metadata["ratio"] == 1.0


def test_concept_between_two_others_gets_one_band_between_them() -> None:
    ranges = density_map(mixture([[-4.0, 0.0, 4.0]]))
    edge = mixture_crossing()
    ((lo, hi),) = band_of(ranges, 1, 0)
    assert lo == pytest.approx(-edge, abs=0.15) and hi == pytest.approx(edge, abs=0.15)
    assert band_of(ranges, 0, 0)[0][0] == -np.inf and band_of(ranges, 2, 0)[-1][1] == np.inf


def test_bimodal_concept_gets_two_intervals() -> None:
    stats = mixture([[(-4.0, 4.0), 0.0]])
    ranges = density_map(stats)
    edge = mixture_crossing()
    (a, b), (c, d) = band_of(ranges, 0, 0)
    assert a == -np.inf and d == np.inf
    assert b == pytest.approx(-edge, abs=0.15) and c == pytest.approx(edge, abs=0.15)
    assert ranges.n_intervals.tolist() == [[2], [1]]
    table = distribution_table(stats, ranges)
    # Both intervals count: nearly all of the bimodal concept's rows, few of the other's.
    assert table.loc[0, "coverage"] > 0.95 and table.loc[0, "purity"] > 0.95
    assert table.loc[0, "n_intervals"] == 2


def test_identical_concepts_get_little_band_at_a_high_ratio() -> None:
    stats = mixture([[0.0, 0.0], [1.0, 1.0]])
    table = distribution_table(stats, density_map(stats, ratio=3.0))
    # Sampling noise may leave a sliver of band, never a real share of either concept.
    assert (table["coverage"] < 0.02).all()
    assert (table["coverage"] * table["purity"].fillna(0) < 0.02).all()


def test_empty_bands_mask_nothing_and_have_no_purity() -> None:
    stats = mixture([[0.0, 3.0]], n=200)
    empty = np.full((2, 1, 1), np.nan)
    ranges = RangeMap(
        ["c0", "c1"], [[0], [0]], empty[..., 0], empty[..., 0], np.zeros((2, 1)),
        np.ones((2, 1)), band_lo=empty, band_hi=empty,
    )  # fmt: skip
    assert (ranges.n_intervals == 0).all() and not ranges.single_interval
    table = distribution_table(stats, ranges)
    assert (table["coverage"] == 0).all() and table["purity"].isna().all()
    assert ranges.ranges(0)[0].intervals == () and ranges.ranges(0)[0].contains(0.0) is False


def test_band_selection_keeps_the_separating_neuron() -> None:
    # Neuron 0: large but identical for both concepts; neuron 2 separates them.
    stats = mixture([[50.0, 50.0], [0.0, 0.0], [-3.0, 3.0], [1.0, 1.0]])
    by_rank = fit_ranges(stats, rank("mean_abs", stats), method="density", p=0.25)
    assert by_rank.neurons.tolist() == [[0], [0]]
    for method in ("density", "gaussian"):
        by_band = fit_ranges(
            stats, rank("mean_abs", stats), method=method, p=0.25, select="band", tau=1.0
        )
        assert by_band.neurons.tolist() == [[2], [2]], method
        assert by_band.metadata["select"] == "band"


def test_intervals_above_interpolates_and_opens_the_ends() -> None:
    values = np.array([5.0, 1.0, -1.0, -3.0, 1.0, 3.0, -1.0, 0.0])
    # Read on bins 0..6: runs {0, 1} (open to the left) and {4, 5}; crossings interpolated
    # between bin centres i + 0.5.
    assert intervals_above(values, 0.0, 0, 6) == [(-np.inf, 2.0), (4.25, 6.25)]
    # Read on bins 1..5: the run {4, 5} now reaches the last bin read, so it is open.
    assert intervals_above(values, 0.0, 1, 5) == [(-np.inf, 2.0), (4.25, np.inf)]
    assert intervals_above(values, 10.0, 0, 7) == []


def test_silverman_bandwidth_follows_the_rule_and_floors_at_one_bin() -> None:
    rng = np.random.default_rng(0)
    counts = np.histogram(rng.normal(32, 8, 5000), bins=64, range=(0, 64))[0][None]
    expected = 0.9 * 8 * 5000**-0.2
    assert silverman_bandwidth(counts, np.array([8.0]))[0] == pytest.approx(expected, rel=0.1)
    point = np.zeros((1, 64), dtype=np.int64)
    point[0, 10] = 100
    assert silverman_bandwidth(point, np.array([0.0]))[0] == 1.0


def test_density_needs_two_concepts_with_rows() -> None:
    stats = ConceptStats(["a", "b"], 2)
    stats.add(np.ones((3, 2)), np.zeros(3, dtype=np.int64))
    with pytest.raises(RangelensError, match="without any rows"):
        fit_ranges(stats, np.ones((2, 2)), method="density")


# ------------------------------------------------------------------------------------ the format


def test_density_map_roundtrip_is_exact(tmp_path: Path) -> None:
    ranges = density_map(mixture([[(-4.0, 4.0), 0.0], [-3.0, 3.0]]))
    assert ranges.bands[0].shape == (2, 2, 2) and not ranges.single_interval
    ranges.save(tmp_path / "out")
    header = json.loads((tmp_path / "out" / "ranges.json").read_text())
    assert header["format"] == FORMAT_VERSION == "rangelens.ranges/2"
    loaded = RangeMap.load(tmp_path / "out")
    for name in ("neurons", "lo", "hi", "mean", "std", "band_lo", "band_hi"):
        assert getattr(loaded, name).tobytes() == getattr(ranges, name).tobytes(), name
    assert loaded.ranges(0) == ranges.ranges(0)


def test_format_1_files_still_load(tmp_path: Path) -> None:
    old = RangeMap.load(V1_FIXTURE)
    assert json.loads((V1_FIXTURE / "ranges.json").read_text())["format"] == "rangelens.ranges/1"
    assert old.concepts == ["sports", "world"] and old.metadata["tau"] == 2.0
    assert old.single_interval
    np.testing.assert_array_equal(old.neurons, [[3, 0, 5], [1, 3, 2]])
    np.testing.assert_array_equal(old.lo, [[-1.0, 0.5, -np.inf], [0.0, -2.0, 1.0]])
    np.testing.assert_array_equal(old.bands[0][..., 0], old.lo)
    np.testing.assert_array_equal(old.bands[1][..., 0], old.hi)
    assert old.ranges("world")[2].intervals == ((1.0, 1.0),)
    old.save(tmp_path / "again")  # re-saved in the current format
    assert RangeMap.load(tmp_path / "again").bands[1].tobytes() == old.bands[1].tobytes()


@pytest.mark.parametrize(
    ("band_lo", "band_hi", "message"),
    [
        ([[0.0, np.nan]], [[1.0, 3.0]], "NaN in only one"),
        ([[np.nan, 0.0]], [[np.nan, 1.0]], "unused slot before a used one"),
        ([[2.0, np.nan]], [[1.0, np.nan]], "lo > hi"),
        ([[0.0, 1.0]], [[1.0, 3.0]], "out of order or overlapping"),
        ([[0.0, 2.0]], [[1.0, 3.0]], "lo differs from the outer end"),
    ],
)
def test_range_map_rejects_malformed_bands(band_lo, band_hi, message) -> None:
    lo, hi = (np.array([[0.5]]), np.array([[3.0]])) if "lo differs" in message else (None, None)
    first = np.asarray(band_lo)[:, :1]
    with pytest.raises(RangelensError, match=message):
        RangeMap(
            ["a"],
            np.zeros((1, 1), dtype=np.int64),
            first if lo is None else lo,
            np.array([[3.0]]) if hi is None else hi,
            np.zeros((1, 1)),
            np.ones((1, 1)),
            band_lo=np.asarray(band_lo)[:, None, :],
            band_hi=np.asarray(band_hi)[:, None, :],
        )


# ------------------------------------------------------------------------------------- masking


def union_oracle(
    x: torch.Tensor, neurons: np.ndarray, lo: np.ndarray, hi: np.ndarray, r: np.ndarray, scale=0.0
) -> torch.Tensor:
    """``where(x in union of [lo_s, hi_s], r + scale (x - r), x)`` per (distinct) neuron, by hand."""
    out = x.clone()
    for j, n in enumerate(neurons):
        col = x[..., n]
        inside = torch.zeros_like(col, dtype=torch.bool)
        for a, b in zip(lo[j], hi[j], strict=True):
            if not np.isnan(a):
                bounds = torch.tensor([a, b], dtype=x.dtype)
                inside |= (col >= bounds[0]) & (col <= bounds[1])
        value = torch.tensor(r[j], dtype=x.dtype)
        out[..., n] = torch.where(inside, value + scale * (col - value), col)
    return out


BAND_LO = np.array([[-np.inf, 0.5], [-0.5, np.nan], [np.nan, np.nan], [-1.0, 0.0]])
BAND_HI = np.array([[-1.0, np.inf], [0.5, np.nan], [np.nan, np.nan], [-0.5, 1.5]])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_multi_interval_masking_equals_union_oracle(dtype: torch.dtype, mode: str) -> None:
    x = torch.randn(3, 7, 12, generator=torch.Generator().manual_seed(0)).to(dtype)
    before = x.clone()
    neurons, r = np.array([4, 0, 9, 2]), np.array([0.25, -1.0, 3.0, 2.0])
    scale = 0.5 if mode == "soft" else 0.0
    out = apply_ranges(x, neurons, BAND_LO, BAND_HI, r, mode, scale)
    expected = union_oracle(x, neurons, BAND_LO, BAND_HI, r, scale)
    assert torch.equal(out, expected) and out.dtype == dtype
    assert torch.equal(x, before)
    changed = (out != x)[..., neurons].float().mean(dim=(0, 1))
    assert (changed[[0, 1, 3]] > 0.2).all() and changed[2] == 0  # neuron 9: empty band


def test_empty_bands_are_a_bitwise_noop_on_a_model() -> None:
    model = tiny_model("llama", 100)
    site = resolve_site(model, "mlp", 1)
    ids = torch.randint(1, 100, (3, 6), generator=torch.Generator().manual_seed(0))
    empty = np.full((site.width, 2), np.nan)
    mask = RangeMask(site, np.arange(site.width), empty, empty, replacement=5.0)
    with torch.no_grad():
        bare = model(input_ids=ids).logits
        with mask.attach(model):
            masked = model(input_ids=ids).logits
    assert masked.view(torch.int32).equal(bare.view(torch.int32))


def test_density_map_masks_its_bands_on_a_model() -> None:
    model = tiny_model("gpt2", 100)
    site = resolve_site(model, "resid", 1)
    ids = torch.randint(1, 100, (8, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), record(model, [site], stop=False) as store:
        model(input_ids=ids)
    acts = store[site.name].reshape(-1, site.width).double().numpy()
    stats = ConceptStats(["a", "b"], site.width)
    stats.add(acts, (np.arange(len(acts)) % 3 == 0).astype(np.int64))
    ranges = fit_ranges(stats, rank("dprime", stats), method="density", p=0.5)
    mask = RangeMask.from_range_map(site, ranges, "b", stats=stats, replacement="mean")
    assert mask.lo.ndim == 2 or ranges.single_interval
    expected = union_oracle(
        store[site.name],
        ranges.neurons[1],
        *(np.atleast_3d(b)[1] for b in ranges.bands),
        stats.pooled().mean[0][ranges.neurons[1]],
    )
    with torch.no_grad(), mask.attach(model), record(model, [site], stop=False) as masked:
        model(input_ids=ids)
    assert torch.equal(masked[site.name], expected)
    assert not torch.equal(expected, store[site.name])


def test_bad_bands_raise_one_line_errors() -> None:
    x = torch.zeros(2, 4)
    with pytest.raises(RangelensError, match=r"expected \(2,\) or \(2, m\)"):
        apply_ranges(x, [0, 1], np.zeros((3, 2)), np.ones((3, 2)))
    with pytest.raises(RangelensError, match="neuron 1 has a NaN in only one"):
        apply_ranges(x, [0, 1], [[0.0], [np.nan]], [[1.0], [1.0]])
    with pytest.raises(RangelensError, match=r"lo > hi for neuron 3 \(2\.0 > 1\.0\)"):
        apply_ranges(x, [0, 3], [[0.0, np.nan], [0.0, 2.0]], [[1.0, np.nan], [0.5, 1.0]])


def test_histogram_svg_draws_every_interval_of_a_band() -> None:
    edges = np.linspace(-4.0, 4.0, 9)
    counts = np.array([3, 5, 1, 0, 0, 1, 5, 3])
    two = ((-np.inf, -2.1), (2.1, np.inf))
    svg = str(histogram_svg(edges, [Series("a", 0, counts, 0.0, 3.0, two)]))
    group = svg[svg.index('<g class="band"') :]
    group = group[: group.index("</g>")]
    assert group.count("<line") == 2 and "a band [−∞, -2.1] ∪ [2.1, ∞]" in group
    empty = str(histogram_svg(edges, [Series("a", 0, counts, 0.0, 3.0, ())]))
    assert "a band ∅" in empty and empty.count('<g class="band"') == 1


# ------------------------------------------------------------------------------ erasure condition


def test_density_condition_equals_density_ranges_on_the_same_folds(
    tiny_llama, tmp_path: Path
) -> None:
    from test_erasure import KEYWORDS, erase

    conditions = ["range", "neuron", "random", "density"]
    analysis = {"taus": [], "density_ratios": [1.0, 4.0]}
    result = erase(tiny_llama, tmp_path / "four", analysis, ppl_texts=2, conditions=conditions)
    table = result.table
    assert set(table["state"]) == {"base", *conditions}
    assert [row["ratio"] for row in result.info["ratio_sweep"]] == [1.0, 4.0]
    assert "Density bands (likelihood ratio > 1)" in result.info["verdict"]
    assert "diff_density_range_target_drop" in result.headline
    assert (tmp_path / "four" / "pareto.png").stat().st_size > 0
    # The density condition is exactly range masking with range_method 'density': same folds,
    # same neurons, same bands.
    as_range = erase(
        tiny_llama,
        tmp_path / "ranged",
        {"taus": [], "range_method": "density"},
        ppl_texts=2,
        conditions=["range"],
    )
    effects = "drop$|flip$|change$"
    density = table[table["state"] == "density"].filter(regex=effects).reset_index(drop=True)
    ranged = as_range.table[as_range.table["state"] == "range"]
    pd.testing.assert_frame_equal(density, ranged.filter(regex=effects).reset_index(drop=True))
    assert len(density) == len(KEYWORDS)


def test_methods_for_names_the_best_eraser_and_its_ties() -> None:
    from rangelens.erasure.outputs import methods_for

    row: dict[str, float] = {}
    for state, drop in (("range", 0.3), ("neuron", 0.45), ("random", 0.9), ("density", 0.5)):
        row |= {f"{state}_target_drop": drop, f"{state}_target_drop_lo": drop - 0.1}
        row |= {f"{state}_target_drop_hi": drop + 0.1}
    row |= {"diff_density_neuron_target_drop_lo": -0.02, "diff_density_neuron_target_drop_hi": 0.1}
    row |= {"diff_density_range_target_drop_lo": 0.05, "diff_density_range_target_drop_hi": 0.3}
    found = methods_for(row, ["range", "neuron", "random", "density"])
    assert found["best"] == "density" and found["ties"] == ["neuron"]  # random is a control
    assert found["rows"][0]["target_drop"] == "0.30 [0.20, 0.40]"
    assert found["rows"][0]["ppl_change"] == "–"
