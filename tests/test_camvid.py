"""CamVid on the real data (skipped when it is absent): splits, roles, arrays and the decode cache."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from ralis_gym.data import AL_ROLES, CamVid, load_dataset, read_image, read_label
from ralis_gym.paths import CACHE_ENV

EXPECTED_ROLE_SIZES = {"d_t": 100, "d_v": 257, "d_s": 10, "d_r": 101, "test": 233}
CLASS_NAMES = (
    "Sky", "Building", "Pole", "Road", "Pavement", "Tree",
    "SignSymbol", "Fence", "Car", "Pedestrian", "Bicyclist",
)  # fmt: skip


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Decode cache in a temporary folder (``RALIS_GYM_CACHE``) for the whole module."""
    folder = tmp_path_factory.mktemp("ralis_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CACHE_ENV, str(folder))
        yield folder


@pytest.fixture(scope="module")
def camvid(camvid_root: Path, cache_dir: Path) -> CamVid:
    return CamVid(camvid_root)


def test_load_dataset_by_name(camvid_root: Path, cache_dir: Path) -> None:
    ds = load_dataset("camvid", camvid_root)
    assert isinstance(ds, CamVid)
    assert ds.root == camvid_root / "camvid"


def test_physical_split_sizes(camvid: CamVid) -> None:
    assert {s: len(camvid.split(s)) for s in ("train", "val", "test")} == {
        "train": 367,
        "val": 101,
        "test": 233,
    }


def test_role_sizes(camvid: CamVid) -> None:
    assert {r: len(camvid.split(r)) for r in AL_ROLES} == EXPECTED_ROLE_SIZES


def test_roles_disjoint_and_cover_train(camvid: CamVid) -> None:
    names = {r: set(camvid.split(r).image_names) for r in ("d_t", "d_v", "d_s")}
    assert not names["d_t"] & names["d_v"]
    assert not names["d_t"] & names["d_s"]
    assert not names["d_v"] & names["d_s"]
    assert names["d_t"] | names["d_v"] | names["d_s"] == set(camvid.split("train").image_names)
    assert camvid.split("d_r").image_names == camvid.split("val").image_names


def test_role_arrays_match_train(camvid: CamVid) -> None:
    train, d_s = camvid.split("train"), camvid.split("d_s")
    i = train.image_names.index(d_s.image_names[0])
    np.testing.assert_array_equal(d_s.images[0], train.images[i])
    np.testing.assert_array_equal(d_s.labels[0], train.labels[i])


def test_images_and_labels(camvid: CamVid) -> None:
    for name in ("train", "val", "test"):
        split = camvid.split(name)
        assert split.images.shape == (len(split), 360, 480, 3)
        assert split.images.dtype == np.uint8
        assert split.labels.shape == (len(split), 360, 480)
        assert split.labels.dtype == np.uint8
        assert int(split.labels.max()) <= 11
    # every class and void occur in train (README: all 12 values in every split)
    assert set(np.unique(camvid.split("train").labels).tolist()) == set(range(12))


def test_decoded_pixels_match_files(camvid: CamVid) -> None:
    img_path, lab_path = camvid.file_pairs("val")[5]
    split = camvid.split("val")
    np.testing.assert_array_equal(split.images[5], read_image(img_path))
    np.testing.assert_array_equal(split.labels[5], read_label(lab_path))


def test_info(camvid: CamVid) -> None:
    info = camvid.info
    assert info.name == "camvid"
    assert info.class_names == CLASS_NAMES
    assert info.num_classes == 11
    assert info.ignore_index == 11
    assert info.image_size == (480, 360)
    assert info.region_size == (80, 90)
    assert info.palette_array().shape == (12, 3)


def test_decode_cache_hit(camvid: CamVid, camvid_root: Path, cache_dir: Path) -> None:
    first = camvid.split("train")
    cached = sorted((cache_dir / "decoded" / "camvid").glob("train-*.npy"))
    assert [p.name.split(".", 1)[1] for p in cached] == ["images.npy", "labels.npy"]
    again = CamVid(camvid_root).split("train")  # a new instance: must come from the cache
    assert isinstance(again.images, np.memmap)
    assert isinstance(again.labels, np.memmap)
    assert again.image_names == first.image_names
    np.testing.assert_array_equal(again.images, first.images)
    np.testing.assert_array_equal(again.labels, first.labels)


def test_no_start_network_has_seen_a_label_of_the_pool_it_acquires_from(camvid_root):
    """The start network of each mode, and the labeled images the final training adds, never hold an
    image of that mode's unlabeled pool (a leak would let a policy 'discover' what the network knew)."""
    from ralis_gym.data import load_dataset
    from ralis_gym.envs.region_al import MODE_POOL, MODE_START
    from ralis_gym.segmentation.pretrain import start_data_roles

    ds = load_dataset("camvid", camvid_root)
    for mode, pool_role in MODE_POOL.items():
        pool = set(ds.split(pool_role).image_names)
        seen = {n for role in start_data_roles(MODE_START[mode]) for n in ds.split(role).image_names}
        assert seen and not (seen & pool), (mode, sorted(seen & pool)[:3])
    assert start_data_roles("source+dt") == ("d_s", "d_t")  # the reference's test start: never saw D_V
    assert not set(ds.split("d_v").image_names) & {n for r in ("d_s", "d_t") for n in ds.split(r).image_names}
