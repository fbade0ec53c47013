"""Dataset model shared by every dataset: metadata, decoded splits, validated PNG decoding, caching.

A dataset decodes each PNG once and keeps uint8 arrays (images ``[n, H, W, 3]`` RGB, labels
``[n, H, W]`` with the ignore id outside the classes). Decoded splits are cached as ``.npy`` files
under the user cache and memory-mapped on later loads, so a second process starts in milliseconds.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from tqdm.auto import tqdm

from ralis_gym.errors import DatasetError
from ralis_gym.fileio import file_lock, unique_temporary
from ralis_gym.paths import user_cache_dir

# Bump when decoding semantics change so stale caches are never reused.
_DECODE_VERSION = 1


@dataclass(frozen=True)
class DatasetInfo:
    """Facts about a dataset that every consumer needs (classes, ignore id, sizes, regions)."""

    name: str
    class_names: tuple[str, ...]
    ignore_index: int
    image_size: tuple[int, int]  # (width, height)
    region_size: tuple[int, int]  # (width, height)
    palette: tuple[tuple[int, int, int], ...] = ()

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def palette_array(self) -> np.ndarray:
        """RGB colour per class id, with black for the ignore id: uint8 ``[ignore_index + 1, 3]``."""
        colours = np.zeros((max(self.ignore_index, self.num_classes - 1) + 1, 3), dtype=np.uint8)
        if self.palette:
            colours[: len(self.palette)] = np.asarray(self.palette, dtype=np.uint8)
        else:  # deterministic distinct colours for datasets without an official palette
            rng = np.random.default_rng(0)
            colours[: self.num_classes] = rng.integers(40, 256, size=(self.num_classes, 3))
        colours[self.ignore_index] = 0
        return colours


@dataclass
class SegmentationSplit:
    """One decoded split: images, labels and the names they came from."""

    info: DatasetInfo
    name: str
    image_names: tuple[str, ...]
    images: np.ndarray  # uint8 [n, H, W, 3], RGB
    labels: np.ndarray  # uint8 [n, H, W], values in 0..num_classes-1 or ignore_index
    _key: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        if len(self.image_names) != len(self.images) or len(self.images) != len(self.labels):
            raise DatasetError(
                f"split {self.name!r}: {len(self.image_names)} names, {len(self.images)} images and "
                f"{len(self.labels)} labels; they must match"
            )

    def __len__(self) -> int:
        return len(self.image_names)

    @property
    def key(self) -> str:
        """Stable identity of the split's content, used to key feature caches."""
        if not self._key:
            digest = hashlib.sha1("\n".join(self.image_names).encode()).hexdigest()[:12]
            self._key = f"{self.info.name}-{self.name}-{len(self)}-{digest}"
        return self._key

    def subset(self, indices: Sequence[int] | np.ndarray, name: str | None = None) -> SegmentationSplit:
        """A split made of some of this split's images (arrays are copied into memory)."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"subset indices out of range 0..{len(self) - 1} for split {self.name!r}")
        return SegmentationSplit(
            info=self.info,
            name=name or f"{self.name}[{idx.size}]",
            image_names=tuple(self.image_names[i] for i in idx),
            images=np.ascontiguousarray(self.images[idx]),
            labels=np.ascontiguousarray(self.labels[idx]),
        )

    def select(self, names: Sequence[str], name: str) -> SegmentationSplit:
        """A split made of the named images, in the given order."""
        position = {n: i for i, n in enumerate(self.image_names)}
        missing = [n for n in names if n not in position]
        if missing:
            raise DatasetError(
                f"split {name!r} names {len(missing)} image(s) absent from {self.name!r}, e.g. {missing[:3]}"
            )
        return self.subset([position[n] for n in names], name=name)

    def class_pixel_counts(self) -> np.ndarray:
        """Pixels per class id over the split (int64 ``[num_classes + 1]``, last = ignore)."""
        counts = np.bincount(self.labels.reshape(-1), minlength=256)
        out = counts[: self.info.num_classes + 1].copy()
        out[-1] = counts[self.info.ignore_index]
        return out


LabelMapper = Callable[[np.ndarray], np.ndarray]


#: suffixes of the image files read from a folder (custom datasets, labeling projects, suggestions)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def image_files(folder: Path) -> list[Path]:
    """The image files of ``folder`` (``IMAGE_SUFFIXES``, any case), sorted by name."""
    return sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def read_image(path: Path) -> np.ndarray:
    """Decode an 8-bit image file into RGB uint8 ``[H, W, 3]``; raises ``DatasetError`` naming the file."""
    raw = _read_bytes(path)
    img = cv2.imdecode(np.frombuffer(raw, dtype=np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise DatasetError(f"cannot decode image {path}: the file is corrupt or not an image; re-download it")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def read_label(path: Path) -> np.ndarray:
    """Decode a single-channel label PNG into uint8 ``[H, W]``; raises ``DatasetError`` naming the file."""
    raw = _read_bytes(path)
    lab = cv2.imdecode(np.frombuffer(raw, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if lab is None:
        raise DatasetError(f"cannot decode label {path}: the file is corrupt or not a PNG; re-download it")
    if lab.ndim == 3:
        raise DatasetError(
            f"label {path} has {lab.shape[2]} channels; expected a single-channel PNG of class ids"
        )
    if lab.dtype != np.uint8:
        if lab.max() > 255:
            raise DatasetError(f"label {path} holds values up to {lab.max()}; expected 8-bit class ids")
        lab = lab.astype(np.uint8)
    return lab


def _read_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise DatasetError(f"missing file {path}")
    raw = path.read_bytes()
    if path.suffix.lower() == ".png" and not raw.rstrip(b"\x00").endswith(b"IEND\xaeB`\x82"):
        # libpng decodes a cut-off file into a partly grey image with only a warning: refuse it.
        raise DatasetError(f"truncated PNG {path} ({len(raw)} bytes, no IEND chunk); re-download it")
    return raw


def decode_pairs(
    pairs: Sequence[tuple[Path, Path]],
    info: DatasetInfo,
    label_map: LabelMapper | None = None,
    desc: str = "decoding",
    check_size: bool = True,
    out: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Decode (image, label) file pairs into stacked uint8 arrays, validating every file.

    Checks: both files decode, image and label sizes agree (and equal ``info.image_size`` when
    ``check_size``), and every label value is a class id or the ignore id (after ``label_map``).
    ``out`` receives the arrays (shapes ``[n, H, W, 3]`` and ``[n, H, W]``) instead of new ones.
    """
    width, height = info.image_size
    n = len(pairs)
    if out is None:
        images = np.empty((n, height, width, 3), dtype=np.uint8)
        labels = np.empty((n, height, width), dtype=np.uint8)
    else:  # e.g. memory-mapped cache files, so a large split never has to fit in RAM
        images, labels = out
    valid = np.zeros(256, dtype=bool)
    valid[: info.num_classes] = True
    valid[info.ignore_index] = True
    for i, (img_path, lab_path) in enumerate(
        tqdm(pairs, desc=desc, unit="img", leave=False, disable=None if n >= 50 else True)
    ):
        img = read_image(img_path)
        lab = read_label(lab_path)
        if label_map is not None:
            lab = label_map(lab)
        if img.shape[:2] != lab.shape:
            raise DatasetError(
                f"size mismatch: image {img_path} is {img.shape[1]}x{img.shape[0]} but label {lab_path} "
                f"is {lab.shape[1]}x{lab.shape[0]} (WxH)"
            )
        if check_size and img.shape[:2] != (height, width):
            raise DatasetError(
                f"image {img_path} is {img.shape[1]}x{img.shape[0]} (WxH); dataset {info.name!r} expects "
                f"{width}x{height}"
            )
        bad = ~valid[lab]
        if bad.any():
            values = sorted(set(np.unique(lab[bad]).tolist()))
            raise DatasetError(
                f"label {lab_path} holds value(s) {values[:8]} outside 0..{info.num_classes - 1} and the "
                f"ignore id {info.ignore_index}"
            )
        images[i] = img
        labels[i] = lab
    return images, labels


