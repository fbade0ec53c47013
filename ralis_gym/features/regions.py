"""Region vectors from arg-max and entropy maps, or from full-resolution softmax maps.

The reference code (https://github.com/ArantxaCasanova/ralis, ``compute_state``) describes a region
by the class histogram of the network's prediction and min/avg/max pooling of its entropy.

A region vector is ``[class histogram (C+1) | min-pool 64 | avg-pool 64 | max-pool 64]`` of one grid
region: the histogram counts the arg-max prediction, the pools summarise the pixel entropy map on an
8x8 grid of cells. The reference computes it region by region in Python; here the entropy and the
arg-max are computed once per image and every region of the image is pooled by one pooling call:

* The region-aligned cells tile the image when the 8x8 cells of each region are laid side by side.
  Each region keeps only its first ``8*kh`` rows and ``8*kw`` columns (``kh = h // 8``,
  ``kw = w // 8``; CamVid's 90-px-high regions with 11-px cells drop their last 2 rows, exactly as
  the reference's floor-mode pooling on the region patch does). Cropping those rows/columns out of
  every region and pooling the cropped image with kernel = stride = ``(kh, kw)`` therefore gives, cell
  by cell, the same windows as pooling each region patch on its own — the same numbers, no window
  ever straddles two regions. When the kernel tiles the region (Cityscapes 128 / 16) the crop is a
  no-op view and the full image is pooled directly.
* The class histograms of all regions of a batch of images come from one ``bincount`` over keys
  ``(image, region, class)``.

Everything runs on the device of ``probs``; Python loops only walk over chunks of images to bound the
temporaries of the entropy computation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ralis_gym.errors import ConfigError
from ralis_gym.regions.grid import RegionGrid

#: Side of the pooling grid of a region (8x8 cells per pooled map).
POOL_CELLS = 8
#: Number of pooled entropy values of a region vector (min, avg and max over 8x8 cells).
POOL_FEATURES = 3 * POOL_CELLS * POOL_CELLS
#: Value of a histogram bin of a class absent from the region (the reference's ``zeros + 1e-7``).
HIST_FLOOR = 1e-7
#: Default bound on ``images * C * H * W`` elements handled at once by :func:`region_tables`.
DEFAULT_IMAGE_CHUNK_ELEMS = 1 << 25


def region_vector_dim(num_classes: int) -> int:
    """``Ds = C + 1 + 192``: 212 for Cityscapes (C=19), 204 for CamVid (C=11)."""
    return num_classes + 1 + POOL_FEATURES


def pool_kernel(grid: RegionGrid) -> tuple[int, int]:
    """``(kh, kw) = (h // 8, w // 8)`` of the entropy pooling, as the reference's ``ks_y, ks_x``.

    Regions smaller than 8 px on a side have no valid kernel and are rejected. For regions below
    64 px whose remainder ``h % 8`` is at least ``h // 8`` the reference's floor-mode pooling would emit
    more than 8 cells per side (a variable-length vector); this implementation always keeps the first
    8x8 cells so the feature size stays ``Ds``.
    """
    rw, rh = grid.region_size
    kh, kw = rh // POOL_CELLS, rw // POOL_CELLS
    if kh == 0 or kw == 0:
        raise ConfigError(
            f"region size {rw}x{rh} (WxH) is too small for {POOL_CELLS}x{POOL_CELLS} entropy pooling; "
            f"regions must be at least {POOL_CELLS} px on each side"
        )
    return kh, kw


def _check_probs(probs: torch.Tensor, grid: RegionGrid) -> None:
    if probs.dim() != 4:
        raise ValueError(f"probs must be [images, C, H, W], got shape {tuple(probs.shape)}")
    h, w = probs.shape[-2:]
    if (w, h) != tuple(grid.image_size):
        raise ValueError(
            f"probs are {w}x{h} (WxH) but the region grid tiles {grid.image_size[0]}x{grid.image_size[1]} "
            "images; features need full-resolution probabilities"
        )


def _pool_cells(cells: torch.Tensor, grid: RegionGrid, kernel: tuple[int, int]) -> torch.Tensor:
    """Min/avg/max of ``[n, H, W]`` entropy maps per region cell → ``[n, rows, cols, 192]``.

    The min is ``-maxpool(-E)``. The reference writes ``5 - maxpool(5 - E)``: mathematically the same
    number, but its float32 round trip through ``5 - E`` quantises small entropies to multiples of
    ulp(5) ≈ 4.8e-7; negation is exact.
    """
    n = cells.shape[0]
    rw, rh = grid.region_size
    kh, kw = kernel
    ch, cw = POOL_CELLS * kh, POOL_CELLS * kw
    if (ch, cw) != (rh, rw):  # drop the rows/columns that no pooling window of a region covers
        cells = cells.view(n, grid.rows, rh, grid.cols, rw)[:, :, :ch, :, :cw]
        cells = cells.reshape(n, grid.rows * ch, grid.cols * cw)
    x = cells.unsqueeze(1)  # [n, 1, rows*ch, cols*cw]
    pooled = torch.stack(
        [
            -F.max_pool2d(-x, kernel, stride=kernel),
            F.avg_pool2d(x, kernel, stride=kernel),
            F.max_pool2d(x, kernel, stride=kernel),
        ],
        dim=1,
    )  # [n, 3, 1, rows*8, cols*8]
    pooled = pooled.view(n, 3, grid.rows, POOL_CELLS, grid.cols, POOL_CELLS)
    # -> [n, rows, cols, 3, 8, 8]: per region, the three maps each flattened row-major over 8x8.
    return pooled.permute(0, 2, 4, 1, 3, 5).reshape(n, grid.rows, grid.cols, POOL_FEATURES)


def class_argmax(probs: torch.Tensor) -> torch.Tensor:
    """Arg-max over the class axis of ``[..., C, H, W]``: ``probs.argmax(-3)``, index for index.

    ``max(...).indices`` returns the same first maximal index (ties and NaN included, see the tests)
    but reduces a strided class axis 4-5x faster on the CPU than ``argmax`` (1.7 vs 0.4 ms for a
    batch of 8 fast-model cell grids), which the reward evaluation does every step.
    """
    return probs.max(dim=-3).indices


def entropy_map(probs: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """``-(p * log(p + eps)).sum(C)`` of ``[n, C, H, W]``: ``ralis_gym.segmentation.uncertainty.pixel_entropy``, op for op.

    Same operations in the same order (so the same bits, see the tests), but in place on one
    temporary instead of three: a Cityscapes image is 160 MB of float32 probabilities. The eps inside
    the log keeps ``0 * log 0`` finite; the reference uses ``log_softmax`` of the logits instead,
    a difference below 1e-9 per pixel.
    """
    t = probs + eps
    t.log_()
    t.mul_(probs)
    return -t.sum(dim=-3)


@torch.no_grad()
def region_tables(
    probs: torch.Tensor, grid: RegionGrid, image_chunk_elems: int = DEFAULT_IMAGE_CHUNK_ELEMS
) -> torch.Tensor:
    """Region vectors of every region of every image, ``[I, rows, cols, C + 1 + 192]`` float32.

    ``probs`` is the full-resolution softmax ``[I, C, H, W]`` (any float dtype, any device). Images
    are processed ``max(1, image_chunk_elems // (C*H*W))`` at a time so the entropy temporaries (a
    few copies of the chunk) stay bounded whatever ``I`` is.
    """
    _check_probs(probs, grid)
    n_img, n_cls = probs.shape[:2]
    out = torch.empty(
        n_img, grid.rows, grid.cols, n_cls + 1 + POOL_FEATURES, dtype=torch.float32, device=probs.device
    )
    step = max(1, image_chunk_elems // max(1, probs[0].numel()))
    for start in range(0, n_img, step):
        p = probs[start : start + step].float()
        out[start : start + p.shape[0]] = region_tables_from_maps(
            class_argmax(p), entropy_map(p), n_cls, grid
        )
    return out


@torch.no_grad()
def region_tables_from_maps(
    prediction: torch.Tensor,
    entropy: torch.Tensor,
    num_classes: int,
    grid: RegionGrid,
    prediction_stride: int = 1,
) -> torch.Tensor:
    """:func:`region_tables` from the arg-max ``[I, H, W]`` and entropy ``[I, H, W]`` maps.

    Models whose predictions are piecewise constant (the fast model's cells) compute both maps at
    cell resolution and expand them, which avoids the full-resolution ``[I, C, H, W]`` softmax.
    With ``prediction_stride = s > 1`` the arg-max map is the cell map ``[I, H / s, W / s]`` itself
    (``s`` must divide the region size): a cell holds ``s * s`` pixels of its class, so the class
    counts are the same integers for 1/s^2 of the work. The entropy map stays full resolution (the
    8x8 pooling windows of a region need not align with the cells).
    """
    kernel = pool_kernel(grid)
    n = prediction.shape[0]
    bins = num_classes + 1
    device = prediction.device
    s = int(prediction_stride)
    rw, rh = grid.region_size
    if (
        s < 1
        or rw % s
        or rh % s
        or tuple(prediction.shape[-2:]) != (grid.image_size[1] // s, grid.image_size[0] // s)
    ):
        raise ValueError(
            f"prediction {tuple(prediction.shape)} at stride {s} does not tile {grid.image_size[0]}x{grid.image_size[1]} "
            f"images into {rw}x{rh} regions"
        )
    ry = torch.arange(prediction.shape[-2], device=device) // (rh // s)
    rx = torch.arange(prediction.shape[-1], device=device) // (rw // s)
    local = ry[:, None] * grid.cols + rx[None, :]
    # Arg-max histogram of every (image, region): one bincount over (image, region, class) keys.
    offsets = torch.arange(n, device=device)[:, None, None] * grid.per_image + local
    keys = prediction.long() + bins * offsets
    counts = torch.bincount(keys.view(-1), minlength=n * grid.per_image * bins).view(
        n, grid.rows, grid.cols, bins
    ) * (s * s)
    out = torch.empty(n, grid.rows, grid.cols, bins + POOL_FEATURES, dtype=torch.float32, device=device)
    # `zeros + 1e-7; v[present] = counts`: present classes hold exact counts, absent ones 1e-7.
    out[..., :bins] = torch.where(
        counts > 0, counts.to(torch.float32), torch.full((), HIST_FLOOR, device=device)
    )
    out[..., bins:] = _pool_cells(entropy.float(), grid, kernel)
    return out


def tables_in_id_order(tables: torch.Tensor) -> torch.Tensor:
    """``[I, rows, cols, D]`` region tables as ``[I * rows * cols, D]`` rows in region-id order:
    image-major, then x-major inside an image (``col * rows + row``, :class:`RegionGrid`'s order and
    the reference code's ``meshgrid(xs, ys).T``), so row ``i`` is region id ``i``."""
    return tables.permute(0, 2, 1, 3).reshape(-1, tables.shape[-1])
