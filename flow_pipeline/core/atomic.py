"""The one way the project writes a file: never half-written, and a failure names the file.

Temp file in the same directory -> write -> flush -> fsync -> ``os.replace`` -> fsync the directory. A crash at any
point leaves the old file or the new one, never a torn one; a failed write (disk full, permissions) removes its temp
file, leaves the old file untouched and raises :class:`AtomicWriteError` (an ``OSError`` with the errno of the cause,
``ENOSPC`` for a full disk) whose message names the file.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

TEMP_PREFIX = ".tmp-"


class AtomicWriteError(OSError):
    """Writing a file failed; ``errno`` is the cause's (``errno.ENOSPC``: no space left), the message names the file."""


def _os_error_behind(exc: BaseException) -> OSError | None:
    """The OSError an exception was raised from (torch.save reports a full disk as a RuntimeError whose context is
    ``OSError(28)``), or None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError) and exc.errno is not None:
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable (a power cut after ``os.replace`` could otherwise lose it)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic_with(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Replace ``path`` by what ``write(handle)`` writes into a binary file handle (``handle.name``: the temp
    file's path, readable after ``handle.flush()``); returns ``path``.

    Raises AtomicWriteError naming ``path`` when the write fails with an OS error (its errno kept); other errors of
    ``write`` propagate unchanged. Either way the temp file is removed and the previous ``path`` is untouched.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{path.name}.", dir=path.parent)
    except OSError as exc:
        raise AtomicWriteError(exc.errno, f"cannot write {path}: {exc.strerror}") from exc
    try:
        os.close(fd)
        with open(tmp_name, "wb") as handle:  # opened by name: ``handle.name`` is the temp file's path
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
        fsync_directory(path.parent)
    except BaseException as exc:
        Path(tmp_name).unlink(missing_ok=True)
        cause = _os_error_behind(exc)
        if cause is not None and not isinstance(exc, AtomicWriteError):
            raise AtomicWriteError(cause.errno, f"cannot write {path}: {cause.strerror or exc} "
                                                f"(the previous file, if any, is unchanged)") from exc
        raise
    return path


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Replace ``path`` by ``data`` atomically (see :func:`write_atomic_with`)."""
    return write_atomic_with(path, lambda handle: handle.write(data))


def remove_stale_temp_files(directory: str | os.PathLike, older_than_s: float = 0.0) -> list[Path]:
    """Delete temp files left in ``directory`` by writes that were killed midway; returns what was removed.

    ``older_than_s``: only those last modified that long ago, for a directory that other processes may be writing
    into right now (their temp files are young: no write of one file takes anywhere near an hour)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    now = time.time()
    stale = []
    for path in sorted(directory.glob(TEMP_PREFIX + "*")):
        try:
            if now - path.stat().st_mtime >= older_than_s:
                path.unlink()
                stale.append(path)
        except FileNotFoundError:  # its own writer renamed or removed it meanwhile
            continue
    return stale
