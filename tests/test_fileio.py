"""The one I/O module: atomic writes leave nothing behind on error, SHA-256 of files, and the one
manifest rule that the download and the dataset check share."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from ralis_gym.errors import DatasetError
from ralis_gym.fileio import atomic_write, parse_manifest, read_manifest, sha256_file, unique_temporary

DIGEST = "ab" * 32


def test_atomic_write_replaces_and_leaves_no_temporary_on_error(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "entry.json"
    atomic_write(target, lambda f: f.write(b"old"))
    assert target.read_bytes() == b"old"

    def fail(f) -> None:
        f.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, fail)
    assert target.read_bytes() == b"old"  # the earlier file is untouched
    assert [p.name for p in target.parent.iterdir()] == ["entry.json"]


def test_unique_temporary_is_hidden_beside_the_target_with_its_suffix(tmp_path: Path) -> None:
    tmp = unique_temporary(tmp_path / "features.npy")
    assert tmp.parent == tmp_path and tmp.name.startswith(".features.") and tmp.name.endswith(".tmp.npy")


def test_sha256_file_matches_hashlib_across_blocks(tmp_path: Path) -> None:
    path = tmp_path / "data.bin"
    data = bytes(range(256)) * 50
    path.write_bytes(data)
    assert sha256_file(path, chunk=1000) == hashlib.sha256(data).hexdigest()


def test_manifest_rules() -> None:
    text = f"# made by sha256sum\n\n{DIGEST.upper()}  train/a.png\n{DIGEST} *train/b.png\n{DIGEST}  train/a.png\n"
    assert parse_manifest(text, "m") == {"train/a.png": DIGEST, "train/b.png": DIGEST}
    bad = {
        "short  a.png": "expected",
        f"{'g' * 64}  a.png": "expected",
        f"{DIGEST}": "expected",
        f"{DIGEST}  ../a.png": "unsafe path",
        f"{DIGEST}  /etc/passwd": "unsafe path",
        f"{DIGEST}  ~/a.png": "unsafe path",
        f"{DIGEST}  a\\b.png": "unsafe path",
        f"{DIGEST}  a.png\n{'cd' * 32}  a.png": "listed twice with different digests",
        "# nothing\n": "lists no files",
    }
    for line, match in bad.items():
        with pytest.raises(ValueError, match=match):
            parse_manifest(line, "m")


def test_read_manifest_raises_the_callers_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="cannot read manifest"):
        read_manifest(tmp_path / "missing", DatasetError)
    (tmp_path / "SHA256SUMS").write_text("nonsense\n")
    with pytest.raises(DatasetError, match=r"SHA256SUMS:1: expected"):
        read_manifest(tmp_path / "SHA256SUMS", DatasetError)
