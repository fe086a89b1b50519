"""Many neurons at a served LLM's speed: neurons are explained concurrently, each finished neuron is
kept at once (a killed run resumes where it stopped), and a live bar shows the work.

A neuron's result depends only on its record, the options and the LLM's replies, never on timing or
on other neurons (no shared random state; failures are logged in a fixed order), so the results and
their order are the same at any concurrency. What is in flight is bounded in one place, the
semaphore of :class:`rangelens.explain.clients.LLM`; ``concurrency`` neurons run at once so that
enough requests are waiting to fill it.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from rangelens.artifacts import clean_stale_temps, read_json
from rangelens.errors import RangelensError
from rangelens.explain.budget import estimate, estimate_line, measured_line
from rangelens.explain.clients import LLM
from rangelens.explain.loop import EXPLANATION_FORMAT, NeuronExplanation
from rangelens.explain.records import NeuronRecord, write_json
from rangelens.explain.roles import Roles

PARTIAL_FORMAT = "rangelens.explain.partial/1"


@dataclass
class Schedule:
    """How a batch of neurons is run: ``concurrency`` neurons at once; finished ones kept in
    ``partial`` (resumed from there; None: not kept), keyed by the record, ``context`` (the options
    that decide results) and the roles; with ``progress``, the estimate before, a live bar, and
    the measured requests, tokens (and cost at ``prices`` per million input, output tokens) after.
    ``llm``: the LLM behind the roles (None offline)."""

    concurrency: int = 1
    partial: Path | None = None
    context: str = ""
    progress: bool = False
    prices: tuple[float, float] | None = None
    llm: LLM | None = None


def roles_identity(roles: Roles) -> list[Any]:
    """What decides the roles' answers: their names and kinds, and for LLM roles the client
    (backend, model, generation settings) and attempts."""
    out: list[Any] = [roles.name, getattr(roles.simulator, "name", "")]
    every: list[object] = [roles.decomposer, roles.clusterer, roles.explainer, roles.simulator]
    for role in [*every, roles.refiner, roles.scorer, roles.judge]:
        out.append(type(role).__qualname__)
        llm = getattr(role, "llm", None)
        if isinstance(llm, LLM):
            out.append([llm.client.identity, llm.attempts])
    return out


class PartialResults:
    """Finished neurons of a run not yet saved: one JSON per neuron in ``directory`` (atomic), named
    by a sha256 of the neuron's record and ``context``, so only a neuron explained from the same
    record with the same options and roles is reused. rangelens makes the directory (marker
    ``partial.json``) and removes it (:meth:`remove`); a directory it did not make is refused."""

    MARKER = "partial.json"
    _FILE = re.compile(r"^n-?\d+-[0-9a-f]{64}\.json$")

    def __init__(self, directory: Path, context: str) -> None:
        self.directory = Path(directory)
        self.context = f"{EXPLANATION_FORMAT}|{context}"
        marker = self.directory / self.MARKER
        if self.directory.exists() and not marker.is_file() and any(self.directory.iterdir()):
            raise RangelensError(
                f"{str(self.directory)!r} exists and was not made by rangelens (no "
                f"{self.MARKER}); move it away to explain here"
            )
        if not marker.is_file():
            write_json(marker, {"format": PARTIAL_FORMAT})

    def key(self, record: NeuronRecord) -> str:
        payload = json.dumps([self.context, record.to_dict()], sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    def _path(self, record: NeuronRecord) -> Path:
        return self.directory / f"n{record.neuron}-{self.key(record)}.json"

    def load(self, record: NeuronRecord) -> NeuronExplanation | None:
        """The neuron's kept result, or None (none kept, or unreadable: explained again)."""
        try:
            return NeuronExplanation.from_dict(read_json(self._path(record))["explanation"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def save(self, record: NeuronRecord, result: NeuronExplanation) -> None:
        write_json(self._path(record), {"format": PARTIAL_FORMAT, "explanation": result.to_dict()})

    @classmethod
    def remove(cls, directory: Path) -> None:
        """Delete what rangelens wrote in ``directory`` (its marker, neuron files and temporaries),
        then the directory if that leaves it empty; anything else is left alone."""
        if not (directory / cls.MARKER).is_file():
            return
        clean_stale_temps(directory)
        for path in directory.iterdir():
            if cls._FILE.match(path.name) and path.is_file():
                path.unlink(missing_ok=True)
        (directory / cls.MARKER).unlink(missing_ok=True)
        with suppress(OSError):  # something not ours is inside: left
            directory.rmdir()


class _Bar:
    """The live bar: neurons done of all; with an LLM, requests in flight, tokens/s and failed
    tries, refreshed twice a second."""

    def __init__(self, total: int, done: int, llm: LLM | None, on: bool) -> None:
        self.llm = llm
        self.start = time.perf_counter()
        self.tokens0 = self._tokens()
        self.bar = tqdm(
            total=total,
            initial=done,
            desc="explanations",
            unit="neuron",
            disable=not on,
            leave=False,
            file=sys.stderr,
        )
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        if on and llm is not None:
            self._ticker = threading.Thread(target=self._tick, daemon=True)
            self._ticker.start()

    def _tokens(self) -> int:
        s = self.llm.stats if self.llm is not None else None
        return 0 if s is None else s.prompt_tokens + s.completion_tokens

    def _tick(self) -> None:
        while not self._stop.wait(0.5):
            assert self.llm is not None
            rate = (self._tokens() - self.tokens0) / max(time.perf_counter() - self.start, 1e-9)
            self.bar.set_postfix_str(
                f"{self.llm.in_flight} in flight, {rate:,.0f} tok/s, "
                f"{self.llm.stats.failures} failed tries"
            )

    def advance(self) -> None:
        self.bar.update(1)

    def close(self) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
        self.bar.close()


def say(message: str, on: bool) -> None:
    """A line on stderr beside the bar (when progress is shown)."""
    if on:
        tqdm.write(message, file=sys.stderr)


def run_neurons(
    records: Sequence[NeuronRecord],
    explain: Callable[[NeuronRecord], NeuronExplanation],
    schedule: Schedule,
    *,
    rounds: int,
    on_result: Callable[[NeuronExplanation], None] | None = None,
) -> list[NeuronExplanation]:
    """``explain`` of each record, in the records' order, ``schedule.concurrency`` at a time;
    neurons kept in ``schedule.partial`` are loaded, not explained again."""
    store = PartialResults(schedule.partial, schedule.context) if schedule.partial else None
    results: list[NeuronExplanation | None] = [
        store.load(r) if store is not None else None for r in records
    ]
    todo = [i for i, r in enumerate(results) if r is None]
    on = schedule.progress
    if len(todo) < len(records):
        say(f"resuming: {len(records) - len(todo)} of {len(records)} neurons already explained", on)
    llm = schedule.llm
    if llm is not None and todo:
        ahead = estimate([records[i] for i in todo], rounds=rounds)
        say(estimate_line(ahead, schedule.prices), on)
    before = (llm.stats.requests, llm.stats.prompt_tokens) if llm is not None else (0, 0)
    start = time.perf_counter()
    bar = _Bar(len(records), len(records) - len(todo), llm, on)

    def one(i: int) -> NeuronExplanation:
        result = explain(records[i])
        if store is not None:
            store.save(records[i], result)
        return result

    def finished(i: int, result: NeuronExplanation) -> None:
        results[i] = result
        bar.advance()
        if on_result is not None:
            on_result(result)

    try:
        workers = min(schedule.concurrency, len(todo))
        if workers <= 1:
            for i in todo:
                finished(i, one(i))
        else:
            _concurrently(one, todo, workers, finished)
    finally:
        bar.close()
    if llm is not None and (llm.stats.requests, llm.stats.prompt_tokens) != before:
        say(measured_line(llm.stats, time.perf_counter() - start, schedule.prices), on)
    return [r for r in results if r is not None]


def _concurrently(
    one: Callable[[int], NeuronExplanation],
    todo: list[int],
    workers: int,
    finished: Callable[[int, NeuronExplanation], None],
) -> None:
    """``one`` over ``todo`` on ``workers`` threads, ``finished`` called in this thread as each
    ends; the first error cancels what has not started and is raised once the running ones end."""
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rangelens-neuron")
    try:
        futures = {pool.submit(one, i): i for i in todo}
        for future in as_completed(futures):
            finished(futures[future], future.result())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
