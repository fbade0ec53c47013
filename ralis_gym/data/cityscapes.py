"""Cityscapes (fine annotations): 2975 train / 500 val images of 2048x1024, 19 classes, ignore = 19.

Layout under the data root (the official one of https://www.cityscapes-dataset.com)::

    cityscapes/leftImg8bit/{train,val}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    cityscapes/gtFine/{train,val}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png

Label PNGs hold Cityscapes ``labelIds``; they are mapped to the 19 ``trainIds`` with a 256-entry
lookup table while decoding (every id not in the table, including 0-6, 9, 10, 14-16, 18, 29, 30,
34 and 255, becomes the ignore id 19).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ralis_gym.data.base import DatasetInfo, SegmentationSplit
from ralis_gym.data.dataset import AL_ROLES, SegmentationDataset, labels_to_train_ids, register_dataset
from ralis_gym.errors import ConfigError, DatasetError
from ralis_gym.regions.grid import check_tiling

CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
    "bicycle",
)  # fmt: skip
CITYSCAPES_PALETTE = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
)  # fmt: skip
CITYSCAPES_IGNORE = 19
# labelId -> trainId, the official table (``id_to_trainid`` of the reference code's data/cityscapes_al.py,
# https://github.com/ArantxaCasanova/ralis); every other labelId maps to the ignore id.
CITYSCAPES_LABEL_TO_TRAIN = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
    23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip
CITYSCAPES_COUNTS = {"train": 2975, "val": 500}
# The state set D_S of the reference Cityscapes setup (10 train images), as image stems.
CITYSCAPES_STATE_SET = (
    "bremen_000000_000019", "bremen_000196_000019", "darmstadt_000055_000019", "stuttgart_000167_000019",
    "tubingen_000102_000019", "jena_000082_000019", "hamburg_000000_106102", "hanover_000000_052887",
    "darmstadt_000082_000019", "hamburg_000000_068916",
)  # fmt: skip
# Sizes of the reference role lists out of the 2975 train images (the reference code reads them from
# data/cityscapes_al_splits.npy, https://github.com/ArantxaCasanova/ralis). D_V includes D_S.
CITYSCAPES_ROLE_SIZES = {"d_t": 150, "d_r": 200, "d_v": 2615, "d_s": 10}
CITYSCAPES_SPLIT_SEED = 0

IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"


def _build_lut() -> np.ndarray:
    lut = np.full(256, CITYSCAPES_IGNORE, dtype=np.uint8)
    for label_id, train_id in CITYSCAPES_LABEL_TO_TRAIN.items():
        lut[label_id] = train_id
    return lut


CITYSCAPES_LUT = _build_lut()
CITYSCAPES_LUT.flags.writeable = False

CITYSCAPES_INFO = DatasetInfo(
    name="cityscapes",
    class_names=CITYSCAPES_CLASSES,
    ignore_index=CITYSCAPES_IGNORE,
    image_size=(2048, 1024),
    region_size=(128, 128),
    palette=CITYSCAPES_PALETTE,
)


def _pair(value: object, what: str) -> tuple[int, int]:
    try:
        w, h = value  # type: ignore[misc]
        if int(w) == w and int(h) == h:
            return int(w), int(h)
    except (TypeError, ValueError):
        pass
    raise ConfigError(f"{what} must be two integers (width, height); got {value!r}")


def cityscapes_role_names(
    train_stems: list[str] | tuple[str, ...], seed: int = CITYSCAPES_SPLIT_SEED
) -> dict[str, tuple[str, ...]]:
    """Deterministic active-learning role lists (image stems) for a Cityscapes train folder.

    ``d_s`` is the reference state set when all of its 10 images are present, otherwise the first
    ``min(10, n - 3)`` images of a seeded permutation. ``d_t``, ``d_r`` and the rest of ``d_v`` are
    disjoint slices of a seeded permutation of the other images, sized in the reference proportions
    (150 / 200 / 2615 of 2975, at least 1 each); ``d_v`` also contains ``d_s`` (as in the reference),
    so at 2975 images the sizes are exactly 150 / 200 / 2615 / 10 with 10 images in no role.
    """
    stems = sorted(train_stems)
    n = len(stems)
    if n < 4:
        raise DatasetError(
            f"Cityscapes train has {n} image(s); at least 4 are needed for the d_s/d_t/d_r/d_v roles"
        )
    rng = np.random.default_rng(seed)
    present = set(stems)
    if n >= len(CITYSCAPES_STATE_SET) + 3 and all(s in present for s in CITYSCAPES_STATE_SET):
        d_s = list(CITYSCAPES_STATE_SET)
    else:
        d_s = [stems[i] for i in rng.permutation(n)[: min(CITYSCAPES_ROLE_SIZES["d_s"], n - 3)]]
    in_s = set(d_s)
    rest = [s for s in stems if s not in in_s]
    rest = [rest[i] for i in rng.permutation(len(rest))]
    total = CITYSCAPES_COUNTS["train"]

    def scaled(role: str) -> int:
        return max(1, round(CITYSCAPES_ROLE_SIZES[role] * n / total))

    n_t, n_r = scaled("d_t"), scaled("d_r")
    n_v_extra = max(1, scaled("d_v") - len(d_s))
    n_t = min(n_t, len(rest) - 2)
    n_r = min(n_r, len(rest) - n_t - 1)
    n_v_extra = min(n_v_extra, len(rest) - n_t - n_r)
    d_t = rest[:n_t]
    d_r = rest[n_t : n_t + n_r]
    d_v = d_s + rest[n_t + n_r : n_t + n_r + n_v_extra]
    return {"d_t": tuple(d_t), "d_r": tuple(d_r), "d_v": tuple(d_v), "d_s": tuple(d_s)}


@register_dataset("cityscapes")
class Cityscapes(SegmentationDataset):
    """Cityscapes fine annotations, labelIds mapped to the 19 trainIds (ignore id 19).

    Physical splits are ``train`` and ``val``; the official test set (no public labels) is unused.
    ``image_size`` / ``region_size`` (both ``(width, height)``) can be overridden, e.g. for small test
    fixtures; the region size must tile the image exactly. The official counts (2975 / 500) are
    only enforced with ``strict_counts=True``; otherwise any non-empty folders are accepted.

    Active-learning roles. DEVIATION: the reference ``cityscapes_al_splits.npy`` lists are not
    available here, so the roles are rebuilt deterministically from the ``train`` folder by
    ``cityscapes_role_names``: ``d_s`` = the reference state set ``CITYSCAPES_STATE_SET`` when all 10 are
    present (otherwise the first 10 of a seed-0 permutation); ``d_t`` / ``d_r`` / ``d_v`` = disjoint
    slices of a seed-0 permutation of the remaining images with the reference sizes 150 / 200 /
    2615 of 2975 (scaled to the folder, at least 1 each). As in the reference lists, ``d_s`` is
    also part of ``d_v`` (``d_s ⊂ d_v``, counted in its 2615) and 10 train images are in no role.
    The test role is the official ``val`` split (500 images).
    """

    info = CITYSCAPES_INFO
    folder_name = "cityscapes"
    label_map = staticmethod(labels_to_train_ids(CITYSCAPES_LUT))

    def __init__(
        self,
        data_root: str | os.PathLike | None = None,
        *,
        image_size: tuple[int, int] | None = None,
        region_size: tuple[int, int] | None = None,
        strict_counts: bool = False,
        use_cache: bool = True,
        verify_checksums: bool = False,
    ) -> None:
        size = _pair(image_size, "image_size") if image_size is not None else CITYSCAPES_INFO.image_size
        region = _pair(region_size, "region_size") if region_size is not None else CITYSCAPES_INFO.region_size
        check_tiling(size, region, "cityscapes")
        self.info = DatasetInfo(
            name=CITYSCAPES_INFO.name,
            class_names=CITYSCAPES_CLASSES,
            ignore_index=CITYSCAPES_IGNORE,
            image_size=size,
            region_size=region,
            palette=CITYSCAPES_PALETTE,
        )
        self.strict_counts = strict_counts
        self._pairs: dict[str, list[tuple[Path, Path]]] = {}
        self._roles: dict[str, tuple[str, ...]] | None = None
        super().__init__(data_root, use_cache=use_cache, verify_checksums=verify_checksums)

    @property
    def physical_splits(self) -> tuple[str, ...]:
        return ("train", "val")

    def check_layout(self) -> None:
        fix = "point RALIS_GYM_DATA / data_root at the folder holding cityscapes/{leftImg8bit,gtFine}"
        if not self.root.is_dir():
            raise DatasetError(f"Cityscapes not found: {self.root} does not exist; {fix}")
        for split in self.physical_splits:
            img_dir = self.root / "leftImg8bit" / split
            lab_dir = self.root / "gtFine" / split
            for folder in (img_dir, lab_dir):
                if not folder.is_dir():
                    raise DatasetError(f"Cityscapes folder missing: {folder}; {fix}")
            images = sorted(img_dir.glob(f"*/*{IMAGE_SUFFIX}"))
            if not images:
                raise DatasetError(
                    f"Cityscapes {split}: no <city>/*{IMAGE_SUFFIX} images in {img_dir}; {fix}"
                )
            expected = CITYSCAPES_COUNTS[split]
            if self.strict_counts and len(images) != expected:
                raise DatasetError(
                    f"Cityscapes {split}: found {len(images)} images in {img_dir}, expected {expected}; "
                    f"the download is incomplete (or pass strict_counts=False for a subset)"
                )
            pairs = []
            for img in images:
                city = img.parent.name
                lab = lab_dir / city / (img.name[: -len(IMAGE_SUFFIX)] + LABEL_SUFFIX)
                if not lab.is_file():
                    raise DatasetError(f"Cityscapes label missing: {lab} (for image {img}); {fix}")
                pairs.append((img, lab))
            self._pairs[split] = pairs

    def file_pairs(self, split: str) -> list[tuple[Path, Path]]:
        if split not in self._pairs:
            raise DatasetError(f"unknown physical split {split!r} for cityscapes; choose train or val")
        return list(self._pairs[split])

    def role_names(self) -> dict[str, tuple[str, ...]]:
        """Image stems (``<city>_<seq>_<frame>``) of ``d_t``, ``d_r``, ``d_v`` and ``d_s``."""
        if self._roles is None:
            stems = [img.name[: -len(IMAGE_SUFFIX)] for img, _ in self._pairs["train"]]
            self._roles = cityscapes_role_names(stems)
        return self._roles

    def role_split(self, role: str) -> SegmentationSplit:
        if role not in AL_ROLES:
            raise DatasetError(f"unknown role {role!r}; choose one of {AL_ROLES}")
        if role == "test":
            return self.split("val")
        names = [s + IMAGE_SUFFIX for s in self.role_names()[role]]
        return self.split("train").select(names, name=role)