def _load_decoded(img_file: Path, lab_file: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """Memory maps of a decoded split's cache files, or None if absent or unreadable."""
    if not (img_file.exists() and lab_file.exists()):
        return None
    try:
        return np.load(img_file, mmap_mode="r"), np.load(lab_file, mmap_mode="r")
    except (ValueError, OSError):
        return None  # a half-written cache of an older version: decode again


def cached_decode(
    pairs: Sequence[tuple[Path, Path]],
    info: DatasetInfo,
    split_name: str,
    label_map: LabelMapper | None = None,
    cache_dir: Path | None = None,
    use_cache: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """``decode_pairs`` with an on-disk ``.npy`` cache keyed by file names, sizes and mtimes."""
    if not use_cache:
        return decode_pairs(pairs, info, label_map, desc=f"{info.name}/{split_name}")
    h = hashlib.sha1(f"v{_DECODE_VERSION}|{info}".encode())
    for img_path, lab_path in pairs:
        for p in (img_path, lab_path):
            try:
                st = p.stat()
            except FileNotFoundError:
                raise DatasetError(f"missing file {p}") from None
            h.update(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    folder = (cache_dir or user_cache_dir() / "decoded") / info.name
    stem = folder / f"{split_name}-{h.hexdigest()[:16]}"
    img_file, lab_file = stem.with_suffix(".images.npy"), stem.with_suffix(".labels.npy")
    cached = _load_decoded(img_file, lab_file)
    if cached is not None:
        return cached
    width, height = info.image_size
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:  # read-only cache: work from memory
        return decode_pairs(pairs, info, label_map, desc=f"{info.name}/{split_name}")
    # One process decodes a split; others that need it meanwhile wait, then map its files.
    with file_lock(stem):
        cached = _load_decoded(img_file, lab_file)
        if cached is not None:
            return cached
        tmp_img, tmp_lab = unique_temporary(img_file), unique_temporary(lab_file)
        try:
            out = (
                np.lib.format.open_memmap(tmp_img, "w+", np.uint8, (len(pairs), height, width, 3)),
                np.lib.format.open_memmap(tmp_lab, "w+", np.uint8, (len(pairs), height, width)),
            )
            decode_pairs(pairs, info, label_map, desc=f"{info.name}/{split_name}", out=out)
            for arr in out:
                arr.flush()
            del out
            os.replace(tmp_img, img_file)
            os.replace(tmp_lab, lab_file)
        except OSError:  # read-only or full cache: work from memory
            return decode_pairs(pairs, info, label_map, desc=f"{info.name}/{split_name}")
        finally:
            for tmp in (tmp_img, tmp_lab):
                tmp.unlink(missing_ok=True)
    return np.load(img_file, mmap_mode="r"), np.load(lab_file, mmap_mode="r")
