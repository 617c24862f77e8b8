"""Advisory locks on adapter directories, so that concurrent saves and loads see whole pairs.

An adapter is two files renamed into place one after the other. Two processes saving to
one directory could interleave their renames and leave one save's weights beside the
other's config. A save therefore holds an exclusive ``flock`` on the directory itself
while it renames (the slow writing happens before, unlocked), and a load holds a shared
one while it reads both files: whoever comes second waits, and every reader sees the
pair of one writer. The kernel drops the lock when its process dies, so a killed save
never blocks the next one.

The lock is taken on the directory, so no lock file is left beside the adapter. Where
``flock`` is unavailable (Windows, some network file systems) or the directory cannot be
opened, saves and loads go ahead unlocked, as they did before.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


@contextlib.contextmanager
def locked(directories: Iterable[Path], *, shared: bool = False) -> Iterator[None]:
    """Hold a lock on each directory (in sorted order, so two writers cannot deadlock)."""
    with contextlib.ExitStack() as stack:
        for directory in sorted(set(directories)):
            stack.enter_context(_locked(directory, shared=shared))
        yield


@contextlib.contextmanager
def _locked(directory: Path, *, shared: bool) -> Iterator[None]:
    fd = None
    if fcntl is not None:
        with contextlib.suppress(OSError):
            fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    if fd is None:
        yield
        return
    try:
        with contextlib.suppress(OSError):  # a file system without flock: unlocked
            fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock
