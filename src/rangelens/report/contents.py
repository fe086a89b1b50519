"""What a run directory holds, loaded for the atlas: every stage that exists, and notes on what is
missing or unreadable (a partial run still renders)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd

from rangelens.artifacts import read_json
from rangelens.config.sources import LOADER_KEYS
from rangelens.data import load_texts
from rangelens.erasure.outputs import ErasureResult, load_erasure, records
from rangelens.errors import RangelensError
from rangelens.explain.results import Explained, load_explained
from rangelens.ranges.captured import CaptureResult, load_capture
from rangelens.ranges.distribution import bhattacharyya
from rangelens.ranges.fit import FittedRanges, load_ranges
from rangelens.ranges.maps import RangeMap
from rangelens.report.output_side import OutputSide
from rangelens.report.token_shift import (
    DEFAULT_MASK,
    MASK_OPTIONS,
    N_NEURONS,
    N_TEXTS,
    ShiftPlan,
    choose_targets,
    first_targets,
    held_out_rows,
)
from rangelens.rundir import RunDir

ERASURE_FIGURES = ("erasure_bars.png", "tau_tradeoff.png", "pareto.png")
STAGES = {  # stage -> (the file that marks it as written, how to make it)
    "capture": ("capture.json", "run `rangelens analyze`"),
    "ranges": ("ranges.json", "run `rangelens analyze`"),
    "erasure": (
        "erasure.json",
        "run `rangelens run CONFIG` (or `rangelens demo`) with an erasure section",
    ),
    "explanations": (
        "results.json",
        "run `rangelens explain --run-dir RUN_DIR`",
    ),
}
T = TypeVar("T")


@dataclass
class Erasure:
    """The ``erasure/`` stage (read by :func:`rangelens.erasure.outputs.load_erasure`) and the
    figures it wrote."""

    result: ErasureResult
    figures: list[Path]

    @property
    def table(self) -> pd.DataFrame:
        return self.result.table

    @property
    def summary(self) -> dict[str, Any]:
        """What ``erasure.json`` holds: config, info and the headline rows (NaN as None)."""
        return {
            "config": self.result.config,
            "info": self.result.info,
            "headline": records(self.result.headline),
        }


@dataclass
class TextExemplars:
    """The analysed texts (re-loaded from the run's dataset config), aligned with the pooled
    features of ``capture/``."""

    texts: list[str]
    labels: np.ndarray


@dataclass
class RunContents:
    """Everything of a run the atlas can show; ``missing`` says what is absent and how to get it."""

    run_dir: Path
    meta: dict[str, Any]
    capture: CaptureResult | None = None
    ranges: FittedRanges | None = None
    erasure: Erasure | None = None
    explanations: Explained | None = None
    texts: TextExemplars | None = None
    missing: list[str] = field(default_factory=list)
    output_side: OutputSide | None = None  # set by the atlas builder (it may load the model)

    @property
    def config(self) -> dict[str, Any]:
        return dict(self.meta.get("config", {}))

    @property
    def model(self) -> str:
        return _display_name(self.config.get("model", "unknown model"))

    @property
    def dataset(self) -> str:
        return _display_name(self.config.get("dataset", "unknown dataset"))

    @property
    def concepts(self) -> list[str]:
        if self.capture is not None:
            return list(self.capture.label_names)
        return list(self.ranges.range_map.concepts) if self.ranges is not None else []

    @property
    def site(self) -> str | None:
        if self.capture is not None:
            return str(self.capture.info.get("site"))
        return self.ranges.range_map.metadata.get("site_name") if self.ranges else None

    def explained_here(self) -> bool:
        """Whether the explanations are of the analysed site (so they join its neuron pages)."""
        return self.explanations is not None and self.explanations.site == self.site


def _display_name(source: object) -> str:
    """A model or dataset as named in the config: a local path by its last part, a built-in or hub
    id as is."""
    text = str(source)
    return Path(text).name if text.startswith(("/", ".", "~")) or Path(text).exists() else text


def source_fingerprint(run_dir: Path, explanations: Path) -> str:
    """Hash of what the atlas is built from (stage markers, run.json, explanation results); paths
    are resolved, so every spelling of the same run gives the same hash."""
    digest, where = hashlib.sha256(), RunDir(run_dir)
    for path in (
        where.meta,
        *(where.stage(s) / "stage.json" for s in ("capture", "splits", "ranges", "erasure")),
        explanations / "results.json",
    ):
        digest.update(str(path.resolve()).encode())
        digest.update(path.read_bytes() if path.is_file() else b"-")
    return digest.hexdigest()[:16]


def default_explanations(run_dir: Path) -> Path:
    """Where a run's explanations are looked for unless told otherwise."""
    return RunDir(run_dir).explanations


def load_run(run_dir: Path, explanations: Path | None = None) -> RunContents:
    """Load every stage of ``run_dir`` that exists; explanations are read from ``explanations``
    (default :func:`default_explanations`)."""
    RunDir(run_dir).require()
    where = RunDir(run_dir)
    run = RunContents(run_dir, read_json(where.meta))
    run.capture = _stage(run, "capture", where.capture, load_capture)
    run.ranges = _stage(run, "ranges", where.ranges, load_ranges)
    run.erasure = _stage(run, "erasure", where.erasure, _load_erasure)
    run.explanations = _stage(
        run, "explanations", explanations or default_explanations(run_dir), load_explained
    )
    if run.capture is not None and run.capture.features is not None:
        run.texts = _load_texts(run)
    if run.explanations is not None and run.site is not None and not run.explained_here():
        run.missing.append(
            f"explanations are of site {run.explanations.site!r}, the analysis of "
            f"{run.site!r}: they are shown on their own pages"
        )
    return run


def _stage(run: RunContents, name: str, directory: Path, load: Callable[[Path], T]) -> T | None:
    """``load(directory)``, or None with a note in ``run.missing`` when the stage's marker file is
    absent or the stage cannot be read."""
    marker, hint = STAGES[name]
    if not (directory / marker).is_file():
        state = f"has no {marker}" if directory.is_dir() else "is missing"
        run.missing.append(f"{name}/ {state}: {hint}")
        return None
    try:
        return load(directory)
    except (OSError, ValueError, KeyError, TypeError) as err:  # RangelensError is a ValueError
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        run.missing.append(f"{name}/ could not be read ({first})")
        return None


def _load_erasure(directory: Path) -> Erasure:
    figures = [directory / name for name in ERASURE_FIGURES if (directory / name).is_file()]
    return Erasure(load_erasure(directory), figures)


def _load_texts(run: RunContents) -> TextExemplars | None:
    """The analysed texts in capture order, or None (with a note) when they cannot be re-loaded."""
    found = _read_texts(run)
    if isinstance(found, str):
        run.missing.append(f"exemplar texts are unavailable: {found}")
        return None
    return found


def _read_texts(run: RunContents) -> TextExemplars | str:
    """The analysed texts in capture order, or why they cannot be re-loaded."""
    assert run.capture is not None
    cfg = run.config
    try:
        data = load_texts(cfg["dataset"], **{k: cfg[k] for k in LOADER_KEYS if k in cfg})
    except (RangelensError, OSError, KeyError) as err:
        return str(err).splitlines()[0]
    if len(data) != len(run.capture.labels) or not np.array_equal(data.labels, run.capture.labels):
        return "the dataset no longer matches the run"
    return TextExemplars(data.texts, data.labels)


def shift_plan(run: RunContents, n_texts: int = N_TEXTS) -> ShiftPlan | str:
    """What the next-token shift of each page neuron's range mask is computed from (see
    :mod:`rangelens.report.token_shift`): up to ``n_texts`` texts of the test split, which the
    headline ranges were not fitted on, masked as the erasure masked; or why it cannot be."""
    if run.ranges is None or run.capture is None:
        return "not computed: the run has no ranges"
    texts = run.texts if run.texts is not None else _read_texts(run)
    if isinstance(texts, str):
        return f"not computed: the held-out texts are unavailable ({texts})"
    rows = held_out_rows(run.capture.test, run.capture.labels, n_texts)
    if not rows:
        return "not computed: the run's test split is empty"
    erased = run.erasure.result.config if run.erasure is not None else {}
    mask = {k: erased.get(k, DEFAULT_MASK[k]) for k in MASK_OPTIONS}
    range_map = run.ranges.range_map
    targets = choose_targets(range_map, run.ranges.scores, page_neurons(run))
    found = run.explanations
    explained = sorted(found.explanations) if found is not None and run.explained_here() else []
    picked = first_targets(range_map, targets, explained, N_NEURONS)
    return ShiftPlan(
        range_map,
        picked,
        [texts.texts[i] for i in rows],
        f"{len(rows)} texts of the run's test split (not used to fit the ranges)",
        mask,
        run.capture.stats,
        f"not computed for this neuron: the atlas computes it for {N_NEURONS} neurons (the "
        f"explained ones, then the most salient, round-robin over concepts) to stay quick; "
        f"rangelens.next_token_shift gives it for any mask"
        if len(picked) < len(targets)
        else None,
    )


def salient_overlap(range_map: RangeMap) -> np.ndarray:
    """Jaccard overlap ``(C, C)`` of the concepts' salient-neuron sets."""
    sets = [set(row.tolist()) for row in range_map.neurons]
    return np.array([[len(a & b) / max(len(a | b), 1) for b in sets] for a in sets])


def distribution_overlap(capture: CaptureResult, range_map: RangeMap) -> np.ndarray:
    """``(C, C)``: median Bhattacharyya coefficient, over concept r's salient neurons, between r's
    fitted Gaussian and concept c's (1 on the diagonal)."""
    stats = capture.stats
    mean, std = np.asarray(stats.mean), np.asarray(stats.std)
    out = np.empty((len(range_map.concepts),) * 2)
    for r, neurons in enumerate(range_map.neurons):
        bc = bhattacharyya(mean[r, neurons], std[r, neurons], mean[:, neurons], std[:, neurons])
        out[r] = np.median(bc, axis=1)
    return out


def page_neurons(run: RunContents) -> list[int]:
    """The neurons of the analysed site that get a page: salient ones and explained ones."""
    found = set(concepts_per_neuron(run.ranges.range_map)) if run.ranges is not None else set()
    if run.explanations is not None and run.explained_here():
        found |= set(run.explanations.explanations) | set(run.explanations.records)
    return sorted(found)


def concepts_per_neuron(range_map: RangeMap) -> dict[int, list[int]]:
    """For each salient neuron, the concepts (indices) it is salient for."""
    out: dict[int, list[int]] = {}
    for c, row in enumerate(range_map.neurons):
        for j in row.tolist():
            out.setdefault(int(j), []).append(c)
    return dict(sorted(out.items()))
