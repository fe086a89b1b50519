"""Labelled text: built-ins, user files, capping, splitting and bad input."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rangelens.data import DataWarning, general_text, load_texts, split
from rangelens.errors import RangelensError


def frame(n_per_class: int = 5, classes: tuple[str, ...] = ("pos", "neg", "neu")) -> pd.DataFrame:
    rows = [
        {"review": f"{c} text number {i}", "sentiment": c}
        for c in classes
        for i in range(n_per_class)
    ]
    return pd.DataFrame(rows)


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".parquet"])
def test_user_files(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"data{suffix}"
    df = frame()
    if suffix == ".csv":
        df.to_csv(path, index=False)
    elif suffix == ".tsv":
        df.to_csv(path, sep="\t", index=False)
    elif suffix == ".jsonl":
        df.to_json(path, orient="records", lines=True)
    else:
        df.to_parquet(path)
    data = load_texts(path, text_column="review", label_column="sentiment")
    assert data.label_names == ["neg", "neu", "pos"]
    assert data.counts() == {"neg": 5, "neu": 5, "pos": 5}
    assert data.texts[data.labels.tolist().index(2)].startswith("pos")


def test_dataframe_and_hf_dataset() -> None:
    datasets = pytest.importorskip("datasets")
    df = frame()
    ds = datasets.Dataset.from_pandas(df)
    a = load_texts(df, text_column="review", label_column="sentiment")
    b = load_texts(ds, text_column="review", label_column="sentiment")
    assert a.texts == b.texts and (a.labels == b.labels).all()


def test_label_folders(tmp_path: Path) -> None:
    for label in ("cats", "dogs"):
        (tmp_path / label).mkdir()
        for i in range(3):
            (tmp_path / label / f"{i}.txt").write_text(f"about {label} {i}")
    data = load_texts(tmp_path)
    assert data.counts() == {"cats": 3, "dogs": 3}


def test_capping_balancing_and_concepts() -> None:
    df = pd.concat([frame(10, ("a",)), frame(4, ("b",)), frame(6, ("c",))])
    kw = {"text_column": "review", "label_column": "sentiment"}
    assert load_texts(df, max_per_class=5, **kw).counts() == {"a": 5, "b": 4, "c": 5}
    assert load_texts(df, balance=True, **kw).counts() == {"a": 4, "b": 4, "c": 4}
    assert load_texts(df, concepts=["c", "a"], **kw).label_names == ["a", "c"]
    one = load_texts(df, max_per_class=5, seed=1, **kw).texts
    assert one == load_texts(df, max_per_class=5, seed=1, **kw).texts
    assert one != load_texts(df, max_per_class=5, seed=2, **kw).texts


def test_split_is_stratified_and_seeded() -> None:
    data = load_texts(frame(20), text_column="review", label_column="sentiment")
    train, test = split(data, 0.2, seed=0)
    assert len(test) == 12 and len(set(train) | set(test)) == 60 and not set(train) & set(test)
    assert np.bincount(data.labels[test]).tolist() == [4, 4, 4]
    assert (split(data, 0.2, seed=0)[1] == test).all()
    assert not (split(data, 0.2, seed=1)[1] == test).all()


def test_builtins() -> None:
    bbc = load_texts("bbc-news")
    assert bbc.counts() == {
        "business": 510,
        "entertainment": 386,
        "politics": 417,
        "sports": 511,
        "tech": 401,
    }
    rt = load_texts("rotten-tomatoes", max_per_class=50)
    assert rt.label_names == ["fresh", "plot", "rotten"] and len(rt) == 150
    assert all(t.strip() for t in rt.texts)
    general = general_text(max_texts=20)
    assert len(general) == 20 and all(len(t) >= 200 for t in general)


@pytest.mark.parametrize(
    ("df", "kwargs", "message"),
    [
        (frame(), {"text_column": "body", "label_column": "sentiment"}, "text column 'body'"),
        (frame(), {"text_column": "review", "label_column": "y"}, "label column 'y'"),
        (frame(5, ("only",)), {}, "only one class"),
        (pd.concat([frame(5, ("a",)), frame(1, ("b",))]), {}, "class 'b'.*fewer than 2"),
        (frame(), {"concepts": ["pos", "happy"]}, "concept 'happy' not in dataset"),
        (frame(), {"max_per_class": 0}, "max_per_class must be >= 1"),
    ],
)
def test_bad_input(df: pd.DataFrame, kwargs: dict, message: str) -> None:
    kwargs = {"text_column": "review", "label_column": "sentiment", **kwargs}
    with pytest.raises(RangelensError, match=message):
        load_texts(df, **kwargs)


def test_empty_texts_unknown_and_unreadable(tmp_path: Path) -> None:
    df = frame()
    df.loc[3, "review"] = "   "
    with pytest.raises(RangelensError, match="1 empty texts"):
        load_texts(df, text_column="review", label_column="sentiment")
    with pytest.raises(RangelensError, match="dataset 'imdb' is not a built-in"):
        load_texts("imdb")
    bad = tmp_path / "broken.parquet"
    bad.write_bytes(b"not parquet at all")
    with pytest.raises(RangelensError, match="cannot read dataset file"):
        load_texts(bad)
    sheet = tmp_path / "x.xlsx"
    sheet.write_text("x")
    with pytest.raises(RangelensError, match="unsupported dataset file"):
        load_texts(sheet)


@pytest.mark.parametrize("name", ["data.csv.gz", "data.tsv.bz2", "data.jsonl.xz", "data.JSON.gz"])
def test_compressed_files_are_read_directly(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    df = frame()
    if ".csv" in name:
        df.to_csv(path, index=False)  # pandas compresses by the suffix
    elif ".tsv" in name:
        df.to_csv(path, sep="\t", index=False)
    elif ".jsonl" in name:
        df.to_json(path, orient="records", lines=True)
    else:
        df.to_json(path, orient="records", compression="gzip")
    assert path.read_bytes()[:2] != b"re"  # really compressed
    data = load_texts(path, text_column="review", label_column="sentiment")
    assert data.counts() == {"neg": 5, "neu": 5, "pos": 5}
    assert sorted(data.texts) == sorted(df["review"])


def test_a_zip_archive_gets_a_hint_to_extract_it(tmp_path: Path) -> None:
    inner = tmp_path / "data.csv"
    frame().to_csv(inner, index=False)
    archive = tmp_path / "data.csv.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(inner, "data.csv")
    with pytest.raises(RangelensError) as err:
        load_texts(archive, text_column="review", label_column="sentiment")
    message = str(err.value)
    assert "\n" not in message and str(archive) in message
    assert "archive; extract it" in message and "'.csv'" in message


def test_a_small_class_notice_says_what_to_do() -> None:
    df = pd.concat([frame(30, ("a",)), frame(30, ("b",)), frame(2, ("tiny",))])
    with pytest.warns(DataWarning, match="unstable statistics") as caught:
        load_texts(df, text_column="review", label_column="sentiment")
    (message,) = [str(w.message) for w in caught if issubclass(w.category, DataWarning)]
    assert "'tiny': 2" in message and "--min-per-class 20" in message and "--concepts" in message
    data = load_texts(df, text_column="review", label_column="sentiment", min_per_class=20)
    assert data.label_names == ["a", "b"]  # what the notice suggests works
