"""Run directories: the one atomic writer, ownership markers, locks, resumable stages, provenance.

Every file and directory rangelens writes goes through :func:`atomic_path` or :func:`atomic_dir`: it
is written under a temporary sibling name (``.NAME.rangelens-HOST-PID-TOKEN.tmp``), flushed to disk
(fsync) and renamed into place, so a crash never leaves a half-written artifact, and temporaries
left by a killed process are removed by the next writer (only rangelens' own names, only when their
process is gone or they are a week old). Files and directories get the usual permissions under the
user's umask.

An existing directory is replaced only when rangelens made it: it carries the marker file of its
kind (a run's ``run.json``, a stage's ``stage.json``, an atlas's ``atlas.json``, explanations'
``results.json``) or is empty. A run directory is never replaced. Anything else is refused with a
one-line error.

A stage directory holds ``stage.json`` with a fingerprint of its inputs; a stage is reused only when
the fingerprint matches and its files load (:func:`reuse_stage`), otherwise it is redone with a
notice. A run directory is locked while a process works on it (:func:`run_lock`, an advisory
``flock`` on ``RUN_DIR/.rangelens.lock``): a second process exits at once with a one-line error
rather than waiting, since it would only redo or reuse the same stages.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import stat
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from rangelens.errors import RangelensError

if TYPE_CHECKING:
    import pandas as pd

RUN_FORMAT = "rangelens.run/1"
STAGE_FORMAT = "rangelens.stage/1"
LOCK_FILE = ".rangelens.lock"
STALE_AFTER_S = 7 * 24 * 3600  # a temporary of a live process is left alone unless this old
T = TypeVar("T")
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:6]
_TEMP = re.compile(r"^\.(?P<name>.+)\.rangelens-(?P<host>[0-9a-f]{6})-(?P<pid>\d+)-[0-9a-f]+\.tmp$")


def notice(message: str) -> None:
    """One line on stderr about something rangelens did on its own (e.g. redoing a damaged stage)."""
    print(f"notice: {message}", file=sys.stderr)


# ------------------------------------------------------------------------------ temporaries


def _temp_sibling(final: Path) -> Path:
    """A fresh temporary name next to ``final`` that :func:`clean_stale_temps` recognises."""
    token = secrets.token_hex(4)
    return final.with_name(f".{final.name}.rangelens-{_HOST}-{os.getpid()}-{token}.tmp")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def clean_stale_temps(directory: Path, name: str | None = None) -> list[Path]:
    """Remove rangelens temporaries in ``directory`` (of ``name`` only, if given) whose process is
    gone (same host) or that are older than a week; return what was removed."""
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return []
    removed = []
    for entry in entries:
        match = _TEMP.match(entry.name)
        if match is None or (name is not None and match["name"] != name):
            continue
        pid = int(match["pid"])
        if match["host"] == _HOST and pid == os.getpid():
            continue  # ours, possibly still being written
        try:
            age = time.time() - entry.stat(follow_symlinks=False).st_mtime
        except OSError:
            continue
        if (match["host"] == _HOST and not _alive(pid)) or age > STALE_AFTER_S:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                Path(entry.path).unlink(missing_ok=True)
            removed.append(Path(entry.path))
    return removed


def _cannot_write(path: Path, err: OSError) -> RangelensError:
    return RangelensError(f"cannot write {str(path)!r}: {err.strerror or err}")


def _make_dirs(directory: Path) -> Path:
    """``mkdir -p`` with a one-line error (a parent that is a file, no permission)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except FileExistsError as err:
        raise RangelensError(f"cannot create directory {str(directory)!r}: it is a file") from err
    except NotADirectoryError as err:
        raise RangelensError(
            f"cannot create directory {str(directory)!r}: a parent of it is a file"
        ) from err
    except OSError as err:
        raise _cannot_write(directory, err) from err
    return directory


