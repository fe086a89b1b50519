"""The ``openai`` backend: any OpenAI-compatible chat server (vLLM, SGLang, Ollama, llama.cpp
server, hosted APIs) through the ``openai`` package. API keys are read from an environment variable
at call time and never stored, logged or hashed."""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import openai

from rangelens.config.explain import LLMOptions
from rangelens.errors import RangelensError
from rangelens.explain.clients.base import (
    Completion,
    FailureKind,
    LLMUnavailable,
    Message,
    ReplyError,
    TokenLogprobs,
    Usage,
)


def _usage(reply: Any, messages: Sequence[Message], text: str) -> Usage:
    """The reply's ``usage`` as the server counted it, else the characters / 4 estimate."""
    usage = getattr(reply, "usage", None)
    sent = getattr(usage, "prompt_tokens", None)
    got = getattr(usage, "completion_tokens", None)
    if isinstance(sent, int) and isinstance(got, int):
        return Usage(sent, got)
    return Usage.guess(messages, text)


def _logprobs(choice: Any) -> list[TokenLogprobs] | None:
    content = getattr(getattr(choice, "logprobs", None), "content", None)
    if not content:
        return None
    out = []
    for item in content:
        top = {t.token: float(t.logprob) for t in (item.top_logprobs or [])}
        top.setdefault(item.token, float(item.logprob))
        out.append(TokenLogprobs(item.token, top))
    return out


# Log-probability replies for long texts reach about 1 MB; the default is the option's.
MAX_REPLY_MB: float = LLMOptions.model_fields["max_reply_mb"].default


