"""Every bad input raises ``DatasetError`` with a message naming the offending file or folder."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import ralis_gym.data.camvid as camvid_module
from ralis_gym.data import CamVid, Cityscapes, verify_manifest
from ralis_gym.errors import DatasetError
from ralis_gym.paths import CACHE_ENV
from tests.fixtures_data import (
    make_camvid_fixture,
    make_cityscapes_fixture,
    write_manifest,
    write_png,
)

COUNTS = {"train": 3, "val": 2, "test": 2}


@pytest.fixture(autouse=True)
def _tmp_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))


@pytest.fixture
def data_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A synthetic 3/2/2-image CamVid-like tree, with the counts patched to match: the error paths
    need files of the right layout and size, not the real CamVid, so these tests run anywhere."""
    monkeypatch.setattr(camvid_module, "CAMVID_COUNTS", dict(COUNTS))
    return make_camvid_fixture(tmp_path / "data", COUNTS)


def first_pair(data_root: Path, split: str = "train") -> tuple[Path, Path]:
    name = sorted(p.name for p in (data_root / "camvid" / split).glob("*.png"))[0]
    return data_root / "camvid" / split / name, data_root / "camvid" / f"{split}annot" / name


def test_fixture_tree_loads(data_root: Path) -> None:
    ds = CamVid(data_root)
    assert len(ds.split("train")) == 3
    assert len(ds.split("test")) == 2


def test_missing_data_root(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetError, match="CamVid not found") as exc:
        CamVid(missing)
    assert str(missing / "camvid") in str(exc.value)


def test_missing_annot_folder(data_root: Path) -> None:
    annot = data_root / "camvid" / "valannot"
    shutil.rmtree(annot)
    with pytest.raises(DatasetError, match="folder missing") as exc:
        CamVid(data_root)
    assert str(annot) in str(exc.value)


def test_wrong_file_count(data_root: Path) -> None:
    image, _ = first_pair(data_root)
    image.unlink()
    with pytest.raises(DatasetError, match="found 2 files") as exc:
        CamVid(data_root)
    assert str(image.parent) in str(exc.value)
    assert "expected 3" in str(exc.value)


def test_missing_label_file(data_root: Path) -> None:
    # same count, but one annotation has another name: its image has no label
    _, label = first_pair(data_root)
    label.rename(label.with_name("renamed.png"))
    ds = CamVid(data_root)
    with pytest.raises(DatasetError, match="missing file") as exc:
        ds.split("train")
    assert str(label) in str(exc.value)


def test_missing_label_file_without_cache(data_root: Path) -> None:
    _, label = first_pair(data_root)
    label.rename(label.with_name("renamed.png"))
    with pytest.raises(DatasetError, match="missing file") as exc:
        CamVid(data_root, use_cache=False).split("train")
    assert str(label) in str(exc.value)


def test_truncated_png(data_root: Path) -> None:
    image, _ = first_pair(data_root)
    raw = image.read_bytes()
    image.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DatasetError, match="truncated PNG") as exc:
        CamVid(data_root).split("train")
    assert str(image) in str(exc.value)


def test_truncated_label_png(data_root: Path) -> None:
    _, label = first_pair(data_root, "test")
    raw = label.read_bytes()
    label.write_bytes(raw[:100])
    with pytest.raises(DatasetError, match="truncated PNG") as exc:
        CamVid(data_root).split("test")
    assert str(label) in str(exc.value)


def test_non_png_garbage(data_root: Path) -> None:
    image, _ = first_pair(data_root)
    image.write_bytes(os.urandom(4096))
    with pytest.raises(DatasetError) as exc:
        CamVid(data_root).split("train")
    assert str(image) in str(exc.value)


def test_garbage_with_png_trailer_cannot_decode(data_root: Path) -> None:
    # garbage that passes the IEND check must still fail in the decoder
    image, label = first_pair(data_root, "val")
    image.write_bytes(os.urandom(4096) + b"IEND\xaeB`\x82")
    with pytest.raises(DatasetError, match="cannot decode image") as exc:
        CamVid(data_root).split("val")
    assert str(image) in str(exc.value)
    shutil.copyfile(first_pair(data_root, "test")[0], image)
    label.write_bytes(b"not a png at all" + b"IEND\xaeB`\x82")
    with pytest.raises(DatasetError, match="cannot decode label") as exc:
        CamVid(data_root).split("val")
    assert str(label) in str(exc.value)


