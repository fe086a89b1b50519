"""The ``local`` backend: a `transformers` causal LM run in-process with its chat template."""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from rangelens.activations.models import LoadedModel, load_model
from rangelens.errors import RangelensError
from rangelens.explain.clients.base import Completion, Message, ReplyError, TokenLogprobs, Usage


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
        usage = Usage(int(start), len(ids))
        if not top_logprobs:
            return Completion(text, usage=usage)
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
        return Completion(text, steps, usage)


def load_chat_model(name_or_path: str) -> LoadedModel:
    """A chat model for the local backend: a built-in name, a `transformers` directory, or a
    ``.gguf`` file (converted once by :func:`rangelens.activations.models.load_model`)."""
    return load_model(name_or_path, kind="decoder")