def _umask() -> int:
    """The process umask, read without changing it where the system tells it (Linux)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore at once
    os.umask(mask)
    return mask


def _follow_umask(path: Path, mask: int) -> None:
    """Give ``path`` the mode a plain ``open``/``mkdir`` would have under ``mask``: writers that
    create private files (safetensors' ``save_file``, ``mkstemp``) do not follow the umask."""
    try:
        st = path.lstat()
    except OSError:
        return
    if stat.S_ISLNK(st.st_mode):
        return
    full = 0o777 if stat.S_ISDIR(st.st_mode) or st.st_mode & 0o111 else 0o666
    if stat.S_IMODE(st.st_mode) != full & ~mask:
        with suppress(OSError):
            os.chmod(path, full & ~mask)


def _fsync(path: Path) -> None:
    """Flush a file (or a directory's entries) to disk; file systems that refuse are skipped."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------- files


@contextmanager
def atomic_path(final: Path, *, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling path to write ``final`` to (for writers that take a file name);
    when the block succeeds it is flushed (``durable``: to disk, fsync) and renamed onto
    ``final``, else removed. Only a cache whose lost entries are simply recomputed skips the
    fsync (a power cut may then leave an entry empty: it reads as absent)."""
    final = Path(final)
    parent = _make_dirs(final.parent)
    clean_stale_temps(parent, final.name)
    tmp = _temp_sibling(final)
    try:
        yield tmp
        _follow_umask(tmp, _umask())
        if durable:
            _fsync(tmp)
        os.replace(tmp, final)
    except IsADirectoryError as err:
        raise RangelensError(f"cannot write {str(final)!r}: it is a directory") from err
    except PermissionError as err:
        raise _cannot_write(final, err) from err
    finally:
        tmp.unlink(missing_ok=True)
    if durable:
        _fsync(parent)


def write_bytes(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Write a file atomically (see :func:`atomic_path`)."""
    with atomic_path(path, durable=durable) as tmp, open(tmp, "xb") as fh:
        fh.write(data)


def write_text(path: Path, text: str, *, durable: bool = True) -> None:
    write_bytes(path, text.encode("utf-8"), durable=durable)


def write_json(path: Path, data: Any, *, allow_nan: bool = True) -> None:
    text = json.dumps(data, indent=2, sort_keys=False, default=str, allow_nan=allow_nan)
    write_text(path, text + "\n")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def write_table(path: Path, frame: pd.DataFrame) -> None:
    """Write a CSV atomically."""
    write_text(path, frame.to_csv(index=False))


# ---------------------------------------------------------------------------- directories


@dataclass(frozen=True)
class Kind:
    """A kind of directory rangelens makes, known by a marker file whose JSON names its format."""

    name: str
    marker: str
    format: str  # prefix of the marker's "format" value

    def marks(self, directory: Path) -> bool:
        """Whether ``directory`` carries this kind's marker."""
        try:
            data = read_json(directory / self.marker)
        except (OSError, ValueError):
            return False
        if not isinstance(data, dict):
            return False
        legacy_stage = self.name == "stage" and {"stage", "fingerprint"} <= set(data)
        return str(data.get("format", "")).startswith(self.format) or legacy_stage


RUN = Kind("run", "run.json", "rangelens.run/")
STAGE = Kind("stage", "stage.json", "rangelens.stage/")
ATLAS = Kind("atlas", "atlas.json", "rangelens.atlas/")
EXPLANATIONS = Kind("explanations", "results.json", "rangelens.explain.results/")
EXPORT = Kind("export", "export.json", "rangelens.export/")  # a shareable folder (rangelens export)
KINDS = (
    RUN,
    ATLAS,
    EXPLANATIONS,
    STAGE,
    EXPORT,
)  # a stage that writes explanations is explanations


def made_by_rangelens(directory: Path) -> Kind | None:
    """The kind of rangelens directory ``directory`` is, or None."""
    return next((kind for kind in KINDS if kind.marks(directory)), None)


def _ignorable(name: str) -> bool:
    return name == LOCK_FILE or _TEMP.match(name) is not None


def check_output_dir(
    final: Path, kind: Kind, *, force: bool = False, keep: Sequence[Path] = ()
) -> None:
    """Raise a one-line error unless a new ``kind`` directory may be written at ``final``.

    Allowed: a new path in a writable place, an empty directory, or a directory of the same kind;
    with ``force``, an atlas or explanations directory that is neither a stage nor inside a run.
    Never: a run directory, a directory holding any of ``keep``, a file, or a directory rangelens
    did not make.
    """
    label = str(final)
    final = Path(os.path.abspath(final))
    if not final.name or final == Path.cwd():
        raise RangelensError(f"refusing to write over {label!r}: give a directory below it")
    try:
        mode = final.lstat().st_mode
    except FileNotFoundError:
        mode = None
    except NotADirectoryError:  # a parent is a file: reported by _check_writable
        mode = None
    if mode is not None and stat.S_ISLNK(mode):
        raise RangelensError(f"refusing to replace {label!r}: it is a symbolic link")
    if mode is not None and not stat.S_ISDIR(mode):
        raise RangelensError(f"{label!r} is a file, not a directory; choose another output")
    if mode is not None:
        resolved = final.resolve()
        for path in keep:
            if Path(path).resolve().is_relative_to(resolved):
                raise RangelensError(
                    f"refusing to replace {label!r}: it holds the run {str(path)!r}"
                )
        names, made = _contents(final)
        if made is RUN:
            raise RangelensError(f"refusing to replace {label!r}: it is a rangelens run directory")
        if made is None and names:
            raise RangelensError(
                f"refusing to replace {label!r}: it is not empty and was not made by rangelens "
                f"(no {kind.marker}); choose a new or empty directory"
            )
        if made is not None and made is not kind:
            _check_forceable(final, label, made)
        if made is not None and made is not kind and not force:
            raise RangelensError(
                f"refusing to replace {label!r}: it holds a rangelens {made.name}, not "
                f"{kind.name}; choose another directory or use --force"
            )
    _check_writable(final.parent)


def _check_forceable(final: Path, label: str, made: Kind) -> None:
    """``--force`` replaces another kind of output only when it is a stand-alone atlas or
    explanations directory: never a stage, nor anything inside a run directory."""
    if made not in (ATLAS, EXPLANATIONS) or STAGE.marks(final):
        raise RangelensError(
            f"refusing to replace {label!r}: it is a rangelens stage directory; --force replaces "
            f"only an atlas or explanations output; choose another directory"
        )
    run = next((p for p in final.parents if RUN.marks(p)), None)
    if run is not None:
        raise RangelensError(
            f"refusing to replace {label!r}: it is inside the rangelens run {str(run)!r}; "
            f"--force replaces only an atlas or explanations output outside a run"
        )


def _contents(directory: Path) -> tuple[set[str], Kind | None]:
    """The entry names of ``directory`` (less locks and temporaries) and its kind, read
    consistently while another process may be swapping it (then its listing and marker may
    momentarily disagree)."""
    markers = {kind.marker for kind in KINDS}
    names: set[str] = set()
    made = None
    for _ in range(10):
        try:
            names = {p.name for p in directory.iterdir() if not _ignorable(p.name)}
        except FileNotFoundError:
            return set(), None
        made = made_by_rangelens(directory)
        if made is not None or not names & markers:
            break
    return names, made


def _check_writable(directory: Path) -> None:
    """Raise a one-line error unless a temporary can be made in ``directory`` (or its nearest
    existing ancestor, where it would be created); writes nothing that stays."""
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise RangelensError(f"cannot create {str(directory)!r}: {str(existing)!r} is a file")
    probe = _temp_sibling(existing / "probe")
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError as err:
        raise _cannot_write(existing, err) from err


def _swap_in(tmp: Path, final: Path, replace: bool) -> None:
    """Rename directory ``tmp`` onto ``final``; an existing ``final`` is moved aside first (and
    removed after) when ``replace``, else ``tmp`` is dropped. Safe against concurrent writers."""
    aside: list[Path] = []
    try:
        for _ in range(100):
            try:
                os.rename(tmp, final)  # succeeds onto a missing or empty directory
                return
            except OSError as err:
                if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                if not replace:
                    return
            old = _temp_sibling(final)
            try:
                os.rename(final, old)
            except FileNotFoundError:
                continue  # another writer moved it first
            aside.append(old)
        raise RangelensError(f"could not replace {str(final)!r}: other processes keep writing it")
    finally:
        for old in aside:
            shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_dir(
    final: Path,
    kind: Kind | None = None,
    *,
    force: bool = False,
    keep: Sequence[Path] = (),
    replace: bool = True,
) -> Iterator[Path]:
    """Yield a new temporary sibling directory that becomes ``final`` when the block succeeds.

    With ``kind``, an existing ``final`` is replaced only as :func:`check_output_dir` allows, and
    the block must write the kind's marker. With ``replace=False`` an existing ``final`` is kept
    and the new one dropped (first writer wins, for caches). Files are flushed before the rename.
    """
    final = Path(os.path.abspath(final))
    if kind is not None:
        check_output_dir(final, kind, force=force, keep=keep)
    parent = _make_dirs(final.parent)
    clean_stale_temps(parent, final.name)
    tmp = _temp_sibling(final)
    try:
        tmp.mkdir()
    except OSError as err:
        raise _cannot_write(parent, err) from err
    try:
        yield tmp
        if kind is not None and not (tmp / kind.marker).is_file():
            raise RuntimeError(f"a {kind.name} directory must hold {kind.marker}")
        mask = _umask()
        for path in tmp.rglob("*"):
            _follow_umask(path, mask)
            if path.is_file():
                _fsync(path)
        _swap_in(tmp, final, replace)
        _fsync(parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
