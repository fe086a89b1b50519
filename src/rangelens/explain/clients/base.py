"""What every LLM backend is: a chat model mapping messages to a :class:`Completion` (text, and
per-token top log-probabilities where the backend returns them), like delphi's client abstraction.

Every failure of one request (timeout, HTTP error, malformed or empty reply, a reply that fails the
caller's schema, an oversized reply) is a :class:`ReplyError` with a ``kind``; an unusable server is
:class:`LLMUnavailable`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal, Protocol

from rangelens.errors import RangelensError

Message = dict[str, str]
FailureKind = Literal["timeout", "http", "malformed", "empty", "too_large", "invalid"]


class LLMUnavailable(RangelensError):
    """The LLM server could not be reached, or refuses every request (bad URL, key or model)."""


class ReplyError(ValueError):
    """One failed request: ``kind`` is timeout, http, malformed (unparseable server response),
    empty, too_large (over the reply size cap), or invalid (the reply does not match the requested
    format)."""

    def __init__(self, message: str, kind: FailureKind = "invalid") -> None:
        super().__init__(message)
        self.kind: FailureKind = kind


@dataclass(frozen=True)
class TokenLogprobs:
    """One generated token and the log-probabilities of the most likely tokens at its position."""

    token: str
    top: dict[str, float]


@dataclass(frozen=True)
class Usage:
    """Tokens one request cost: as the server counted them (its ``usage``), or, where it sends
    none, estimated as characters / 4 (``estimated``)."""

    prompt_tokens: int
    completion_tokens: int
    estimated: bool = False

    @classmethod
    def guess(cls, messages: Sequence[Message], reply: str) -> Usage:
        """The characters / 4 estimate of a request and its reply."""
        sent = sum(len(m.get("content", "")) for m in messages)
        return cls(-(-sent // 4), -(-len(reply) // 4), estimated=True)


@dataclass(frozen=True)
class Completion:
    """A reply's text; ``logprobs`` per generated token when requested and returned, else None;
    ``usage`` its token counts where the backend reports them (never part of a cache key)."""

    text: str
    logprobs: list[TokenLogprobs] | None = None
    usage: Usage | None = None

    def to_dict(self) -> dict[str, Any]:
        lps = self.logprobs
        return {  # by hand: asdict deep-copies every log-probability, per request
            "text": self.text,
            "logprobs": None if lps is None else [{"token": t.token, "top": t.top} for t in lps],
            "usage": None if self.usage is None else asdict(self.usage),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Completion:
        lps = data.get("logprobs")
        usage = data.get("usage")
        return cls(
            str(data["text"]),
            None if lps is None else [TokenLogprobs(**t) for t in lps],
            None if usage is None else Usage(**usage),
        )


class LLMClient(Protocol):
    """A chat model. ``identity`` names backend, model and generation settings (cache key; no
    secrets)."""

    @property
    def identity(self) -> str: ...

    @property
    def max_concurrency(self) -> int:
        """Requests the backend serves at once (the most :class:`LLM` keeps in flight)."""
        ...

    @property
    def supports_prefill(self) -> bool:
        """Whether a final assistant message is continued (a response prefix), not answered."""
        ...

    def complete(
        self, messages: Sequence[Message], *, top_logprobs: int = 0, max_tokens: int | None = None
    ) -> Completion:
        """One request; raises :class:`ReplyError` (counted, retried by :class:`LLM`) or
        :class:`LLMUnavailable` (fatal)."""
        ...
