"""The validated-reply runner every LLM role calls: retries, failure counts by kind, the cache.

:class:`LLM` retries a :class:`ReplyError`, counts it, and caches only replies that validated, so a
re-run after fixing the server asks again.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

from rangelens.errors import RangelensError
from rangelens.explain.clients.base import (
    Completion,
    LLMClient,
    LLMUnavailable,
    Message,
    ReplyError,
)
from rangelens.explain.clients.cache import ResponseCache

T = TypeVar("T")


@dataclass
class LLMStats:
    """What an :class:`LLM` did: steps (one validated answer wanted each), failed steps, requests
    sent, cache hits, and failed attempts by kind (timeout, http, malformed, empty, invalid)."""

    steps: int = 0
    failed_steps: int = 0
    requests: int = 0
    cache_hits: int = 0
    failed_attempts: Counter[str] = field(default_factory=Counter)

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
        self._lock = threading.Lock()
        self._server_failures = 0  # consecutive steps lost to the server (not to the model)
        self._last_error = ""

    @property
    def max_concurrency(self) -> int:
        return self.client.max_concurrency

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
                reply = self.client.complete(
                    convo + start, top_logprobs=top_logprobs, max_tokens=max_tokens
                )
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

    def _check_alive(self) -> None:
        if self._server_failures >= self.give_up_after:
            raise LLMUnavailable(
                f"{self.give_up_after} LLM steps in a row failed at the server (last: "
                f"{self._last_error}); giving up. {self.stats.summary()}"
            )
