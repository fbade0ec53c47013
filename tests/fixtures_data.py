"""Builders of small on-disk datasets for tests (plain functions, reusable from any test module).

Every builder writes into a folder it is given and returns the path to pass to the dataset
(a data root for ``CamVid`` / ``Cityscapes``, a YAML path for ``CustomDataset``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import yaml

from ralis_gym.paths import DATA_ENV

# The README's convention when RALIS_GYM_DATA is not set: ``shared/data`` beside the checkout.
DEFAULT_DATA_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CAMVID_SPLITS = ("train", "val", "test")


def default_data_root() -> Path:
    """The data root holding the real datasets: ``$RALIS_GYM_DATA`` if set, else ``../shared/data``
    relative to the repository root."""
    env = os.environ.get(DATA_ENV)
    return Path(env).expanduser() if env else DEFAULT_DATA_ROOT


def find_camvid_root() -> Path | None:
    """The data root if it holds a real CamVid (``camvid/train`` ... ``camvid/testannot``), else None."""
    root = default_data_root()
    camvid = root / "camvid"
    if all((camvid / s).is_dir() and (camvid / f"{s}annot").is_dir() for s in CAMVID_SPLITS):
        return root
    return None


def write_png(path: Path, array: np.ndarray) -> Path:
    """Write a uint8 array as PNG (``[H, W, 3]`` is taken as RGB, ``[H, W]`` as one channel)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.ascontiguousarray(array, dtype=np.uint8)
    if arr.ndim == 3:
        arr = cv2.cvtColor(arr, cv2.COLOR_RGB2BGR)
    if not cv2.imwrite(str(path), arr):
        raise OSError(f"could not write {path}")
    return path


def random_rgb(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """Random RGB uint8 image of ``size`` = (width, height)."""
    w, h = size
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def make_camvid_fixture(
    data_root: Path,
    counts: Mapping[str, int] | None = None,
    source: Path | None = None,
    size: tuple[int, int] = (480, 360),
    seed: int = 0,
) -> Path:
    """A CamVid-like tree ``data_root/camvid/{split,splitannot}/*.png`` with ``counts`` files per split.

    With ``source`` (a real ``camvid`` folder) the first files of each split are copied byte for byte;
    otherwise random images and labels with values 0..11 of ``size`` (w, h) are written.
    Returns ``data_root``. Pair it with ``monkeypatch.setattr(ralis_gym.data.camvid, "CAMVID_COUNTS", counts)``.
    """
    counts = dict(counts or {"train": 3, "val": 2, "test": 2})
    rng = np.random.default_rng(seed)
    camvid = data_root / "camvid"
    for split, n in counts.items():
        (camvid / split).mkdir(parents=True, exist_ok=True)
        (camvid / f"{split}annot").mkdir(parents=True, exist_ok=True)
        if source is not None:
            names = sorted(p.name for p in (source / split).glob("*.png"))[:n]
            for name in names:
                shutil.copyfile(source / split / name, camvid / split / name)
                shutil.copyfile(source / f"{split}annot" / name, camvid / f"{split}annot" / name)
        else:
            w, h = size
            for i in range(n):
                name = f"{split}_{i:04d}.png"
                write_png(camvid / split / name, random_rgb(rng, size))
                write_png(camvid / f"{split}annot" / name, rng.integers(0, 12, size=(h, w), dtype=np.uint8))
    return data_root


CITYSCAPES_TRAIN_CITIES = ("aachen", "bochum", "zurich")
CITYSCAPES_VAL_CITIES = ("frankfurt", "lindau")


def make_cityscapes_fixture(
    root: Path,
    n_train: int = 24,
    n_val: int = 4,
    size: tuple[int, int] = (256, 128),
    include_state_set: bool = False,
    seed: int = 0,
) -> Path:
    """A tiny Cityscapes in the official layout under ``root/cityscapes``; returns ``root``.

    Writes random RGB ``<city>_<seq>_<frame>_leftImg8bit.png`` images of ``size`` (w, h) and
    ``..._gtFine_labelIds.png`` labels with random labelIds in 0..33 (plus a few 255).
    With ``include_state_set`` the first 10 train images carry the names of the reference state
    set (``CITYSCAPES_STATE_SET``), so ``Cityscapes`` uses them as ``d_s``.
    """
    from ralis_gym.data.cityscapes import CITYSCAPES_STATE_SET

    rng = np.random.default_rng(seed)
    w, h = size
    base = root / "cityscapes"
    for split, n, cities in (
        ("train", n_train, CITYSCAPES_TRAIN_CITIES),
        ("val", n_val, CITYSCAPES_VAL_CITIES),
    ):
        stems = [f"{cities[i % len(cities)]}_{i:06d}_{19 + i:06d}" for i in range(n)]
        if split == "train" and include_state_set:
            k = min(n, len(CITYSCAPES_STATE_SET))
            stems[:k] = CITYSCAPES_STATE_SET[:k]
        for stem in stems:
            city = stem.split("_")[0]
            write_png(base / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", random_rgb(rng, size))
            label = rng.integers(0, 34, size=(h, w), dtype=np.uint8)
            label[rng.random((h, w)) < 0.01] = 255
            write_png(base / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", label)
    return root


def make_custom_fixture(
    root: Path,
    n: int = 12,
    size: tuple[int, int] = (64, 48),
    num_classes: int = 3,
    config: Mapping[str, Any] | None = None,
    seed: int = 0,
    yaml_name: str = "custom.yaml",
) -> Path:
    """Images ``root/images/img_XX.png``, masks ``root/masks/img_XX.png`` and a YAML; returns its path.

    Masks hold class ids ``0..num_classes-1`` and a few ignore pixels (255). The YAML has every
    required key plus ``split_seed: 0`` and fractions; ``config`` entries replace or add keys
    (a value of ``None`` removes the key).
    """
    rng = np.random.default_rng(seed)
    w, h = size
    for i in range(n):
        write_png(root / "images" / f"img_{i:02d}.png", random_rgb(rng, size))
        mask = rng.integers(0, num_classes, size=(h, w), dtype=np.uint8)
        mask[rng.random((h, w)) < 0.02] = 255
        write_png(root / "masks" / f"img_{i:02d}.png", mask)
    cfg: dict[str, Any] = {
        "name": "tiny_custom",
        "class_names": [f"class_{c}" for c in range(num_classes)],
        "ignore_index": 255,
        "image_size": [w, h],
        "region_size": [w // 4 or 1, h // 4 or 1],
        "images_dir": "images",
        "masks_dir": "masks",
        "split_seed": 0,
        "split_fractions": {"d_t": 0.25, "d_v": 0.4, "d_s": 0.1, "d_r": 0.1, "test": 0.15},
    }
    for key, value in (config or {}).items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    path = root / yaml_name
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def write_manifest(folder: Path, name: str = "SHA256SUMS") -> Path:
    """A ``sha256sum``-format manifest of every file under ``folder`` (paths relative to it)."""
    lines = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != name):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        lines.append(f"{digest}  {path.relative_to(folder).as_posix()}")
    manifest = folder / name
    manifest.write_text("\n".join(lines) + "\n")
    return manifest
