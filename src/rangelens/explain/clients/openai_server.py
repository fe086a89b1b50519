"""The ``openai`` backend: any OpenAI-compatible chat server (vLLM, SGLang, Ollama, llama.cpp
server, hosted APIs) through the ``openai`` package. API keys are read from an environment variable
at call time and never stored, logged or hashed."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from typing import Any

import openai

from rangelens.errors import RangelensError
from rangelens.explain.clients.base import (
    Completion,
    LLMUnavailable,
    Message,
    ReplyError,
    TokenLogprobs,
)


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


class OpenAIClient:
    """An OpenAI-compatible chat-completions server.

    Each request waits at most ``timeout`` seconds. Connection errors, 429 and 5xx replies are
    retried ``max_retries`` times with exponential backoff from ``backoff`` seconds; a server that
    stays unreachable raises :class:`LLMUnavailable` naming the URL, as do 401/403/404 (bad key,
    URL or model: every request would fail). Everything else that goes wrong with one request --
    timeout, other HTTP errors, a response that is not valid JSON, no choices or empty content -- is
    a :class:`ReplyError`. Local servers that need no key get the placeholder ``"EMPTY"``.
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
    ) -> None:
        if not (timeout > 0 and math.isfinite(timeout)):
            raise RangelensError(f"--timeout must be a positive number of seconds, got {timeout}")
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
                return self._client.chat.completions.create(
                    model=self.model,
                    messages=list(messages),  # type: ignore[arg-type]
                    temperature=self.temperature,
                    max_tokens=max_tokens,
                    **extra,
                )
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
        return Completion(text, _logprobs(choices[0]) if top_logprobs else None)
