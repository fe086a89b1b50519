"""LLM backends behind one small interface (:mod:`.base`), one module per backend
(:mod:`.openai_server`, :mod:`.local_model`), the reply cache and :class:`LLM`, the validated-reply
runner the roles use. Backends import their heavy dependencies (openai, torch) only when used."""

from __future__ import annotations

from rangelens.explain.clients.base import (
    Completion,
    LLMClient,
    LLMUnavailable,
    Message,
    ReplyError,
    TokenLogprobs,
    Usage,
)
from rangelens.explain.clients.cache import ResponseCache
from rangelens.explain.clients.runner import LLM, LLMStats
from rangelens.lazy import lazy_members

_BACKENDS = {
    "OpenAIClient": "rangelens.explain.clients.openai_server",
    "TransformersClient": "rangelens.explain.clients.local_model",
    "load_chat_model": "rangelens.explain.clients.local_model",
}


__getattr__ = lazy_members(__name__, _BACKENDS)

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
    "Usage",
    "load_chat_model",
]
