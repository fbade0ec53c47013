"""Per-pixel acquisition scores on probability tensors (spec §7), shared by the env and the agents.

All functions are vectorized over any leading axes; the class axis is -3 (``[..., C, H, W]``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

EPS = 1e-10


def pixel_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Predictive entropy ``-sum_c p_c log p_c`` (natural log) of ``probs [..., C, H, W]`` -> ``[..., H, W]``."""
    return -(probs * torch.log(probs + EPS)).sum(dim=-3)


def pixel_bald(mc_probs: torch.Tensor) -> torch.Tensor:
    """BALD of T stochastic passes ``mc_probs [T, ..., C, H, W]``: ``H[mean_t p_t] - mean_t H[p_t]``."""
    return pixel_entropy(mc_probs.mean(dim=0)) - pixel_entropy(mc_probs).mean(dim=0)


def pixel_margin(probs: torch.Tensor) -> torch.Tensor:
    """Margin uncertainty ``1 - (p_top1 - p_top2)`` of ``probs [..., C, H, W]``: high where the two best classes tie."""
    top2 = probs.topk(2, dim=-3).values
    return 1.0 - (top2.select(-3, 0) - top2.select(-3, 1))


def pixel_class_rarity(probs: torch.Tensor, class_frequency: torch.Tensor) -> torch.Tensor:
    """Expected rarity ``sum_c p_c(x) * -log(pi_c)`` of the predicted class, for frequencies ``pi [C]``.

    The class-balance heuristic of this project: it favours regions predicted to hold classes that are
    rare in what has been labeled so far (Pole, SignSymbol, Pedestrian, Bicyclist on CamVid).
    """
    pi = class_frequency.to(probs) / class_frequency.sum().clamp_min(EPS)
    rarity = -torch.log(pi + 1e-6)
    shape = [1] * probs.dim()
    shape[-3] = -1
    return (probs * rarity.view(shape)).sum(dim=-3)


#: heuristics scored from the network's predictions alone (``region_scores``)
LABEL_FREE_SCORES = ("entropy", "margin", "bald", "class_balance")


def region_means(
    pixel_maps: Callable[[np.ndarray], torch.Tensor], images: np.ndarray, rows: int, cols: int, batch: int
) -> torch.Tensor:
    """Mean of per-pixel maps over every region of some images, float64 ``[I, (C,) rows, cols]``.

    ``pixel_maps(chunk)`` gives ``[B, (C,) h, w]`` maps of a chunk of image indices on the model's
    native grid (``h``/``w`` multiples of the region rows/columns, so the region mean is exact there);
    chunks of ``batch`` images keep ``T x B x C x h x w`` MC-dropout tensors small.
    """
    per_image = []
    for start in range(0, images.size, max(1, batch)):
        maps = pixel_maps(images[start : start + batch])
        h, w = maps.shape[-2:]
        view = maps.reshape(*maps.shape[:-2], rows, h // rows, cols, w // cols)
        per_image.append(view.mean(dim=(-3, -1)).double())  # [B, (C,) rows, cols]
    return torch.cat(per_image)


def region_scores(
    segmenter: Any,
    split: Any,
    images: np.ndarray,
    rows: int,
    cols: int,
    heuristic: str,
    labeled_class_pixels: np.ndarray | None = None,
    mc_passes: int = 20,
) -> torch.Tensor:
    """A label-free heuristic's score of every region of some images of ``split``, ``[I, rows, cols]``.

    A region's score is the mean over its pixels of ``entropy``, ``margin``, ``bald`` (``mc_passes``
    MC-dropout passes) or ``class_balance`` (the expected rarity of the predicted class, frequencies
    from ``labeled_class_pixels`` ``[C(+1)]`` plus these images' predicted pixels), computed with
    ``segmenter``'s current network. The one scoring of the heuristics: the environment's
    ``score_candidates`` and the labeling projects' suggestions both call it.
    """
    if heuristic not in LABEL_FREE_SCORES:
        raise ValueError(f"unknown label-free heuristic {heuristic!r}; choose one of {LABEL_FREE_SCORES}")

    def maps_of(chunk: np.ndarray) -> torch.Tensor:
        if heuristic == "bald":
            return pixel_bald(segmenter.native_proba(split, chunk, passes=mc_passes))
        probs = segmenter.native_proba(split, chunk)
        if heuristic == "entropy":
            return pixel_entropy(probs)
        if heuristic == "margin":
            return pixel_margin(probs)
        return probs  # class_balance: per-class region means, combined once all frequencies are known

    means = region_means(maps_of, np.asarray(images), rows, cols, segmenter.default_batch_size())
    if heuristic == "class_balance":
        rw, rh = split.info.region_size
        predicted = means.sum(dim=(0, 2, 3)) * (rw * rh)  # expected predicted pixels per class
        counts = np.zeros(means.shape[1]) if labeled_class_pixels is None else labeled_class_pixels
        labeled = torch.as_tensor(np.asarray(counts)[: means.shape[1]], dtype=torch.float64)
        means = pixel_class_rarity(means, labeled.to(predicted.device) + predicted)
    return means
