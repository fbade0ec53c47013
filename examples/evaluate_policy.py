"""Run a trained RALIS policy or a heuristic on the D_V pool to a budget, then the final training.

    python examples/evaluate_policy.py --policy entropy --budget 480
    python examples/evaluate_policy.py --policy runs/ralis_camvid_fast/ralis_final.zip --budget 1920

Prints and saves (OUT/<policy>_seed<seed>_b<budget>.json) test mIoU, per-class IoU and the D_R mIoU
after every step. `--policy` is a RalisDQN .zip or one of: random, entropy, margin, bald, class_balance.
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
from agents import RalisDQN
from agents.heuristics import BASELINE_AGENTS, make_heuristic_agent
from ralis_gym.config import load_yaml, parse_dataclass_args
from ralis_gym.envs.region_al import run_agent


@dataclass
class Args:
    policy: str = "entropy"
    env_id: str = "RegionAL-CamVid-Fast-v0"
    config: str | None = None  # YAML of env keyword arguments
    data_root: str | None = None
    budget: int = 480
    seed: int = 20
    final_max_epochs: int = 0  # 0: the model's FINAL_TRAINING_DEFAULTS (the paper: 1000)
    final_patience: int = 0  # 0: the model's FINAL_TRAINING_DEFAULTS (the paper: 150)
    out: str = "outputs/evaluate"
    threads: int = 1


def parse_args() -> Args:
    return parse_dataclass_args(Args, __doc__)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    env_kwargs = {"mode": "test", **(load_yaml(args.config) if args.config else {}), "budget": args.budget}
    if args.data_root:
        env_kwargs["data_root"] = args.data_root
    env = gym.make(args.env_id, **env_kwargs)
    if args.policy in BASELINE_AGENTS:
        agent, name = make_heuristic_agent(args.policy, env, seed=args.seed), args.policy
    else:
        # The policy scores any number of candidates, so a net trained with N = 20 acts on N = 10.
        agent, name = RalisDQN.load(args.policy, device="cpu"), "ralis"

    t0 = time.perf_counter()
    curve, info = run_agent(env, agent, seed=args.seed, desc=f"{name} acquisition")
    final = env.unwrapped.evaluate(
        max_epochs=args.final_max_epochs or None, patience=args.final_patience or None, progress=True
    )
    class_names = env.unwrapped.info_.class_names
    result = {
        "policy": args.policy, "seed": args.seed, "budget": args.budget, "test_miou": final["test_miou"],
        "d_r_miou": final["d_r_miou"], "final_epochs": final["epochs"],
        "per_class_iou": {c: (None if np.isnan(v) else float(v)) for c, v in zip(class_names, final["per_class_iou"])},
        "labeled_class_pixels": info["labeled_class_pixels"].tolist(), "d_r_curve": curve,
        "seconds": time.perf_counter() - t0,
    }  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}_seed{args.seed}_b{args.budget}.json"
    path.write_text(json.dumps(result, indent=2))
    print(
        f"\n{name}: test mIoU {100 * final['test_miou']:.2f}% after {args.budget} regions (D_R {100 * final['d_r_miou']:.2f}%)"
    )
    for c, v in result["per_class_iou"].items():
        print(f"  {c:12s} {'  n/a' if v is None else f'{100 * v:5.1f}'}")
    print(f"saved {path}")


if __name__ == "__main__":
    main()