def test_image_label_size_mismatch(data_root: Path) -> None:
    image, label = first_pair(data_root)
    write_png(label, np.zeros((180, 240), dtype=np.uint8))
    with pytest.raises(DatasetError, match="size mismatch") as exc:
        CamVid(data_root).split("train")
    assert str(image) in str(exc.value)
    assert str(label) in str(exc.value)


def test_wrong_image_size_for_dataset(data_root: Path) -> None:
    image, label = first_pair(data_root)
    write_png(image, np.zeros((180, 240, 3), dtype=np.uint8))
    write_png(label, np.zeros((180, 240), dtype=np.uint8))
    with pytest.raises(DatasetError, match="expects 480x360") as exc:
        CamVid(data_root).split("train")
    assert str(image) in str(exc.value)


def test_label_value_out_of_range(data_root: Path) -> None:
    _, label = first_pair(data_root)
    values = np.zeros((360, 480), dtype=np.uint8)
    values[10:20, 10:20] = 200
    write_png(label, values)
    with pytest.raises(DatasetError, match=r"value\(s\) \[200\]") as exc:
        CamVid(data_root).split("train")
    assert str(label) in str(exc.value)


def test_label_with_three_channels(data_root: Path) -> None:
    _, label = first_pair(data_root)
    write_png(label, np.zeros((360, 480, 3), dtype=np.uint8))
    with pytest.raises(DatasetError, match="3 channels") as exc:
        CamVid(data_root).split("train")
    assert str(label) in str(exc.value)


def test_checksum_mismatch(data_root: Path) -> None:
    folder = data_root / "camvid"
    manifest = write_manifest(folder)
    assert verify_manifest(manifest, folder) == 2 * sum(COUNTS.values())
    assert CamVid(data_root, verify_checksums=True).verify_checksums() == 14
    _, label = first_pair(data_root, "val")
    raw = bytearray(label.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    label.write_bytes(bytes(raw))
    with pytest.raises(DatasetError, match="checksum mismatch") as exc:
        verify_manifest(manifest, folder)
    assert str(label) in str(exc.value)
    with pytest.raises(DatasetError, match="checksum mismatch"):
        CamVid(data_root, verify_checksums=True)


def test_manifest_lists_missing_file(data_root: Path) -> None:
    folder = data_root / "camvid"
    manifest = write_manifest(folder)
    image, _ = first_pair(data_root, "test")
    image.unlink()
    with pytest.raises(DatasetError, match="missing file") as exc:
        verify_manifest(manifest, folder)
    assert str(image) in str(exc.value)


def test_no_manifest(data_root: Path) -> None:
    with pytest.raises(DatasetError, match="no SHA256SUMS") as exc:
        CamVid(data_root, verify_checksums=True)
    assert str(data_root / "camvid") in str(exc.value)


def test_cityscapes_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="Cityscapes not found") as exc:
        Cityscapes(tmp_path)
    assert str(tmp_path / "cityscapes") in str(exc.value)


def test_cityscapes_missing_label(tmp_path: Path) -> None:
    root = make_cityscapes_fixture(tmp_path / "data", n_train=5, n_val=2, size=(64, 32))
    label = sorted((root / "cityscapes" / "gtFine" / "val").glob("*/*_labelIds.png"))[1]
    label.unlink()
    with pytest.raises(DatasetError, match="label missing") as exc:
        Cityscapes(root, image_size=(64, 32), region_size=(32, 32))
    assert str(label) in str(exc.value)


def test_cityscapes_missing_folder(tmp_path: Path) -> None:
    root = make_cityscapes_fixture(tmp_path / "data", n_train=5, n_val=2, size=(64, 32))
    folder = root / "cityscapes" / "gtFine" / "train"
    shutil.rmtree(folder)
    with pytest.raises(DatasetError, match="folder missing") as exc:
        Cityscapes(root, image_size=(64, 32), region_size=(32, 32))
    assert str(folder) in str(exc.value)


def test_cityscapes_empty_split(tmp_path: Path) -> None:
    root = make_cityscapes_fixture(tmp_path / "data", n_train=5, n_val=0, size=(64, 32))
    (root / "cityscapes" / "leftImg8bit" / "val").mkdir(parents=True, exist_ok=True)
    (root / "cityscapes" / "gtFine" / "val").mkdir(parents=True, exist_ok=True)
    with pytest.raises(DatasetError, match="no <city>") as exc:
        Cityscapes(root, image_size=(64, 32), region_size=(32, 32))
    assert str(root / "cityscapes" / "leftImg8bit" / "val") in str(exc.value)
