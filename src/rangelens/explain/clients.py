"""LLM backends behind one small interface, plus an on-disk response cache.

``OpenAIClient`` talks to any OpenAI-compatible chat server (vLLM, Ollama, llama.cpp server, hosted
APIs) through the ``openai`` package; ``TransformersClient`` runs a local `transformers` causal LM
with its chat template. Like delphi's client abstraction, the roles only see ``complete(messages) ->
str``. API keys are read from an environment variable at call time and never stored, logged or
hashed.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol, TypeVar

import openai
import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from rangelens.errors import RangelensError
from rangelens.models import LoadedModel

Message = dict[str, str]
T = TypeVar("T")


class LLMUnavailable(RangelensError):
    """The LLM server could not be reached (or kept failing) after all retries."""


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

    def complete(self, messages: Sequence[Message]) -> str: ...


def parallel_map(client: LLMClient, fn: Callable[[T], object], items: Sequence[T]) -> list[object]:
    """``fn`` over ``items`` with at most ``client.max_concurrency`` in flight, results in order."""
    if client.max_concurrency <= 1 or len(items) <= 1:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(max_workers=client.max_concurrency) as pool:
        return list(pool.map(fn, items))


class OpenAIClient:
    """An OpenAI-compatible chat-completions server, with timeouts and retries with backoff.

    Connection errors, timeouts, 429 and 5xx replies are retried ``max_retries`` times (exponential
    backoff from ``backoff`` seconds); then :class:`LLMUnavailable` names the URL. Other HTTP errors
    (401, 404, ...) fail at once. Local servers that need no key get the placeholder ``"EMPTY"``.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key_env: str = "OPENAI_API_KEY",
        timeout: float = 60.0,
        max_retries: int = 3,
        backoff: float = 0.5,
        max_concurrency: int = 4,
        temperature: float = 0.0,
        max_tokens: int = 512,
    ) -> None:
        self.base_url = base_url
        self.model = model
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

    def complete(self, messages: Sequence[Message]) -> str:
        last: Exception | None = None
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                reply = self._client.chat.completions.create(
                    model=self.model,
                    messages=list(messages),  # type: ignore[arg-type]
                    temperature=self.temperature,
                    max_tokens=self.max_tokens,
                )
            except (
                openai.APIConnectionError,
                openai.RateLimitError,
                openai.InternalServerError,
            ) as err:
                last = err
                continue
            except openai.APIStatusError as err:
                raise RangelensError(
                    f"LLM server at {self.base_url} rejected the request: HTTP {err.status_code}"
                ) from err
            if not reply.choices:
                return ""
            return reply.choices[0].message.content or ""
        raise LLMUnavailable(
            f"LLM server at {self.base_url} unreachable after {self.max_retries + 1} attempts "
            f"({type(last).__name__}); check --base-url and that the server is running"
        )


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

    Generation stops as soon as the reply holds a complete JSON object (the roles ask for one); a
    mild repetition penalty keeps small models from looping inside JSON lists.
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

    def complete(self, messages: Sequence[Message]) -> str:
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
        with self._lock, torch.inference_mode():
            out = self.lm.model.generate(  # type: ignore[operator]
                **inputs,
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                repetition_penalty=self.repetition_penalty,
                stopping_criteria=StoppingCriteriaList(
                    [_JSONComplete(tok, inputs["input_ids"].shape[1], prefix)]
                ),
                pad_token_id=tok.pad_token_id,
            )
        new = tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        return prefix + str(new)


class ResponseCache:
    """Replies on disk, one JSON file per sha256 of (client identity, messages): reruns are free and
    interrupted runs resume where they stopped."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)

    @staticmethod
    def key(identity: str, messages: Sequence[Message]) -> str:
        payload = json.dumps([identity, list(messages)], sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    def _path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.json"

    def get(self, key: str) -> str | None:
        path = self._path(key)
        if not path.is_file():
            return None
        return str(json.loads(path.read_text(encoding="utf-8"))["reply"])

    def put(self, key: str, identity: str, reply: str) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps({"client": identity, "reply": reply}), encoding="utf-8")
        os.replace(tmp, path)


class CachedClient:
    """Wrap a client so each distinct prompt is sent once; counts ``hits`` and ``misses``."""

    def __init__(self, client: LLMClient, cache: ResponseCache) -> None:
        self.client = client
        self.cache = cache
        self.hits = 0
        self.misses = 0
        self._lock = threading.Lock()

    @property
    def identity(self) -> str:
        return self.client.identity

    @property
    def max_concurrency(self) -> int:
        return self.client.max_concurrency

    @property
    def supports_prefill(self) -> bool:
        return self.client.supports_prefill

    def complete(self, messages: Sequence[Message]) -> str:
        key = self.cache.key(self.identity, messages)
        cached = self.cache.get(key)
        if cached is not None:
            with self._lock:
                self.hits += 1
            return cached
        reply = self.client.complete(messages)
        self.cache.put(key, self.identity, reply)
        with self._lock:
            self.misses += 1
        return reply
