"""Options of the erasure experiment (NeuronLens, Haider et al., arXiv 2502.06809): range vs neuron
masking on a classification task, with controls (bad values are one-line :class:`RangelensError`)."""

from __future__ import annotations

from typing import Any, Literal, get_args

from pydantic import Field, ValidationError, field_validator, model_validator

from rangelens.config.sources import Options
from rangelens.errors import RangelensError, choices, location, one_line, shown

DEFAULT_PROMPT = "Classify the text as one of: {labels}.\n\nText: {text}\nLabel:"
MOVED = ("tau", "p", "taus", "ps", "layers", "batch_size")  # analysis options: one per run
RENAMED = {"concepts": "targets"}
# Masked states compared with the unmasked base; each has an entry in ``rangelens.erasure.conditions``.
Condition = Literal["range", "neuron", "random", "density", "leace"]
Task = Literal["head", "prompt", "finetuned"]
Probe = Literal["linear", "binary", "mlp"]


class ErasureConfig(Options):
    """How the erasure experiment is run. The ranges it erases are the analysis' (``analysis.tau``,
    ``analysis.p``, sweeps ``analysis.taus`` / ``ps`` / ``layers``); built as ``ErasureConfig(...)``
    a bad value raises a one-line error naming the option, the value and what is valid."""

    task: Task = Field(
        "head", description="head (linear head on a frozen site) | prompt | finetuned"
    )
    targets: list[str] | None = Field(None, description="concepts to erase (default: all)")
    conditions: list[Condition] = Field(
        default_factory=lambda: list[Condition](["range", "neuron", "random"]),
        description="masked states compared with the unmasked base (see erasure.conditions)",
    )
    range_rows: Literal["correct", "all"] = Field(
        "correct", description="fit ranges on correctly classified training rows, or on all"
    )
    folds: int = Field(5, ge=2, description="stratified k-fold: every text is test once")
    repeats: int = Field(1, ge=1, description="repeat the k-fold with other shuffles")
    replacement: Literal["zero", "mean", "complement_mean"] = Field(
        "zero",
        description="what a masked activation becomes: 0, the corpus mean or the mean of the other concepts",
    )
    positions: Literal["all", "last"] = Field(
        "all", description="mask every token, or only the last real token of each text"
    )
    mode: Literal["hard", "soft"] = Field(
        "hard",
        description="hard: replace in-range values; soft: shrink them towards the replacement",
    )
    scale: float = Field(0.0, ge=0, lt=1, description="soft mode: keep this share of x - r")
    bootstrap: int = Field(1000, ge=100, description="bootstrap resamples for the 95% intervals")
    chance_margin: float = Field(0.1, ge=0, lt=1, description="warn if base acc < chance + this")
    min_test_texts: int = Field(30, ge=1, description="warn if a concept has fewer test texts")
    head_C: float = Field(1.0, gt=0, description="inverse L2 strength of the logistic head")
    head_site: str = Field(
        "resid",
        description="site the classification head reads (default: the final representation); "
        "masks at an earlier site re-run the model from there",
    )
    head_layer: int = Field(-1, description="layer of head_site; negative counts from the end")
    head_position: Literal["last", "first", "cls", "mean"] | None = Field(
        None, description="default: 'last' for decoders, 'cls' for encoders"
    )
    prompt_template: str = Field(
        DEFAULT_PROMPT, description="task prompt: the instruction with {text} and {labels}"
    )
    few_shot: int = Field(0, ge=0, description="training examples shown before each prompt")
    ppl_texts: int = Field(32, ge=0, description="general texts for perplexity (0: skip)")
    ppl_max_length: int = Field(64, ge=2, description="tokens per general text for perplexity")
    ppl_sweep: bool = Field(
        True, description="perplexity at every swept tau too (false: the headline tau only)"
    )
    probes: list[Probe] = Field(
        default_factory=lambda: list[Probe](["linear", "binary", "mlp"]),
        description="probes refit on masked training rows (does a retrained probe still read the "
        "concept?): linear (the head's family), binary (concept vs rest, logistic) and a small "
        "MLP; [] skips",
    )
    suffix: bool = Field(True, description="re-run only the blocks after the mask site")
    stack_rows: int = Field(
        64,
        ge=1,
        description="most rows (texts x masks) in one masked forward: masks on the same texts are "
        "stacked into one batched forward up to this (at most batch_size: one forward per mask)",
    )

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as err:
            raise RangelensError(erasure_error(err)) from None

    @model_validator(mode="after")
    def _consistent(self) -> ErasureConfig:
        if self.mode == "hard" and self.scale != 0:
            raise ValueError(f"scale {self.scale!r} only applies to mode 'soft'; use 0 with 'hard'")
        if self.positions == "last" and self.ppl_texts > 0:
            raise ValueError(
                f"positions 'last' with ppl_texts {self.ppl_texts}: the last position's prediction "
                f"is never scored, so the perplexity change is 0 by construction; use positions "
                f"'all' or ppl_texts 0"
            )
        return self

    @field_validator("conditions")
    @classmethod
    def _conditions(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError(f"give at least one condition; valid: {choices(get_args(Condition))}")
        return list(dict.fromkeys(v))

    @field_validator("prompt_template")
    @classmethod
    def _template(cls, v: str) -> str:
        try:
            filled = v.format(text="\0", labels="")
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(f"valid placeholders are {{text}} and {{labels}} ({err})") from None
        if "\0" not in filled:
            raise ValueError("the template needs a {text} placeholder")
        return v


def erasure_error(err: ValidationError) -> str:
    """An erasure option error as one line; keys that moved or were renamed say where they went."""
    first = err.errors()[0]
    where = location(first)
    if first["type"] == "extra_forbidden" and where in MOVED:
        return (
            f"invalid erasure option {where} = {shown(first.get('input'))}: {where} is an "
            f"analysis option (one per run): set analysis.{where}"
        )
    if first["type"] == "extra_forbidden" and where in RENAMED:
        return f"erasure option {where!r} is now {RENAMED[where]!r}"
    if first["type"] in ("literal_error", "extra_forbidden"):
        return one_line(err, ErasureConfig.model_fields)
    msg = str(first["msg"]).removeprefix("Value error, ")
    if not where:
        return f"invalid erasure options: {msg}"
    return f"invalid erasure option {where} = {shown(first.get('input'))}: {msg}"