class OpenAIClient:
    """An OpenAI-compatible chat-completions server.

    Each request takes at most ``timeout`` seconds as a whole (connecting, sending, and reading
    headers and body: a server that drips bytes is cut off too), and its reply at most
    ``max_reply_mb`` megabytes (read in chunks, never more). Connection errors, 429 and 5xx
    replies are retried ``max_retries`` times with exponential backoff from ``backoff`` seconds; a
    server that stays unreachable raises :class:`LLMUnavailable` naming the URL, as do 401/403/404
    (bad key, URL or model: every request would fail). Everything else that goes wrong with one request --
    timeout, other HTTP errors, a response that is not valid JSON or is too large, no choices or
    empty content -- is a :class:`ReplyError`. Local servers that need no key get the placeholder
    ``"EMPTY"``.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key_env: str = "OPENAI_API_KEY",
        timeout: float = 60.0,
        max_retries: int = 2,
        backoff: float = 0.5,
        max_concurrency: int = 4,
        temperature: float = 0.0,
        max_tokens: int = 512,
        max_reply_mb: float = MAX_REPLY_MB,
    ) -> None:
        if not (timeout > 0 and math.isfinite(timeout)):
            raise RangelensError(f"--timeout must be a positive number of seconds, got {timeout}")
        if not (max_reply_mb > 0 and math.isfinite(max_reply_mb)):
            raise RangelensError(
                f"--max-reply-mb must be a positive number of megabytes, got {max_reply_mb}"
            )
        self.max_reply_mb = max_reply_mb
        self.base_url = base_url
        self.model = model
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self._max_concurrency = max_concurrency
        self.temperature = temperature
        self.max_tokens = max_tokens
        self._client = openai.OpenAI(
            base_url=base_url,
            api_key=os.environ.get(api_key_env) or "EMPTY",
            timeout=timeout,
            max_retries=0,
        )

    @property
    def identity(self) -> str:
        return f"openai|{self.base_url}|{self.model}|t={self.temperature}|max={self.max_tokens}"

    @property
    def max_concurrency(self) -> int:
        return self._max_concurrency

    @property
    def supports_prefill(self) -> bool:
        return False

    def _request(self, messages: Sequence[Message], top_logprobs: int, max_tokens: int) -> Any:
        extra: dict[str, Any] = (
            {"logprobs": True, "top_logprobs": top_logprobs} if top_logprobs else {}
        )
        last: Exception | None = None
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                return self._bounded(
                    model=self.model,
                    messages=list(messages),
                    temperature=self.temperature,
                    max_tokens=max_tokens,
                    **extra,
                )
            except ReplyError:
                raise
            except openai.APITimeoutError as err:
                raise ReplyError(f"no reply within {self.timeout:g} s", "timeout") from err
            except (
                openai.APIConnectionError,
                openai.RateLimitError,
                openai.InternalServerError,
            ) as e:
                last = e
            except openai.APIStatusError as err:
                if err.status_code in (401, 403, 404):
                    raise LLMUnavailable(
                        f"LLM server at {self.base_url} refused the request: HTTP "
                        f"{err.status_code}; check --base-url, --llm-model and --api-key-env"
                    ) from err
                raise ReplyError(f"HTTP {err.status_code}", "http") from err
            except (openai.APIResponseValidationError, ValueError) as err:  # body not JSON
                raise ReplyError(f"malformed server response ({err})"[:200], "malformed") from err
        if isinstance(last, openai.APIStatusError):
            raise ReplyError(f"HTTP {last.status_code} after {self.max_retries + 1} tries", "http")
        raise LLMUnavailable(
            f"LLM server at {self.base_url} unreachable after {self.max_retries + 1} attempts "
            f"({type(last).__name__}); check --base-url and that the server is running"
        )

    def _bounded(self, **request: Any) -> Any:
        """One request that ends within ``timeout`` seconds whatever the server does: it runs in a
        daemon thread, which stops reading once abandoned (the per-read timeout alone lets a server
        that sends a byte now and then hold a request forever)."""
        outcome: list[tuple[bool, Any]] = []
        done, abandoned = threading.Event(), threading.Event()

        def fetch() -> None:
            try:
                outcome.append((True, self._fetch(request, abandoned)))
            except BaseException as err:  # noqa: BLE001 (raised again in the caller's thread)
                outcome.append((False, err))
            finally:
                done.set()

        threading.Thread(target=fetch, name="rangelens-llm-request", daemon=True).start()
        if not done.wait(self.timeout):
            abandoned.set()
            raise ReplyError(f"no reply within {self.timeout:g} s", "timeout")
        ok, value = outcome[0]
        if not ok:
            raise value
        return value

    def _fetch(self, request: dict[str, Any], abandoned: threading.Event) -> Any:
        """POST ``request``; its JSON reply, read in chunks up to the size cap, as attributes."""
        cap = int(self.max_reply_mb * 1e6)
        too_large = ReplyError(
            f"reply larger than {self.max_reply_mb:g} MB (--max-reply-mb)", "too_large"
        )
        create = self._client.chat.completions.with_streaming_response.create
        with create(**request) as response:
            length = response.headers.get("content-length", "")
            if length.isdigit() and int(length) > cap:
                raise too_large
            body = bytearray()
            try:
                for chunk in response.iter_bytes():
                    if abandoned.is_set():
                        return None
                    body += chunk
                    if len(body) > cap:
                        raise too_large
            except ReplyError:
                raise
            except Exception as err:  # noqa: BLE001 (the HTTP library's errors: a cut connection)
                kind: FailureKind = "timeout" if "Timeout" in type(err).__name__ else "malformed"
                raise ReplyError(f"reply cut off ({type(err).__name__})", kind) from err
        return json.loads(bytes(body), object_hook=lambda d: SimpleNamespace(**d))

    def complete(
        self, messages: Sequence[Message], *, top_logprobs: int = 0, max_tokens: int | None = None
    ) -> Completion:
        reply = self._request(messages, top_logprobs, max_tokens or self.max_tokens)
        choices = getattr(reply, "choices", None)
        if not isinstance(choices, list):
            raise ReplyError("malformed server response (no 'choices' list)", "malformed")
        if not choices:
            raise ReplyError("server returned no choices", "empty")
        message = getattr(choices[0], "message", None)
        text = getattr(message, "content", None)
        if not isinstance(text, str) or not text.strip():
            raise ReplyError("server returned an empty reply", "empty")
        return Completion(
            text, _logprobs(choices[0]) if top_logprobs else None, _usage(reply, messages, text)
        )
