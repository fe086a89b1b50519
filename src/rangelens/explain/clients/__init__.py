"""LLM backends behind one small interface (:mod:`.base`), one module per backend
(:mod:`.openai_server`, :mod:`.local_model`), the reply cache and :class:`LLM`, the validated-reply
runner the roles use. Backends import their heavy dependencies (openai, torch) only when used."""

from __future__ import annotations

import importlib
from typing import Any

from rangelens.explain.clients.base import (
    Completion,
    LLMClient,
    LLMUnavailable,
    Message,
    ReplyError,
    TokenLogprobs,
    parallel_map,
)
from rangelens.explain.clients.cache import ResponseCache
from rangelens.explain.clients.runner import LLM, LLMStats

_BACKENDS = {
    "OpenAIClient": "rangelens.explain.clients.openai_server",
    "TransformersClient": "rangelens.explain.clients.local_model",
    "load_chat_model": "rangelens.explain.clients.local_model",
}


def __getattr__(name: str) -> Any:
    """The backends, imported on first use (``openai`` / ``torch`` only when asked for)."""
    if name in _BACKENDS:
        return getattr(importlib.import_module(_BACKENDS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "LLM",
    "Completion",
    "LLMClient",
    "LLMStats",
    "LLMUnavailable",
    "Message",
    "OpenAIClient",
    "ReplyError",
    "ResponseCache",
    "TokenLogprobs",
    "TransformersClient",
    "load_chat_model",
    "parallel_map",
]
