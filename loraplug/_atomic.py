"""Atomic file writes: a reader sees the old file or the new one, never a torn one.

Each file is written to a temporary name in its own directory, flushed to disk, and then
renamed over the target (``os.replace`` is atomic on POSIX and Windows). A process killed
at any point before the rename leaves the previous file untouched; at worst a stray
``.<name>.<random>.tmp`` file remains beside it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable
from pathlib import Path

from ._lock import locked


def _fsync_path(path: Path, *, directory: bool = False) -> None:
    flags = os.O_RDONLY if directory else os.O_RDWR
    try:
        fd = os.open(path, flags)
    except OSError:
        if directory:  # some platforms (Windows) cannot open a directory; nothing to sync
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


_CHUNK = 16 << 20


def bytes_writer(data: bytes) -> Callable[[str], None]:
    """A writer for :func:`write_atomically` that writes ``data`` in chunks."""

    def write(path: str) -> None:
        view = memoryview(data)
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
        try:
            while view:
                view = view[os.write(fd, view[:_CHUNK]):]
        finally:
            os.close(fd)

    return write


def _stage(target: Path, write: Callable[[str], None]) -> Path:
    temp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
    # O_EXCL: never reuse someone else's file; mode 0o666 lets the umask decide, as open() does.
    os.close(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    mode = os.stat(temp).st_mode & 0o777
    try:
        write(str(temp))
        # A writer may have replaced the file (safetensors writes a 0600 file and renames
        # it over the path): give the result the mode a plain open() would have.
        os.chmod(temp, mode)
        _fsync_path(temp)
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise
    return temp


def write_atomically(files: dict[Path, Callable[[str], None]]) -> None:
    """Write each ``target: write(temp_path)`` pair, then rename all targets into place.

    Every file is complete and synced before the first rename, so an interruption while
    writing (the slow part) leaves all previous files as they were. Renames follow in the
    order given, under an exclusive lock on the directories (``_lock``), so that the
    renames of concurrent writers never interleave.
    """
    staged: list[tuple[Path, Path]] = []
    try:
        for target, write in files.items():
            staged.append((_stage(target, write), target))
        # Concurrent writers to one directory rename their files one writer at a time.
        with locked(target.parent for target in files):
            for temp, target in staged:
                os.replace(temp, target)
    except BaseException:
        for temp, _ in staged:
            with contextlib.suppress(OSError):
                temp.unlink()
        raise
    for directory in {target.parent for target in files}:
        _fsync_path(directory, directory=True)
