"""The rows each range map is fitted on: the splits stage's product.

A *split* is the analysis train/test split (``full``) or one fold of the erasure protocol's
repeated stratified k-fold. Ranges are fitted on a split's ``fit`` rows: its correctly classified
training rows when a classification task exists, else all its training rows (``rows`` says which).

On disk (``RUN_DIR/splits/``): ``splits.safetensors`` (``<split>.train`` / ``.test`` / ``.fit``,
int64) and ``splits.json`` (format ``rangelens.splits/1``: per split how ``fit`` was chosen and the
share of correctly classified training rows; the task's inputs when they are not the dataset texts).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from rangelens.artifacts import read_json, write_json
from rangelens.errors import RangelensError

FORMAT_VERSION = "rangelens.splits/1"
FULL = "full"


@dataclass
class Split:
    """Rows of one split: the task trains on ``train``, ranges are fitted on ``fit`` (a subset of
    ``train``), metrics come from ``test``; ``rows`` says how ``fit`` was chosen."""

    name: str
    train: np.ndarray
    test: np.ndarray
    fit: np.ndarray
    rows: str


@dataclass
class Splits:
    """Every split of a run, in order (``full`` first), and what the ranges read at the mask site:
    the dataset texts (``inputs`` None) or the task's own inputs (e.g. prompts), tokenised with
    ``max_length`` / ``padding_side`` (None: the analysis settings)."""

    splits: list[Split]
    inputs: list[str] | None = None
    max_length: int | None = None
    padding_side: str | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.splits or self.splits[0].name != FULL:
            first = self.splits[0].name if self.splits else None
            raise RangelensError(f"the first split must be {FULL!r}; got {first!r}")

    def save(self, directory: Path) -> None:
        arrays = {
            f"{s.name}.{part}": np.asarray(getattr(s, part), dtype=np.int64)
            for s in self.splits
            for part in ("train", "test", "fit")
        }
        save_file(arrays, str(directory / "splits.safetensors"))
        write_json(
            directory / "splits.json",
            {
                "format": FORMAT_VERSION,
                "splits": {s.name: {"rows": s.rows, "n_fit": len(s.fit)} for s in self.splits},
                "inputs": self.inputs,
                "max_length": self.max_length,
                "padding_side": self.padding_side,
                "info": self.info,
            },
        )

    @classmethod
    def load(cls, directory: Path) -> Splits:
        index = read_json(directory / "splits.json")
        if index.get("format") != FORMAT_VERSION:
            raise RangelensError(f"{str(directory)!r} holds no splits of format {FORMAT_VERSION}")
        arrays = load_file(str(directory / "splits.safetensors"))
        splits = [
            Split(
                name,
                arrays[f"{name}.train"],
                arrays[f"{name}.test"],
                arrays[f"{name}.fit"],
                v["rows"],
            )
            for name, v in index["splits"].items()
        ]
        return cls(
            splits, index["inputs"], index["max_length"], index["padding_side"], index["info"]
        )


def default_splits(train: np.ndarray, test: np.ndarray) -> Splits:
    """The analysis split alone, ranges fitted on all its training rows (no classification task)."""
    return Splits([Split(FULL, train, test, train, "all training rows (no classification task)")])
