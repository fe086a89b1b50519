"""Python API: explain neurons (or a NeuronLens concept range) and save the results atomically."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

from rangelens.activations.models import LoadedModel
from rangelens.activations.sites import NeuronSite
from rangelens.artifacts import EXPLANATIONS, atomic_dir, read_json
from rangelens.config.explain import Backend, ExplainConfig, LLMOptions
from rangelens.errors import RangelensError, choices
from rangelens.explain.clients import LLM, LLMClient, ResponseCache
from rangelens.explain.evaluation import MethodScores
from rangelens.explain.exemplars import ExemplarConfig, build_records, scaled_config
from rangelens.explain.llm import llm_roles
from rangelens.explain.loop import NeuronExplanation, explain_record
from rangelens.explain.offline import offline_roles
from rangelens.explain.records import NeuronRecord, write_json
from rangelens.explain.roles import Roles
from rangelens.ranges.maps import ConceptRange

BACKENDS = get_args(Backend)
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


def roles_for(options: LLMOptions, lm: LoadedModel, cache_dir: Path) -> tuple[Roles, LLM | None]:
    """The roles ``options`` ask for, and the :class:`LLM` behind them (None offline). The local
    backend reuses ``lm`` when ``llm_model`` names it; validated replies are cached in
    ``cache_dir``."""
    if options.backend == "offline":
        return offline_roles(), None
    client: LLMClient
    if options.backend == "openai":
        from rangelens.explain.clients.openai_server import OpenAIClient

        client = OpenAIClient(
            options.base_url,
            options.llm_model,
            api_key_env=options.api_key_env,
            timeout=options.timeout,
        )
    else:
        from rangelens.explain.clients.local_model import TransformersClient, load_chat_model

        same = options.llm_model == lm.name
        client = TransformersClient(lm if same else load_chat_model(options.llm_model))
    llm = LLM(client, ResponseCache(cache_dir), options.max_attempts)
    return llm_roles(llm, name=options.backend, simulator=options.simulator), llm


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


def explain_site(
    lm: LoadedModel,
    texts: Sequence[str],
    site: NeuronSite,
    config: ExplainConfig,
    *,
    neurons: Sequence[int] = (),
    ranges: Sequence[ConceptRange] = (),
    seed: int = 0,
    max_length: int = 64,
    batch_size: int = 16,
    cache_dir: Path,
    metadata: dict[str, Any] | None = None,
) -> Explained:
    """Explain ``neurons`` of ``site`` (or, with ``ranges``, each concept range: in-range tokens
    are the positive set) on ``texts``, with the exemplar pools sized to the texts, the loop run
    ``config.rounds`` times, and the roles ``config`` asks for."""
    exemplars = scaled_config(len(texts), seed)
    roles, llm = roles_for(config, lm, cache_dir)
    records: list[NeuronRecord] = []
    targets: list[tuple[list[int], tuple[float, float] | None]] = [
        ([r.neuron], (r.lo, r.hi)) for r in ranges
    ]
    if neurons:
        targets.append((list(neurons), None))
    for ids, target_range in targets:
        records += build_records(
            lm,
            texts,
            site,
            ids,
            config=exemplars,
            target_range=target_range,
            max_length=max_length,
            batch_size=batch_size,
        )
    results = explain_records(records, roles, rounds=config.rounds)
    shown = "offline (lexical baseline)" if config.backend == "offline" else config.backend
    return Explained(
        {**(metadata or {}), "backend": shown},
        {e.neuron: e for e in results},
        {r.neuron: r for r in records},
        llm,
    )


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
