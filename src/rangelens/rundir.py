"""A run directory: every path a run writes, its lock, its provenance (``run.json``) and the
fingerprints of its stages.

Layout (formats: ``docs/ARTIFACTS.md``)::

    RUN_DIR/run.json          resolved config, seed, library versions, platform
    RUN_DIR/capture/          activations statistics and pooled features
    RUN_DIR/splits/           train/test rows of every split and the rows ranges are fitted on
    RUN_DIR/ranges/           rankings, range maps, distribution table
    RUN_DIR/erasure/          the erasure experiment
    RUN_DIR/explanations/     explanations of the top salient neurons
    RUN_DIR/atlas/            the HTML atlas

A stage directory holds ``stage.json`` with a fingerprint of its inputs (and of its upstream
stages'). The run directory is locked while a process works on it (an advisory ``flock`` on
``RUN_DIR/.rangelens.lock``): a second process exits at once with a one-line error.
"""

from __future__ import annotations

import fcntl
import os
import platform
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rangelens.artifacts import (
    EXPORT,
    LOCK_FILE,
    RUN_FORMAT,
    STAGE_FORMAT,
    _cannot_write,
    _ignorable,
    _make_dirs,
    read_json,
    write_json,
)
from rangelens.errors import RangelensError
from rangelens.provenance import library_versions

STAGES = ("capture", "splits", "ranges", "erasure", "explanations")
EXPORTED_RUN = "run"  # the run inside an export folder (``rangelens export``)


def run_root(path: str | Path) -> Path:
    """``path``, or the run an export folder holds (``EXPORT/run``) when ``path`` is one."""
    path = Path(path)
    return path / EXPORTED_RUN if EXPORT.marks(path) else path


class RunDir:
    """The paths of one run directory, in pipeline order."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    meta = property(lambda self: self.root / "run.json")
    capture = property(lambda self: self.root / "capture")
    splits = property(lambda self: self.root / "splits")
    ranges = property(lambda self: self.root / "ranges")
    erasure = property(lambda self: self.root / "erasure")
    explanations = property(lambda self: self.root / "explanations")
    atlas = property(lambda self: self.root / "atlas")

    def stage(self, name: str) -> Path:
        """The directory of stage ``name``."""
        if name not in STAGES:
            raise RangelensError(f"unknown stage {name!r}; valid: {', '.join(STAGES)}")
        return self.root / name

    def is_run(self) -> bool:
        """Whether the directory holds a run (its ``run.json``)."""
        return self.meta.is_file()

    def config(self) -> dict[str, Any]:
        """The resolved config the run recorded (empty if it has none)."""
        if not self.meta.is_file():
            return {}
        config = read_json(self.meta).get("config", {})
        return config if isinstance(config, dict) else {}

    def fingerprint(self, name: str) -> str | None:
        """The fingerprint stage ``name`` was finished with, or None."""
        return stage_fingerprint(self.stage(name))

    def require(self) -> None:
        """Refuse a directory that is not a finished run (one line naming it)."""
        if not self.root.is_dir():
            raise RangelensError(f"run directory {str(self.root)!r} does not exist")
        if not self.meta.is_file() and not self.ranges.is_dir():
            raise RangelensError(
                f"{str(self.root)!r} is not a rangelens run (no run.json); give a run directory "
                f"(made by `rangelens analyze`, `run` or `demo`)"
            )

    def check(self, model: str) -> None:
        """Refuse to mix runs: an existing run directory must belong to the same model, and an
        existing directory that is not a run must be empty."""
        if not self.root.exists():
            return
        if not self.root.is_dir():
            raise RangelensError(f"run directory {str(self.root)!r} is a file; choose a directory")
        if not self.meta.exists():
            if any(not _ignorable(p.name) for p in self.root.iterdir()):
                raise RangelensError(
                    f"output directory {str(self.root)!r} exists and is not a rangelens run; "
                    f"choose a new or empty directory"
                )
            return
        previous = self.config().get("model")
        if previous is not None and previous != model:
            raise RangelensError(
                f"run directory {str(self.root)!r} was made with model {previous!r}, not "
                f"{model!r}; use a new output directory"
            )

    def write_meta(self, config: dict[str, Any], seed: int) -> None:
        """Save the resolved config, seed and library versions at the run's root."""
        write_json(
            self.meta,
            {
                "format": RUN_FORMAT,
                "config": config,
                "seed": seed,
                "versions": library_versions(),
                "platform": platform.platform(),
                "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            },
        )

    def lock(self) -> Any:
        """The run's advisory lock (see :func:`run_lock`)."""
        return run_lock(self.root)


def stage_fingerprint(stage: Path) -> str | None:
    """The fingerprint recorded in ``stage/stage.json``, or None."""
    try:
        fp = read_json(stage / "stage.json").get("fingerprint")
    except (OSError, ValueError, AttributeError):
        return None
    return fp if isinstance(fp, str) else None


def mark_stage(stage_tmp: Path, name: str, fp: str, **info: Any) -> None:
    """Record a stage's fingerprint and timing info inside its (temporary) directory."""
    write_json(
        stage_tmp / "stage.json",
        {
            "format": STAGE_FORMAT,
            "stage": name,
            "fingerprint": fp,
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **info,
        },
    )


_held: dict[Path, tuple[int, int]] = {}  # resolved run dir -> (lock fd, nesting depth)
_held_guard = threading.Lock()


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold the advisory lock of ``run_dir`` (created if missing) for the block; re-entrant within
    a process. Another process holding it is a one-line error naming its pid (no waiting). A run
    directory this call created is removed again if the block fails before writing into it."""
    run_dir = Path(run_dir)
    created = not run_dir.exists()
    if run_dir.exists() and not run_dir.is_dir():
        raise RangelensError(f"run directory {str(run_dir)!r} is a file; choose a directory")
    _make_dirs(run_dir)
    key = run_dir.resolve()
    with _held_guard:
        fd, depth = _held.get(key, (-1, 0))
        if depth == 0:
            fd = _acquire(run_dir / LOCK_FILE)
        _held[key] = (fd, depth + 1)
    ok = False
    try:
        yield
        ok = True
    finally:
        with _held_guard:
            fd, depth = _held.pop(key)
            if depth > 1:
                _held[key] = (fd, depth - 1)
            else:
                os.close(fd)
                if created and not ok and [p.name for p in run_dir.iterdir()] == [LOCK_FILE]:
                    shutil.rmtree(run_dir, ignore_errors=True)


def _acquire(lock: Path) -> int:
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as err:
        raise _cannot_write(lock.parent, err) from err
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as err:
        owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise RangelensError(
            f"run directory {str(lock.parent)!r} is in use by another rangelens process "
            f"(pid {owner}); wait for it to finish or choose another directory"
        ) from err
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
