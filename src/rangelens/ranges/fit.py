"""The ranges stage's work: rank neurons per concept and fit every range map of a run (site x
split x tau x p, and density bands) once, on the rows each split gives (NeuronLens, Haider et al.,
arXiv 2502.06809); analyse the concept distributions of the headline map.

On disk (``RUN_DIR/ranges/``): the :class:`RangeSet` (``rangeset.json``, ``splits.safetensors``,
``maps/``), the headline :class:`RangeMap` (``ranges.json`` / ``ranges.safetensors``), the scores
(``scores.safetensors``), ``rankings.csv``, ``distribution.csv``, ``summary.csv`` / ``.json`` and
``polysemanticity.csv``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from safetensors.numpy import load_file, save_file

from rangelens.artifacts import read_json, write_json, write_table
from rangelens.config.analysis import AnalysisConfig
from rangelens.errors import RangelensError
from rangelens.ranges.captured import CaptureResult
from rangelens.ranges.distribution import distribution_summary, distribution_table
from rangelens.ranges.maps import RangeMap, fit_ranges
from rangelens.ranges.rangeset import RangeSet, replacement_values, sweep_points
from rangelens.ranges.ranking import polysemanticity, rank
from rangelens.ranges.splits import FULL, Splits, default_splits
from rangelens.ranges.stats import ConceptStats

if TYPE_CHECKING:
    from rangelens.activations.models import LoadedModel
    from rangelens.activations.sites import NeuronSite


@dataclass
class FittedRanges:
    """What the ranges stage produced (loaded back from disk when the stage is reused)."""

    scores: np.ndarray  # (C, d) ranking scores of the headline split at the analysis site
    rangeset: RangeSet
    distribution: pd.DataFrame
    summary: pd.DataFrame
    polysemanticity: pd.DataFrame

    @property
    def range_map(self) -> RangeMap:
        """The headline map, the one the atlas shows: analysis site, split ``full``, the run's tau
        and p."""
        meta = self.rangeset.metadata
        return self.rangeset.map(str(meta["main_site"]), FULL, float(meta["tau"]), float(meta["p"]))

    def save(self, directory: Path, label_names: list[str]) -> None:
        """Write every file of the stage into ``directory``."""
        self.rangeset.save(directory)
        headline = self.range_map
        headline.save(directory)
        save_file({"scores": self.scores}, str(directory / "scores.safetensors"))
        write_table(
            directory / "rankings.csv", ranking_table(self.scores, headline.neurons, label_names)
        )
        write_table(directory / "distribution.csv", self.distribution)
        write_table(directory / "summary.csv", self.summary)
        write_table(directory / "polysemanticity.csv", self.polysemanticity)
        write_json(directory / "summary.json", self.summary.to_dict(orient="records"))


def load_ranges(directory: Path) -> FittedRanges:
    """Load a finished ranges stage (raises if one of its files is missing or damaged)."""
    RangeMap.load(directory)
    pd.read_csv(directory / "rankings.csv")
    read_json(directory / "summary.json")
    return FittedRanges(
        load_file(str(directory / "scores.safetensors"))["scores"],
        RangeSet.load(directory),
        pd.read_csv(directory / "distribution.csv"),
        pd.read_csv(directory / "summary.csv"),
        pd.read_csv(directory / "polysemanticity.csv"),
    )


def ranking_table(scores: np.ndarray, top: np.ndarray, names: list[str]) -> pd.DataFrame:
    rows = [
        {"concept": names[c], "rank": r, "neuron": int(j), "score": float(scores[c, j])}
        for c in range(len(names))
        for r, j in enumerate(top[c])
    ]
    return pd.DataFrame(rows)


class FeatureSource:
    """Per-concept statistics (and pooled features) of chosen rows at each mask site.

    The analysis site reuses the capture's pooled features; other sites (the layer sweep), other
    inputs (a prompt task's prompts) and ``position='tokens'`` are captured with ``lm`` (a loaded
    model, or a function that loads it on first use).
    """

    def __init__(
        self,
        cap: CaptureResult,
        config: AnalysisConfig,
        lm: LoadedModel | Callable[[], LoadedModel] | None = None,
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
            from rangelens.activations.sites import resolve_site

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
        if callable(self.lm):  # loaded on first use: most fits need only the capture
            self.lm = self.lm()
        return self.lm

    def _site(self, name: str) -> NeuronSite:
        from rangelens.activations.sites import resolve_site

        site = self._sites.get(name)
        return site or resolve_site(self._model().model, self.config.site, self.config.layer)

    def stats(self, site: str, rows: np.ndarray) -> tuple[ConceptStats, np.ndarray | None]:
        """Statistics of ``rows`` at ``site`` and their pooled features (None for tokens)."""
        from rangelens.activations.capture import capture, iter_activations

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


def fit_rangeset(
    cap: CaptureResult,
    config: AnalysisConfig,
    metadata: dict[str, object],
    *,
    source: FeatureSource | None = None,
    splits: Splits | None = None,
    ratios: list[float] | None = None,
) -> FittedRanges:
    """Rank neurons per concept and fit every range map (site x split x tau x p), once; analyse the
    concept distributions of the headline map (analysis site, split ``full``, tau, p) over all
    training rows of the analysis split. With ``ratios``, also density bands (site x split x ratio
    x p) on the same neurons as the range maps of that p, for the erasure ``density`` condition."""
    source = source or FeatureSource(cap, config)
    every = (splits or default_splits(cap.train, cap.test)).splits
    points = sweep_points(config.tau, config.p, config.taus, config.ps)
    headline = {"tau": float(config.tau), "p": float(config.p), "main_site": source.main}
    found = RangeSet(splits={s.name: s for s in every}, metadata={**metadata, **headline})
    scores = np.zeros(0)
    for site in source.sites:
        for part in every:
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
    overall, _ = source.stats(source.main, every[0].train)
    table = distribution_table(overall, range_map)
    summary = distribution_summary(table)
    top = range_map.neurons  # the ranking's top p, or the best-separating bands (select 'band')
    poly = pd.DataFrame(
        {"concept": cap.label_names, "n_salient": top.shape[1], "shared": polysemanticity(top)}
    )
    return FittedRanges(scores, found, table, summary, poly)


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
