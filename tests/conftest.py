"""Shared fixtures: tiny random-initialised models of each supported family, and the real built-ins."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from rangelens.activations.models import LoadedModel, builtin_model_dir, load_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def decoder_tokenizer():
    return AutoTokenizer.from_pretrained(builtin_model_dir("smollm2-135m"))


@pytest.fixture(scope="session")
def encoder_tokenizer():
    return AutoTokenizer.from_pretrained(builtin_model_dir("minilm-l6"))


def tiny_model(family: str, vocab_size: int) -> nn.Module:
    """A tiny randomly initialised Llama, GPT-2 or BERT (3 layers, width 32) in eval mode."""
    torch.manual_seed(0)
    if family == "llama":
        llama = LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=vocab_size,
        )
        return LlamaForCausalLM(llama).eval()
    if family == "gpt2":
        gpt2 = GPT2Config(n_embd=32, n_inner=64, n_layer=3, n_head=4, vocab_size=vocab_size)
        return GPT2LMHeadModel(gpt2).eval()
    bert = BertConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        vocab_size=vocab_size,
    )
    return BertModel(bert).eval()


def _tiny(family: str, decoder_tokenizer, encoder_tokenizer) -> LoadedModel:
    tokenizer = encoder_tokenizer if family == "bert" else decoder_tokenizer
    kind = "encoder" if family == "bert" else "decoder"
    return LoadedModel(tiny_model(family, len(tokenizer)), tokenizer, f"tiny-{family}", kind)


@pytest.fixture(scope="session", params=["llama", "gpt2", "bert"])
def tiny_lm(request, decoder_tokenizer, encoder_tokenizer) -> LoadedModel:
    """A tiny random model of each family (Llama, GPT-2, BERT) with a real tokenizer."""
    return _tiny(request.param, decoder_tokenizer, encoder_tokenizer)


@pytest.fixture(scope="session")
def tiny_llama(decoder_tokenizer, encoder_tokenizer) -> LoadedModel:
    return _tiny("llama", decoder_tokenizer, encoder_tokenizer)


@pytest.fixture(scope="session")
def smollm() -> LoadedModel:
    """The real embedded decoder (dequantised once, then cached as safetensors)."""
    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def minilm() -> LoadedModel:
    return load_model("minilm-l6")


TEXTS = [
    "The match ended in a draw after extra time.",
    "Shares fell sharply.",
    "A new smartphone with a folding screen was unveiled at the trade show on Monday morning.",
    "Parliament votes today.",
    "The film's soundtrack is wonderful, but the plot drags in the middle and the ending feels rushed.",
    "Hi",
    "Interest rates were left unchanged by the central bank, which cited inflation risks.",
]


@pytest.fixture
def texts() -> list[str]:
    """Texts of very different lengths, so batches are padded."""
    return list(TEXTS)


TOPICS = {
    "sport": ["The striker scored twice in the league match", "A late goal won the cup final"],
    "money": ["Shares fell as the bank raised interest rates", "Profits rose at the retail group"],
    "tech": ["The new phone has a faster chip and camera", "Software update fixes a security bug"],
}


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    rows = [
        {"text": f"{t} ({i})", "topic": label}
        for label, texts in TOPICS.items()
        for i in range(6)
        for t in texts
    ]
    path = tmp_path / "topics.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


@pytest.fixture
def tiny_model_dir(tmp_path: Path, tiny_llama: LoadedModel) -> Path:
    """A tiny Llama saved as a local model directory, loaded by path like any user model."""
    path = tmp_path / "tiny-llama"
    tiny_llama.model.save_pretrained(path)
    tiny_llama.tokenizer.save_pretrained(path)
    return path


def stage_stamp(stage: Path) -> tuple[int, int]:
    """Identity of a stage's ``stage.json``: inode and modification time in nanoseconds. A stage
    that is redone is written anew (a new file renamed into place), so its stamp changes even within
    the same second."""
    info = (stage / "stage.json").stat()
    return info.st_ino, info.st_mtime_ns
