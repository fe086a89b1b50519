"""Where a run's inputs come from: the model and the labelled texts (one declaration each)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from rangelens.assets import BUILTIN_DATASETS, BUILTIN_MODELS, cache_dir
from rangelens.provenance import path_digest

if TYPE_CHECKING:
    from rangelens.data import LabeledTexts


class Options(BaseModel):
    """Base of every option model: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


class ModelSource(Options):
    """Which model a command loads: the one declaration of the ``model`` option (it comes first in
    every command that loads one)."""

    model: str = Field(
        "smollm2-135m", description="built-in name, hub id, local folder or .gguf file"
    )


class DataSource(Options):
    """Which labelled texts a command reads and how: the one declaration of the loader options."""

    dataset: str = Field(
        "bbc-news",
        description="built-in name, CSV/TSV/JSONL (also .gz/.bz2/.xz/.zst)/Parquet/folder path, "
        "a datasets save_to_disk folder, or a Hugging Face hub id name[:config][@split]",
    )
    text_column: str = Field("text", description="text column of a user file")
    label_column: str = Field("label", description="label column of a user file")
    header: bool = Field(True, description="the file's first row names its columns")
    sep: str | None = Field(None, description="column separator of a delimited file")
    missing_labels: Literal["drop", "error"] = Field(
        "drop", description="rows with a missing label: drop them (with a count) or refuse"
    )
    concepts: list[str] | None = Field(None, description="keep only these labels (default: all)")
    min_per_class: int | None = Field(
        None, ge=1, description="drop classes with fewer examples (with a notice)"
    )
    seed: int = Field(0, description="seed for capping, splits, probes and sampling")
    streaming: bool = Field(
        False,
        description="read the dataset in chunks, keeping max_per_class rows per class (never "
        "loads it whole; files, saved datasets folders and hub ids)",
    )

    def loader_options(self) -> dict[str, Any]:
        """How the dataset is read and filtered (everything :func:`rangelens.data.load_texts`
        takes)."""
        options = {k: getattr(self, k) for k in LOADER_KEYS if hasattr(self, k)}
        if not options.get("streaming"):  # the default: runs made before the option stay current
            options.pop("streaming", None)
        return options

    def load_data(self, **override: Any) -> LabeledTexts:
        """The labelled texts this source selects (capped and balanced with its seed)."""
        from rangelens.data import load_texts

        return load_texts(self.dataset, **{**self.loader_options(), **override})


class Sampling(Options):
    """How many texts an analysis takes per class."""

    max_per_class: int | None = Field(200, ge=1, description="cap examples per class")
    balance: bool = Field(False, description="cap every class at the smallest class size")


# The options of :func:`rangelens.data.load_texts` a run records (its config fields of these names).
LOADER_KEYS = (
    *(k for k in DataSource.model_fields if k != "dataset"),
    *Sampling.model_fields,
)


def resolve_dataset(source: str) -> str:
    """A built-in name or a hub id as is; a file or folder as its absolute resolved path (what a
    run records)."""
    from rangelens.hub import parse_hub_id

    path = Path(source).expanduser()
    if source in BUILTIN_DATASETS or (not path.exists() and parse_hub_id(source) is not None):
        return source
    return str(path.resolve())


def resolve_model(source: str) -> str:
    """A built-in or hub name as is; an existing local path made absolute."""
    if source not in BUILTIN_MODELS and Path(source).expanduser().exists():
        return str(Path(source).expanduser().resolve())
    return source


def input_digest(source: str) -> str:
    """A built-in or hub name as is; a local file/folder by its content digest (memoised)."""
    path = Path(source).expanduser()
    if source in BUILTIN_MODELS or not path.exists():
        return source
    return path_digest(path, memo=cache_dir() / "digests.json")
