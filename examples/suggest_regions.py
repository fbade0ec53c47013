"""Which regions of my unlabeled images should be annotated next? Writes a ranked queue and overlays.

    python examples/suggest_regions.py --policy runs/ralis_camvid_fast/ralis_final.zip \
        --images my_unlabeled_frames/ --out outputs/queue --top 24

`--segmentation` is a start-network/segmenter checkpoint (.pt with a `model_state`); by default the
cached `source+dt` start network of the fast model is used (pretrained if needed). The state set is
the dataset's D_S. Outputs: OUT/queue.json ([{rank, image, box [x, y, w, h], score}], best first)
and OUT/<image>_queue.png with the top regions outlined and numbered.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from agents import RalisDQN
from agents.suggest import draw_queue, folder_split, rank_regions
from ralis_gym.config import parse_dataclass_args
from ralis_gym.data import load_dataset
from ralis_gym.segmentation import build_segmenter
from ralis_gym.segmentation.pretrain import pretrain_start_network


@dataclass
class Args:
    policy: str = "runs/ralis_camvid_fast/ralis_final.zip"
    images: str = "unlabeled/"
    segmentation: str | None = None
    model: str = "fast"
    dataset: str = "camvid"
    data_root: str | None = None
    out: str = "outputs/queue"
    top: int = 24


def parse_args() -> Args:
    return parse_dataclass_args(Args, __doc__)


def main() -> None:
    args = parse_args()
    dataset = load_dataset(args.dataset, args.data_root)
    if args.segmentation:
        seg = build_segmenter(args.model, dataset.info)
        ckpt = torch.load(args.segmentation, map_location="cpu", weights_only=False)
        seg.load_model_state(ckpt.get("model_state", ckpt))
    else:
        seg, _ = pretrain_start_network(dataset, args.model, "source+dt")
    policy = RalisDQN.load(args.policy, device="cpu").policy
    unlabeled = folder_split(args.images, dataset.info)
    # The state branch was trained on a fixed state set: the first images of D_S, as many as it saw.
    state_images = policy.observation_space["state"].shape[0] // seg.grid.per_image
    d_s = dataset.split("d_s")
    if state_images > len(d_s):
        raise SystemExit(f"the policy expects a state set of {state_images} images; D_S has {len(d_s)}")
    queue = rank_regions(policy.q_net, seg, unlabeled, d_s.subset(np.arange(state_images)))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "queue.json").write_text(json.dumps(queue, indent=2))
    pictures = draw_queue(unlabeled, queue, args.top, out)
    print(
        f"ranked {len(queue)} regions of {len(unlabeled)} images -> {out / 'queue.json'}; {len(pictures)} overlays"
    )
    for item in queue[: min(args.top, 10)]:
        print(f"  #{item['rank']:3d} {item['image']} box={item['box']} Q={item['score']:.3f}")


if __name__ == "__main__":
    main()
