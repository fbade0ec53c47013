"""Datasets: validated decoding, the paper's splits, download, Cityscapes and custom folders."""

from ralis_gym.data.base import DatasetInfo, SegmentationSplit, read_image, read_label
from ralis_gym.data.camvid import CAMVID_INFO, CamVid, camvid_ralis_splits
from ralis_gym.data.dataset import (
    AL_ROLES,
    SegmentationDataset,
    load_dataset,
    register_dataset,
    registered_datasets,
    verify_manifest,
)

__all__ = [
    "AL_ROLES",
    "CAMVID_INFO",
    "CamVid",
    "DatasetInfo",
    "SegmentationDataset",
    "SegmentationSplit",
    "camvid_ralis_splits",
    "load_dataset",
    "read_image",
    "read_label",
    "register_dataset",
    "registered_datasets",
    "verify_manifest",
]
