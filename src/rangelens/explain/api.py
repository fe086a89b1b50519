"""Python API: explain neurons (or a NeuronLens concept range) and save the results atomically."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

from rangelens.artifacts import EXPLANATIONS, atomic_dir
from rangelens.errors import RangelensError, choices
from rangelens.explain.clients import LLM, LLMClient, ResponseCache
from rangelens.explain.exemplars import ExemplarConfig, build_records
from rangelens.explain.llm import llm_roles
from rangelens.explain.loop import NeuronExplanation, explain_record
from rangelens.explain.offline import offline_roles
from rangelens.explain.protocol import MethodScores
from rangelens.explain.records import NeuronRecord, write_json
from rangelens.explain.roles import Roles
from rangelens.models import LoadedModel
from rangelens.ranges import ConceptRange
from rangelens.sites import NeuronSite

BACKENDS = ("offline", "openai", "local")
RESULTS_FORMAT = "rangelens.explain.results/1"
DEFAULT_EXEMPLARS = ExemplarConfig()


def make_roles(
    backend: str = "offline",
    client: LLMClient | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    attempts: int = 3,
    n_exemplars: int = 6,
) -> Roles:
    """Roles for ``backend``: ``offline`` needs nothing; ``openai`` / ``local`` need ``client``,
    run through one :class:`LLM` (``attempts`` tries per step; validated replies cached under
    ``cache_dir`` when given)."""
    if backend not in BACKENDS:
        raise RangelensError(f"unknown backend {backend!r}; valid: {choices(BACKENDS)}")
    if backend == "offline":
        return offline_roles()
    if client is None:
        raise RangelensError(f"backend {backend!r} needs an LLM client")
    cache = ResponseCache(cache_dir) if cache_dir is not None else None
    return llm_roles(LLM(client, cache, attempts), name=backend, n_exemplars=n_exemplars)


def explain_records(
    records: Sequence[NeuronRecord],
    roles: Roles,
    *,
    rounds: int = 4,
    single_pass_k: int | None = None,
    on_result: Callable[[NeuronExplanation], None] | None = None,
) -> list[NeuronExplanation]:
    """Run NeuronScope + the single-pass baseline (from the top ``single_pass_k`` exemplars; all
    top exemplars by default) on each record."""
    out = []
    for record in records:
        result = explain_record(record, roles, rounds=rounds, single_pass_k=single_pass_k)
        if on_result is not None:
            on_result(result)
        out.append(result)
    return out


def explain_neurons(
    lm: LoadedModel,
    texts: Sequence[str],
    site: NeuronSite,
    neurons: Sequence[int],
    *,
    roles: Roles | None = None,
    rounds: int = 4,
    config: ExemplarConfig = DEFAULT_EXEMPLARS,
    max_length: int = 64,
) -> tuple[list[NeuronRecord], list[NeuronExplanation]]:
    """Build exemplars for ``neurons`` of ``site`` (one capture pass) and explain each neuron."""
    records = build_records(lm, texts, site, neurons, config=config, max_length=max_length)
    return records, explain_records(records, roles or offline_roles(), rounds=rounds)


def explain_range(
    lm: LoadedModel,
    texts: Sequence[str],
    site: NeuronSite,
    concept_range: ConceptRange,
    *,
    roles: Roles | None = None,
    rounds: int = 4,
    config: ExemplarConfig = DEFAULT_EXEMPLARS,
    max_length: int = 64,
) -> tuple[NeuronRecord, NeuronExplanation]:
    """Explain a NeuronLens concept range: the signal explained and scored is the 0/1 indicator of
    a token's activation on ``concept_range.neuron`` lying in ``[lo, hi]`` (in-range tokens are the
    positive set)."""
    lo, hi = concept_range.lo, concept_range.hi
    if not lo <= hi:
        raise RangelensError(f"range lower bound {lo} is above its upper bound {hi}")
    (record,) = build_records(
        lm,
        texts,
        site,
        [concept_range.neuron],
        config=config,
        target_range=(lo, hi),
        max_length=max_length,
    )
    return record, explain_record(record, roles or offline_roles(), rounds=rounds)


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
        "lookup_held_out": _held(e.lookup),
        "iterative_auc": e.iterative.auc,
        "single_pass_auc": e.single_pass.auc,
        "n_candidates": e.n_candidates,
        "n_modes": len(e.modes),
        "modes": [{"label": m.label, "lo": m.lo, "hi": m.hi, "score": m.score} for m in e.modes],
        "failures": len(e.failures),
    }
