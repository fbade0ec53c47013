"""How much of an AL step's reward is training noise? (issue 10's diagnosis)

From a set of states (training-mode episodes, ``--warm`` random steps in), every action in a fixed
set (``--random-actions`` random ones plus the picks of ``--methods``) is tried as a real AL step
(``RegionALEnv.trial_step``, undone afterwards) under each of ``--train-seeds`` training seeds, and
the reward ``100 * (D_R mIoU after - before)`` is recorded. Per state:

- **noise**: the standard deviation of the reward of one action across training seeds;
- **signal**: the standard deviation across actions of the actions' mean rewards;
- **paired noise**: the standard deviation across training seeds of the difference between an action's
  reward and the first random action's under the *same* seed (common random numbers): the noise of the
  counterfactual reward (``reward="counterfactual"``).

    OMP_NUM_THREADS=1 python benchmarks/reward_noise.py --states 0,1,2,3,4 --warm 0,10
    python benchmarks/reward_noise.py --report-only
"""

from __future__ import annotations

import csv
import itertools
from dataclasses import dataclass
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

import ralis_gym  # noqa: F401  (registers the environments)
from ralis_gym.config import load_yaml, parse_dataclass_args
from ralis_gym.stats import sample_std


@dataclass
class Args:
    env_id: str = "RegionAL-CamVid-Fast-v0"
    data_root: str | None = None
    config: str | None = (
        None  # YAML of env keyword arguments over the training protocol (e.g. a tiny test config)
    )
    states: str = "0,1,2,3,4"  # episode seeds; each gives one state per --warm value
    warm: str = "0,10"  # random steps taken before the state is measured
    random_actions: int = 3
    methods: str = "entropy,margin,oracle"  # heuristics and oracles whose picks are tried too
    train_seeds: str = "0,1,2,3,4,5"
    out: str = "benchmarks/results/reward-noise.csv"
    threads: int = 1
    report_only: bool = False


FIELDS = ["state_seed", "warm", "action", "train_seed", "reward"]


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def measure(args: Args) -> None:
    kwargs = {"mode": "train", "model": "fast"} | (load_yaml(args.config) if args.config else {})
    kwargs |= {"data_root": args.data_root} if args.data_root else {}
    env = gym.make(args.env_id, **kwargs).unwrapped
    out = Path(args.out)
    done = set()
    if out.exists():
        with open(out) as f:
            done = {(int(r["state_seed"]), int(r["warm"])) for r in csv.DictReader(f)}
    new = not out.exists()
    with open(out, "a", newline="") as f:
        writer = csv.DictWriter(f, FIELDS)
        if new:
            writer.writeheader()
        for seed, warm in itertools.product(ints(args.states), ints(args.warm)):
            if (seed, warm) in done:
                continue
            obs, info = env.reset(seed=seed)
            rng = np.random.default_rng(1000 + seed)
            for _ in range(warm):
                mask = obs["action_mask"] > 0
                obs, _, _, _, info = env.step(np.where(mask, rng.random(mask.shape), -1).argmax(1))
            before = info["miou"]
            mask = obs["action_mask"] > 0
            actions = {f"random{i}": np.where(mask, rng.random(mask.shape), -1).argmax(1)
                       for i in range(args.random_actions)}  # fmt: skip
            for method in filter(None, args.methods.split(",")):
                actions[method] = env.score_candidates(method).argmax(1)
            for (name, action), r in itertools.product(actions.items(), ints(args.train_seeds)):
                reward = 100.0 * (env.trial_step(action, seed=r) - before)
                writer.writerow({"state_seed": seed, "warm": warm, "action": name, "train_seed": r,
                                 "reward": f"{reward:.6f}"})  # fmt: skip
            f.flush()
            print(f"state {seed} (+{warm} steps) done")


def report(path: Path) -> None:
    rows = list(csv.DictReader(open(path)))
    by_state: dict[tuple, dict[str, dict[int, float]]] = {}
    for r in rows:
        key = (int(r["state_seed"]), int(r["warm"]))
        by_state.setdefault(key, {}).setdefault(r["action"], {})[int(r["train_seed"])] = float(r["reward"])
    print(
        "| state (seed, +steps) | noise: std over training seeds | signal: std of action means "
        "| paired noise (vs random0, same seed) | best action (mean) |"
    )
    print("|---|---|---|---|---|")
    summary = []
    for key in sorted(by_state):
        acts = by_state[key]
        names = sorted(acts)
        seeds = sorted(set.intersection(*(set(acts[a]) for a in names)))
        table = np.array([[acts[a][s] for s in seeds] for a in names])  # [actions, seeds]
        noise = float(np.mean([sample_std(row) for row in table]))
        signal = sample_std(table.mean(1))
        base = table[names.index("random0")]
        paired = float(np.mean([sample_std(row - base) for a, row in zip(names, table) if a != "random0"]))
        best = names[int(table.mean(1).argmax())]
        summary.append((noise, signal, paired))
        print(
            f"| {key[0]}, +{key[1]} | {noise:.2f} | {signal:.2f} | {paired:.2f} | {best} ({table.mean(1).max():+.2f}) |"
        )
    noise, signal, paired = np.mean(summary, axis=0)
    print(f"| **mean** | **{noise:.2f}** | **{signal:.2f}** | **{paired:.2f}** | |")
    print(
        f"\nsignal / noise = {signal / noise:.2f}; a single plain reward tells actions apart with "
        f"signal/noise {signal / noise:.2f}, a counterfactual one with {signal / paired:.2f}"
    )


def main() -> None:
    args = parse_dataclass_args(Args, __doc__)
    torch.set_num_threads(args.threads)
    if not args.report_only:
        measure(args)
    report(Path(args.out))


if __name__ == "__main__":
    main()
