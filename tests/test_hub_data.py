"""Datasets beyond local tables: hub ids (offline here: a one-line error), folders written by
`datasets`' save_to_disk, and streaming reads whose memory stays bounded on a file larger than the
test's memory cap."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rangelens.config import AnalysisConfig
from rangelens.data import load_texts
from rangelens.errors import RangelensError
from rangelens.hub import parse_hub_id

datasets = pytest.importorskip("datasets")


def _frame(n_per_class: int = 30) -> pd.DataFrame:
    rows = [
        {"sentence": f"{label} text number {i}", "topic": label}
        for label in ("sport", "money", "tech")
        for i in range(n_per_class)
    ]
    return pd.DataFrame(rows)


def test_hub_ids_parse_and_paths_do_not() -> None:
    assert parse_hub_id("ag_news") == ("ag_news", None, None)
    assert parse_hub_id("stanfordnlp/imdb:plain_text@test[:10%]") == (
        "stanfordnlp/imdb",
        "plain_text",
        "test[:10%]",
    )
    for path in ("./data.csv", "/tmp/x", "topics.parquet", "a b", "~/corpus"):
        assert parse_hub_id(path) is None
    # A run records a hub id as given, not as a path.
    assert (
        AnalysisConfig(dataset="someone/corpus@train").resolved().dataset == "someone/corpus@train"
    )


def test_offline_hub_id_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for streaming in (False, True):
        with pytest.raises(RangelensError, match="hub cannot be reached") as err:
            load_texts("someone/no-such-dataset@train", streaming=streaming, max_per_class=5)
        assert "\n" not in str(err.value)


def test_a_saved_datasets_folder_loads_like_the_table(tmp_path: Path) -> None:
    frame = _frame()
    datasets.Dataset.from_pandas(frame).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_pandas(frame),
            "test": datasets.Dataset.from_pandas(frame[:6]),
        }
    ).save_to_disk(str(tmp_path / "dict"))
    frame.to_csv(tmp_path / "same.csv", index=False)
    options = {"text_column": "sentence", "label_column": "topic", "max_per_class": 10, "seed": 3}
    want = load_texts(tmp_path / "same.csv", **options)
    for source in ("saved", "dict"):
        got = load_texts(tmp_path / source, **options)
        assert got.texts == want.texts and got.label_names == want.label_names
        streamed = load_texts(str(tmp_path / source), streaming=True, **options)
        assert streamed.counts() == {"money": 10, "sport": 10, "tech": 10}
    with pytest.raises(RangelensError, match="column 'text' not in dataset"):
        load_texts(str(tmp_path / "saved"), streaming=True, max_per_class=5)


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl", ".csv"])
def test_streaming_keeps_a_seeded_uniform_sample(tmp_path: Path, suffix: str) -> None:
    frame = _frame(500)
    frame.loc[7, "topic"] = None  # a missing label is dropped with a notice
    path = tmp_path / f"big{suffix}"
    if suffix == ".parquet":
        frame.to_parquet(path, row_group_size=1000)
    elif suffix == ".jsonl":
        frame.to_json(path, orient="records", lines=True)
    else:
        frame.to_csv(path, index=False)
    options = {"text_column": "sentence", "label_column": "topic", "max_per_class": 40}
    with pytest.warns(UserWarning, match="missing label"):
        a = load_texts(str(path), streaming=True, seed=1, **options)
    b = load_texts(str(path), streaming=True, seed=1, **options)
    c = load_texts(str(path), streaming=True, seed=2, **options)
    assert a.texts == b.texts and a.texts != c.texts
    assert a.counts() == {"money": 40, "sport": 40, "tech": 40}
    numbers = [int(t.split()[-1]) for t, y in zip(a.texts, a.labels, strict=True) if y == 1]
    assert max(numbers) > 250 and min(numbers) < 250  # from the whole file, not its head
    whole = {**options, "max_per_class": 5000}  # above the class sizes: every row is kept
    some = load_texts(str(path), streaming=True, concepts=["tech", "money"], **whole)
    assert some.counts() == {"money": 500, "tech": 500}
    assert some.texts == load_texts(str(path), concepts=["tech", "money"], **whole).texts
    with pytest.raises(RangelensError, match="give max_per_class"):
        load_texts(str(path), streaming=True, text_column="sentence", label_column="topic")


MEASURE = textwrap.dedent(
    """
    import sys
    import pandas, pyarrow.parquet  # imported before the baseline
    from rangelens.data import load_texts
    from rangelens.ranges.captured import peak_rss_mb
    before = peak_rss_mb()
    data = load_texts(sys.argv[1], text_column="text", label_column="label",
                      max_per_class=20, streaming=sys.argv[2] == "stream")
    assert data.counts() == {"a": 20, "b": 20}, data.counts()
    print(peak_rss_mb() - before)
    """
)


def test_streaming_a_parquet_larger_than_the_memory_cap(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    cap_mb = 120
    path = tmp_path / "large.parquet"
    rng = np.random.default_rng(0)
    rows, width, chunks = 10_000, 1000, 26  # 250 MB of text, written chunk by chunk
    schema = pa.schema([("text", pa.string()), ("label", pa.string())])
    with pq.ParquetWriter(path, schema) as writer:
        for _ in range(chunks):
            letters = rng.integers(97, 123, size=(rows, width), dtype=np.uint8)
            texts = [bytes(r).decode("ascii") for r in letters]
            labels = ["a" if i % 2 else "b" for i in range(rows)]
            writer.write_table(pa.table({"text": texts, "label": labels}, schema=schema))
    text_mb = rows * width * chunks / 2**20
    assert text_mb > 2 * cap_mb

    def growth(mode: str) -> float:
        out = subprocess.run(
            [sys.executable, "-c", MEASURE, str(path), mode],
            capture_output=True,
            text=True,
            check=True,
        )
        return float(out.stdout.strip().splitlines()[-1])

    streamed, whole = growth("stream"), growth("whole")
    print(f"peak memory growth: streamed {streamed:.0f} MB, whole {whole:.0f} MB")
    assert streamed < cap_mb, (streamed, whole)
    assert whole > cap_mb, (
        streamed,
        whole,
    )  # the cap is one a whole read breaks: the test can fail
