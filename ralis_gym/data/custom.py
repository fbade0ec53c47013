"""A user dataset described by a YAML file: a folder of images and a folder of class-id masks.

Example ``my_data.yaml`` (paths are relative to the YAML file)::

    name: my_data
    class_names: [background, road, car]
    ignore_index: 255          # optional, default 255; must be >= number of classes
    image_size: [640, 480]     # width, height: every image must have this size
    region_size: [80, 80]      # width, height: must tile image_size exactly
    images_dir: images         # any of .png .jpg .jpeg .bmp .tif .tiff
    masks_dir: masks           # <image stem>.png, single channel, values = class ids or ignore_index
    palette: [[0, 0, 0], [128, 64, 128], [0, 0, 142]]   # optional, one RGB per class
    # either explicit lists per role (file names or stems) ...
    splits: {d_t: [...], d_v: [...], d_s: [...], d_r: [...], test: [...]}
    # ... or fractions of all images drawn reproducibly with a seed
    split_seed: 0
    split_fractions: {d_t: 0.2, d_v: 0.5, d_s: 0.05, d_r: 0.1, test: 0.15}

``load_dataset("my_data.yaml")`` opens it. The dataset has one physical split, ``all`` (every image
in ``images_dir``, sorted by file name), and the five active-learning roles ``d_t``, ``d_v``,
``d_s``, ``d_r`` and ``test`` as subsets of it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ralis_gym.config import check_keys, load_yaml
from ralis_gym.data.base import IMAGE_SUFFIXES, DatasetInfo, SegmentationSplit, image_files
from ralis_gym.data.dataset import AL_ROLES, SegmentationDataset, register_dataset_file
from ralis_gym.errors import ConfigError, DatasetError
from ralis_gym.fileio import atomic_write
from ralis_gym.regions.grid import check_tiling

VALID_KEYS = (
    "name", "class_names", "ignore_index", "image_size", "region_size", "images_dir", "masks_dir",
    "splits", "split_seed", "split_fractions", "palette",
)  # fmt: skip
REQUIRED_KEYS = ("name", "class_names", "image_size", "region_size", "images_dir", "masks_dir")
DEFAULT_IGNORE_INDEX = 255
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class CustomDatasetConfig:
    """A validated custom dataset YAML (folders resolved to absolute paths)."""

    path: Path
    info: DatasetInfo
    images_dir: Path
    masks_dir: Path
    splits: dict[str, tuple[str, ...]] | None = None
    split_seed: int = 0
    split_fractions: dict[str, float] | None = field(default=None)


def load_custom_config(path: str | os.PathLike) -> CustomDatasetConfig:
    """Read and validate a custom dataset YAML; raises ``ConfigError`` naming the bad key or value."""
    path = Path(path).expanduser()
    raw = load_yaml(path)
    where = f"custom dataset config {path}"
    check_keys(raw, VALID_KEYS, where)
    missing = [k for k in REQUIRED_KEYS if k not in raw]
    if missing:
        raise ConfigError(f"{where}: missing required key(s) {missing}; valid keys: {', '.join(VALID_KEYS)}")

    name = raw["name"]
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ConfigError(f"{where}: name must be a word of letters, digits, '_', '-' or '.'; got {name!r}")
    class_names = raw["class_names"]
    if (
        not isinstance(class_names, list)
        or not class_names
        or not all(isinstance(c, str) and c for c in class_names)
    ):
        raise ConfigError(f"{where}: class_names must be a non-empty list of strings; got {class_names!r}")
    if len(set(class_names)) != len(class_names):
        raise ConfigError(f"{where}: class_names has duplicates: {class_names}")
    if len(class_names) > 255:
        raise ConfigError(
            f"{where}: {len(class_names)} classes; at most 255 fit 8-bit masks with an ignore id"
        )
    ignore = raw.get("ignore_index", DEFAULT_IGNORE_INDEX)
    if not _is_int(ignore) or not len(class_names) <= ignore <= 255:
        raise ConfigError(
            f"{where}: ignore_index must be an integer in {len(class_names)}..255 (not a class id); got {ignore!r}"
        )
    image_size = _size(raw["image_size"], "image_size", where)
    region_size = _size(raw["region_size"], "region_size", where)
    try:
        check_tiling(image_size, region_size, where)
    except ConfigError as exc:
        raise ConfigError(f"{exc} (keys image_size / region_size)") from None
    palette: tuple[tuple[int, int, int], ...] = ()
    if raw.get("palette") is not None:
        pal = raw["palette"]
        if (
            not isinstance(pal, list)
            or len(pal) != len(class_names)
            or not all(
                isinstance(c, list) and len(c) == 3 and all(_is_int(v) and 0 <= v <= 255 for v in c)
                for c in pal
            )
        ):
            raise ConfigError(
                f"{where}: palette must list one [r, g, b] (0..255) per class ({len(class_names)}); got {pal!r}"
            )
        palette = tuple((int(r), int(g), int(b)) for r, g, b in pal)
    dirs = {}
    for key in ("images_dir", "masks_dir"):
        if not isinstance(raw[key], str) or not raw[key]:
            raise ConfigError(
                f"{where}: {key} must be a folder path (relative to the YAML); got {raw[key]!r}"
            )
        dirs[key] = (path.parent / raw[key]).expanduser()

    splits, fractions = raw.get("splits"), raw.get("split_fractions")
    seed = raw.get("split_seed", 0)
    if splits is not None and (fractions is not None or "split_seed" in raw):
        raise ConfigError(f"{where}: give either splits or split_seed + split_fractions, not both")
    if splits is None and fractions is None:
        raise ConfigError(
            f"{where}: give splits (a list of images per role) or split_fractions (+ split_seed)"
        )
    if not _is_int(seed) or seed < 0:
        raise ConfigError(f"{where}: split_seed must be a non-negative integer; got {seed!r}")
    out_splits = _check_roles_mapping(splits, "splits", where) if splits is not None else None
    if out_splits is not None:
        for role, names in out_splits.items():
            if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
                raise ConfigError(f"{where}: splits.{role} must be a non-empty list of image names")
            if len(set(names)) != len(names):
                raise ConfigError(f"{where}: splits.{role} names an image more than once")
        out_splits = {r: tuple(v) for r, v in out_splits.items()}
    out_fractions = None
    if fractions is not None:
        out_fractions = _check_roles_mapping(fractions, "split_fractions", where)
        for role, frac in out_fractions.items():
            if isinstance(frac, bool) or not isinstance(frac, int | float) or not 0 < frac <= 1:
                raise ConfigError(f"{where}: split_fractions.{role} must be a number in (0, 1]; got {frac!r}")
        total = sum(out_fractions.values())
        if total > 1 + 1e-9:
            raise ConfigError(f"{where}: split_fractions add up to {total:g}; they must add up to at most 1")
        out_fractions = {r: float(v) for r, v in out_fractions.items()}

    info = DatasetInfo(
        name=name,
        class_names=tuple(class_names),
        ignore_index=int(ignore),
        image_size=image_size,
        region_size=region_size,
        palette=palette,
    )
    return CustomDatasetConfig(
        path=path,
        info=info,
        images_dir=dirs["images_dir"],
        masks_dir=dirs["masks_dir"],
        splits=out_splits,
        split_seed=int(seed),
        split_fractions=out_fractions,
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _size(value: Any, key: str, where: str) -> tuple[int, int]:
    if not isinstance(value, list | tuple) or len(value) != 2 or not all(_is_int(v) and v > 0 for v in value):
        raise ConfigError(f"{where}: {key} must be [width, height] with positive integers; got {value!r}")
    return int(value[0]), int(value[1])


def _check_roles_mapping(value: Any, key: str, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: {key} must map each role ({', '.join(AL_ROLES)}) to a value")
    for role in value:
        if role not in AL_ROLES:
            raise ConfigError(f"{where}: unknown role {role!r} in {key}; valid roles: {', '.join(AL_ROLES)}")
    missing = [r for r in AL_ROLES if r not in value]
    if missing:
        raise ConfigError(f"{where}: {key} lacks role(s) {missing}; every role of {AL_ROLES} is needed")
    return {r: value[r] for r in AL_ROLES}


def draw_role_counts(n: int, fractions: dict[str, float]) -> dict[str, int]:
    """Images per role for ``n`` images: at least 1 each, largest-remainder rounding of the fractions."""
    raw = {r: fractions[r] * n for r in AL_ROLES}
    counts = {r: max(1, int(np.floor(raw[r] + 1e-9))) for r in AL_ROLES}
    target = max(sum(counts.values()), int(np.floor(sum(raw.values()) + 1e-6)))
    by_remainder = sorted(AL_ROLES, key=lambda r: (-(raw[r] - np.floor(raw[r] + 1e-9)), AL_ROLES.index(r)))
    i = 0
    while sum(counts.values()) < target:
        counts[by_remainder[i % len(AL_ROLES)]] += 1
        i += 1
    if sum(counts.values()) > n:
        raise DatasetError(
            f"{n} image(s) are too few for the split fractions {fractions}: each of the {len(AL_ROLES)} "
            f"roles needs at least one image"
        )
    return counts


@register_dataset_file(".yaml", ".yml")
class CustomDataset(SegmentationDataset):
    """A dataset described by a YAML file (see the module docstring for the keys).

    Physical split: ``all``. Roles ``d_t``, ``d_v``, ``d_s``, ``d_r``, ``test``: the YAML's explicit
    lists, or disjoint slices of a permutation of ``all`` drawn with ``split_seed`` in the
    proportions ``split_fractions`` (images beyond the fractions' total are in no role). Explicit
    lists must be pairwise disjoint, except that ``d_s`` may share images with ``d_v`` (as in the
    reference Cityscapes lists).
    """

    folder_name = ""

    def __init__(
        self,
        config: str | os.PathLike | CustomDatasetConfig,
        *,
        use_cache: bool = True,
        verify_checksums: bool = False,
    ) -> None:
        self.config = config if isinstance(config, CustomDatasetConfig) else load_custom_config(config)
        self.info = self.config.info
        self._pairs: list[tuple[Path, Path]] = []
        self._roles: dict[str, tuple[str, ...]] = {}
        super().__init__(self.config.path.parent, use_cache=use_cache, verify_checksums=verify_checksums)

    @property
    def physical_splits(self) -> tuple[str, ...]:
        return ("all",)

    def check_layout(self) -> None:
        cfg = self.config
        for key, folder in (("images_dir", cfg.images_dir), ("masks_dir", cfg.masks_dir)):
            if not folder.is_dir():
                raise DatasetError(
                    f"{cfg.info.name}: {key} folder {folder} does not exist (set in {cfg.path})"
                )
        images = image_files(cfg.images_dir)
        if not images:
            raise DatasetError(f"{cfg.info.name}: no images ({' '.join(IMAGE_SUFFIXES)}) in {cfg.images_dir}")
        seen: dict[str, Path] = {}
        pairs = []
        for img in images:
            if img.stem in seen:
                raise DatasetError(
                    f"{cfg.info.name}: images {seen[img.stem]} and {img} share the stem {img.stem!r}; "
                    "masks are matched by stem, so keep one"
                )
            seen[img.stem] = img
            mask = cfg.masks_dir / f"{img.stem}.png"
            if not mask.is_file():
                raise DatasetError(f"{cfg.info.name}: mask missing: {mask} (for image {img})")
            pairs.append((img, mask))
        self._pairs = pairs
        self._roles = self._resolve_roles([img.name for img, _ in pairs])

    def _resolve_roles(self, file_names: list[str]) -> dict[str, tuple[str, ...]]:
        cfg = self.config
        if cfg.splits is None:
            assert cfg.split_fractions is not None
            counts = draw_role_counts(len(file_names), cfg.split_fractions)
            perm = np.random.default_rng(cfg.split_seed).permutation(len(file_names))
            roles, start = {}, 0
            for role in AL_ROLES:
                roles[role] = tuple(file_names[i] for i in perm[start : start + counts[role]])
                start += counts[role]
            return roles
        by_stem = {Path(n).stem: n for n in file_names}
        known = set(file_names)
        roles = {}
        for role, names in cfg.splits.items():
            resolved = []
            for n in names:
                if n in known:
                    resolved.append(n)
                elif n in by_stem:
                    resolved.append(by_stem[n])
                else:
                    raise DatasetError(
                        f"{cfg.info.name}: splits.{role} names {n!r}, which is not an image in "
                        f"{cfg.images_dir} (config {cfg.path})"
                    )
            if len(set(resolved)) != len(resolved):
                raise ConfigError(f"{cfg.path}: splits.{role} names an image more than once")
            roles[role] = tuple(resolved)
        for i, a in enumerate(AL_ROLES):
            for b in AL_ROLES[i + 1 :]:
                if {a, b} == {"d_s", "d_v"}:
                    continue
                common = set(roles[a]) & set(roles[b])
                if common:
                    raise ConfigError(
                        f"{cfg.path}: splits.{a} and splits.{b} share {len(common)} image(s), e.g. "
                        f"{sorted(common)[:3]}; roles must be disjoint (only d_s may overlap d_v)"
                    )
        return roles

    def file_pairs(self, split: str) -> list[tuple[Path, Path]]:
        if split != "all":
            raise DatasetError(
                f"unknown physical split {split!r} for {self.info.name}; the only one is 'all'"
            )
        return list(self._pairs)

    def role_names(self) -> dict[str, tuple[str, ...]]:
        """Image file names of each role, in role order."""
        return dict(self._roles)

    def role_split(self, role: str) -> SegmentationSplit:
        if role not in AL_ROLES:
            raise DatasetError(f"unknown role {role!r}; choose one of {AL_ROLES}")
        return self.split("all").select(self._roles[role], name=role)

    def to_config(self, relative_to: str | os.PathLike | None = None) -> dict[str, Any]:
        """The dataset as a YAML-ready dict with explicit role lists (freezes a drawn split).

        Folder paths are written relative to ``relative_to`` (default: the folder of the YAML).
        """
        base = Path(relative_to) if relative_to is not None else self.config.path.parent
        info = self.info
        out: dict[str, Any] = {
            "name": info.name,
            "class_names": list(info.class_names),
            "ignore_index": info.ignore_index,
            "image_size": list(info.image_size),
            "region_size": list(info.region_size),
            "images_dir": os.path.relpath(self.config.images_dir, base),
            "masks_dir": os.path.relpath(self.config.masks_dir, base),
        }
        if info.palette:
            out["palette"] = [list(c) for c in info.palette]
        out["splits"] = {r: list(self._roles[r]) for r in AL_ROLES}
        return out

    def write_config(self, path: str | os.PathLike) -> Path:
        """Write ``to_config`` as YAML to ``path`` (paths made relative to its folder); returns it."""
        path = Path(path)
        text = yaml.safe_dump(self.to_config(path.parent), sort_keys=False)
        atomic_write(path, lambda f: f.write(text.encode()))
        return path
