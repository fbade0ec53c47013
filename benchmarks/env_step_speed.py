"""Median ``step()`` time of ``RegionAL-CamVid-Fast-v0`` in train mode, with its breakdown.

Runs random-action episodes with the paper's CamVid training protocol (pool D_T, K = 24, N = 20,
budget 480, reward on all 101 D_R images, state from all 10 D_S images) and prints the median of
each part of a step: labeling, segmentation training, reward evaluation, features (pool sampling,
predictions and the spec §4 features of the next observation).

    python benchmarks/env_step_speed.py --data-root ../shared/data [--episodes 2]

Feature-computation scaling up to Cityscapes test scale (K·N = 25,600): benchmarks/feature_speed.py.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import torch

import ralis_gym  # noqa: F401  (registers the environments)


@dataclass
class Args:
    data_root: str | None = None
    episodes: int = 2
    mode: str = "train"
    seed: int = 0


def parse() -> Args:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default=None)
    p.add_argument("--episodes", type=int, default=Args.episodes)
    p.add_argument("--mode", default=Args.mode, choices=["train", "test"])
    p.add_argument("--seed", type=int, default=Args.seed)
    a = p.parse_args()
    return Args(a.data_root, a.episodes, a.mode, a.seed)


def main() -> None:
    args = parse()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    t0 = time.perf_counter()
    env = gym.make("RegionAL-CamVid-Fast-v0", data_root=args.data_root, mode=args.mode, progress=True)
    print(f"make (data, start network from cache or pretraining): {time.perf_counter() - t0:.1f} s")
    rng = np.random.default_rng(args.seed)
    parts: dict[str, list[float]] = {}
    resets, first_miou, last_miou = [], [], []
    for ep in range(args.episodes):
        t0 = time.perf_counter()
        _, info = env.reset(seed=args.seed + ep)
        resets.append(time.perf_counter() - t0)
        first_miou.append(info["miou"])
        done = False
        while not done:
            action = np.array([rng.choice(np.flatnonzero(m)) for m in info["action_mask"]])
            _, _, term, trunc, info = env.step(action)
            done = term or trunc
            for key, value in env.unwrapped.timings.items():
                parts.setdefault(key, []).append(value)
        last_miou.append(info["miou"])
    print(
        f"\nmode {args.mode}: {len(parts['step'])} steps over {args.episodes} episodes; reset median {statistics.median(resets):.3f} s"
    )
    print(
        "D_R mIoU per episode: "
        + ", ".join(f"{100 * a:.1f}% -> {100 * b:.1f}%" for a, b in zip(first_miou, last_miou))
    )
    print("\n| part of step() | median s | share |\n|---|---|---|")
    total = statistics.median(parts["step"])
    for key in ("label", "train", "reward", "features", "step"):
        med = statistics.median(parts[key])
        print(f"| {key} | {med:.3f} | {100 * med / total:.0f}% |")


if __name__ == "__main__":
    main()
