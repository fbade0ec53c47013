"""Grid tiling of images into fixed-size rectangular regions, as in the RALIS reference code
(https://github.com/ArantxaCasanova/ralis): every image is cut into ``rows x cols`` equal regions,
the unit that is labeled (CamVid 80x90 pixels, 24 per image; Cityscapes 128x128, 128 per image).

A region is identified within a split by one integer ``region_id = image * per_image + local`` with
``local = col * rows + row``: the x-major order of the reference code's state set
(``np.meshgrid(xs, ys).T.reshape(-1, 2)``), so the state features keep the paper's region order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ralis_gym.errors import ConfigError


def check_tiling(image_size: tuple[int, int], region_size: tuple[int, int], where: str = "") -> None:
    """Raise ``ConfigError`` unless ``region_size`` (w, h) tiles ``image_size`` (w, h) exactly.

    A region size that does not divide the image size is rejected (no remainder policy): silently
    dropping border pixels would make them unlabelable. ``where`` (e.g. a config file) starts the
    message.
    """
    (w, h), (rw, rh) = image_size, region_size
    at = f"{where}: " if where else ""
    if min(w, h, rw, rh) <= 0:
        raise ConfigError(f"{at}image size {w}x{h} and region size {rw}x{rh} (WxH) must be positive")
    if w % rw or h % rh:
        raise ConfigError(
            f"{at}region size {rw}x{rh} does not tile image size {w}x{h} (WxH) exactly "
            f"({w} % {rw} = {w % rw}, {h} % {rh} = {h % rh}); pick a region size that divides both"
        )


@dataclass(frozen=True)
class RegionGrid:
    """Exact tiling of a ``width x height`` image by ``region_w x region_h`` regions (``check_tiling``)."""

    image_size: tuple[int, int]  # (width, height)
    region_size: tuple[int, int]  # (width, height)

    def __post_init__(self) -> None:
        check_tiling(self.image_size, self.region_size)

    @property
    def cols(self) -> int:
        return self.image_size[0] // self.region_size[0]

    @property
    def rows(self) -> int:
        return self.image_size[1] // self.region_size[1]

    @property
    def per_image(self) -> int:
        return self.rows * self.cols

    def split_ids(self, region_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(image, row, col) arrays of region ids."""
        ids = np.asarray(region_ids, dtype=np.int64)
        image, local = np.divmod(ids, self.per_image)
        col, row = np.divmod(local, self.rows)
        return image, row, col

    def make_ids(self, image: np.ndarray, row: np.ndarray, col: np.ndarray) -> np.ndarray:
        return np.asarray(image, np.int64) * self.per_image + np.asarray(col, np.int64) * self.rows + row

    def boxes(self, region_ids: np.ndarray) -> np.ndarray:
        """``[R, 5]`` int64 rows of (image, x, y, width, height) in pixels."""
        image, row, col = self.split_ids(region_ids)
        rw, rh = self.region_size
        size = np.broadcast_to(np.array([rw, rh]), (image.size, 2))
        return np.column_stack([image, col * rw, row * rh, size])

    def pixel_mask(self, region_mask: np.ndarray) -> np.ndarray:
        """Expand a region mask ``[..., rows, cols]`` to a pixel mask ``[..., H, W]``."""
        rw, rh = self.region_size
        return np.repeat(np.repeat(region_mask, rh, axis=-2), rw, axis=-1)

    def region_view(self, pixels: np.ndarray) -> np.ndarray:
        """View ``[..., H, W]`` as ``[..., rows, rh, cols, rw]`` (no copy)."""
        rw, rh = self.region_size
        return pixels.reshape(*pixels.shape[:-2], self.rows, rh, self.cols, rw)
