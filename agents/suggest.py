"""The real-world use: rank every region of a folder of unlabeled images for annotation.

All regions of the folder form one candidate set (the query network scores any number of
candidates with the same weights), with the paper's features: region vectors from the segmentation
network, KL histograms to the already-labeled regions (none here unless given) and to all
candidates, and the state computed on a state set.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from ralis_gym.data.base import DatasetInfo, SegmentationSplit, read_image
from ralis_gym.errors import DatasetError
from ralis_gym.features import candidate_features, region_tables, state_features
from ralis_gym.regions import RegionGrid
from ralis_gym.segmentation.base import Segmenter

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def folder_split(folder: str | Path, info: DatasetInfo) -> SegmentationSplit:
    """Images of a folder as an unlabeled split (labels all ignore), resized to the dataset's size."""
    paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
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

    ``box`` is ``[x, y, width, height]`` in the split's (dataset-sized) pixel coordinates.
    """
    grid = RegionGrid(unlabeled.info.image_size, unlabeled.info.region_size)
    tables = torch.cat(
        [region_tables(p, grid) for _, p in segmenter.iter_proba(unlabeled)]
    )  # [I, rows, cols, Ds]
    ids = np.arange(len(unlabeled) * grid.per_image)
    image, row, col = grid.split_ids(ids)
    vecs = tables[torch.as_tensor(image), torch.as_tensor(row), torch.as_tensor(col)]
    cands = candidate_features(vecs, labeled_dists, (1, len(ids)))
    state_vec = state_features(torch.cat([p for _, p in segmenter.iter_proba(state)]), grid)
    device = next(q_net.parameters()).device
    q_net.eval()
    q = q_net(cands.to(device), state_vec[None].to(device), torch.zeros(1, dtype=torch.long, device=device))
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
