"""Options of the explanations (NeuronScope, Liu et al., arXiv 2601.03671): which neurons, the
iterative loop, the LLM backend; and the inputs ``explain`` reads (defaults: its run's)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from rangelens.config.analysis import Runtime, SiteOptions
from rangelens.config.sources import DataSource, ModelSource, Options

Backend = Literal["offline", "openai", "local"]
# auto: lexical for the offline backend, llm for an LLM backend; lexical: the offline word-list
# simulator (only for the offline word lists: prose is never scored by word matching); llm: the LLM
# echoes tokens with 0-10 values; llm-list: the LLM lists the words the explanation describes
SimulatorName = Literal["auto", "lexical", "llm", "llm-list"]


class LLMOptions(Options):
    """The LLM that explains and scores (``offline``: the lexical baseline, no LLM)."""

    backend: Backend = Field("offline", description="offline (the lexical baseline, no LLM)")
    base_url: str = Field(
        "http://127.0.0.1:8000/v1", description="OpenAI-compatible server (openai backend)"
    )
    llm_model: str = Field(
        "smollm2-135m",
        description="served model name (openai), or for the local backend a built-in name, a "
        "transformers directory or a .gguf file",
    )
    api_key_env: str = Field(
        "OPENAI_API_KEY", description="environment variable holding the API key"
    )
    timeout: float = Field(
        60.0,
        gt=0,
        description="seconds one LLM request may take in all, connect to last byte (openai)",
    )
    max_reply_mb: float = Field(
        4.0,
        gt=0,
        description="largest LLM reply accepted, in MB; larger ones are failed tries (openai)",
    )
    max_attempts: int = Field(
        3, ge=1, description="tries per LLM step (failed tries are counted, never cached)"
    )
    concurrency: int = Field(
        8,
        ge=1,
        le=1024,
        description="LLM requests in flight at once, across all neurons (neurons are explained "
        "concurrently; results do not depend on it): a local server's parallel slots, e.g. "
        "llama.cpp --parallel or OLLAMA_NUM_PARALLEL; 64 or more for vLLM or SGLang",
    )
    price_per_mtok: list[float] | None = Field(
        None,
        description="price per million tokens, input,output (one value: both), to print what "
        "the explanations cost",
    )
    simulator: SimulatorName = Field(
        "auto",
        description="what simulates explanations from their text: auto (lexical offline, llm with "
        "an LLM backend), lexical (word matching; only for the offline word lists), llm (the LLM "
        "echoes each token with a 0-10 activation) or llm-list (the LLM lists the words the "
        "explanation describes; for small models). Every method is also scored by the embedding "
        "judge",
    )

    @model_validator(mode="after")
    def _needs_llm(self) -> LLMOptions:
        prices = self.price_per_mtok
        if prices is not None and not (
            len(prices) in (1, 2) and all(p >= 0 and p != float("inf") for p in prices)
        ):
            raise ValueError(
                f"invalid price_per_mtok {prices}: give input,output prices per million tokens "
                "(one or two numbers >= 0)"
            )
        if self.simulator in ("llm", "llm-list") and self.backend == "offline":
            raise ValueError(
                f"invalid simulator {self.simulator!r} with backend 'offline': it needs an LLM; "
                f"use backend 'openai' or 'local'"
            )
        if self.simulator == "lexical" and self.backend != "offline":
            raise ValueError(
                f"invalid simulator 'lexical' with backend {self.backend!r}: an LLM's prose is "
                f"never scored by word matching; use 'llm' or 'llm-list'"
            )
        return self

    @property
    def prices(self) -> tuple[float, float] | None:
        """Input and output price per million tokens, when given."""
        p = self.price_per_mtok
        return None if p is None else (p[0], p[-1])

    @property
    def simulator_name(self) -> str:
        """The simulator actually used (``auto`` resolved)."""
        if self.simulator != "auto":
            return self.simulator
        return "lexical" if self.backend == "offline" else "llm"


class ExplainOptions(Options):
    """Which neurons are explained and how long the iterative loop refines."""

    neurons: list[int] | None = Field(None, description="neuron ids (default: --top-k of the run)")
    top_k: int = Field(10, ge=1, le=1000, description="neurons (or ranges) taken from the run")
    concept: str | None = Field(
        None, description="explain this concept's ranges (in-range tokens; needs a run)"
    )
    rounds: int = Field(4, ge=0, le=20, description="refinement rounds")
    texts_per_class: int = Field(
        60, ge=1, description="texts per class the exemplars are drawn from"
    )


class ExplainConfig(ExplainOptions, LLMOptions):
    """A run's ``explain:`` section and the ``explain`` command's options."""

    def result_inputs(self) -> dict[str, object]:
        """The options that decide the explanations (a stage's fingerprint, a neuron's resume
        key): all but :data:`NOT_RESULTS`."""
        return self.model_dump(exclude=set(NOT_RESULTS))


# How fast explanations are made and what is printed about them, never what they are.
NOT_RESULTS = ("concurrency", "price_per_mtok")


class RunSource(Options):
    """The run whose site, data and salient neurons ``explain`` takes."""

    run_dir: Path | None = Field(
        None, description="a rangelens run dir: explain its top salient neurons"
    )


class ExplainInputs(Runtime, SiteOptions, DataSource, ModelSource):
    """The model, texts and site ``explain`` reads (defaults: its run's, else these)."""


# Taken from the run when not given: what was analysed and how it was read (not how many texts
# nor the seed: explanations sample their own).
FROM_RUN = tuple(k for k in ExplainInputs.model_fields if k != "seed")
