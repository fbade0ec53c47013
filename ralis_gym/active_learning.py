"""A plain active-learning loop with heuristic region scores: the main job until agents land.

Per step (spec §3.3/§7): draw K pools of N unlabeled regions, pick the best-scoring region of each
pool, label them, train the segmenter one epoch on the K new regions, measure D_R mIoU. After the
budget, train on all acquired regions until D_R mIoU stops improving and report test mIoU.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ralis_gym.data.base import SegmentationSplit
from ralis_gym.errors import ConfigError
from ralis_gym.regions import RegionGrid, RegionPool
from ralis_gym.segmentation.base import Segmenter, pixel_entropy
from ralis_gym.segmentation.pretrain import train_until_plateau

STRATEGIES = ("random", "entropy")


def region_scores(
    seg: Segmenter, split: SegmentationSplit, region_ids: np.ndarray, strategy: str
) -> np.ndarray:
    """Mean per-pixel score of each region (``random``: uniform noise is drawn by the caller)."""
    if strategy != "entropy":
        raise ConfigError(f"no region score for strategy {strategy!r}; choose one of {STRATEGIES}")
    grid = seg.grid
    image, row, col = grid.split_ids(region_ids)
    images = np.unique(image)
    slot = np.searchsorted(images, image)
    ent = torch.cat([pixel_entropy(p) for _, p in seg.iter_proba(split, images)])  # [I, H, W]
    means = grid.region_view(ent).mean(dim=(-3, -1))  # [I, rows, cols]
    return means[torch.as_tensor(slot), torch.as_tensor(row), torch.as_tensor(col)].cpu().numpy()


@dataclass
class ALResult:
    strategy: str
    steps: list[dict[str, Any]] = field(default_factory=list)
    final: dict[str, Any] = field(default_factory=dict)


def run_active_learning(
    seg: Segmenter,
    pool_split: SegmentationSplit,
    reward_split: SegmentationSplit,
    test_split: SegmentationSplit | None,
    strategy: str = "entropy",
    budget: int = 240,
    num_pools: int = 24,
    pool_size: int = 10,
    seed: int = 0,
    final_epochs: int = 30,
    final_patience: int = 5,
    progress: bool = True,
) -> ALResult:
    """Acquire ``budget`` regions from ``pool_split`` with a heuristic and report D_R / test mIoU."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"unknown strategy {strategy!r}; choose one of {STRATEGIES}")
    rng = np.random.default_rng(seed)
    info = pool_split.info
    grid = RegionGrid(info.image_size, info.region_size)
    pool = RegionPool(grid, len(pool_split), info.num_classes, info.ignore_index)
    result = ALResult(strategy)
    miou = seg.evaluate(reward_split).miou
    result.steps.append({"labeled": 0, "miou": miou})
    bar = tqdm(total=budget, desc=f"active learning ({strategy})", unit="region", disable=not progress)
    while pool.num_labeled < budget and pool.num_unlabeled > 0:
        t0 = time.perf_counter()
        pools = pool.sample_pools(num_pools, pool_size, rng)
        if strategy == "random":
            scores = rng.random(pools.shape)
        else:
            scores = np.full(pools.shape, -np.inf)
            scores[pools.mask] = region_scores(seg, pool_split, pools.region_ids[pools.mask], strategy)
        scores[~pools.mask] = -np.inf
        best = scores.argmax(1)
        picked = pools.region_ids[np.arange(num_pools), best]
        picked = picked[pools.mask[np.arange(num_pools), best]][: budget - pool.num_labeled]
        pool.label(picked, pool_split.labels)
        seg.fit_regions(pool_split, picked, pool.labeled)
        seg.step_lr()
        seg.step_lr()
        miou = seg.evaluate(reward_split).miou
        result.steps.append({"labeled": pool.num_labeled, "miou": miou, "seconds": time.perf_counter() - t0})
        bar.update(len(picked))
        bar.set_postfix(miou=f"{miou:.3f}")
    bar.close()
    labeled_ids = pool.order.copy()
    final = train_until_plateau(
        seg, lambda: seg.fit_regions(pool_split, labeled_ids, pool.labeled), reward_split,
        final_epochs, final_patience, progress=progress, desc="final training", lr_steps_per_epoch=2,
    )  # fmt: skip
    result.final = {"d_r_miou": final["best_miou"], "labeled": pool.num_labeled,
                    "class_pixels": pool.class_pixels.tolist()}  # fmt: skip
    if test_split is not None:
        test = seg.evaluate(test_split)
        result.final["test_miou"] = test.miou
        result.final["per_class_iou"] = test.to_dict(info.class_names)["per_class_iou"]
    return result
