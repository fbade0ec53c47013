"""Datasets: validated decoding, the paper's splits, download, Cityscapes and custom folders."""

from ralis_gym.data.base import DatasetInfo, SegmentationSplit, read_image, read_label
from ralis_gym.data.camvid import CAMVID_INFO, CamVid, camvid_ralis_splits
from ralis_gym.data.cityscapes import (
    CITYSCAPES_INFO,
    CITYSCAPES_LUT,
    Cityscapes,
    cityscapes_role_names,
)
from ralis_gym.data.custom import CustomDataset, CustomDatasetConfig, load_custom_config
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
    "CITYSCAPES_INFO",
    "CITYSCAPES_LUT",
    "CamVid",
    "Cityscapes",
    "CustomDataset",
    "CustomDatasetConfig",
    "DatasetInfo",
    "SegmentationDataset",
    "SegmentationSplit",
    "camvid_ralis_splits",
    "cityscapes_role_names",
    "load_custom_config",
    "load_dataset",
    "read_image",
    "read_label",
    "register_dataset",
    "registered_datasets",
    "verify_manifest",
]
