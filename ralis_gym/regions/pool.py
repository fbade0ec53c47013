"""Labeled/unlabeled bookkeeping over the regions of one split, and candidate-pool sampling."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ralis_gym.errors import ConfigError
from ralis_gym.regions.grid import RegionGrid


@dataclass(frozen=True)
class CandidatePools:
    """``K`` disjoint pools of up to ``N`` unlabeled regions; empty slots hold -1 and mask False."""

    region_ids: np.ndarray  # int64 [K, N]
    mask: np.ndarray  # bool [K, N]

    @property
    def shape(self) -> tuple[int, int]:
        return self.region_ids.shape


class RegionPool:
    """Which regions of a split are labeled, in which order, and what they contain.

    Labeling is O(number labeled); no operation loops in Python over all regions. ``labeled`` is a
    boolean ``[images, rows, cols]`` array, ``order`` the labeled region ids in labeling order.
    """

    def __init__(self, grid: RegionGrid, num_images: int, num_classes: int, ignore_index: int) -> None:
        self.grid = grid
        self.num_images = num_images
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.labeled = np.zeros((num_images, grid.rows, grid.cols), dtype=bool)
        self.unlabeled_per_image = np.full(num_images, grid.per_image, dtype=np.int64)
        self._order = np.empty(num_images * grid.per_image, dtype=np.int64)
        self._count = 0
        # Per-class pixels of everything labeled so far, last bin = ignore pixels.
        self.class_pixels = np.zeros(num_classes + 1, dtype=np.int64)

    # --- state ------------------------------------------------------------------------------
    @property
    def num_regions(self) -> int:
        return self.num_images * self.grid.per_image

    @property
    def num_labeled(self) -> int:
        return self._count

    @property
    def num_unlabeled(self) -> int:
        return self.num_regions - self._count

    @property
    def order(self) -> np.ndarray:
        """Labeled region ids in the order they were labeled (read-only view)."""
        view = self._order[: self._count]
        view.flags.writeable = False
        return view

    def is_labeled(self, region_ids: np.ndarray) -> np.ndarray:
        image, row, col = self.grid.split_ids(region_ids)
        return self.labeled[image, row, col]

    def reset(self) -> None:
        self.labeled[:] = False
        self.unlabeled_per_image[:] = self.grid.per_image
        self._count = 0
        self.class_pixels[:] = 0

    def snapshot(self) -> tuple[np.ndarray, ...]:
        """Copies of the labeling state, for ``restore`` (an AL step tried and undone)."""
        return (self.labeled.copy(), self.unlabeled_per_image.copy(), self._order.copy(),
                np.int64(self._count), self.class_pixels.copy())  # fmt: skip

    def restore(self, snapshot: tuple[np.ndarray, ...]) -> None:
        labeled, per_image, order, count, class_pixels = snapshot
        self.labeled[:], self.unlabeled_per_image[:], self._order[:] = labeled, per_image, order
        self._count, self.class_pixels[:] = int(count), class_pixels

    # --- labeling -----------------------------------------------------------------------------
    def label(self, region_ids: np.ndarray, labels: np.ndarray | None = None) -> np.ndarray:
        """Mark regions labeled; returns their ground-truth class histograms ``[R, C + 1]``.

        ``labels`` is the split's label array ``[images, H, W]``; without it the histograms are zero.
        Raises ``ValueError`` for out-of-range, duplicate or already-labeled ids.
        """
        ids = np.asarray(region_ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_regions):
            raise ValueError(
                f"region ids must lie in 0..{self.num_regions - 1}; got {ids.min()}..{ids.max()}"
            )
        if np.unique(ids).size != ids.size:
            raise ValueError("the same region appears twice in one labeling call")
        already = self.is_labeled(ids)
        if already.any():
            raise ValueError(f"region(s) {ids[already][:5].tolist()} are already labeled")
        image, row, col = self.grid.split_ids(ids)
        self.labeled[image, row, col] = True
        np.subtract.at(self.unlabeled_per_image, image, 1)
        self._order[self._count : self._count + ids.size] = ids
        self._count += ids.size
        hist = self.region_class_histograms(ids, labels) if labels is not None else None
        if hist is None:
            return np.zeros((ids.size, self.num_classes + 1), dtype=np.int64)
        self.class_pixels += hist.sum(0)
        return hist

    def region_class_histograms(self, region_ids: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Ground-truth pixels per class of each region, ``[R, C + 1]`` int64 (last column = ignore)."""
        image, row, col = self.grid.split_ids(region_ids)
        rw, rh = self.grid.region_size
        # Gather all region windows in one fancy-indexing op: [R, rh, rw].
        ys = row[:, None] * rh + np.arange(rh)[None, :]
        xs = col[:, None] * rw + np.arange(rw)[None, :]
        patches = labels[image[:, None, None], ys[:, :, None], xs[:, None, :]].reshape(len(image), -1)
        patches = np.where(patches == self.ignore_index, self.num_classes, patches).astype(np.int64)
        if patches.size and patches.max() > self.num_classes:
            raise ValueError(f"labels hold ids above {self.num_classes - 1} other than the ignore id")
        offset = np.arange(len(image))[:, None] * (self.num_classes + 1)
        counts = np.bincount((patches + offset).ravel(), minlength=len(image) * (self.num_classes + 1))
        return counts.reshape(len(image), self.num_classes + 1)

    # --- training targets ----------------------------------------------------------------------
    def pixel_mask(self, images: np.ndarray | int) -> np.ndarray:
        """Boolean ``[..., H, W]`` mask of the labeled pixels of the given image(s)."""
        return self.grid.pixel_mask(self.labeled[images])

    def masked_labels(self, labels: np.ndarray, images: np.ndarray | int) -> np.ndarray:
        """Ground truth of ``images`` with the ignore id everywhere outside labeled regions."""
        return np.where(self.pixel_mask(images), labels, np.uint8(self.ignore_index)).astype(np.uint8)

    # --- sampling ------------------------------------------------------------------------------
    def sample_pools(self, num_pools: int, pool_size: int, rng: np.random.Generator) -> CandidatePools:
        """Draw ``K = num_pools`` disjoint pools of ``N = pool_size`` unlabeled regions.

        Same distribution as the reference code's ``get_candidates`` + ``get_region_candidates``
        (https://github.com/ArantxaCasanova/ralis), vectorized: images are drawn without replacement
        until they hold more than K*N unlabeled regions; then regions are drawn one by one by picking
        a uniform image among those with regions left and a uniform unlabeled region of it. That
        sequential process equals merging, by time, per-image streams whose inter-arrival times are
        i.i.d. Exp(1) (memorylessness makes the next arrival uniform over the images still active),
        with each image's regions in uniformly random order. Finally the K*N candidates are shuffled
        into pools. When fewer than K*N regions are unlabeled, all are taken and dealt round-robin
        over the pools, so a pool is empty only when fewer than K regions remain.
        """
        if num_pools <= 0 or pool_size <= 0:
            raise ConfigError(f"num_pools and pool_size must be positive, got {num_pools} and {pool_size}")
        total = num_pools * pool_size
        order = rng.permutation(self.num_images)
        counts = self.unlabeled_per_image[order]
        cum = np.cumsum(counts)
        stop = int(np.searchsorted(cum, total, side="right")) + 1  # first prefix whose sum > total
        chosen = order[:stop]
        chosen = chosen[self.unlabeled_per_image[chosen] > 0]
        # All unlabeled regions of the chosen images, grouped by image in `chosen` order.
        free = ~self.labeled[chosen].reshape(len(chosen), -1)
        grp, local_rc = np.nonzero(free)  # local_rc in row-major (row * cols + col)
        n_free = grp.size
        take = min(total, n_free)
        if n_free:
            # Random order inside each image, then Exp(1) cumulative arrival times per image.
            within = np.lexsort((rng.random(n_free), grp))
            grp, local_rc = grp[within], local_rc[within]
            times = rng.exponential(size=n_free)
            csum = np.cumsum(times)
            starts = np.r_[0, np.flatnonzero(np.diff(grp)) + 1]
            base = np.repeat(np.r_[0.0, csum[starts[1:] - 1]], np.diff(np.r_[starts, n_free]))
            arrival = csum - base
            first = np.argsort(arrival, kind="stable")[:take]
            row, col = np.divmod(local_rc[first], self.grid.cols)
            ids = self.grid.make_ids(chosen[grp[first]], row, col)
            ids = ids[rng.permutation(take)]
        else:
            ids = np.empty(0, dtype=np.int64)
        region_ids = np.full(total, -1, dtype=np.int64)
        if take == total:
            region_ids[:] = ids
        else:  # deal round-robin: slot j -> pool j % K, position j // K
            slots = np.arange(take)
            region_ids[(slots % num_pools) * pool_size + slots // num_pools] = ids
        region_ids = region_ids.reshape(num_pools, pool_size)
        return CandidatePools(region_ids=region_ids, mask=region_ids >= 0)
