"""Cityscapes on a tiny generated fixture, and custom datasets described by YAML."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from ralis_gym.data import (
    AL_ROLES,
    CITYSCAPES_INFO,
    CITYSCAPES_LUT,
    Cityscapes,
    CustomDataset,
    load_dataset,
    read_label,
)
from ralis_gym.data.cityscapes import CITYSCAPES_STATE_SET, cityscapes_role_names
from ralis_gym.errors import ConfigError, DatasetError
from ralis_gym.paths import CACHE_ENV
from tests.fixtures_data import make_cityscapes_fixture, make_custom_fixture, write_png

# the official Cityscapes labelId -> trainId table, written out independently of the package's
SPEC_LABEL_TO_TRAIN = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
    23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip
SIZE = (256, 128)


@pytest.fixture(autouse=True)
def _tmp_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def cs_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_cityscapes_fixture(tmp_path_factory.mktemp("cs"), n_train=24, n_val=4, size=SIZE)


@pytest.fixture
def cs(cs_root: Path) -> Cityscapes:
    return Cityscapes(cs_root, image_size=SIZE)


# --- Cityscapes -------------------------------------------------------------------------------


def test_lut_known_values() -> None:
    assert CITYSCAPES_LUT.shape == (256,)
    assert CITYSCAPES_LUT.dtype == np.uint8
    assert CITYSCAPES_LUT[7] == 0
    assert CITYSCAPES_LUT[26] == 13
    assert CITYSCAPES_LUT[33] == 18
    assert CITYSCAPES_LUT[0] == 19
    assert CITYSCAPES_LUT[34] == 19
    assert CITYSCAPES_LUT[255] == 19
    expected = np.full(256, 19, dtype=np.uint8)
    for label_id, train_id in SPEC_LABEL_TO_TRAIN.items():
        expected[label_id] = train_id
    np.testing.assert_array_equal(CITYSCAPES_LUT, expected)


def test_info() -> None:
    assert CITYSCAPES_INFO.name == "cityscapes"
    assert CITYSCAPES_INFO.num_classes == 19
    assert CITYSCAPES_INFO.ignore_index == 19
    assert CITYSCAPES_INFO.image_size == (2048, 1024)
    assert CITYSCAPES_INFO.region_size == (128, 128)
    assert CITYSCAPES_INFO.class_names[0] == "road"
    assert CITYSCAPES_INFO.class_names[13] == "car"
    assert CITYSCAPES_INFO.class_names[18] == "bicycle"
    assert len(CITYSCAPES_INFO.palette) == 19
    # 128x128 regions tile 2048x1024 into 16 x 8 = 128 regions per image, as in the reference
    (w, h), (rw, rh) = CITYSCAPES_INFO.image_size, CITYSCAPES_INFO.region_size
    assert (w % rw, h % rh) == (0, 0)
    assert (w // rw) * (h // rh) == 128


def test_train_ids_decoded(cs: Cityscapes) -> None:
    assert cs.info.image_size == SIZE
    assert cs.info.region_size == (128, 128)
    train = cs.split("train")
    assert train.images.shape == (24, 128, 256, 3)
    assert train.labels.shape == (24, 128, 256)
    assert set(np.unique(train.labels).tolist()) == set(range(20))
    for i, (_, lab_path) in enumerate(cs.file_pairs("train")[:3]):
        raw = read_label(lab_path)
        expected = np.full(raw.shape, 19, dtype=np.uint8)
        for label_id, train_id in SPEC_LABEL_TO_TRAIN.items():
            expected[raw == label_id] = train_id
        np.testing.assert_array_equal(train.labels[i], expected)
        assert (raw == 255).any() and (raw == 0).any()  # mapped to ignore


def test_registry_and_region_grid(cs_root: Path) -> None:
    ds = load_dataset("cityscapes", cs_root, image_size=SIZE)
    assert isinstance(ds, Cityscapes)
    (w, h), (rw, rh) = ds.info.image_size, ds.info.region_size
    assert (w // rw, h // rh) == (2, 1)
    small = Cityscapes(cs_root, image_size=SIZE, region_size=(64, 64))
    assert small.info.region_size == (64, 64)
    assert Cityscapes.info == CITYSCAPES_INFO  # the class default is untouched


def test_region_must_tile(cs_root: Path) -> None:
    with pytest.raises(ConfigError, match="100x128 does not tile image size 256x128"):
        Cityscapes(cs_root, image_size=SIZE, region_size=(100, 128))
    with pytest.raises(ConfigError, match="two integers"):
        Cityscapes(cs_root, image_size=(256.5, 128))


def test_default_size_rejects_small_images(cs_root: Path) -> None:
    with pytest.raises(DatasetError, match="expects 2048x1024"):
        Cityscapes(cs_root).split("val")


def test_strict_counts(cs_root: Path) -> None:
    with pytest.raises(DatasetError, match="found 24 images .* expected 2975"):
        Cityscapes(cs_root, image_size=SIZE, strict_counts=True)


def test_roles(cs: Cityscapes) -> None:
    sizes = {r: len(cs.split(r)) for r in AL_ROLES}
    # 24 train images: d_s 10; d_t / d_r / d_v scaled from 150 / 200 / 2615 of 2975 (d_v includes d_s)
    assert sizes == {"d_t": 1, "d_v": 21, "d_s": 10, "d_r": 2, "test": 4}
    names = {r: set(cs.split(r).image_names) for r in AL_ROLES}
    assert not names["d_t"] & names["d_r"]
    assert not names["d_t"] & names["d_v"]
    assert not names["d_r"] & names["d_v"]
    assert names["d_s"] <= names["d_v"]  # as in the reference lists
    train = set(cs.split("train").image_names)
    assert names["d_t"] | names["d_r"] | names["d_v"] <= train
    assert names["test"] == set(cs.split("val").image_names)
    assert not names["test"] & train
    # deterministic across instances
    assert Cityscapes(cs.data_root, image_size=SIZE).role_names() == cs.role_names()


def test_roles_full_size() -> None:
    cities = ("aachen", "bremen", "darmstadt", "stuttgart")
    stems = [f"{cities[i % 4]}_{i:06d}_000019" for i in range(2975 - 10)] + list(CITYSCAPES_STATE_SET)
    roles = cityscapes_role_names(stems)
    assert {r: len(v) for r, v in roles.items()} == {"d_t": 150, "d_r": 200, "d_v": 2615, "d_s": 10}
    assert roles["d_s"] == CITYSCAPES_STATE_SET
    assert set(roles["d_s"]) <= set(roles["d_v"])
    used = set(roles["d_t"]) | set(roles["d_r"]) | set(roles["d_v"])
    assert len(used) == 2965  # 10 train images in no role, as in the reference
    assert cityscapes_role_names(list(reversed(stems))) == roles


def test_state_set_used_when_present(tmp_path: Path) -> None:
    root = make_cityscapes_fixture(tmp_path, n_train=16, n_val=2, size=(128, 128), include_state_set=True)
    ds = Cityscapes(root, image_size=(128, 128))
    assert ds.role_names()["d_s"] == CITYSCAPES_STATE_SET
    assert ds.split("d_s").image_names[0] == "bremen_000000_000019_leftImg8bit.png"
    assert len(ds.split("d_t")) >= 1 and len(ds.split("d_r")) >= 1


def test_too_few_train_images(tmp_path: Path) -> None:
    root = make_cityscapes_fixture(tmp_path, n_train=3, n_val=1, size=(128, 128))
    with pytest.raises(DatasetError, match="at least 4"):
        Cityscapes(root, image_size=(128, 128)).split("d_t")


# --- custom datasets --------------------------------------------------------------------------


def test_custom_fractions(tmp_path: Path) -> None:
    path = make_custom_fixture(tmp_path, n=20)
    ds = load_dataset(str(path))
    assert isinstance(ds, CustomDataset)
    assert ds.info.name == "tiny_custom"
    assert ds.info.class_names == ("class_0", "class_1", "class_2")
    assert ds.info.ignore_index == 255
    assert ds.info.image_size == (64, 48)
    assert ds.info.region_size == (16, 12)
    everything = ds.split("all")
    assert everything.images.shape == (20, 48, 64, 3)
    assert set(np.unique(everything.labels).tolist()) == {0, 1, 2, 255}
    sizes = {r: len(ds.split(r)) for r in AL_ROLES}
    assert sizes == {"d_t": 5, "d_v": 8, "d_s": 2, "d_r": 2, "test": 3}
    names = [set(ds.split(r).image_names) for r in AL_ROLES]
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            assert not names[i] & names[j]
    assert CustomDataset(path).role_names() == ds.role_names()  # reproducible
    np.testing.assert_array_equal(
        ds.split("d_s").labels[0], read_label(path.parent / "masks" / ds.role_names()["d_s"][0])
    )


def test_custom_seed_changes_draw(tmp_path: Path) -> None:
    a = CustomDataset(make_custom_fixture(tmp_path, n=20))
    b = CustomDataset(make_custom_fixture(tmp_path, n=20, config={"split_seed": 1}, yaml_name="b.yaml"))
    assert a.role_names() != b.role_names()


def test_custom_yaml_round_trip(tmp_path: Path) -> None:
    path = make_custom_fixture(tmp_path / "data", n=12, config={"palette": [[1, 2, 3], [4, 5, 6], [7, 8, 9]]})
    ds = CustomDataset(path)
    (tmp_path / "elsewhere").mkdir()
    frozen = ds.write_config(tmp_path / "elsewhere" / "frozen.yaml")
    text = yaml.safe_load(frozen.read_text())
    assert "splits" in text and "split_fractions" not in text
    again = CustomDataset(frozen)
    assert again.info == ds.info
    assert again.role_names() == ds.role_names()
    np.testing.assert_array_equal(again.split("d_t").images, ds.split("d_t").images)
    assert again.info.palette_array()[:3].tolist() == [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    yml = ds.write_config(tmp_path / "elsewhere" / "frozen.yml")  # both suffixes open by path
    assert load_dataset(str(yml)).role_names() == ds.role_names()
    assert sorted(p.name for p in yml.parent.iterdir()) == ["frozen.yaml", "frozen.yml"]


def test_custom_explicit_splits(tmp_path: Path) -> None:
    splits = {
        "d_t": ["img_00", "img_01.png"],
        "d_v": ["img_02", "img_03", "img_04"],
        "d_s": ["img_04"],  # may overlap d_v, as in the reference
        "d_r": ["img_05"],
        "test": ["img_06", "img_07"],
    }
    path = make_custom_fixture(
        tmp_path, n=8, config={"splits": splits, "split_seed": None, "split_fractions": None}
    )
    ds = CustomDataset(path)
    assert ds.split("d_t").image_names == ("img_00.png", "img_01.png")
    assert ds.split("d_s").image_names == ("img_04.png",)
    assert len(ds.split("test")) == 2


def test_custom_overlap_rejected(tmp_path: Path) -> None:
    splits = {"d_t": ["img_00"], "d_v": ["img_01"], "d_s": ["img_02"], "d_r": ["img_03"], "test": ["img_00"]}
    path = make_custom_fixture(
        tmp_path, n=4, config={"splits": splits, "split_seed": None, "split_fractions": None}
    )
    with pytest.raises(ConfigError, match="splits.d_t and splits.test share 1"):
        CustomDataset(path)


def test_custom_unknown_image_in_split(tmp_path: Path) -> None:
    splits = {"d_t": ["img_00"], "d_v": ["img_01"], "d_s": ["img_02"], "d_r": ["img_03"], "test": ["nope"]}
    path = make_custom_fixture(
        tmp_path, n=4, config={"splits": splits, "split_seed": None, "split_fractions": None}
    )
    with pytest.raises(DatasetError, match="'nope'") as exc:
        CustomDataset(path)
    assert str(tmp_path / "images") in str(exc.value)


def test_custom_bad_key(tmp_path: Path) -> None:
    path = make_custom_fixture(tmp_path, n=4, config={"clases": ["a"]})
    with pytest.raises(ConfigError, match=r"unknown key 'clases' \(did you mean 'class_names'\?\)") as exc:
        load_dataset(str(path))
    for key in ("class_names", "region_size", "split_fractions", "palette"):
        assert key in str(exc.value)
    assert str(path) in str(exc.value)


def test_custom_non_tiling_region(tmp_path: Path) -> None:
    path = make_custom_fixture(tmp_path, n=4, config={"region_size": [50, 48]})
    with pytest.raises(ConfigError, match="region size 50x48 does not tile image size 64x48") as exc:
        CustomDataset(path)
    assert "64 % 50 = 14" in str(exc.value)


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"name": None}, "missing required key"),
        ({"ignore_index": 1}, "ignore_index"),
        ({"image_size": [64]}, "image_size"),
        ({"palette": [[0, 0, 0]]}, "palette"),
        ({"split_fractions": {"d_t": 0.5, "d_v": 0.5, "d_s": 0.1, "d_r": 0.1, "test": 0.1}}, "add up to"),
        ({"split_fractions": {"d_t": 0.5, "d_v": 0.5}}, "lacks role"),
        ({"split_fractions": None}, "give splits"),
        ({"splits": {"d_x": []}}, "not both"),
        ({"split_seed": None, "split_fractions": None, "splits": {"d_x": ["a"]}}, "unknown role 'd_x'"),
    ],
)
def test_custom_config_errors(tmp_path: Path, config: dict, match: str) -> None:
    path = make_custom_fixture(tmp_path, n=4, config=config)
    with pytest.raises(ConfigError, match=match):
        CustomDataset(path)


def test_custom_missing_mask_and_bad_value(tmp_path: Path) -> None:
    path = make_custom_fixture(tmp_path, n=6)
    mask = tmp_path / "masks" / "img_03.png"
    write_png(mask, np.full((48, 64), 7, dtype=np.uint8))
    with pytest.raises(DatasetError, match=r"value\(s\) \[7\]") as exc:
        CustomDataset(path).split("all")
    assert str(mask) in str(exc.value)
    mask.unlink()
    with pytest.raises(DatasetError, match="mask missing") as exc:
        CustomDataset(path)
    assert str(mask) in str(exc.value)


def test_custom_missing_folder(tmp_path: Path) -> None:
    path = make_custom_fixture(tmp_path, n=4, config={"masks_dir": "labels"})
    with pytest.raises(DatasetError, match="masks_dir folder") as exc:
        CustomDataset(path)
    assert str(tmp_path / "labels") in str(exc.value)
