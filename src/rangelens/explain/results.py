"""An explanations directory: ``results.json`` (format ``rangelens.explain.results/1``: metadata and
one summary line per neuron), ``explanations/<neuron>.json`` and ``records/<neuron>.json``;
written atomically, read back by the report and the pipeline (no torch needed to read it)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rangelens.artifacts import EXPLANATIONS, atomic_dir, read_json
from rangelens.errors import RangelensError
from rangelens.explain.evaluation import MethodScores
from rangelens.explain.loop import NeuronExplanation
from rangelens.explain.records import NeuronRecord, write_json
from rangelens.explain.roles import Mode

if TYPE_CHECKING:
    from rangelens.explain.clients import LLM

RESULTS_FORMAT = "rangelens.explain.results/1"


@dataclass
class Explained:
    """An explanations directory's contents (``results.json`` metadata, explanations and exemplar
    records by neuron); ``llm`` is the LLM that made them in this process (None offline or when
    loaded from disk)."""

    metadata: dict[str, Any]
    explanations: dict[int, NeuronExplanation]
    records: dict[int, NeuronRecord]
    llm: LLM | None = None

    @property
    def site(self) -> str | None:
        site = self.metadata.get("site")
        return str(site) if site is not None else None

    def save(self, directory: Path) -> None:
        """Write into ``directory`` (a fresh temporary directory, see :func:`save_results`)."""
        write_results(
            directory, list(self.records.values()), list(self.explanations.values()), self.metadata
        )


def load_explained(directory: Path) -> Explained:
    """Read an explanations directory written by :func:`write_results`."""
    results = read_json(directory / "results.json")
    if results.get("format") != RESULTS_FORMAT:
        raise RangelensError(f"results.json has format {results.get('format')!r}")
    explanations = {}
    for path in sorted((directory / "explanations").glob("*.json")):
        e = NeuronExplanation.load(path)
        explanations[e.neuron] = e
    records = {}
    for path in sorted((directory / "records").glob("*.json")):
        r = NeuronRecord.load(path)
        records[r.neuron] = r
    return Explained(dict(results.get("metadata", {})), explanations, records)


def write_results(
    directory: Path,
    records: Sequence[NeuronRecord],
    explanations: Sequence[NeuronExplanation],
    metadata: dict[str, object],
) -> None:
    """Write ``results.json``, ``records/<neuron>.json`` and ``explanations/<neuron>.json`` into
    ``directory`` (a fresh temporary directory: see :func:`save_results`)."""
    for rec in records:
        rec.save(directory / "records" / f"{rec.neuron}.json")
    for exp in explanations:
        exp.save(directory / "explanations" / f"{exp.neuron}.json")
    write_json(
        directory / "results.json",
        {
            "format": RESULTS_FORMAT,
            "metadata": metadata,
            "neurons": [summary(e) for e in explanations],
        },
    )


def save_results(
    directory: str | os.PathLike[str],
    records: Sequence[NeuronRecord],
    explanations: Sequence[NeuronExplanation],
    metadata: dict[str, object],
    *,
    force: bool = False,
) -> Path:
    """:func:`write_results` into a temporary sibling directory renamed into place, so
    ``directory`` is complete or absent. An existing ``directory`` is replaced only if it holds
    explanations or is empty (``force``: also another kind of rangelens directory; see
    :func:`rangelens.artifacts.check_output_dir`)."""
    with atomic_dir(Path(directory), EXPLANATIONS, force=force) as tmp:
        write_results(tmp, records, explanations, metadata)
    return Path(directory)


def _held(scores: MethodScores | None) -> float | None:
    return None if scores is None else scores.held_out


def summary(e: NeuronExplanation) -> dict[str, object]:
    """One line of ``results.json``: held-out scores of every method, mode count and ranges."""
    return {
        "neuron": e.neuron,
        "backend": e.backend,
        "iterative_held_out": e.iterative.held_out,
        "single_pass_held_out": e.single_pass.held_out,
        "single_pass_first_held_out": _held(e.single_pass_first),
        "control_held_out": _held(e.control),
        "nofeedback_held_out": _held(e.nofeedback),
        "lookup_held_out": _held(e.lookup),
        "iterative_auc": e.iterative.auc,
        "single_pass_auc": e.single_pass.auc,
        "simulator": e.simulator,
        "iterative_semantic_auc": e.iterative.semantic_auc,
        "iterative_semantic_mismatched": e.iterative.semantic_mismatched,
        "iterative_semantic_failure": e.iterative.semantic_failure,
        "n_candidates": e.n_candidates,
        "n_modes": len(e.modes),
        "modes": [{"label": m.label, "lo": m.lo, "hi": m.hi, "score": m.score} for m in e.modes],
        "failures": len(e.failures),
    }


@dataclass
class Context:
    """A window of an exemplar around its peak: readable token pieces, their activations and the
    peak's position in the window."""

    pieces: list[str]
    activations: list[float]
    peak: int

    def text(self) -> str:
        """One line with the peak token in brackets (whitespace collapsed)."""
        shown = [f"[{p.strip() or p}]" if k == self.peak else p for k, p in enumerate(self.pieces)]
        return " ".join("".join(shown).split())


def mode_contexts(mode: Mode, record: NeuronRecord, n: int = 2, width: int = 6) -> list[Context]:
    """The mode's ``n`` strongest exemplars (its evidence), ``width`` tokens each side of the peak."""
    from rangelens.explain.lexical import render

    by_index = {r.text_index: r for r in record.explain_set}
    owned = [by_index[i] for i in mode.exemplars if i in by_index]
    owned.sort(key=lambda r: -r.max_activation)
    out = []
    for r in owned[:n]:
        a, b = max(0, r.peak - width), min(len(r.tokens), r.peak + width + 1)
        out.append(Context(render(r.tokens)[a:b], r.activations[a:b], r.peak - a))
    return out
