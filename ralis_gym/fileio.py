"""Files that many processes share (the user cache): one lock per entry, atomic writes.

Why: benchmark sweeps on Ray and ``SubprocVecEnv`` workers start many processes against one cache
at once. Without a lock each of them decodes, encodes or pretrains the same entry (minutes of
duplicated work); without unique temporary names two writers would write into the same temporary
file and could publish a mix of both. Here the first process does the work under an exclusive
advisory lock while the others wait and then read its result; every file appears in one
``os.replace``, so a reader never sees a half-written one and a killed writer leaves at most a
stray temporary file (named ``.<name>.*.tmp``), never a corrupt entry.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

try:
    import fcntl
except ImportError:  # not POSIX: no advisory locks (writes stay atomic, work may be done twice)
    fcntl = None  # type: ignore[assignment]


@contextmanager
def file_lock(path: Path) -> Iterator[bool]:
    """Hold an exclusive lock on ``<path>.lock`` for the block; yields whether it is held.

    A second process asking for the same lock waits until the first leaves the block. The kernel
    drops the lock when its holder dies, so a killed process never leaves a stale lock. Where no
    lock can be taken (read-only cache folder, no ``fcntl``) the block runs unlocked.
    """
    lock_path = path.with_name(path.name + ".lock")
    fd = None
    if fcntl is not None:
        try:
            lock_path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            fd = None
    if fd is None:
        yield False
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield True
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def unique_temporary(path: Path) -> Path:
    """A temporary name beside ``path`` that no other process or thread uses, with ``path``'s
    suffix (``np.save`` and memory maps keep ``.npy``): ``.<stem>.<pid>-<random>.tmp<suffix>``."""
    return path.with_name(f".{path.stem}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp{path.suffix}")


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write ``path`` through ``write(file)`` into a unique temporary file, fsync it, then rename it
    over ``path`` in one step. On any error the temporary file is removed and the error raised."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
