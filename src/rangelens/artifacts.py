"""Run directories: atomic writes, stage fingerprints for resumable runs, and provenance.

Every artifact is written to a temporary sibling and renamed into place, so an interrupted or failed run
never leaves a half-written file or stage directory behind. A stage directory holds ``stage.json`` with a
fingerprint of its inputs; a stage whose directory exists with the same fingerprint is skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd

from rangelens.errors import RangelensError

RUN_FORMAT = "rangelens.run/1"
VERSIONED_PACKAGES = (
    "rangelens",
    "torch",
    "transformers",
    "numpy",
    "scipy",
    "scikit-learn",
    "pandas",
    "safetensors",
)


def library_versions() -> dict[str, str]:
    """Versions of Python and the libraries a result depends on (saved with every run)."""
    versions = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def fingerprint(*parts: Any) -> str:
    """Stable short hash of JSON-able inputs (config subsets, upstream fingerprints)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_digest(path: Path, memo: Path | None = None) -> str:
    """sha256 of a file's content, streamed in 1 MiB blocks.

    Reading is cheap for data files (MBs) but seconds for multi-GB weights, so digests are remembered
    by (resolved path, size, mtime in ns) in this process and, given ``memo``, in that JSON file across
    runs (the rsync/make quick check: an edit changes size or mtime).
    """
    path = path.resolve()
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    stored = read_json(memo) if memo is not None and memo.exists() else {}
    memo_key = "|".join(map(str, key))
    if key not in _DIGESTS and memo_key in stored:
        _DIGESTS[key] = stored[memo_key]
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with path.open("rb") as fh:
            while block := fh.read(1 << 20):
                h.update(block)
        _DIGESTS[key] = h.hexdigest()
        if memo is not None:
            write_json(memo, {**stored, memo_key: _DIGESTS[key]})
    return _DIGESTS[key]


def path_digest(path: Path, memo: Path | None = None) -> str:
    """Content digest of a file, or of a folder (its files' relative paths and digests)."""
    if path.is_file():
        return file_digest(path, memo)
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    return fingerprint([(str(f.relative_to(path)), file_digest(f, memo)) for f in files])


def write_text(path: Path, text: str) -> None:
    """Write a text file atomically (temp file in the same directory, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def write_table(path: Path, frame: pd.DataFrame) -> None:
    """Write a CSV atomically."""
    write_text(path, frame.to_csv(index=False))


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``final`` only if the block succeeds."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-tmp-", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            old = final.with_name(f".{final.name}-old-{os.getpid()}")
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def stage_is_current(stage: Path, fp: str) -> bool:
    """True when ``stage`` was completed with inputs of fingerprint ``fp``."""
    marker = stage / "stage.json"
    return marker.exists() and read_json(marker).get("fingerprint") == fp


def mark_stage(stage_tmp: Path, name: str, fp: str, **info: Any) -> None:
    """Record a stage's fingerprint and timing info inside its (temporary) directory."""
    write_json(
        stage_tmp / "stage.json",
        {
            "stage": name,
            "fingerprint": fp,
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **info,
        },
    )


def check_run_dir(run_dir: Path, model: str) -> None:
    """Refuse to mix runs: an existing run directory must belong to the same model."""
    meta = run_dir / "run.json"
    if not run_dir.exists():
        return
    if not meta.exists():
        if any(run_dir.iterdir()):
            raise RangelensError(
                f"output directory {str(run_dir)!r} exists and is not a rangelens run; "
                f"choose a new or empty directory"
            )
        return
    previous = read_json(meta).get("config", {}).get("model")
    if previous is not None and previous != model:
        raise RangelensError(
            f"run directory {str(run_dir)!r} was made with model {previous!r}, not {model!r}; "
            f"use a new output directory"
        )


def write_run_meta(run_dir: Path, config: dict[str, Any], seed: int) -> None:
    """Save the resolved config, seed and library versions at the run's root."""
    write_json(
        run_dir / "run.json",
        {
            "format": RUN_FORMAT,
            "config": config,
            "seed": seed,
            "versions": library_versions(),
            "platform": platform.platform(),
            "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        },
    )
