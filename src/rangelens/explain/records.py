"""Exemplar records: texts with per-token activations of one neuron, saved as versioned JSON.

Modelled on OpenAI's neuron-explainer ``ActivationRecord`` / ``NeuronRecord`` (Bills et al.,
"Language models can explain neurons in language models", 2023). A :class:`NeuronRecord` keeps
disjoint pools of texts (checked when it is built): ``top`` and ``quantiles`` are shown to the
explainer; ``feedback`` supplies the worst-fit exemplars a refiner sees; ``validation`` decides
whether a candidate is kept (acceptance); ``held_out`` is only used for the final score. The
calibration of a fixed explanation is fitted on ``feedback + validation``, never on ``held_out``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rangelens.artifacts import write_text
from rangelens.errors import RangelensError

RECORD_FORMAT = "rangelens.explain.record/2"
POOLS = ("top", "quantiles", "feedback", "validation", "held_out")
OLD_FORMATS = ("rangelens.explain.record/1",)  # no feedback pool: readable, not explainable


@dataclass
class ActivationRecord:
    """One text: its tokens (as strings), their ids, the neuron's activation on each and the
    text's concept (its class in the labelled dataset; None when unknown)."""

    tokens: list[str]
    token_ids: list[int]
    activations: list[float]
    text_index: int
    concept: str | None = None

    @property
    def max_activation(self) -> float:
        return max(self.activations)

    @property
    def peak(self) -> int:
        """Position of the highest activation."""
        return int(np.argmax(self.activations))


@dataclass
class NeuronRecord:
    """A neuron's exemplars. ``threshold`` is the per-text maximum above which a text is
    *activating*.

    ``target`` names what the activations are: ``"activation"`` (the raw neuron) or
    ``"in_range[lo,hi]"`` (a 0/1 indicator of a NeuronLens concept range).
    """

    model: str
    site: str
    layer: int | None
    neuron: int
    top: list[ActivationRecord]
    quantiles: list[ActivationRecord]
    validation: list[ActivationRecord]
    held_out: list[ActivationRecord]
    threshold: float
    target: str = "activation"
    stats: dict[str, float] = field(default_factory=dict)
    feedback: list[ActivationRecord] = field(default_factory=list)

    def __post_init__(self) -> None:
        seen: dict[int, str] = {}
        for name in POOLS:
            for rec in getattr(self, name):
                if rec.text_index in seen:
                    raise RangelensError(
                        f"text {rec.text_index} is in both the {seen[rec.text_index]} and the "
                        f"{name} pool of neuron {self.neuron}; pools must be disjoint"
                    )
                seen[rec.text_index] = name

    @property
    def explain_set(self) -> list[ActivationRecord]:
        """Everything the explainer may read: top-activating plus quantile samples."""
        return self.top + self.quantiles

    @property
    def calibration(self) -> list[ActivationRecord]:
        """The calibration pool: feedback and validation texts (never held-out ones)."""
        return self.feedback + self.validation

    def to_dict(self) -> dict[str, Any]:
        return {"format": RECORD_FORMAT, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NeuronRecord:
        if data.get("format") != RECORD_FORMAT and data.get("format") not in OLD_FORMATS:
            raise RangelensError(
                f"neuron record has format {data.get('format')!r}; valid: {RECORD_FORMAT!r}"
            )
        sets: dict[str, Any] = {
            name: [ActivationRecord(**r) for r in data.get(name, [])] for name in POOLS
        }
        scalars: dict[str, Any] = {k: v for k, v in data.items() if k not in sets and k != "format"}
        return cls(**scalars, **sets)

    def save(self, path: str | os.PathLike[str]) -> None:
        write_json(Path(path), self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> NeuronRecord:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (:func:`rangelens.artifacts.write_text`); NaN is rejected, not written."""
    write_text(path, json.dumps(data, indent=1, allow_nan=False) + "\n")
