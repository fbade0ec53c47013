"""The real-world use: rank every region of a folder of unlabeled images for annotation.

All regions of the folder form one candidate pool (the query network scores any number of
candidates with the same weights), with the environment's observation (``features.observation``):
region vectors from the segmentation network, KL histograms to the already-labeled regions (none
here unless given) and to all candidates, and the state computed on a state set.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from ralis_gym.data.base import IMAGE_SUFFIXES, DatasetInfo, SegmentationSplit, image_files, read_image
from ralis_gym.errors import ConfigError, DatasetError
from ralis_gym.features import observation
from ralis_gym.regions import CandidatePools, RegionGrid
from ralis_gym.segmentation.base import Segmenter


def folder_split(folder: str | Path, info: DatasetInfo) -> SegmentationSplit:
    """Images of a folder as an unlabeled split (labels all ignore), resized to the dataset's size."""
    paths = image_files(folder)
    if not paths:
        raise DatasetError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    w, h = info.image_size
    images = np.stack(
        [
            cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA) if img.shape[:2] != (h, w) else img
            for img in map(read_image, paths)
        ]
    )
    labels = np.full(images.shape[:3], info.ignore_index, dtype=np.uint8)
    return SegmentationSplit(
        info, f"folder:{Path(folder).name}", tuple(p.name for p in paths), images, labels
    )


@torch.no_grad()
def rank_regions(
    q_net: torch.nn.Module,
    segmenter: Segmenter,
    unlabeled: SegmentationSplit,
    state: SegmentationSplit,
    labeled_dists: torch.Tensor | None = None,
) -> list[dict[str, Any]]:
    """Every region of ``unlabeled`` with its Q-value, best first: ``{"rank", "image", "box", "score"}``.

    The observation is the environment's (``ralis_gym.features.observation``) with one pool that holds
    every region, so the policy sees exactly the features it was trained on. ``box`` is
    ``[x, y, width, height]`` in the split's (dataset-sized) pixel coordinates.
    """
    grid = RegionGrid(unlabeled.info.image_size, unlabeled.info.region_size)
    ids = np.arange(len(unlabeled) * grid.per_image)
    pools = CandidatePools(ids[None], np.ones((1, ids.size), dtype=bool))
    obs = observation(segmenter, unlabeled, state, grid, pools, labeled_dists)
    expected = getattr(q_net, "candidate_dim", obs["candidates"].shape[-1])
    if expected != obs["candidates"].shape[-1]:
        raise ConfigError(
            f"the policy expects {expected} features per candidate, the reference features are "
            f"{obs['candidates'].shape[-1]}: it was trained with the env's score_features, which ranking "
            "a folder does not compute; use a policy trained without them"
        )
    device = next(q_net.parameters()).device
    q_net.eval()
    cands, state_vec = (torch.from_numpy(obs[k]).to(device) for k in ("candidates", "state"))
    q = q_net(cands, state_vec[None], torch.zeros(1, dtype=torch.long, device=device))
    scores = q.reshape(-1).double().cpu().numpy()
    order = np.argsort(-scores, kind="stable")
    boxes = grid.boxes(ids)
    return [
        {
            "rank": r + 1,
            "image": unlabeled.image_names[boxes[i, 0]],
            "box": boxes[i, 1:].tolist(),
            "score": float(scores[i]),
        }
        for r, i in enumerate(order)
    ]


def draw_queue(
    split: SegmentationSplit, queue: list[dict[str, Any]], top: int, out_dir: str | Path
) -> list[Path]:
    """Overlay PNGs: the ``top`` regions of the queue outlined on their images, with their rank."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    by_image: dict[str, list[dict[str, Any]]] = {}
    for item in queue[:top]:
        by_image.setdefault(item["image"], []).append(item)
    index = {n: i for i, n in enumerate(split.image_names)}
    written = []
    for name, items in by_image.items():
        img = cv2.cvtColor(np.asarray(split.images[index[name]]), cv2.COLOR_RGB2BGR)
        shade = img.copy()
        for item in items:
            x, y, w, h = item["box"]
            cv2.rectangle(shade, (x, y), (x + w - 1, y + h - 1), (0, 0, 255), -1)
        img = cv2.addWeighted(img, 0.75, shade, 0.25, 0)
        for item in items:
            x, y, w, h = item["box"]
            cv2.rectangle(img, (x, y), (x + w - 1, y + h - 1), (0, 0, 255), 2)
            cv2.putText(
                img, f"#{item['rank']}", (x + 4, y + 20), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (255, 255, 255), 2
            )
        path = out / f"{Path(name).stem}_queue.png"
        cv2.imwrite(str(path), img)
        written.append(path)
    return written
