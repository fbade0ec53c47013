"""The query network's observation, built from the segmentation network: the one feature pipeline.

``segmenter + splits + candidate pools + labeled distributions -> {"state", "candidates",
"action_mask"}``. The environment calls :func:`observation` after every step, and
``agents.suggest.rank_regions`` calls it to rank every region of a folder of images, so a policy is
served the features it was trained on, computed by the same code.

Region vectors come from the segmenter's arg-max and entropy maps (``Segmenter.prediction_maps``
with ``native_prediction=True``: the arg-max stays on the model's native cell grid, which gives the
same class counts for a fraction of the work, see :func:`region_tables_from_maps`), in chunks of the
segmenter's batch size so that memory does not grow with the number of images. The pure
:func:`~ralis_gym.features.regions.region_tables` computes the same vectors from full-resolution
probabilities; the tests hold the two against each other.

The segmenter is used through its methods only (``prediction_maps``, ``default_batch_size``,
``native_stride``, ``info``), so this module does not import the segmentation package.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ralis_gym.features.kl import candidate_features
from ralis_gym.features.regions import region_tables_from_maps, tables_in_id_order
from ralis_gym.regions import CandidatePools, RegionGrid


@torch.no_grad()
def segmenter_region_tables(segmenter: Any, split: Any, images: np.ndarray, grid: RegionGrid) -> torch.Tensor:
    """Region vectors ``[I, rows, cols, Ds]`` of every region of ``images`` of ``split`` under the
    segmenter's current network, computed a batch of images at a time."""
    images = np.asarray(images, dtype=np.int64)
    chunk = max(1, segmenter.default_batch_size())
    parts = []
    for start in range(0, len(images), chunk):
        pred, ent = segmenter.prediction_maps(split, images[start : start + chunk], native_prediction=True)
        parts.append(
            region_tables_from_maps(
                pred, ent, segmenter.info.num_classes, grid, prediction_stride=segmenter.native_stride
            )
        )
    return torch.cat(parts)


@torch.no_grad()
def state_vectors(segmenter: Any, state_split: Any, grid: RegionGrid) -> torch.Tensor:
    """The state ``[M, Ds]``: the region vector of every region of every image of the state set, in
    region-id order."""
    return tables_in_id_order(
        segmenter_region_tables(segmenter, state_split, np.arange(len(state_split)), grid)
    )


@torch.no_grad()
def observation(
    segmenter: Any,
    pool_split: Any,
    state_split: Any,
    grid: RegionGrid,
    pools: CandidatePools,
    labeled_dists: torch.Tensor | None,
    scores: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """The observation of the query network for candidate ``pools`` of ``pool_split`` (float32).

    - ``state`` ``[M, Ds]``: :func:`state_vectors` of ``state_split``.
    - ``candidates`` ``[K, N, Ds + E + 64]``: each valid candidate's region vector, then its ``E``
      acquisition ``scores`` (``[valid candidates, E]`` in row-major mask order, e.g. the margin
      heuristic's; none by default), then its KL histograms to ``labeled_dists`` (the ground-truth class distributions of the regions labeled so
      far, ``[L, C + 1]``; ``None`` or empty: zeros) and to the other candidates of the step
      (:func:`~ralis_gym.features.kl.candidate_features`); masked slots are zero.
    - ``action_mask`` ``[K, N]``: 1 for real candidates.

    Only the images that hold candidates are run through the network.
    """
    ids = pools.region_ids[pools.mask]
    image, row, col = grid.split_ids(ids)
    images, slot = np.unique(image, return_inverse=True)
    tables = segmenter_region_tables(segmenter, pool_split, images, grid)
    vecs = tables[torch.from_numpy(slot), torch.from_numpy(row), torch.from_numpy(col)]
    cands = candidate_features(vecs, labeled_dists, pools.shape, mask=torch.from_numpy(pools.mask))
    if scores is not None and scores.shape[-1]:  # [region vector | scores | KL]: the KL stays last
        extra = torch.zeros(*pools.shape, scores.shape[-1], dtype=cands.dtype, device=cands.device)
        extra[torch.from_numpy(pools.mask)] = torch.as_tensor(scores, dtype=cands.dtype, device=cands.device)
        ds = vecs.shape[-1]
        cands = torch.cat([cands[..., :ds], extra, cands[..., ds:]], dim=-1)
    return {
        "state": state_vectors(segmenter, state_split, grid).cpu().numpy().astype(np.float32),
        "candidates": cands.cpu().numpy().astype(np.float32),
        "action_mask": pools.mask.astype(np.float32),
    }
