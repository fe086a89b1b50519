"""Exemplar records: texts with per-token activations of one neuron, saved as versioned JSON.

Modelled on OpenAI's neuron-explainer ``ActivationRecord`` / ``NeuronRecord`` (Bills et al.,
"Language models can explain neurons in language models", 2023). A :class:`NeuronRecord` keeps four
disjoint sets: ``top`` and ``quantiles`` are shown to the explainer; ``validation`` decides whether
a revision is kept; ``held_out`` is only used for the final score.
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

RECORD_FORMAT = "rangelens.explain.record/1"


@dataclass
class ActivationRecord:
    """One text: its tokens (as strings), their ids and the neuron's activation on each."""

    tokens: list[str]
    token_ids: list[int]
    activations: list[float]
    text_index: int

    @property
    def max_activation(self) -> float:
        return max(self.activations)

    @property
    def peak(self) -> int:
        """Position of the highest activation."""
        return int(np.argmax(self.activations))

    def text(self) -> str:
        return "".join(self.tokens)


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

    @property
    def explain_set(self) -> list[ActivationRecord]:
        """Everything the explainer may read: top-activating plus quantile samples."""
        return self.top + self.quantiles

    def to_dict(self) -> dict[str, Any]:
        return {"format": RECORD_FORMAT, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NeuronRecord:
        if data.get("format") != RECORD_FORMAT:
            raise RangelensError(
                f"neuron record has format {data.get('format')!r}; valid: {RECORD_FORMAT!r}"
            )
        sets: dict[str, Any] = {
            name: [ActivationRecord(**r) for r in data[name]]
            for name in ("top", "quantiles", "validation", "held_out")
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
