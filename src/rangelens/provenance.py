"""Provenance: what a result depends on. Content digests of input files (so a stage is reused by
what its inputs hold, not how their paths are spelled), fingerprints of stage inputs, and the
library versions saved with every run."""

from __future__ import annotations

import hashlib
import json
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from rangelens.artifacts import read_json, write_json

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


_DIGESTS: dict[tuple[str, ...], str] = {}
HASH_ALWAYS_BELOW = 64 << 20  # files smaller than this are hashed on every call (milliseconds)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def file_digest(path: Path, memo: Path | None = None) -> str:
    """sha256 of a file's content, streamed in 1 MiB blocks.

    Files under :data:`HASH_ALWAYS_BELOW` (data files) are hashed every time. Larger ones (multi-GB
    weights take seconds) are remembered in this process and, given ``memo``, in that JSON file
    across runs, by resolved path, device, inode, size, mtime and ctime in ns: an edit in place
    that keeps the size and restores the mtime (``cp -p``, ``rsync -t``, ``touch -d``) still
    changes the ctime, which no user call can set back.
    """
    path = path.resolve()
    st = path.stat()
    if st.st_size < HASH_ALWAYS_BELOW:
        return _sha256(path)
    key = tuple(map(str, (path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)))
    stored = read_json(memo) if memo is not None and memo.exists() else {}
    memo_key = "|".join(key)
    if key not in _DIGESTS and memo_key in stored:
        _DIGESTS[key] = stored[memo_key]
    if key not in _DIGESTS:
        _DIGESTS[key] = _sha256(path)
        if memo is not None:
            write_json(memo, {**stored, memo_key: _DIGESTS[key]})
    return _DIGESTS[key]


def path_digest(path: Path, memo: Path | None = None) -> str:
    """Content digest of a file, or of a folder (its files' relative paths and digests)."""
    if path.is_file():
        return file_digest(path, memo)
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    return fingerprint([(str(f.relative_to(path)), file_digest(f, memo)) for f in files])
