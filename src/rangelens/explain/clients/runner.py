"""The validated-reply runner every LLM role calls: retries, failure counts by kind, the cache, and
the one limit on requests in flight.

:class:`LLM` retries a :class:`ReplyError`, counts it, and caches only replies that validated, so a
re-run after fixing the server asks again. Every request of every role and every neuron passes
through :meth:`LLM.ask`, where a semaphore keeps at most ``client.max_concurrency`` in flight; a
role step fans out on the LLM's shared threads (:meth:`LLM.fan_out`), made once, not per step.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

from rangelens.errors import RangelensError
from rangelens.explain.clients.base import (
    Completion,
    LLMClient,
    LLMUnavailable,
    Message,
    ReplyError,
    Usage,
)
from rangelens.explain.clients.cache import ResponseCache

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class LLMStats:
    """What an :class:`LLM` did: steps (one validated answer wanted each), failed steps, requests
    sent, cache hits, failed attempts by kind (timeout, http, malformed, empty, invalid), and the
    tokens of the replies received (``estimated_requests`` of them counted as characters / 4, the
    server having sent no ``usage``)."""

    steps: int = 0
    failed_steps: int = 0
    requests: int = 0
    cache_hits: int = 0
    failed_attempts: Counter[str] = field(default_factory=Counter)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    estimated_requests: int = 0

    @property
    def failures(self) -> int:
        """Failed attempts of every kind."""
        return sum(self.failed_attempts.values())

    def summary(self) -> str:
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(self.failed_attempts.items())) or "none"
        return (
            f"LLM steps: {self.steps - self.failed_steps} ok, {self.failed_steps} failed of "
            f"{self.steps}; {self.requests} requests, {self.cache_hits} cache hits; failed "
            f"attempts by kind: {kinds}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "failed_attempts": dict(self.failed_attempts)}


class LLM:
    """What the roles call: a client, an optional cache of validated replies, and ``attempts`` tries
    per step. A failed try (any :class:`ReplyError`) is counted by kind; an invalid reply is shown
    back to the model with the error before the next try; after ``attempts`` the step fails and
    returns None. Only replies that validated are cached. After ``give_up_after`` consecutive steps
    lost to the server (timeouts, HTTP errors, malformed or empty replies) it raises
    :class:`LLMUnavailable` instead of letting a dead server fail every remaining step."""

    def __init__(
        self,
        client: LLMClient,
        cache: ResponseCache | None = None,
        attempts: int = 3,
        *,
        give_up_after: int = 5,
    ) -> None:
        if attempts < 1:
            raise RangelensError(f"--max-attempts must be at least 1, got {attempts}")
        self.client = client
        self.cache = cache
        self.attempts = attempts
        self.give_up_after = give_up_after
        self.stats = LLMStats()
        self.in_flight = 0  # requests sent and not yet answered
        self._slots = threading.BoundedSemaphore(self.concurrency)
        self._threads: ThreadPoolExecutor | None = None  # made on the first fan-out
        self._lock = threading.Lock()
        self._server_failures = 0  # consecutive steps lost to the server (not to the model)
        self._last_error = ""

    @property
    def concurrency(self) -> int:
        """The most requests in flight at once, across every role and neuron."""
        return max(1, self.client.max_concurrency)

    def fan_out(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        """``fn`` over ``items``, results in order, on this LLM's shared threads (``concurrency``
        of them, made once): the requests of a role step queue for the same slots as every other
        neuron's. ``fn`` asks, it must not fan out again (it would wait for threads it holds).
        The first error is raised; items not yet started are dropped."""
        if self.concurrency <= 1 or len(items) <= 1:
            return [fn(item) for item in items]
        with self._lock:
            if self._threads is None:
                self._threads = ThreadPoolExecutor(self.concurrency, "rangelens-llm")
        futures = [self._threads.submit(fn, item) for item in items]
        try:
            return [f.result() for f in futures]
        finally:
            for f in futures:
                f.cancel()

    @property
    def supports_prefill(self) -> bool:
        return self.client.supports_prefill

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for name, n in deltas.items():
                setattr(self.stats, name, getattr(self.stats, name) + n)

    def ask(
        self,
        messages: list[Message],
        validate: Callable[[Completion], T],
        *,
        prefill: str = "",
        top_logprobs: int = 0,
        max_tokens: int | None = None,
        feedback: bool = True,
    ) -> tuple[T | None, str]:
        """``(validated value, "")``, or ``(None, last error)`` after ``attempts`` failed tries."""
        self._check_alive()
        start = (
            [{"role": "assistant", "content": prefill}] if prefill and self.supports_prefill else []
        )
        key = ResponseCache.key(
            self.client.identity, messages + start, f"logprobs={top_logprobs}|max={max_tokens}"
        )
        if self.cache is not None:
            cached = self.cache.get(key)
            if cached is not None:
                try:
                    value = validate(cached)
                except ReplyError:
                    pass  # stale entry (e.g. a stricter validator): ask again
                else:
                    self._count(steps=1, cache_hits=1)
                    return value, ""
        convo = list(messages)
        error = ""
        kind = ""
        for _ in range(self.attempts):
            self._count(requests=1)
            reply: Completion | None = None
            try:
                reply = self._send(convo + start, top_logprobs, max_tokens)
                value = validate(reply)
            except ReplyError as err:
                error, kind = f"{err.kind}: {err}", err.kind
                with self._lock:
                    self.stats.failed_attempts[err.kind] += 1
                if feedback and reply is not None:
                    convo = [
                        *messages,
                        {"role": "assistant", "content": reply.text},
                        {"role": "user", "content": f"Invalid reply: {err}. Follow the format."},
                    ]
                continue
            if self.cache is not None:
                self.cache.put(key, self.client.identity, reply)
            with self._lock:
                self.stats.steps += 1
                self._server_failures = 0
            return value, ""
        with self._lock:
            self.stats.steps += 1
            self.stats.failed_steps += 1
            self._server_failures = 0 if kind == "invalid" else self._server_failures + 1
            self._last_error = error
        self._check_alive()
        return None, error

    def _send(
        self, messages: list[Message], top_logprobs: int, max_tokens: int | None
    ) -> Completion:
        """One request, once a slot is free; its tokens counted."""
        with self._slots:
            with self._lock:
                self.in_flight += 1
            try:
                reply = self.client.complete(
                    messages, top_logprobs=top_logprobs, max_tokens=max_tokens
                )
            finally:
                with self._lock:
                    self.in_flight -= 1
        usage = reply.usage or Usage.guess(messages, reply.text)
        with self._lock:
            self.stats.prompt_tokens += usage.prompt_tokens
            self.stats.completion_tokens += usage.completion_tokens
            self.stats.estimated_requests += usage.estimated
        return reply

    def _check_alive(self) -> None:
        if self._server_failures >= self.give_up_after:
            raise LLMUnavailable(
                f"{self.give_up_after} LLM steps in a row failed at the server (last: "
                f"{self._last_error}); giving up. {self.stats.summary()}"
            )
