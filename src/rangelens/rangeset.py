"""The ranges stage: every range map a run fits, saved side by side: one :class:`~rangelens.ranges.RangeMap` per
(mask site, data split, tau, p) (NeuronLens, Haider et al., arXiv 2502.06809, §1).

The ranges stage fits them once; the erasure experiment and the atlas only load them, so what the
atlas shows is what was erased. A *split* is the analysis train/test split (``"full"``) or one fold
of the erasure protocol's repeated stratified k-fold; ranges are fitted on the split's correctly
classified training rows when a classification task exists, else on all its training rows
(``Split.rows`` says which).

On disk (format ``rangelens.rangeset/1``), inside the ``ranges/`` stage::

    rangeset.json                      format, sites, splits (rows used), sweep points, metadata
    splits.safetensors                 <split>.train / .test / .fit row indices (int64)
    maps/<site>/<split>/tau<t>_p<p>/   a RangeMap (ranges.json + ranges.safetensors)
    maps/<site>/<split>/density<r>_p<p>/   density bands at likelihood ratio r (when the erasure
                                       experiment has a ``density`` condition), same neurons
    maps/<site>/<split>/replacement.safetensors   corpus "mean" (d,) and "complement_mean" (C, d)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from safetensors.numpy import load_file, save_file

from rangelens.artifacts import read_json, write_json
from rangelens.capture import capture, iter_activations
from rangelens.errors import RangelensError, choices
from rangelens.models import LoadedModel
from rangelens.ranges import RangeMap, distribution_summary, distribution_table, fit_ranges
from rangelens.ranking import polysemanticity, rank
from rangelens.sites import NeuronSite, resolve_site
from rangelens.stats import ConceptStats

if TYPE_CHECKING:
    from rangelens.analysis import AnalysisConfig, CaptureResult

FORMAT_VERSION = "rangelens.rangeset/1"
FULL = "full"


@dataclass
class Split:
    """Rows of one split: the task trains on ``train``, ranges are fitted on ``fit`` (a subset of
    ``train``), metrics come from ``test``; ``rows`` says how ``fit`` was chosen."""

    name: str
    train: np.ndarray
    test: np.ndarray
    fit: np.ndarray
    rows: str


def point_name(tau: float, p: float) -> str:
    return f"tau{tau:g}_p{p:g}"


def band_name(ratio: float, p: float) -> str:
    return f"density{ratio:g}_p{p:g}"


def band_ratios(config: AnalysisConfig) -> list[float]:
    """Likelihood ratios of the density bands the erasure ``density`` condition masks: the
    headline ``density_ratio`` and the sweep ``density_ratios``."""
    return sorted({float(config.density_ratio), *map(float, config.density_ratios)})


def sweep_points(tau: float, p: float, taus: Iterable[float], ps: Iterable[float]) -> list[tuple]:
    """Every (tau, p) to fit: the headline point and the grid of ``taus`` x ``ps`` around it."""
    all_taus = sorted({float(tau), *map(float, taus)})
    all_ps = sorted({float(p), *map(float, ps)})
    return [(t, q) for q in all_ps for t in all_taus]


def replacement_values(stats: ConceptStats) -> dict[str, np.ndarray]:
    """Per-neuron replacement values of the rows ``stats`` saw: the corpus ``mean`` ``(d,)`` and
    each concept's ``complement_mean`` ``(C, d)`` (mean over the other concepts' rows)."""
    return {
        "mean": np.asarray(stats.pooled().mean[0], dtype=np.float64),
        "complement_mean": np.stack([stats.complement(c)[0] for c in range(len(stats.concepts))]),
    }


@dataclass
class RangeSet:
    """Range maps by ``(site, split, tau, p)``, replacement values by ``(site, split)``, the splits."""

    splits: dict[str, Split] = field(default_factory=dict)
    maps: dict[tuple[str, str, float, float], RangeMap] = field(default_factory=dict)
    replacements: dict[tuple[str, str], dict[str, np.ndarray]] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    bands: dict[tuple[str, str, float, float], RangeMap] = field(default_factory=dict)

    @property
    def sites(self) -> list[str]:
        return list(dict.fromkeys(k[0] for k in self.maps))

    @property
    def points(self) -> list[tuple[float, float]]:
        return list(dict.fromkeys((k[2], k[3]) for k in self.maps))

    @property
    def ratios(self) -> list[float]:
        """Likelihood ratios with saved density bands (empty when none were fitted)."""
        return sorted({k[2] for k in self.bands})

    def band_map(self, site: str, split: str, ratio: float, p: float) -> RangeMap:
        """The density bands at ``ratio`` on the same neurons as the ``(site, split, p)`` maps."""
        key = (site, split, float(ratio), float(p))
        if key not in self.bands:
            raise RangelensError(
                f"no saved density bands for site {site}, split {split}, ratio {ratio:g}, "
                f"p {p:g}; saved ratios: {choices(f'{r:g}' for r in self.ratios)}"
            )
        return self.bands[key]

    def map(self, site: str, split: str, tau: float, p: float) -> RangeMap:
        key = (site, split, float(tau), float(p))
        if key not in self.maps:
            have = sorted({f"{k[0]}/{k[1]}/{point_name(k[2], k[3])}" for k in self.maps})
            raise RangelensError(
                f"no saved range map for site {site}, split {split}, tau {tau:g}, p {p:g}; "
                f"saved: {choices(have[:8])}{' ...' if len(have) > 8 else ''}"
            )
        return self.maps[key]

    def replacement(self, site: str, split: str, kind: str, concept: int) -> np.ndarray:
        """Replacement value of every neuron ``(d,)`` for masking ``concept``: zeros, the corpus
        mean or the concept's complement mean over the split's fitted rows."""
        values = self.replacements[(site, split)]
        if kind == "zero":
            return np.zeros_like(values["mean"])
        if kind == "mean":
            return values["mean"]
        if kind == "complement_mean":
            return np.asarray(values["complement_mean"][concept])
        raise RangelensError(
            f"unknown replacement {kind!r}; valid: 'zero', 'mean', 'complement_mean'"
        )

    def save(self, directory: Path) -> None:
        """Write every map, the replacement values, the split rows and the index."""
        directory = Path(directory)
        for (site, split, tau, p), range_map in self.maps.items():
            range_map.save(directory / "maps" / site / split / point_name(tau, p))
        for (site, split, ratio, p), range_map in self.bands.items():
            range_map.save(directory / "maps" / site / split / band_name(ratio, p))
        for (site, split), values in self.replacements.items():
            path = directory / "maps" / site / split / "replacement.safetensors"
            save_file({k: np.ascontiguousarray(v) for k, v in values.items()}, str(path))
        arrays = {
            f"{s.name}.{part}": np.asarray(getattr(s, part), dtype=np.int64)
            for s in self.splits.values()
            for part in ("train", "test", "fit")
        }
        save_file(arrays, str(directory / "splits.safetensors"))
        write_json(
            directory / "rangeset.json",
            {
                "format": FORMAT_VERSION,
                "sites": self.sites,
                "points": [list(pt) for pt in self.points],
                "ratios": self.ratios,
                "splits": {
                    s.name: {"rows": s.rows, "n_train": len(s.train), "n_fit": len(s.fit)}
                    for s in self.splits.values()
                },
                "metadata": self.metadata,
            },
        )

    @classmethod
    def load(cls, directory: Path) -> RangeSet:
        """Read a range set written by :meth:`save`."""
        directory = Path(directory)
        index_path = directory / "rangeset.json"
        if not index_path.is_file():
            raise RangelensError(f"{str(directory)!r} holds no range set (no rangeset.json)")
        index = read_json(index_path)
        if index.get("format") != FORMAT_VERSION:
            raise RangelensError(
                f"{str(index_path)!r} has format {index.get('format')!r}; valid: {FORMAT_VERSION!r}"
            )
        arrays = load_file(str(directory / "splits.safetensors"))
        out = cls(metadata=index.get("metadata", {}))
        for name, info in index["splits"].items():
            train, test, fit = (arrays[f"{name}.{part}"] for part in ("train", "test", "fit"))
            out.splits[name] = Split(name, train, test, fit, info["rows"])
        for site in index["sites"]:
            for name in out.splits:
                base = directory / "maps" / site / name
                for tau, p in index["points"]:
                    out.maps[(site, name, float(tau), float(p))] = RangeMap.load(
                        base / point_name(tau, p)
                    )
                    for ratio in index.get("ratios", []):
                        out.bands[(site, name, float(ratio), float(p))] = RangeMap.load(
                            base / band_name(ratio, p)
                        )
                out.replacements[(site, name)] = load_file(str(base / "replacement.safetensors"))
        return out


class FeatureSource:
    """Per-concept statistics (and pooled features) of chosen rows at each mask site.

    The analysis site reuses the capture's pooled features; other sites (the layer sweep), other
    inputs (a prompt task's prompts) and ``position='tokens'`` are captured with ``lm``.
    """

    def __init__(
        self,
        cap: CaptureResult,
        config: AnalysisConfig,
        lm: LoadedModel | None = None,
        inputs: list[str] | None = None,
        *,
        max_length: int | None = None,
        padding_side: str | None = None,
    ) -> None:
        self.cap, self.config, self.lm, self.inputs = cap, config, lm, inputs
        self.raw = inputs is None  # the dataset texts, as captured
        self.max_length = max_length or config.max_length
        self.padding_side = padding_side or config.padding_side
        self.main = str(cap.info["site"])
        self._sites: dict[str, NeuronSite | None] = {self.main: None}
        if config.layers:
            model = self._model().model
            self._sites = {resolve_site(model, config.site, config.layer).name: None}
            for layer in config.layers:
                site = resolve_site(model, config.site, layer)
                self._sites.setdefault(site.name, site)
            self._sites[self.main] = resolve_site(model, config.site, config.layer)
        self._features: dict[str, np.ndarray] = {}

    @property
    def sites(self) -> list[str]:
        return list(self._sites)

    def _model(self) -> LoadedModel:
        if self.lm is None:
            raise RangelensError("this range fit needs the model (layer sweep or new inputs)")
        return self.lm

    def _site(self, name: str) -> NeuronSite:
        site = self._sites.get(name)
        return site or resolve_site(self._model().model, self.config.site, self.config.layer)

    def stats(self, site: str, rows: np.ndarray) -> tuple[ConceptStats, np.ndarray | None]:
        """Statistics of ``rows`` at ``site`` and their pooled features (None for tokens)."""
        cap, config = self.cap, self.config
        labels = cap.labels[rows]
        raw_main = site == self.main and self.raw
        if raw_main and np.array_equal(rows, cap.train):
            return cap.stats, None if cap.features is None else cap.features[rows]
        stats = ConceptStats(cap.label_names, cap.stats.n_neurons, n_bins=config.n_bins)
        if raw_main and cap.features is not None:
            stats.add(cap.features[rows], labels)
            return stats, cap.features[rows]
        if self.inputs is None:
            self.inputs = list(config.load_data().texts)
        texts = self.inputs
        pooled = config.position != "tokens"
        if pooled and site not in self._features:  # every text once, then any rows
            lm, where = self._model(), self._site(site)
            self._features[site] = np.asarray(
                capture(
                    lm,
                    texts,
                    [where],
                    position=config.position,
                    batch_size=config.batch_size,
                    max_length=self.max_length,
                    padding_side=self.padding_side,
                    progress=False,
                ).acts[where.name],
                dtype=np.float32,
            )
        if pooled:
            features = self._features[site][rows]
            stats = ConceptStats(cap.label_names, features.shape[1], n_bins=config.n_bins)
            stats.add(features, labels)
            return stats, features
        where = self._site(site)
        stats = ConceptStats(cap.label_names, where.width, n_bins=config.n_bins)
        for batch in iter_activations(
            self._model(),
            [texts[i] for i in rows],
            [where],
            position="tokens",
            batch_size=config.batch_size,
            max_length=self.max_length,
            padding_side=self.padding_side,
            progress=False,
        ):
            stats.add(batch.acts[where.name].numpy(), labels[batch.rows])
        return stats, None


@dataclass
class RangesPlan:
    """How the ranges stage picks its rows when a classification task exists (built by the erasure
    protocol): ``inputs`` are JSON-able and enter the stage fingerprint; ``make`` returns the
    feature source and the splits (each with the rows its ranges are fitted on)."""

    inputs: dict[str, object]
    make: Callable[[CaptureResult], tuple[FeatureSource, list[Split]]]


def default_splits(cap: CaptureResult) -> list[Split]:
    return [
        Split(FULL, cap.train, cap.test, cap.train, "all training rows (no classification task)")
    ]


def run_ranges(
    cap: CaptureResult,
    config: AnalysisConfig,
    metadata: dict[str, object],
    *,
    source: FeatureSource | None = None,
    splits: list[Split] | None = None,
    ratios: list[float] | None = None,
) -> tuple[np.ndarray, RangeSet, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Rank neurons per concept and fit every range map (site x split x tau x p), once; analyse the
    concept distributions of the headline map (analysis site, split ``full``, tau, p) over all
    training rows of the analysis split. With ``ratios``, also density bands (site x split x ratio
    x p) on the same neurons as the range maps of that p, for the erasure ``density`` condition."""
    source = source or FeatureSource(cap, config)
    splits = splits or default_splits(cap)
    if splits[0].name != FULL:
        raise RangelensError(f"the first split must be {FULL!r}; got {splits[0].name!r}")
    points = sweep_points(config.tau, config.p, config.taus, config.ps)
    headline = {"tau": float(config.tau), "p": float(config.p), "main_site": source.main}
    found = RangeSet(splits={s.name: s for s in splits}, metadata={**metadata, **headline})
    scores = np.zeros(0)
    for site in source.sites:
        for part in splits:
            stats, features = source.stats(site, part.fit)
            labels = cap.labels[part.fit]
            ranked = rank(config.ranking, stats, features, labels, seed=config.seed)
            where = {
                **metadata,
                "site_name": site,
                "split": part.name,
                "rows": part.rows,
                "n_rows_per_concept": dict(zip(cap.label_names, stats.count.tolist(), strict=True)),
            }
            for tau, p in points:
                found.maps[(site, part.name, tau, p)] = fit_ranges(
                    stats,
                    ranked,
                    tau=tau,
                    p=p,
                    method=config.range_method,
                    ratio=config.density_ratio,
                    select=config.select,
                    metadata=where,
                )
            for ratio in ratios or []:
                for p in dict.fromkeys(q for _, q in points):
                    found.bands[(site, part.name, ratio, p)] = fit_ranges(
                        stats,
                        ranked,
                        p=p,
                        method="density",
                        ratio=ratio,
                        select=config.select,
                        metadata=where,
                    )
            found.replacements[(site, part.name)] = replacement_values(stats)
            if site == source.main and part.name == FULL:
                scores = ranked
    range_map = found.map(source.main, FULL, config.tau, config.p)
    overall, _ = source.stats(source.main, splits[0].train)
    table = distribution_table(overall, range_map)
    summary = distribution_summary(table)
    top = range_map.neurons  # the ranking's top p, or the best-separating bands (select 'band')
    poly = pd.DataFrame(
        {"concept": cap.label_names, "n_salient": top.shape[1], "shared": polysemanticity(top)}
    )
    return scores, found, table, summary, poly


def overlap_statement(summary: pd.DataFrame, n_concepts: int) -> str:
    """A plain sentence on how separated the concept distributions are (median Bhattacharyya
    max-overlap: 1 = identical Gaussians; median purity against chance 1/C)."""
    row = summary.set_index("concept").loc["overall"]
    bc, purity, chance = (
        float(row["median_bhattacharyya_max"]),
        float(row["median_purity"]),
        1 / n_concepts,
    )
    if bc >= 0.9:
        shape = "overlap almost completely"
    elif bc >= 0.6:
        shape = "overlap substantially"
    else:
        shape = "are mostly separated"
    near = purity < chance + 0.5 * (1 - chance) * 0.2
    pure = (
        f"median purity {purity:.2f} is near chance (1/C = {chance:.2f}): a range holds other "
        f"concepts' rows about as often as its own"
        if near
        else f"median purity {purity:.2f} is above chance (1/C = {chance:.2f})"
    )
    return (
        f"Concept distributions on the salient neurons {shape} (median Bhattacharyya max-overlap "
        f"{bc:.2f}; 1 = identical, 0 = disjoint); {pure}."
    )
