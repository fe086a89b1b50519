"""Python API: explain neurons (or a NeuronLens concept range) and save the results atomically."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, get_args

from rangelens.activations.capture import Activations
from rangelens.activations.models import LoadedModel
from rangelens.activations.sites import NeuronSite
from rangelens.config.explain import Backend, ExplainConfig, LLMOptions
from rangelens.errors import RangelensError, choices
from rangelens.explain.clients import LLM, LLMClient, ResponseCache
from rangelens.explain.exemplars import ExemplarConfig, build_records, scaled_config
from rangelens.explain.llm import llm_roles
from rangelens.explain.loop import NeuronExplanation, explain_record, judge_semantics
from rangelens.explain.offline import offline_roles
from rangelens.explain.records import NeuronRecord
from rangelens.explain.results import Explained
from rangelens.explain.roles import Roles
from rangelens.explain.schedule import Schedule, roles_identity, run_neurons
from rangelens.explain.semantic import JUDGE_NAME, SemanticJudge
from rangelens.ranges.maps import ConceptRange

BACKENDS = get_args(Backend)
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
    return _through_llm(backend, client, cache, attempts, n_exemplars=n_exemplars)[0]


def _through_llm(
    backend: str,
    client: LLMClient,
    cache: ResponseCache | None,
    attempts: int,
    **options: Any,
) -> tuple[Roles, LLM]:
    """The LLM roles of ``backend`` over one :class:`LLM` (its cache, attempts and failure counts
    shared by every role), and that LLM."""
    llm = LLM(client, cache, attempts)
    return llm_roles(llm, name=backend, **options), llm


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
            max_reply_mb=options.max_reply_mb,
            max_concurrency=options.concurrency,
        )
    else:
        from rangelens.explain.clients.local_model import TransformersClient, load_chat_model

        same = options.llm_model == lm.name
        client = TransformersClient(lm if same else load_chat_model(options.llm_model))
    cache = ResponseCache(cache_dir)
    return _through_llm(
        options.backend, client, cache, options.max_attempts, simulator=options.simulator_name
    )


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
    concepts: Sequence[str] | None = None,
    partial: Path | None = None,
    progress: bool = False,
    activations: Activations | None = None,
) -> Explained:
    """Explain ``neurons`` of ``site`` (or, with ``ranges``, each concept range: in-range tokens
    are the positive set) on ``texts``, with the exemplar pools sized to the texts, the loop run
    ``config.rounds`` times, and the roles ``config`` asks for; ``concepts[i]`` (text i's class)
    lets the offline labels name a mode by the concept its exemplars share. With an LLM,
    ``config.concurrency`` requests are in flight; finished neurons are kept in ``partial`` (a
    killed run resumes from there); ``progress`` shows the estimate, a live bar and the usage.
    ``activations``: the texts' per-token activations at ``site`` when already captured (else one
    capture pass)."""
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
            concepts=concepts,
            activations=activations,
        )
    schedule = Schedule(
        llm.concurrency if llm is not None else 1,  # offline: sequential (see explain_records)
        partial,
        json.dumps(config.result_inputs(), sort_keys=True),
        progress,
        config.prices,
        llm,
    )
    results = explain_records(records, roles, rounds=config.rounds, schedule=schedule)
    shown = "offline (lexical baseline)" if config.backend == "offline" else config.backend
    scored_by: dict[str, Any] = {
        "simulator": getattr(roles.simulator, "name", config.simulator_name),
        "judges": [j for j in (getattr(roles.judge, "name", None), JUDGE_NAME) if j],
    }
    if llm is not None:  # what this process asked (a resumed run: only the rest)
        scored_by["llm_usage"] = llm.stats.to_dict()
    return Explained(
        {**(metadata or {}), "backend": shown, **scored_by},
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
    semantic: bool = True,
    schedule: Schedule | None = None,
) -> list[NeuronExplanation]:
    """Run NeuronScope + the single-pass baseline (from the top ``single_pass_k`` exemplars; all
    top exemplars by default) on each record, ``schedule.concurrency`` neurons at once (results
    in the records' order and the same at any concurrency; see :mod:`.schedule`), ``on_result``
    called as each finishes; then (``semantic``) every method is scored by the embedding judge
    with its mismatched control (:mod:`rangelens.explain.semantic`). The offline roles run one
    neuron at a time: on two cores, threads made them no faster (``benchmarks/RESULTS.md``)."""
    schedule = schedule or Schedule()
    context = json.dumps([schedule.context, roles_identity(roles), rounds, single_pass_k])
    out = run_neurons(
        records,
        lambda record: explain_record(record, roles, rounds=rounds, single_pass_k=single_pass_k),
        replace(schedule, context=context),
        rounds=rounds,
        on_result=on_result,
    )
    if semantic and out:
        judge_semantics(out, records, SemanticJudge(getattr(roles.clusterer, "embedder", None)))
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
