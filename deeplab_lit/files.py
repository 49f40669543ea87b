"""Writing files so that nothing is ever half-written, and checking outputs before long work starts.

- `atomic_write(path, writer)`: the data goes to a temporary file with a name unique to this process
  in the same directory, is flushed to disk, given ordinary permissions (0666 minus the umask, like
  any file the user creates: teammates on a shared `runs/` can read it) and renamed over `path`. If
  anything fails, the temporary file is deleted and the error is a UserError naming `path`.
- `check_writable(path, key)`: refuses, before an evaluation of hours, an output that is a directory,
  whose directory cannot be created, or where no file can be created.
- `RunLock`: one run directory, one live process. An exclusive `flock` on `<run dir>/.lock`, held for
  the life of the process and released by the kernel when it exits (a crashed or killed process
  leaves no stale lock to clean up); the file holds the holder's PID for the message.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

from deeplab_lit.errors import UserError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _describe(error: OSError) -> str:
    if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return f"{error.strerror} (the disk or quota is full)"
    return error.strerror or str(error)


def atomic_write(path: str | Path, writer: Callable[[BinaryIO], None]) -> Path:
    """Call `writer(handle)` on a temporary file, then rename it to `path` (see the module docstring)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as error:
        raise UserError(f"cannot write {path}: {_describe(error)}; choose a writable location") from None
    try:
        with os.fdopen(handle, "wb") as stream:
            writer(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, path)
    except BaseException as error:
        Path(temporary).unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise UserError(f"cannot write {path}: {_describe(error)}; nothing was written") from None
        raise
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda stream: stream.write(text.encode()))


def write_json_atomic(path: str | Path, data: Any) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


def check_writable(path: str | Path, key: str) -> Path:
    """Refuse an output file that cannot be written, naming the option `key` (e.g. "--json")."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{key} {path} is a directory; give a file name")
    check_writable_dir(path.parent, key, shown=path)
    return path


def check_writable_dir(directory: str | Path, key: str, shown: str | Path | None = None) -> Path:
    """Refuse an output directory in which no file can be created (without leaving anything behind)."""
    directory = Path(directory)
    shown = shown if shown is not None else directory
    if directory.exists() and not directory.is_dir():
        raise UserError(f"{key} {shown}: {directory} is a file, not a directory")
    existing = directory
    while not existing.exists():  # the nearest existing ancestor must accept the directories to create
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{key} {shown}: {existing} is a file, not a directory")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise UserError(f"{key} {shown}: cannot write in {existing} ({_describe(error)})") from None
    return directory


class RunLock:
    """Exclusive lock of a run directory for this process (see the module docstring)."""

    FILE = ".lock"

    def __init__(self, run_dir: str | Path, what: str):
        self.path = Path(run_dir) / self.FILE
        self.what = what  # e.g. "run runs/v3/default-seed0", for the message
        self._handle = None

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise UserError(f"{self.what} is in use by process {holder} (lock {self.path}); wait for it to finish, "
                            "or give this command another --run-dir or seed") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._handle = handle
        return self

    def release(self) -> None:
        if self._handle is not None:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()
