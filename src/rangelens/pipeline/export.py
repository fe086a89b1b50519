"""Shareable results: a run exported to a self-describing folder that ``huggingface_hub`` can push
(``upload_folder(folder_path=OUT, repo_id=..., repo_type="dataset")``) and that rangelens loads back.

Layout of ``OUT`` (``rangelens export RUN_DIR OUT``)::

    export.json               format, source run, rangelens version, headline, file list
    README.md                 dataset card: YAML front matter (tags, configs of the Parquet tables),
                              the config, the headline and how to load it back
    config.json               the run's resolved configuration
    ranges.parquet            the headline range map: concept, rank, neuron, lo, hi, mean, std
    distribution.parquet      per-(concept, neuron) distribution table (skew, overlap, purity, ...)
    erasure_effects.parquet   per concept x condition x effect: estimate, lo, hi (if erasure ran)
    erasure_table.parquet     the full erasure table (if erasure ran)
    explanations.parquet      one row per explained neuron's mode (if explanations exist)
    neurons/<neuron>.json     per-neuron JSON in a Neuronpedia-like shape
    run/                      the run itself (run.json and its stages, not the atlas), so that
                              ``rangelens report OUT`` and :func:`load_export` read it as a run
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from safetensors.numpy import load_file, save_file

from rangelens.artifacts import EXPORT, atomic_dir, read_json, write_json, write_text
from rangelens.errors import RangelensError
from rangelens.explain.results import Explained, load_explained
from rangelens.pipeline.tables import effects
from rangelens.ranges.maps import RangeMap
from rangelens.report.contents import RunContents, load_run, page_neurons, shift_plan
from rangelens.report.output_side import OutputSide, compute_output_side
from rangelens.rundir import EXPORTED_RUN, STAGES, RunDir, run_root

EXPORT_FORMAT = "rangelens.export/1"
RUN_FILES = ("run.json",)
FEATURES = "capture/features.safetensors"  # also holds labels and splits; "features" is optional
TOKENS = "capture/tokens.safetensors"  # per-token activations: exported only with "features"


def _frame_file(tmp: Path, name: str, frame: pd.DataFrame) -> str:
    frame.to_parquet(tmp / name, index=False)
    return name


def _copy_run(run_dir: Path, dest: Path, features: bool) -> None:
    dest.mkdir()
    for name in RUN_FILES:
        shutil.copy2(run_dir / name, dest / name)
    for stage in STAGES:
        src = run_dir / stage
        if src.is_dir():
            shutil.copytree(src, dest / stage, ignore=shutil.ignore_patterns(".*"))
    if not features and (dest / FEATURES).is_file():  # per-text activations stay private
        arrays = load_file(str(dest / FEATURES))
        arrays.pop("features", None)
        save_file(arrays, str(dest / FEATURES))
    if not features:  # and per-token ones (explanations of the run then capture their own)
        (dest / TOKENS).unlink(missing_ok=True)


def _explanation_rows(found: Explained) -> pd.DataFrame:
    rows = []
    for j, e in sorted(found.explanations.items()):
        for i, m in enumerate(e.modes):
            rows.append(
                {
                    "neuron": j,
                    "mode": i,
                    "label": m.label,
                    "explanation": m.explanation,
                    "lo": m.lo,
                    "hi": m.hi,
                    "mode_score": m.score,
                    "held_out_r": e.iterative.held_out,
                    "single_pass_r": e.single_pass.held_out,
                    "backend": e.backend,
                }
            )
    return pd.DataFrame(rows)


def _float(x: Any) -> float | None:
    value = float(x)
    return value if np.isfinite(value) else None


def neuron_json(run: RunContents, neuron: int, side: OutputSide) -> dict[str, Any]:
    """One neuron in a Neuronpedia-like shape: ``modelId``, ``layer`` (``<layer>-<site>``),
    ``index``, ``explanations``, ``activations`` (top exemplars: ``tokens``, ``values``),
    ``pos_str`` / ``pos_values`` and ``neg_str`` / ``neg_values`` (top promoted / suppressed
    tokens), ``density`` (the share of texts of each concept inside its range) and the concept
    ranges and statistics rangelens adds, with ``next_token_shift`` (what masking the neuron's
    range does to the next-token distribution on held-out text, when computed)."""
    config = run.config
    out: dict[str, Any] = {
        "modelId": str(config.get("model")),
        "layer": f"{config.get('layer')}-{config.get('site')}",
        "index": int(neuron),
        "explanations": [],
        "activations": [],
        "pos_str": [],
        "pos_values": [],
        "neg_str": [],
        "neg_values": [],
        "ranges": [],
        "density": {},
    }
    found = run.explanations
    if found is not None and run.explained_here():
        e = found.explanations.get(neuron)
        if e is not None:
            out["explanations"] = [
                {
                    "description": m.explanation,
                    "label": m.label,
                    "lo": m.lo,
                    "hi": m.hi,
                    "score": m.score,
                }
                for m in e.modes
            ]
        record = found.records.get(neuron)
        if record is not None:
            out["activations"] = [
                {"tokens": r.tokens, "values": r.activations, "maxValue": r.max_activation}
                for r in record.top
            ]
    tokens = side.of(neuron)
    if tokens is not None:
        out["pos_str"] = [t for t, _ in tokens["promoted"]]
        out["pos_values"] = [v for _, v in tokens["promoted"]]
        out["neg_str"] = [t for t, _ in tokens["suppressed"]]
        out["neg_values"] = [v for _, v in tokens["suppressed"]]
    shift = side.shift_of(neuron)
    if shift is not None:
        out["next_token_shift"] = {**side.shift_about, **shift.as_dict()}
    if run.ranges is not None:
        rmap = run.ranges.range_map
        for c, name in enumerate(rmap.concepts):
            for r in rmap.ranges(c):
                if r.neuron == neuron:
                    out["ranges"].append(
                        {
                            "concept": name,
                            "rank": r.rank,
                            "lo": _float(r.lo),
                            "hi": _float(r.hi),
                            "mean": _float(r.mean),
                            "std": _float(r.std),
                        }
                    )
        if run.capture is not None:
            stats = run.capture.stats
            for item in out["ranges"]:
                c = rmap.concept_index(item["concept"])
                if item["lo"] is not None and item["hi"] is not None:
                    lo = np.full(stats.n_neurons, item["lo"])
                    hi = np.full(stats.n_neurons, item["hi"])
                    out["density"][item["concept"]] = _float(stats.mass_in(lo, hi)[c, neuron])
    return out


def _card(meta: dict[str, Any], files: list[str], headline: list[dict[str, Any]]) -> str:
    config = meta.get("config", {})
    tables = [f for f in files if f.endswith(".parquet")]
    front = {
        "tags": ["rangelens", "interpretability", "neuron-ranges"],
        "configs": [{"config_name": f.removesuffix(".parquet"), "data_files": f} for f in tables],
    }
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).strip(),
        "---",
        "",
        f"# rangelens results: {config.get('model')} on {config.get('dataset')}",
        "",
        "Concept ranges of neurons (NeuronLens, arXiv 2502.06809), range-masking erasure and "
        "NeuronScope-style explanations (arXiv 2601.03671), exported by "
        f"[rangelens](https://github.com/) {meta.get('rangelens')}.",
        "",
        f"Site `{config.get('site')}`, layer {config.get('layer')}, position "
        f"`{config.get('position')}`; ranking `{config.get('ranking')}`, tau {config.get('tau')}, "
        f"p {config.get('p')}.",
        "",
        "## Headline",
        "",
    ]
    if headline:
        lines += ["| concept | condition | effect | estimate [95% CI] |", "|---|---|---|---|"]
        lines += [
            f"| {h['concept']} | {h['condition']} | {h['effect']} | "
            f"{h['estimate']:.3f} [{h['lo']:.3f}, {h['hi']:.3f}] |"
            for h in headline
        ]
    else:
        lines.append("No erasure experiment in this run.")
    lines += [
        "",
        "## Files",
        "",
        *[f"- `{f}`" for f in files],
        "",
        "## Load it back",
        "",
        "```python",
        "import rangelens",
        'shared = rangelens.load_export("path/or/hub-id")  # a folder, or a hub dataset id',
        "shared.range_map, shared.effects, shared.neurons[0]",
        "```",
        "",
        "`rangelens report OUT` builds the atlas from the run inside (`run/`).",
        "",
        "## Config",
        "",
        "```yaml",
        yaml.safe_dump(config, sort_keys=True).strip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def export_run(
    run_dir: str | Path,
    out: str | Path,
    *,
    output_side: str = "auto",
    features: bool = False,
    force: bool = False,
) -> Path:
    """Write a shareable, self-describing folder of a run to ``out`` (layout in the module
    docstring) and return it. ``output_side``: top promoted / suppressed tokens per neuron and
    the next-token shift of its range mask (``auto``: when the model is cheap to load);
    ``features``: include the pooled per-text activations and the capture's per-token sample. An
    existing ``out`` is replaced only if it is an earlier export (or empty)::

        export_run("runs/demo", "shared/demo")
        # huggingface_hub.upload_folder(folder_path="shared/demo", repo_id=..., repo_type="dataset")
    """
    source = RunDir(run_dir)
    source.require()
    run = load_run(source.root)
    plan = shift_plan(run) if output_side != "off" else None
    side = compute_output_side(run.config, page_neurons(run), mode=output_side, shifts=plan)
    with atomic_dir(Path(out), EXPORT, force=force, keep=[source.root]) as tmp:
        files: list[str] = []
        write_json(tmp / "config.json", run.config)
        files.append("config.json")
        if run.ranges is not None:
            files.append(_frame_file(tmp, "ranges.parquet", run.ranges.range_map.to_frame()))
            files.append(_frame_file(tmp, "distribution.parquet", run.ranges.distribution))
        headline: list[dict[str, Any]] = []
        if run.erasure is not None:
            frame = effects(run.erasure.result)
            files.append(_frame_file(tmp, "erasure_effects.parquet", frame))
            files.append(_frame_file(tmp, "erasure_table.parquet", run.erasure.table))
            top = frame[
                (frame.concept == "average")
                & frame.effect.isin(["target_drop", "complement_flip", "ppl_change"])
            ]
            headline = top.dropna(subset=["estimate"]).to_dict(orient="records")
        if run.explanations is not None:
            files.append(
                _frame_file(tmp, "explanations.parquet", _explanation_rows(run.explanations))
            )
        neurons = tmp / "neurons"
        neurons.mkdir()
        for j in page_neurons(run):
            write_json(neurons / f"{j}.json", neuron_json(run, j, side), allow_nan=False)
        files.append("neurons/")
        _copy_run(source.root, tmp / EXPORTED_RUN, features)
        files.append(f"{EXPORTED_RUN}/")
        meta = {
            "format": EXPORT_FORMAT,
            "rangelens": metadata.version("rangelens"),
            "exported": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "source": str(source.root.resolve()),
            "config": run.config,
            "output_side": side.note or "computed",
            "headline": headline,
            "files": files,
        }
        write_text(tmp / "README.md", _card(meta, files, headline))
        write_json(tmp / "export.json", meta)
    return Path(out)


@dataclass
class SharedRun:
    """An export loaded back: the tables as DataFrames, the range map, per-neuron JSON, and the
    run inside (``run_dir``: give it to :func:`~rangelens.pipeline.load_analysis` or
    :func:`~rangelens.report.build_atlas`)."""

    path: Path
    meta: dict[str, Any]
    range_map: RangeMap | None
    tables: dict[str, pd.DataFrame]
    neurons: dict[int, dict[str, Any]]
    explained: Explained | None

    @property
    def run_dir(self) -> Path:
        return self.path / EXPORTED_RUN

    @property
    def config(self) -> dict[str, Any]:
        return dict(self.meta.get("config", {}))

    @property
    def effects(self) -> pd.DataFrame | None:
        return self.tables.get("erasure_effects")


def _download(repo_id: str) -> Path:
    """A hub dataset repository's snapshot (one-line error when the hub cannot be reached)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as err:
        raise RangelensError(
            f"{repo_id!r} is not a local export folder, and loading from the hub needs "
            f"huggingface_hub (pip install huggingface-hub)"
        ) from err
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise RangelensError(
            f"{repo_id!r} is not a local export folder and the Hugging Face hub cannot be "
            f"reached (offline mode: HF_HUB_OFFLINE is set)"
        )
    try:
        return Path(snapshot_download(repo_id, repo_type="dataset"))
    except Exception as err:  # offline, unknown repo, no permission: many exception types
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise RangelensError(
            f"{repo_id!r} is not a local export folder and the Hugging Face hub cannot be "
            f"reached or has no such dataset ({first})"
        ) from err


def load_export(source: str | Path) -> SharedRun:
    """Load an export folder (``rangelens export``), or a hub dataset id holding one::

    shared = load_export("shared/demo")
    shared.effects.query("concept == 'average'")
    """
    path = Path(source).expanduser()
    if not path.exists():
        path = _download(str(source))
    if not EXPORT.marks(path):
        raise RangelensError(
            f"{str(source)!r} is not a rangelens export (no export.json); make one with "
            f"`rangelens export RUN_DIR OUT`"
        )
    meta = read_json(path / "export.json")
    tables = {f.stem: pd.read_parquet(f) for f in sorted(path.glob("*.parquet"))}
    run = run_root(path)
    ranges = RangeMap.load(run / "ranges") if (run / "ranges" / "ranges.json").is_file() else None
    neurons = {int(f.stem): read_json(f) for f in (path / "neurons").glob("*.json")}
    explained = None
    if (run / "explanations" / "results.json").is_file():
        explained = load_explained(run / "explanations")
    return SharedRun(path, meta, ranges, tables, dict(sorted(neurons.items())), explained)
