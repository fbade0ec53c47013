"""Foundation timings on this machine: CamVid decode/cache, one AL training step, one D_R evaluation.

For the fast and the paper model: one training step on 24 labeled regions (the CamVid K) and one
evaluation of the whole reward set D_R (101 images at 480x360), with the paper/fast ratio measured
in the same run.

    python benchmarks/foundation_speed.py --data-root ../shared/data [--models fast paper] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch
from feature_speed import timed  # sibling script: benchmarks/ is on sys.path when run as a script


@dataclass
class Args:
    data_root: str | None = None
    models: tuple[str, ...] = ("fast", "paper")
    repeats: int = 3
    device: str = "auto"


def parse() -> Args:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default=None)
    p.add_argument("--models", nargs="+", default=list(Args.models), choices=["fast", "paper"])
    p.add_argument("--repeats", type=int, default=Args.repeats)
    p.add_argument("--device", default=Args.device)
    a = p.parse_args()
    return Args(a.data_root, tuple(a.models), a.repeats, a.device)


def main() -> None:
    args = parse()
    from ralis_gym.data import load_dataset
    from ralis_gym.regions import RegionPool
    from ralis_gym.segmentation import build_segmenter

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, cuda={torch.cuda.is_available()}")  # fmt: skip
    rows: list[tuple[str, str, float]] = []

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["RALIS_GYM_CACHE"] = tmp  # cold decode cache for the first load
        t0 = time.perf_counter()
        ds = load_dataset("camvid", args.data_root)
        for name in ("train", "val", "test"):
            ds.split(name)
        rows.append(("data", "decode all 701 CamVid PNGs + write cache", time.perf_counter() - t0))
        t0 = time.perf_counter()
        ds = load_dataset("camvid", args.data_root)
        for name in ("train", "val", "test"):
            ds.split(name)
        rows.append(("data", "load all splits from the decode cache", time.perf_counter() - t0))

        pool_split, reward = ds.split("d_v"), ds.split("d_r")
        rng = np.random.default_rng(0)
        pool = RegionPool(ds_grid(ds), len(pool_split), ds.info.num_classes, ds.info.ignore_index)
        picks = pool.sample_pools(24, 1, rng).region_ids.reshape(-1)
        pool.label(picks, pool_split.labels)
        per_model: dict[str, dict[str, float]] = {}
        for kind in args.models:
            seg = build_segmenter(kind, ds.info, device=args.device, seed=0)
            t0 = time.perf_counter()
            seg.evaluate(reward)  # first call also fills any feature cache
            rows.append((kind, "first D_R evaluation (fills feature caches)", time.perf_counter() - t0))
            t0 = time.perf_counter()
            seg.fit_regions(pool_split, picks, pool.labeled)  # first call also fills the D_V feature cache
            rows.append((kind, "first training step (fills feature caches)", time.perf_counter() - t0))
            step = timed(lambda s=seg: s.fit_regions(pool_split, picks, pool.labeled), args.repeats)
            ev = timed(lambda s=seg: s.evaluate(reward), 1 if kind == "paper" else args.repeats)
            per_model[kind] = {"step": step, "eval": ev}
            rows.append((kind, "one training step on 24 labeled regions", step))
            rows.append((kind, "one D_R evaluation (101 images, 480x360)", ev))

    print("\n| part | what | seconds |\n|---|---|---|")
    for part, what, secs in rows:
        print(f"| {part} | {what} | {secs:.3f} |")
    if {"fast", "paper"} <= per_model.keys():
        f, p = per_model["fast"], per_model["paper"]
        print(
            f"\npaper/fast ratio: training step {p['step'] / f['step']:.0f}x, D_R evaluation {p['eval'] / f['eval']:.0f}x"
        )


def ds_grid(ds):
    from ralis_gym.regions import RegionGrid

    return RegionGrid(ds.info.image_size, ds.info.region_size)


if __name__ == "__main__":
    main()
