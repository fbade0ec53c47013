"""Any Stable-Baselines3 algorithm on the environment, unchanged: PPO, A2C, or sb3-contrib MaskablePPO.

    python examples/train_sb3.py --algo ppo --steps 2000
    python examples/train_sb3.py --algo maskable_ppo --config examples/configs/camvid_fast_small.yaml

`MultiInputPolicy` flattens the Dict observation (state, candidates, mask), which loses the set
structure the RALIS Q-head exploits; it is a baseline for RL researchers. MaskablePPO reads
`env.action_masks()` (the flat K*N mask), so it never picks an empty pool slot.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gymnasium as gym
import torch
from stable_baselines3 import A2C, PPO

import ralis_gym  # noqa: F401  (registers the environments)
from ralis_gym.config import load_yaml, parse_dataclass_args


@dataclass
class Args:
    algo: str = "ppo"  # ppo, a2c or maskable_ppo
    env_id: str = "RegionAL-CamVid-Fast-v0"
    config: str | None = None
    data_root: str | None = None
    steps: int = 2000
    n_steps: int = 20  # rollout length: one CamVid training episode
    seed: int = 0
    out: str = "runs/sb3"
    threads: int = 1


def parse_args() -> Args:
    return parse_dataclass_args(Args, __doc__)


def make_algo(name: str, env: gym.Env, n_steps: int, seed: int, log: str):
    common = {"policy": "MultiInputPolicy", "env": env, "n_steps": n_steps, "seed": seed, "verbose": 0}
    if name == "ppo":
        return PPO(batch_size=n_steps, tensorboard_log=log, **common)
    if name == "a2c":
        return A2C(tensorboard_log=log, **common)
    if name == "maskable_ppo":
        from sb3_contrib import MaskablePPO  # pip install sb3-contrib

        return MaskablePPO(batch_size=n_steps, tensorboard_log=log, **common)
    raise SystemExit(f"unknown --algo {name!r}: use ppo, a2c or maskable_ppo")


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    env_kwargs = {"mode": "train", **(load_yaml(args.config) if args.config else {})}
    if args.data_root:
        env_kwargs["data_root"] = args.data_root
    env = gym.make(args.env_id, **env_kwargs)
    log = None
    try:
        import tensorboard  # noqa: F401

        log = args.out
    except ImportError:
        print("tensorboard not installed: no TensorBoard logs")
    model = make_algo(args.algo, env, args.n_steps, args.seed, log)
    model.learn(total_timesteps=args.steps, progress_bar=True)
    path = Path(args.out) / f"{args.algo}_final"
    model.save(path)
    print(f"saved {path}.zip")


if __name__ == "__main__":
    main()
