"""Frozen, label-free cell features for the fast model, computed once per image and cached.

Why a hand-made encoder: no pretrained weights may be downloaded, and the start networks must never
have seen the labels of the pool they acquire from, yet the whole RALIS loop has to run on a 2-core
CPU in minutes. So the expensive part of the segmenter is a fixed function of the pixels (no
parameters learned from labels, nothing random that is not seeded) that is evaluated once per image;
only a small head on top of it is trained. Every start network shares this encoder.

An image of ``H x W`` is cut into cells of ``stride x stride`` pixels (the stride divides the region
size, so every cell lies in exactly one region) and each cell gets a vector of:

* local appearance (``local_dim`` values): mean and standard deviation of CIE-Lab; magnitude-weighted
  histograms of gradient orientation (HOG-like, soft-binned, unsigned) at several Gaussian scales;
  Laplacian-of-Gaussian response and its absolute value at several scales (blobs, texture energy);
  soft histograms of lightness and of hue weighted by chroma; chroma gradient energy; the largest
  fine-scale gradient in the cell (thin structures such as poles survive the averaging this way);
* context (what a deep network gets from its receptive field): box means of the local vector over
  ``k x k`` cell neighbourhoods for each ``k`` in ``context_sizes``, and the means over the cell's
  whole row and whole column of the image (horizon, road band, sky band).

Position is *not* part of the cached vector: the head adds it (see ``position_encoding``), which
keeps the cache flip-equivariant: the features of a mirrored image are the mirrored cell grid with
the channel permutation ``flip_permutation()`` (orientation bins ``k <-> -k``), so horizontal-flip
augmentation costs no extra encoding.

All per-pixel work is vectorized (OpenCV separable filters per image, torch ``bincount`` for the
soft histograms, ``avg_pool2d`` for pooling); there is no Python loop over pixels.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from ralis_gym.data.base import SegmentationSplit
from ralis_gym.errors import ConfigError
from ralis_gym.fileio import atomic_write, file_lock
from ralis_gym.paths import user_cache_dir

# Bump when the feature definition changes so stale caches are never reused.
ENCODER_VERSION = 1

_BORDER = cv2.BORDER_REFLECT


@dataclass(frozen=True)
class EncoderConfig:
    """What the frozen encoder computes; its ``key`` names the feature caches.

    Sigmas are in pixels, context sizes in cells. The defaults were chosen by measurement on CamVid
    (``benchmarks/fast_model_accuracy.py``).
    """

    stride: int = 10
    gradient_sigmas: tuple[float, ...] = (1.0, 2.0, 4.0)
    log_sigmas: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0)
    orientations: int = 6
    lightness_bins: int = 5
    hue_bins: int = 8
    chroma_sigma: float = 2.0
    context_sizes: tuple[int, ...] = (3, 7, 15)
    row_col_context: bool = True
    offset_context: int = 0

    def __post_init__(self) -> None:
        if self.stride <= 0:
            raise ConfigError(f"stride must be positive, got {self.stride}")
        if not self.gradient_sigmas:
            raise ConfigError("gradient_sigmas must not be empty (the max-gradient feature uses the first)")
        if any(k <= 0 or k % 2 == 0 for k in self.context_sizes):
            raise ConfigError(f"context sizes must be odd positive cell counts, got {self.context_sizes}")
        if self.offset_context < 0 or (self.offset_context and self.offset_context % 2 == 0):
            raise ConfigError(
                f"offset_context must be 0 (off) or an odd cell count, got {self.offset_context}"
            )
        if self.orientations < 2 or self.lightness_bins < 2 or self.hue_bins < 2:
            raise ConfigError("orientations, lightness_bins and hue_bins must be at least 2")

    @property
    def key(self) -> str:
        """Stable short hash of the feature definition (config + encoder version)."""
        text = json.dumps({"v": ENCODER_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha1(text.encode()).hexdigest()[:12]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> EncoderConfig:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def _gaussian_kernels(sigma: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """1-D Gaussian and its scale-normalised first and second derivatives (radius 3 sigma)."""
    radius = max(1, math.ceil(3 * sigma))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    g = np.exp(-(x**2) / (2 * sigma**2))
    g /= g.sum()
    d1 = -x / sigma**2 * g * sigma
    d2 = (x**2 / sigma**4 - 1 / sigma**2) * g * sigma**2
    return g.astype(np.float32), d1.astype(np.float32), d2.astype(np.float32)


def _soft_histogram(
    pos: torch.Tensor, weight: torch.Tensor, bins: int, circular: bool, cell: torch.Tensor, cells: int
) -> torch.Tensor:
    """Per-cell sums of ``weight`` split linearly between the two bins nearest ``pos``.

    ``pos`` and ``weight`` are ``[B, P]`` (P pixels, ``pos`` in bin units, within ``[0, bins]``),
    ``cell`` ``[P]`` int32 the cell of each pixel. Returns ``[B, bins, cells]``: one ``bincount``
    instead of ``bins`` full-size maps (int32 index arithmetic; it is the hot loop of the encoder).
    """
    batch = pos.shape[0]
    lower = torch.floor(pos)
    frac = pos - lower
    lo = lower.to(torch.int32)
    hi = lo + 1
    if circular:
        lo = torch.where(lo >= bins, lo - bins, lo)
        hi = torch.where(hi >= bins, hi - bins, hi)
    else:
        lo = lo.clamp_(0, bins - 1)
        hi = hi.clamp_(0, bins - 1)
    offset = (torch.arange(batch, dtype=torch.int32) * (bins * cells)).view(batch, 1) + cell.view(1, -1)
    index = torch.cat([lo.mul_(cells).add_(offset), hi.mul_(cells).add_(offset)]).reshape(-1)
    upper = weight * frac
    values = torch.cat([weight - upper, upper]).reshape(-1)
    return torch.bincount(index, values, minlength=batch * bins * cells).view(batch, bins, cells)


class CellEncoder:
    """The frozen feature extractor: uint8 RGB images -> ``[B, rows, cols, dim]`` cell features."""

    def __init__(self, config: EncoderConfig | None = None) -> None:
        self.config = config or EncoderConfig()
        c = self.config
        self._grad_kernels = [_gaussian_kernels(s) for s in c.gradient_sigmas]
        self._log_kernels = [_gaussian_kernels(s) for s in c.log_sigmas]
        self._chroma_kernels = _gaussian_kernels(c.chroma_sigma)

    # --- layout -----------------------------------------------------------------------------------
    @property
    def local_names(self) -> list[str]:
        """Name of every local channel, in order (used for the flip permutation and for debugging)."""
        c = self.config
        names = [f"lab_mean_{ch}" for ch in "Lab"] + [f"lab_std_{ch}" for ch in "Lab"]
        for s in c.gradient_sigmas:
            names += [f"hog_s{s:g}_o{k}" for k in range(c.orientations)]
        names += [f"log_s{s:g}" for s in c.log_sigmas] + [f"abslog_s{s:g}" for s in c.log_sigmas]
        names += [f"lightness_{k}" for k in range(c.lightness_bins)]
        names += [f"hue_{k}" for k in range(c.hue_bins)]
        names += ["chroma_gradient", f"max_gradient_s{c.gradient_sigmas[0]:g}"]
        return names

    @property
    def local_dim(self) -> int:
        return len(self.local_names)

    @property
    def context_names(self) -> list[str]:
        """The copies of the local vector that the context stage stacks, in order (itself first)."""
        c = self.config
        names = ["local"] + [f"box{k}" for k in c.context_sizes]
        if c.row_col_context:
            names += ["row", "col"]
        if c.offset_context:
            names += ["above", "below", "left", "right"]
        return names

    @property
    def context_copies(self) -> int:
        return len(self.context_names)

    @property
    def dim(self) -> int:
        return self.local_dim * self.context_copies

    def grid_shape(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """``(rows, cols)`` of the cell grid of ``(width, height)`` images; the stride must divide both."""
        width, height = image_size
        s = self.config.stride
        if width % s or height % s:
            raise ConfigError(f"stride {s} does not divide the image size {width}x{height}")
        return height // s, width // s

    def flip_permutation(self) -> torch.Tensor:
        """Channel permutation ``p`` with ``encode(flip(x)) == flip_cols(encode(x))[..., p]``.

        Mirroring negates the x-gradient, so the unsigned orientation ``t`` becomes ``pi - t``: bin
        ``k`` maps to bin ``-k mod orientations``. Every other local channel is mirror-invariant; the
        context pools are symmetric except the left/right offset windows, which swap.
        """
        c = self.config
        local = list(range(self.local_dim))
        for i in range(len(c.gradient_sigmas)):
            start = 6 + i * c.orientations
            for k in range(c.orientations):
                local[start + k] = start + (-k) % c.orientations
        names = self.context_names
        swap = {"left": "right", "right": "left"}
        source = [names.index(swap.get(n, n)) for n in names]
        perm = [source[copy] * self.local_dim + ch for copy in range(len(names)) for ch in local]
        return torch.tensor(perm, dtype=torch.long)

    # --- computation ------------------------------------------------------------------------------
    def _filter_image(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """OpenCV filtering of one image: (pooled-by-mean maps ``[M, H, W]``, gradients ``[S, 2, H, W]``)."""
        lab = cv2.cvtColor(image.astype(np.float32) * (1 / 255.0), cv2.COLOR_RGB2LAB) * (1 / 100.0)
        light = np.ascontiguousarray(lab[..., 0])
        maps = [lab.transpose(2, 0, 1), (lab * lab).transpose(2, 0, 1)]
        logs = []
        for g, _, d2 in self._log_kernels:
            logs.append(
                cv2.sepFilter2D(light, -1, d2, g, borderType=_BORDER)
                + cv2.sepFilter2D(light, -1, g, d2, borderType=_BORDER)
            )
        maps += [np.stack(logs), np.abs(np.stack(logs))]
        g, d1, _ = self._chroma_kernels
        ab = np.ascontiguousarray(lab[..., 1:])
        cx = cv2.sepFilter2D(ab, -1, d1, g, borderType=_BORDER)
        cy = cv2.sepFilter2D(ab, -1, g, d1, borderType=_BORDER)
        maps.append(np.sqrt((cx * cx + cy * cy).sum(-1))[None])
        grads = [
            np.stack(
                [
                    cv2.sepFilter2D(light, -1, d1, g, borderType=_BORDER),
                    cv2.sepFilter2D(light, -1, g, d1, borderType=_BORDER),
                ]
            )
            for g, d1, _ in self._grad_kernels
        ]
        return np.concatenate(maps), np.stack(grads)

    @torch.no_grad()
    def local_features(self, images: np.ndarray) -> torch.Tensor:
        """Local cell features ``[B, local_dim, rows, cols]`` float32 of uint8 RGB ``[B, H, W, 3]``."""
        c = self.config
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"expected uint8 images [B, H, W, 3], got {images.dtype} {images.shape}")
        n, height, width = images.shape[:3]
        rows, cols = self.grid_shape((width, height))
        s, cells = c.stride, rows * cols
        filtered = [self._filter_image(img) for img in images]
        maps = torch.from_numpy(np.stack([f[0] for f in filtered]))
        grads = torch.from_numpy(np.stack([f[1] for f in filtered])).view(n, len(c.gradient_sigmas), 2, -1)
        pooled = F.avg_pool2d(maps, s)
        mean_lab, mean_sq = pooled[:, :3], pooled[:, 3:6]
        std_lab = (mean_sq - mean_lab**2).clamp_min(0).sqrt()
        cell = (torch.arange(height, dtype=torch.int32) // s).view(-1, 1) * cols
        cell = (cell + (torch.arange(width, dtype=torch.int32) // s).view(1, -1)).view(-1)
        area = float(s * s)

        gx, gy = grads[:, :, 0], grads[:, :, 1]
        magnitude = torch.sqrt(gx * gx + gy * gy)  # [n, S, P]
        angle = torch.atan2(gy, gx).remainder(math.pi) * (c.orientations / math.pi)
        hog = (
            _soft_histogram(
                angle.reshape(-1, angle.shape[-1]),
                magnitude.reshape(-1, angle.shape[-1]),
                c.orientations,
                True,
                cell,
                cells,
            ).view(n, -1, rows, cols)
            / area
        )

        lab = maps[:, :3].reshape(n, 3, -1)
        light = lab[:, 0].clamp(0, 1) * (c.lightness_bins - 1)
        light_hist = _soft_histogram(light, torch.ones_like(light), c.lightness_bins, False, cell, cells)
        a, b = lab[:, 1], lab[:, 2]
        hue = torch.atan2(b, a).remainder(2 * math.pi) * (c.hue_bins / (2 * math.pi))
        hue_hist = _soft_histogram(hue, torch.sqrt(a * a + b * b), c.hue_bins, True, cell, cells)
        max_grad = F.max_pool2d(magnitude[:, :1].reshape(n, 1, height, width), s)
        nlog = len(c.log_sigmas)
        return torch.cat(
            [
                mean_lab,
                std_lab,
                hog,
                pooled[:, 6 : 6 + 2 * nlog],
                light_hist.view(n, -1, rows, cols) / area,
                hue_hist.view(n, -1, rows, cols) / area,
                pooled[:, 6 + 2 * nlog :],
                max_grad,
            ],
            1,
        )

    @torch.no_grad()
    def context_features(self, local: torch.Tensor) -> torch.Tensor:
        """Stack the local map ``[B, D, rows, cols]`` with its neighbourhood/row/column means."""
        _, _, rows, cols = local.shape
        out = [local]
        for k in self.config.context_sizes:
            # Separable box mean (exact: the valid part of a window is a rectangle).
            col_mean = F.avg_pool2d(local, (k, 1), stride=1, padding=(k // 2, 0), count_include_pad=False)
            out.append(F.avg_pool2d(col_mean, (1, k), stride=1, padding=(0, k // 2), count_include_pad=False))
        if self.config.row_col_context:
            out.append(local.mean(3, keepdim=True).expand(-1, -1, rows, cols))
            out.append(local.mean(2, keepdim=True).expand(-1, -1, rows, cols))
        k = self.config.offset_context
        if k:
            # k x k box means centred k cells above / below / left / right (layout: what is next to it)
            box = F.avg_pool2d(local, (k, 1), stride=1, padding=(k // 2, 0), count_include_pad=False)
            box = F.avg_pool2d(box, (1, k), stride=1, padding=(0, k // 2), count_include_pad=False)
            pad = F.pad(box, (k, k, k, k), mode="replicate")
            out += [
                pad[:, :, 0:rows, k : k + cols],
                pad[:, :, 2 * k : 2 * k + rows, k : k + cols],
                pad[:, :, k : k + rows, 0:cols],
                pad[:, :, k : k + rows, 2 * k : 2 * k + cols],
            ]
        return torch.cat(out, 1)

    @torch.no_grad()
    def encode(self, images: np.ndarray) -> torch.Tensor:
        """Cell features ``[B, rows, cols, dim]`` float32 of uint8 RGB images ``[B, H, W, 3]``."""
        return self.context_features(self.local_features(images)).permute(0, 2, 3, 1).contiguous()


def position_encoding(rows: int, cols: int, frequencies: tuple[int, ...] = (1, 2, 4)) -> torch.Tensor:
    """``[rows, cols, 2 + 4 * len(frequencies)]``: normalised (y, x) of cell centres and sin/cos of them.

    Street scenes are strongly laid out (sky on top, road at the bottom, pavement on the driving side),
    so the head sees where a cell is. Kept out of the cached features so that flipping stays a
    channel permutation; ``x`` of a mirrored cell is simply ``1 - x``.
    """
    y = (torch.arange(rows, dtype=torch.float32) + 0.5) / rows
    x = (torch.arange(cols, dtype=torch.float32) + 0.5) / cols
    yy, xx = torch.meshgrid(y, x, indexing="ij")
    parts = [yy, xx]
    for f in frequencies:
        parts += [
            torch.sin(math.pi * f * yy),
            torch.cos(math.pi * f * yy),
            torch.sin(math.pi * f * xx),
            torch.cos(math.pi * f * xx),
        ]
    return torch.stack(parts, -1)


# --- caching ----------------------------------------------------------------------------------------
_MEMORY: dict[tuple[str, str, str], torch.Tensor] = {}
_LOCK = threading.Lock()


def clear_feature_cache() -> None:
    """Drop every in-memory feature tensor (the on-disk cache is kept)."""
    with _LOCK:
        _MEMORY.clear()


_FINGERPRINTS: dict[int, tuple[weakref.ref, str]] = {}


def content_fingerprint(array: np.ndarray, step: int = 23) -> str:
    """Short hash of a sparse pixel sample of every image of ``array`` ``[N, H, W, ...]``.

    ``split.key`` names a split by its image names only; adding this cheap sample (a few hundred
    bytes per image) to the cache keys keeps a split whose pixels changed under the same names (a
    relabeled test fixture, replaced files) from reusing stale entries. Memoised per array object
    (arrays are not expected to be modified in place once handed to a segmenter).
    """
    memo = _FINGERPRINTS.get(id(array))
    if memo is not None and memo[0]() is array:
        return memo[1]
    arr = np.asarray(array)
    digest = hashlib.sha1(repr((arr.shape, arr.dtype.str)).encode())
    digest.update(np.ascontiguousarray(arr[:, ::step, ::step]).tobytes())
    fingerprint = digest.hexdigest()[:10]
    try:
        for key in [k for k, (ref, _) in _FINGERPRINTS.items() if ref() is None]:
            del _FINGERPRINTS[key]  # forget arrays that no longer exist
        _FINGERPRINTS[id(array)] = (weakref.ref(array), fingerprint)
    except TypeError:
        pass  # not weak-referenceable: recompute next time
    return fingerprint


def feature_cache_dir() -> Path:
    """``<user cache>/features``: one sub-folder per encoder key, one ``.npy`` per split key."""
    return user_cache_dir() / "features"


def split_features(
    encoder: CellEncoder,
    split: SegmentationSplit,
    *,
    disk_cache: bool = True,
    batch_size: int = 4,
    progress: bool = False,
) -> torch.Tensor:
    """Features of every image of ``split``: ``[N, rows, cols, dim]`` float16, cached.

    The in-memory cache is process-wide and keyed by ``(encoder key, split.key, pixel fingerprint)``,
    so every segmenter built on the same encoder shares it (start networks, episode resets). The disk
    cache stores float16 ``.npy`` files written atomically; a corrupt or mismatching file is recomputed.
    """
    fingerprint = content_fingerprint(split.images)
    key = (encoder.config.key, split.key, fingerprint)
    with _LOCK:
        hit = _MEMORY.get(key)
    if hit is not None:
        return hit
    rows, cols = encoder.grid_shape(split.info.image_size)
    shape = (len(split), rows, cols, encoder.dim)
    path = feature_cache_dir() / encoder.config.key / f"{split.key}-{fingerprint}.npy"
    feats = _load_cached(path, shape) if disk_cache else None
    if feats is None and disk_cache:
        # One process encodes a split; others that need it meanwhile wait, then read its file.
        with file_lock(path):
            feats = _load_cached(path, shape)
            if feats is None:
                feats = _encode_split(encoder, split, shape, batch_size, progress)
                _save_atomic(path, feats.numpy())
    elif feats is None:
        feats = _encode_split(encoder, split, shape, batch_size, progress)
    with _LOCK:
        _MEMORY[key] = feats
    return feats


def _encode_split(
    encoder: CellEncoder, split: SegmentationSplit, shape: tuple[int, ...], batch_size: int, progress: bool
) -> torch.Tensor:
    from tqdm.auto import tqdm

    out = torch.empty(shape, dtype=torch.float16)
    starts = range(0, len(split), batch_size)
    for start in tqdm(starts, desc=f"features {split.name}", leave=False, disable=not progress):
        stop = min(start + batch_size, len(split))
        out[start:stop] = encoder.encode(np.asarray(split.images[start:stop])).to(torch.float16)
    return out


def _load_cached(path: Path, shape: tuple[int, ...]) -> torch.Tensor | None:
    """The cached features at ``path`` if they exist and have the expected shape, else None."""
    if not path.exists():
        return None
    try:
        arr = np.load(path)
    except (ValueError, OSError):
        return None  # corrupt (e.g. an old cache's half-written file): recompute
    return torch.from_numpy(arr) if arr.shape == shape and arr.dtype == np.float16 else None


def _save_atomic(path: Path, array: np.ndarray) -> None:
    try:
        atomic_write(path, lambda f: np.save(f, array))
    except OSError:
        pass  # read-only cache: keep working from memory
