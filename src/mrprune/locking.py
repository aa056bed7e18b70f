"""Advisory locks (flock) that keep mrprune runs started side by side apart where they share a path: a
checkpoint directory, the GGUF conversion cache, the moment an output directory is swapped in. The kernel drops
a lock when its process ends, so a killed run never leaves one held. Where flock does not exist (Windows) the
locks are no-ops."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - not on Linux or macOS
    fcntl = None  # type: ignore[assignment]


def try_lock(path: Path) -> int | None:
    """Create ``path`` if needed and take an exclusive lock on it without waiting. Returns the open descriptor
    that holds the lock (pass it to ``release``), or None when another process holds it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is None:
            return fd
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # the holder removed the file as we locked it: lock the one at the path now


def release(fd: int) -> None:
    os.close(fd)  # closing the last descriptor of the open file drops its flock


@contextlib.contextmanager
def held(path: Path, directory: bool = False) -> Iterator[None]:
    """An exclusive lock on ``path`` while the block runs, waiting for it if another process holds it.
    ``directory``: lock the existing directory ``path`` itself (nothing is created in it)."""
    if fcntl is None:  # nothing to lock with (and Windows cannot open a directory)
        yield
        return
    fd = os.open(path, os.O_RDONLY) if directory else os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
