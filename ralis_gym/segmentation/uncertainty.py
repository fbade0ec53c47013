"""Acquisition scores: per-pixel maps on probability tensors, their region means, and the scores of
candidate regions for every method of ``ralis_gym.methods`` (:func:`candidate_scores`, what
``RegionALEnv.score_candidates`` and so the heuristic agents use).

The reference code's baselines are random, entropy and BALD over MC-dropout passes
(https://github.com/ArantxaCasanova/ralis); margin, class balance and the ground-truth oracles are
this project's. Pixel functions are vectorized over any leading axes; the class axis is -3
(``[..., C, H, W]``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ralis_gym.errors import ConfigError
from ralis_gym.methods import HEURISTICS, METHODS

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


#: heuristics scored from the network's predictions alone (``region_scores``): all but random
LABEL_FREE_SCORES = tuple(m for m in HEURISTICS if m != "random")


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
        raise ConfigError(f"unknown label-free heuristic {heuristic!r}; choose one of {LABEL_FREE_SCORES}")

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


def candidate_scores(
    method: str,
    segmenter: Any,
    split: Any,
    pool: Any,
    region_ids: np.ndarray,
    rng: np.random.Generator,
    *,
    mc_passes: int = 20,
    oracle_split: Any = None,
    oracle_gradient: str = "classifier",
) -> np.ndarray:
    """Scores ``[R]`` (float64, higher = label first) of the candidate regions ``region_ids`` of
    ``split`` for ``method`` (one of ``ralis_gym.methods.METHODS``), with the segmenter's current network.

    ``pool`` is the split's ``RegionPool`` (its grid, the class pixels labeled so far and, for the
    ground-truth references, the regions' true class histograms).

    - ``random``: uniform noise from ``rng``.
    - ``entropy``, ``margin``, ``bald`` (``mc_passes`` MC-dropout passes, p = 0.5 before the
      classifier), ``class_balance`` (expected rarity of the predicted class, frequencies from the
      labeled pixels so far plus the predicted pixels of the candidates' images): the region mean of
      the per-pixel map (:func:`region_scores`).
    - ``oracle`` (fast model): reads the candidates' labels and those of ``oracle_split`` and scores a
      region by the first-order decrease of that set's loss that a gradient step on the region's loss
      would bring: the inner product of the two gradients with respect to the classifier layer
      (``FastSegmenter.gradient_alignment_maps``; one forward of ``oracle_split``), or with
      ``oracle_gradient="head"`` with respect to every head parameter (a forward-mode JVP).
    - ``oracle_loss``: the network's current class-weighted loss on the region (``Segmenter.loss_maps``).
    - ``oracle_rarity``: the true pixels' rarity ``-log pi_c`` (void 0), ``pi`` from the labeled
      pixels plus the candidates' true pixels (class_balance given the truth).

    The oracles read ground truth no annotation team has: upper references for what choosing well can
    gain, not strategies.
    """
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; choose one of {METHODS}")
    ids = np.asarray(region_ids, dtype=np.int64)
    if ids.size == 0:
        return np.empty(0)
    if method == "random":
        return rng.random(ids.size)
    grid = pool.grid
    if method == "oracle_rarity":
        hist = torch.from_numpy(pool.region_class_histograms(ids, split.labels)[:, :-1]).double()
        freq = torch.as_tensor(pool.class_pixels[:-1], dtype=torch.float64) + hist.sum(0)
        pi = freq / freq.sum().clamp_min(1.0)
        area = grid.region_size[0] * grid.region_size[1]
        return (hist @ -torch.log(pi + 1e-6)).numpy() / area  # mean over the region's pixels
    image, row, col = grid.split_ids(ids)
    images, slot = np.unique(image, return_inverse=True)
    rows, cols, batch = grid.rows, grid.cols, segmenter.default_batch_size()
    if method in LABEL_FREE_SCORES:
        means = region_scores(segmenter, split, images, rows, cols, method, pool.class_pixels, mc_passes)
    elif method == "oracle":
        if not hasattr(segmenter, "gradient_alignment_maps"):
            raise ConfigError(
                f"method 'oracle' needs the fast model (model: fast), not {segmenter.kind!r}; "
                "'oracle_loss' works with every model"
            )
        if oracle_gradient == "head":
            gradient, alignment = segmenter.head_gradient, segmenter.head_alignment_maps
        else:
            gradient, alignment = segmenter.classifier_gradient, segmenter.gradient_alignment_maps
        direction = gradient(oracle_split)
        means = region_means(lambda chunk: alignment(split, chunk, direction), images, rows, cols, batch)
    else:  # oracle_loss
        means = region_means(lambda chunk: segmenter.loss_maps(split, chunk), images, rows, cols, batch)
    index = [torch.as_tensor(a, device=means.device) for a in (slot, row, col)]
    return means[index[0], index[1], index[2]].cpu().numpy()
