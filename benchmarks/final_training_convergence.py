"""Does the environment's final training converge? (issue 9: it must give the pretraining recipe's
test mIoU on the same images within 0.5 points.)

For the first ``N`` images of D_T, from the same scratch network (same seed):
1. the pretraining recipe: ``fit_images`` epochs under ``train_until_plateau`` with
   ``PRETRAIN_DEFAULTS`` (what ``ralis-gym pretrain`` runs);
2. the final-training path: every region of the N images labeled in the env's pool, then
   ``RegionALEnv.evaluate()`` with its defaults (``FINAL_TRAINING_DEFAULTS``, since 2026-12-01 the
   pretraining recipe itself);
3. the same path with the former defaults (100 epochs / patience 5), which stopped too early.

The two paths are the same computation (tests/test_env.py checks it to the bit on a tiny config);
here they differ only by the training randomness (the env reseeds the segmenter at reset).

    python benchmarks/final_training_convergence.py --data-root ../shared/data --images 100
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

import ralis_gym  # noqa: F401  (registers the environments)
from ralis_gym.config import parse_dataclass_args
from ralis_gym.segmentation import build_segmenter
from ralis_gym.segmentation.pretrain import PRETRAIN_DEFAULTS, train_until_plateau


@dataclass
class Args:
    data_root: str | None = None
    images: int = 100  # first N images of D_T
    seed: int = 0
    threads: int = 1
    out: str = "benchmarks/results/final-training-convergence.json"


def final_path(args: Args, max_epochs: int | None, patience: int | None) -> dict:
    env = gym.make(
        "RegionAL-CamVid-Fast-v0", data_root=args.data_root, mode="train", start_network="scratch",
        subset={"pool": args.images}, budget=24 * args.images,
        final_training={"include_start_data": False}, pretrain={"seed": args.seed},
    ).unwrapped  # fmt: skip
    env.reset(seed=args.seed)
    env.pool.label(np.arange(env.pool.num_regions), env.pool_split.labels)
    t0 = time.perf_counter()
    result = env.evaluate(max_epochs=max_epochs, patience=patience)
    return {"test_miou": result["test_miou"], "d_r_miou": result["d_r_miou"], "epochs": result["epochs"],
            "seconds": time.perf_counter() - t0}  # fmt: skip


def recipe(args: Args) -> dict:
    from ralis_gym.data import load_dataset

    dataset = load_dataset("camvid", args.data_root)
    split = dataset.split("d_t")
    split = split.subset(np.arange(min(args.images, len(split))))
    seg = build_segmenter("fast", dataset.info, device="cpu", seed=args.seed)
    d = PRETRAIN_DEFAULTS["fast"]
    t0 = time.perf_counter()
    out = train_until_plateau(
        seg,
        lambda: seg.fit_images(split),
        dataset.split("d_r"),
        d["max_epochs"],
        d["patience"],
        progress=False,
    )
    return {"test_miou": seg.evaluate(dataset.split("test")).miou, "d_r_miou": out["best_miou"],
            "epochs": out["epochs"], "seconds": time.perf_counter() - t0}  # fmt: skip


def main(args: Args) -> None:
    torch.set_num_threads(args.threads)
    d = PRETRAIN_DEFAULTS["fast"]
    rows = {
        f"pretraining recipe ({d['max_epochs']}/{d['patience']})": recipe(args),
        "final-training path (defaults)": final_path(args, None, None),
        "final-training path (100/5, the former default)": final_path(args, 100, 5),
    }
    ref = next(iter(rows.values()))["test_miou"]
    print(f"first {args.images} D_T images, seed {args.seed}")
    for name, r in rows.items():
        print(f"{name:>36}: test {100 * r['test_miou']:.2f}% ({100 * (r['test_miou'] - ref):+.2f}) "
              f"D_R {100 * r['d_r_miou']:.2f}%  {r['epochs']} epochs  {r['seconds']:.0f} s")  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "results": rows}, indent=2))


if __name__ == "__main__":
    main(parse_dataclass_args(Args, __doc__))
