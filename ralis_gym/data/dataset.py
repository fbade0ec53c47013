"""The dataset interface every dataset implements, and the registry of datasets by name and file type."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ralis_gym.data.base import DatasetInfo, LabelMapper, SegmentationSplit, cached_decode
from ralis_gym.errors import DatasetError
from ralis_gym.fileio import read_manifest, sha256_file
from ralis_gym.paths import resolve_data_root

# Roles of the active-learning protocol of RALIS (https://github.com/ArantxaCasanova/ralis): d_t and
# d_v are the pools of the training and the test episodes, d_s the state set (the images whose
# predictions the policy sees), d_r the reward set and test the final test set. Every dataset maps
# each role to a split.
AL_ROLES = ("d_t", "d_v", "d_s", "d_r", "test")


class SegmentationDataset(ABC):
    """A dataset on disk: validated layout, named splits, decoded lazily and cached.

    Subclasses give ``info``, the folder name under the data root, the file pairs of each physical
    split and the mapping of the active-learning roles (``d_t``, ``d_v``, ``d_s``, ``d_r``,
    ``test``) to splits.
    """

    info: DatasetInfo
    folder_name: str = ""

    def __init__(
        self,
        data_root: str | os.PathLike | None = None,
        *,
        use_cache: bool = True,
        verify_checksums: bool = False,
    ) -> None:
        self.data_root = resolve_data_root(data_root)
        self.root = self.data_root / self.folder_name if self.folder_name else self.data_root
        self.use_cache = use_cache
        self._splits: dict[str, SegmentationSplit] = {}
        self.check_layout()
        if verify_checksums:
            self.verify_checksums()

    # --- to implement -------------------------------------------------------------------------
    @abstractmethod
    def check_layout(self) -> None:
        """Raise ``DatasetError`` with a fix if folders or files are missing or counts are wrong."""

    @abstractmethod
    def file_pairs(self, split: str) -> list[tuple[Path, Path]]:
        """(image, label) paths of a physical split, in a fixed order."""

    @abstractmethod
    def role_split(self, role: str) -> SegmentationSplit:
        """The split that plays an active-learning role (one of ``AL_ROLES``)."""

    label_map: LabelMapper | None = None

    # --- shared -------------------------------------------------------------------------------
    @property
    def physical_splits(self) -> tuple[str, ...]:
        return ("train", "val", "test")

    def split(self, name: str) -> SegmentationSplit:
        """A decoded split by physical name (``train``/``val``/``test``) or role (``d_t``...)."""
        if name in self._splits:
            return self._splits[name]
        if name in AL_ROLES and name not in self.physical_splits:
            out = self.role_split(name)
        elif name in self.physical_splits:
            pairs = self.file_pairs(name)
            images, labels = cached_decode(
                pairs, self.info, name, label_map=self.label_map, use_cache=self.use_cache
            )
            out = SegmentationSplit(self.info, name, tuple(p[0].name for p in pairs), images, labels)
        else:
            raise DatasetError(
                f"unknown split {name!r} for {self.info.name}; choose one of "
                f"{sorted(set(self.physical_splits) | set(AL_ROLES))}"
            )
        self._splits[name] = out
        return out

    def checksum_manifest(self) -> Path | None:
        """Path of a ``SHA256SUMS`` manifest (``sha256sum`` format) if the dataset folder has one."""
        path = self.root / "SHA256SUMS"
        return path if path.is_file() else None

    def verify_checksums(self, manifest: Path | None = None) -> int:
        """Verify every file listed in the manifest; returns how many were checked."""
        manifest = manifest or self.checksum_manifest()
        if manifest is None:
            raise DatasetError(f"no SHA256SUMS manifest in {self.root}; cannot verify checksums")
        return verify_manifest(manifest, self.root)


def verify_manifest(manifest: Path, root: Path) -> int:
    """Check every file of a ``sha256sum``-style manifest under ``root``; returns how many.

    Raises ``DatasetError`` naming the first bad line, missing file or corrupt file.
    """
    checked = 0
    for rel, digest in read_manifest(manifest, DatasetError).items():
        path = root / rel
        if not path.is_file():
            raise DatasetError(f"missing file {path} (listed in {manifest})")
        if sha256_file(path) != digest:
            raise DatasetError(f"checksum mismatch for {path}: the file is corrupt; re-download it")
        checked += 1
    return checked


def expect_count(what: str, found: int, expected: int, where: Path, fix: str) -> None:
    if found != expected:
        raise DatasetError(f"{what}: found {found} files in {where}, expected {expected}; {fix}")


def labels_to_train_ids(lut: np.ndarray) -> LabelMapper:
    """A label mapper from a 256-entry lookup table (e.g. Cityscapes labelIds -> trainIds)."""

    def mapper(lab: np.ndarray) -> np.ndarray:
        return lut[lab]

    return mapper


_REGISTRY: dict[str, type[SegmentationDataset]] = {}
_FILE_TYPES: dict[str, Callable[..., SegmentationDataset]] = {}


def register_dataset(name: str):
    """Class decorator: ``load_dataset(name, data_root)`` opens the dataset."""

    def deco(cls: type[SegmentationDataset]) -> type[SegmentationDataset]:
        _REGISTRY[name] = cls
        return cls

    return deco


def register_dataset_file(*suffixes: str):
    """Class decorator: ``load_dataset(path)`` of a path ending in one of ``suffixes`` opens
    ``cls(path)``. Why a registry and not an import here: the datasets import this module, so this
    module must not import them."""

    def deco(cls: type[SegmentationDataset]) -> type[SegmentationDataset]:
        for suffix in suffixes:
            _FILE_TYPES[suffix] = cls
        return cls

    return deco


def load_dataset(name: str, data_root: str | os.PathLike | None = None, **kwargs) -> SegmentationDataset:
    """Open a registered dataset (``camvid``, ``cityscapes``) or a custom dataset YAML by path."""
    if name in _REGISTRY:
        return _REGISTRY[name](data_root, **kwargs)
    suffix = next((s for s in _FILE_TYPES if str(name).endswith(s)), None)
    if suffix is not None:
        return _FILE_TYPES[suffix](name, **kwargs)
    raise DatasetError(
        f"unknown dataset {name!r}; registered: {sorted(_REGISTRY)} or a custom dataset YAML path"
    )


def registered_datasets() -> list[str]:
    return sorted(_REGISTRY)
