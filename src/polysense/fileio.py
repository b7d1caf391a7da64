"""Atomic file writes: write to a temporary file in the same directory, then `os.replace`.

A reader (or a resumed run) therefore sees either the old file or the new one, never half.
A write that fails for a reason outside the program (a read-only location, no permission, a
full disk) is a one-line `OutputError` naming the file and the fix, not a traceback.

Every writer here holds an exclusive `flock` on its temporary file (or directory, `temp_dir`)
while it writes, so `remove_stale` can tell the leftovers of a killed writer from live ones.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from polysense.errors import OutputError

_NOT_ALLOWED = (errno.EACCES, errno.EPERM, errno.EROFS)
_FULL = (errno.ENOSPC, errno.EDQUOT)
# How libraries that do not raise OSError report a full disk: safetensors and tokenizers (Rust
# io errors), SQLite, and torch.save, whose zip writer notices the short write afterwards.
_FULL_MESSAGES = ("No space left on device", "os error 28", "disk is full", "unexpected pos")
STALE_AFTER_S = 60.0  # a temp entry unlocked and unchanged for this long is a killed writer's
TEMP_FILE = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")  # atomic_open/atomic_path: .NAME.XXXXXXXX.tmp


def write_failure(exc: BaseException, path: str | Path, *, flag: str = "") -> OutputError | None:
    """The one-line error for writing `path` that failed with `exc` because of where it writes
    (read-only, no permission, disk full), or None when `exc` is anything else (a bug to show).
    `flag` names the option that chose the location, e.g. "--out", for the fix."""
    elsewhere = f"choose another {flag}" if flag else "write somewhere else"
    errno_ = exc.errno if isinstance(exc, OSError) else None
    if errno_ in _NOT_ALLOWED:
        where = getattr(exc, "filename", None) or path
        return OutputError(
            f"{where}: cannot write here ({exc.strerror}); {elsewhere} or make it writable"
        )
    if errno_ in _FULL or any(m in str(exc) for m in _FULL_MESSAGES):
        detail = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
        return OutputError(f"{path}: the disk is full ({detail}); free some space or {elsewhere}")
    return None


def writable_dir(path: str | Path, *, flag: str) -> Path:
    """Create the directory `path` if needed and check that files can be made in it, so that a
    read-only or mistyped `flag` (e.g. "--out") fails in one line before any work is done."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{flag} {path} is a file; {flag} must name a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-check.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise write_failure(exc, path, flag=flag) or OutputError(
            f"{flag} {path}: cannot create files there ({exc.strerror or exc}); choose another "
            f"{flag}"
        ) from None
    return path


@contextlib.contextmanager
def _translated(path: Path) -> Iterator[None]:
    """Turn a write failure caused by the location (see `write_failure`) into one line."""
    try:
        yield
    except Exception as exc:
        failure = write_failure(exc, path)
        if failure is None:
            raise
        raise failure from None


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary sibling of `path` for writing; rename it over `path` on success."""
    path = Path(path)
    with _translated(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        fcntl.flock(fd, fcntl.LOCK_EX)  # held until the handle closes: a live temp file
        os.fchmod(fd, 0o644)  # mkstemp makes 0600 files; outputs are meant to be shared
        try:
            with os.fdopen(fd, mode) as handle:
                yield handle
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary sibling path for writers that take a file name (safetensors, tokenizers);
    renamed over `path` when the block succeeds, removed when it fails."""
    path = Path(path)
    with _translated(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        fcntl.flock(fd, fcntl.LOCK_EX)  # held while the writer fills the file
        try:
            yield Path(tmp)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        finally:
            os.close(fd)
            if os.path.exists(tmp):
                os.unlink(tmp)


@contextlib.contextmanager
def temp_dir(parent: str | Path, prefix: str) -> Iterator[Path]:
    """A new directory `parent/PREFIXXXXXXXXX`, locked while the block runs (so `remove_stale`
    leaves it alone) and removed after it unless the block renamed it into place."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=prefix))
    fd = os.open(tmp, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        os.close(fd)


@contextlib.contextmanager
def files_into(directory: str | Path, *, prefix: str = ".files.") -> Iterator[Path]:
    """A locked temporary directory inside `directory` for writers that fill a folder
    (`save_pretrained`); when the block succeeds each file in it is renamed into `directory`
    (file by file: each appears whole), and the temporary directory goes either way."""
    directory = Path(directory)
    with _translated(directory), temp_dir(directory, prefix) as tmp:
        yield tmp
        for file in sorted(tmp.iterdir()):
            os.replace(file, directory / file.name)


def remove_stale(directory: str | Path, pattern: re.Pattern[str] = TEMP_FILE) -> list[Path]:
    """Remove what writers killed mid-write left in `directory`: the files and directories whose
    name matches `pattern` (by default the temp files of `atomic_open` and `atomic_path`) that
    no process holds locked (every writer here locks its temp entry while it writes, and the
    kernel drops the locks of a killed process) and that have not changed for `STALE_AFTER_S`
    seconds (which covers the instant between creating a temp entry and locking it). A live
    writer's temp entry is therefore never touched. Best effort: what cannot be removed (a
    read-only directory) stays. Returns the removed paths."""
    try:
        entries = [e for e in os.scandir(directory) if pattern.fullmatch(e.name)]
    except OSError:
        return []
    removed = []
    for entry in entries:
        try:
            is_dir = entry.is_dir(follow_symlinks=False)
            if not (is_dir or entry.is_file(follow_symlinks=False)):
                continue  # only what our writers make: no links, FIFOs or devices
            if time.time() - entry.stat(follow_symlinks=False).st_mtime < STALE_AFTER_S:
                continue
            fd = os.open(entry.path, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if is_dir:
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            removed.append(Path(entry.path))
        except OSError:  # locked by a live writer, or not removable here
            continue
        finally:
            os.close(fd)
    return removed


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_open(path, "w") as handle:
        handle.write(text)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")
