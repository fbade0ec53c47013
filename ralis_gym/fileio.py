"""File I/O in one place: locks and atomic writes for shared files, SHA-256 hashes and manifests.

Why: benchmark sweeps on Ray and ``SubprocVecEnv`` workers start many processes against one cache
at once. Without a lock each of them decodes, encodes or pretrains the same entry (minutes of
duplicated work); without unique temporary names two writers would write into the same temporary
file and could publish a mix of both. Here the first process does the work under an exclusive
advisory lock while the others wait and then read its result; every file appears in one
``os.replace``, so a reader never sees a half-written one and a killed writer leaves at most a
stray temporary file (named ``.<stem>.<pid>-<random>.tmp<suffix>``), never a corrupt entry.

Manifests (``sha256sum`` output: ``<sha256>  <relative path>`` per line) list what a dataset folder
must hold; one parser with one rule serves the download (which writes the files) and the dataset
check (which reads them), so a manifest that one accepts the other accepts too.
"""

from __future__ import annotations

import hashlib
import os
import re
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
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
    """Write ``path`` through ``write(file)`` into a ``unique_temporary`` file, fsync it, then rename
    it over ``path`` in one step. On any error the temporary file is removed and the error raised."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = unique_temporary(path)
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in blocks so large files never sit in memory."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


_DIGEST = re.compile(r"[0-9a-fA-F]{64}")


def parse_manifest(text: str, where: str, error: type[Exception] = ValueError) -> dict[str, str]:
    """Map relative path -> lower-case SHA-256 from ``sha256sum``-style lines; raise ``error``.

    Blank lines and ``#`` comments are skipped; a leading ``*`` (binary mode) is dropped. Every
    other line must be a 64-digit hex digest and a path that stays inside the folder (no absolute
    path, ``..``, ``~`` or backslash: the paths become file names on disk). A path listed twice with
    different digests, or a manifest that lists nothing, is refused: it cannot verify anything.
    ``where`` names the manifest in messages; ``error`` is the caller's exception class.
    """
    entries: dict[str, str] = {}
    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split(maxsplit=1)
        if len(parts) != 2 or not _DIGEST.fullmatch(parts[0]):
            raise error(f"{where}:{line_no}: expected '<sha256>  <relative path>', got {line!r}")
        digest, rel = parts[0].lower(), parts[1].strip().lstrip("*")
        pure = PurePosixPath(rel)
        if not rel or "\\" in rel or pure.is_absolute() or ".." in pure.parts or rel.startswith("~"):
            raise error(f"{where}:{line_no}: unsafe path {rel!r}; paths must stay inside the folder")
        if entries.get(rel, digest) != digest:
            raise error(f"{where}:{line_no}: {rel!r} is listed twice with different digests")
        entries[rel] = digest
    if not entries:
        raise error(f"manifest {where} lists no files")
    return entries


def read_manifest(path: str | os.PathLike, error: type[Exception] = ValueError) -> dict[str, str]:
    """``parse_manifest`` of a manifest file; an unreadable file raises ``error`` too."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise error(f"cannot read manifest {path}: {exc}") from None
    return parse_manifest(text, str(path), error)
