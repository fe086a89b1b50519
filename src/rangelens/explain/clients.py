"""LLM backends behind one small interface, and :class:`LLM`, the validated-reply runner the roles use.

``OpenAIClient`` talks to any OpenAI-compatible chat server (vLLM, Ollama, llama.cpp server, hosted
APIs) through the ``openai`` package; ``TransformersClient`` runs a local `transformers` causal LM
with its chat template. Like delphi's client abstraction, a client only maps messages to a
:class:`Completion` (text, and per-token top log-probabilities where the backend returns them). API
keys are read from an environment variable at call time and never stored, logged or hashed.

Every failure of one request (timeout, HTTP error, malformed, empty or oversized reply, a reply that
fails the caller's schema) is a :class:`ReplyError` with a ``kind``; :class:`LLM` retries it, counts
it, and caches only replies that validated, so a re-run after fixing the server asks again.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal, Protocol, TypeVar

import openai
import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from rangelens.artifacts import write_text
from rangelens.errors import RangelensError
from rangelens.models import LoadedModel, load_model

Message = dict[str, str]
T = TypeVar("T")
FailureKind = Literal["timeout", "http", "malformed", "empty", "too_large", "invalid"]
MAX_REPLY_MB = 4.0  # log-probability replies for long texts reach about 1 MB


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
class Completion:
    """A reply's text; ``logprobs`` per generated token when requested and returned, else None."""

    text: str
    logprobs: list[TokenLogprobs] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Completion:
        lps = data.get("logprobs")
        return cls(str(data["text"]), None if lps is None else [TokenLogprobs(**t) for t in lps])


class LLMClient(Protocol):
    """A chat model. ``identity`` names backend, model and generation settings (cache key; no
    secrets)."""

    @property
    def identity(self) -> str: ...

    @property
    def max_concurrency(self) -> int: ...

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


def parallel_map(concurrency: int, fn: Callable[[T], object], items: Sequence[T]) -> list[object]:
    """``fn`` over ``items`` with at most ``concurrency`` in flight, results in order; the first
    exception cancels the items not yet started and is raised."""
    if concurrency <= 1 or len(items) <= 1:
        return [fn(item) for item in items]
    pool = ThreadPoolExecutor(max_workers=concurrency)
    try:
        return list(pool.map(fn, items))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


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
        return Completion(text, _logprobs(choices[0]) if top_logprobs else None)


class _JSONComplete(StoppingCriteria):
    """Stop generating once the reply (with its prefix) holds one complete JSON object."""

    def __init__(self, tokenizer: Any, start: int, prefix: str) -> None:
        self.tokenizer = tokenizer
        self.start = start
        self.prefix = prefix

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> bool:
        text = self.prefix + self.tokenizer.decode(input_ids[0, self.start :])
        if not text.rstrip().endswith(("}", "]")) or "{" not in text:
            return False
        try:
            json.JSONDecoder().raw_decode(text, text.find("{"))
        except json.JSONDecodeError:
            return False
        return True


class TransformersClient:
    """A local `transformers` causal LM (e.g. built-in SmolLM2-135M-Instruct), greedy decoding.

    When the prompt's reply starts with ``{`` (a JSON prefill) generation stops as soon as the reply
    holds a complete JSON object; a mild repetition penalty keeps small models from looping inside
    JSON lists. Top log-probabilities come from the raw logits of each generated step.
    """

    def __init__(
        self, lm: LoadedModel, *, max_new_tokens: int = 160, repetition_penalty: float = 1.15
    ) -> None:
        if lm.kind != "decoder":
            raise RangelensError(f"model {lm.name!r} is an encoder; a chat LLM must be a decoder")
        if lm.tokenizer.chat_template is None:
            raise RangelensError(f"model {lm.name!r} has no chat template; use an instruct model")
        self.lm = lm
        self.max_new_tokens = max_new_tokens
        self.repetition_penalty = repetition_penalty
        self._lock = threading.Lock()

    @property
    def identity(self) -> str:
        return (
            f"transformers|{self.lm.name}|greedy|max={self.max_new_tokens}"
            f"|rep={self.repetition_penalty}"
        )

    @property
    def max_concurrency(self) -> int:
        return 1

    @property
    def supports_prefill(self) -> bool:
        return True

    def complete(
        self, messages: Sequence[Message], *, top_logprobs: int = 0, max_tokens: int | None = None
    ) -> Completion:
        tok = self.lm.tokenizer
        prefix = messages[-1]["content"] if messages[-1]["role"] == "assistant" else ""
        encoded: Any = tok.apply_chat_template(
            list(messages),
            add_generation_prompt=not prefix,
            continue_final_message=bool(prefix),
            return_tensors="pt",
            return_dict=True,
        )
        inputs = {k: v.to(self.lm.device) for k, v in encoded.items()}
        start = inputs["input_ids"].shape[1]
        stop = [_JSONComplete(tok, start, prefix)] if prefix.lstrip().startswith("{") else []
        with self._lock, torch.inference_mode():
            out: Any = self.lm.model.generate(  # type: ignore[operator]
                **inputs,
                max_new_tokens=max_tokens or self.max_new_tokens,
                do_sample=False,
                repetition_penalty=self.repetition_penalty,
                stopping_criteria=StoppingCriteriaList(stop),
                pad_token_id=tok.pad_token_id,
                return_dict_in_generate=True,
                output_logits=bool(top_logprobs),
            )
        ids = out.sequences[0, start:]
        text = prefix + str(tok.decode(ids, skip_special_tokens=True))
        if not text.strip():
            raise ReplyError("model generated an empty reply", "empty")
        if not top_logprobs:
            return Completion(text)
        steps = []
        special = set(tok.all_special_ids)
        for i, logits in zip(ids.tolist(), out.logits, strict=False):
            if i in special:
                continue
            logp = torch.log_softmax(logits[0].float(), dim=-1)
            values, idx = logp.topk(top_logprobs)
            top = {str(tok.decode([int(j)])): float(v) for j, v in zip(idx, values, strict=True)}
            chosen = str(tok.decode([i]))
            top.setdefault(chosen, float(logp[i]))
            steps.append(TokenLogprobs(chosen, top))
        if prefix:
            steps.insert(0, TokenLogprobs(prefix, {prefix: 0.0}))
        return Completion(text, steps)


class ResponseCache:
    """Validated replies on disk, one JSON file per sha256 of the request: reruns are free and
    interrupted runs resume where they stopped. Failed replies are never written."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)

    @staticmethod
    def key(identity: str, messages: Sequence[Message], options: str = "") -> str:
        payload = json.dumps(
            [identity, list(messages), options], sort_keys=True, ensure_ascii=False
        )
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    def _path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.json"

    def get(self, key: str) -> Completion | None:
        path = self._path(key)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return Completion.from_dict(data["reply"])
        except (OSError, ValueError, KeyError, TypeError):  # absent or unreadable: ask again
            return None

    def put(self, key: str, identity: str, reply: Completion) -> None:
        write_text(self._path(key), json.dumps({"client": identity, "reply": reply.to_dict()}))


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


def load_chat_model(name_or_path: str) -> LoadedModel:
    """A chat model for the local backend: a built-in name, a `transformers` directory, or a
    ``.gguf`` file (converted once by :func:`rangelens.models.load_model`)."""
    return load_model(name_or_path, kind="decoder")
