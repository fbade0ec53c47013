"""Does AL-step training make the model better as labels arrive? D_R mIoU over episodes of random
acquisition, one row per (variant, seed, step), for AL-step training variants side by side.

Each variant is a set of env config overrides (``train_regions``, ``replay_regions``,
``epochs_per_step``, ``model_kwargs.lr``, ...). Every variant sees the same seeds, so the same
first pools; the table prints D_R at the start, the middle and the end of the episode (mean ± std
over seeds) and the median training seconds per step.

    python benchmarks/al_step_training.py --data-root ../shared/data --seeds 0,1,2
    python benchmarks/al_step_training.py --variants "last:train_regions=last" "lr3e-4:model_kwargs.lr=3e-4"
    python benchmarks/al_step_training.py --methods random,oracle --seeds 0,1,2,3,4,5,6,7,8,9 \
        --variants "replay24+S:"     # training-mode returns of the oracle vs random (issue 9)
    python benchmarks/al_step_training.py --report-only   # the table from the committed CSV

Episodes already in ``--out`` are skipped, so a killed run resumes. Step seconds are medians of the
whole ``step()`` (with two of these processes side by side on the 2-core machine they are ~20%
above a lone run's).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
import yaml

import ralis_gym  # noqa: F401  (registers the environments)
from agents.heuristics import make_heuristic_agent
from ralis_gym.envs.region_al import run_agent
from ralis_gym.stats import sample_std, welch_t

#: the measured set (BENCHMARKS.md "AL-step training"); "+S" adds a pass over the start data D_S
DEFAULT_VARIANTS = [
    "last:train_regions=last,step_start_data=false",
    "all:train_regions=all,step_start_data=false",
    "replay24:train_regions=replay,replay_regions=24,step_start_data=false",
    "last+S:train_regions=last,step_start_data=true",
    "all+S:train_regions=all,step_start_data=true",
    "replay24+S:train_regions=replay,replay_regions=24,step_start_data=true",
]


#: the environment's default AL-step training (its random rows are the baseline of variants without any)
DEFAULT_VARIANT = DEFAULT_VARIANTS[-1].split(":")[0]


@dataclass
class Args:
    env_id: str = "RegionAL-CamVid-Fast-v0"
    data_root: str | None = None
    mode: str = "train"
    budget: int = 480
    seeds: str = "0,1,2"
    methods: str = "random"  # comma-separated acquisition methods; each (variant, method) is a row group
    variants: list[str] = field(default_factory=lambda: list(DEFAULT_VARIANTS))
    out: str = "benchmarks/results/al-step-training.csv"
    threads: int = 1
    report_only: bool = False


def parse_variant(text: str) -> tuple[str, dict]:
    """``name:key=value,key=value``; dotted keys nest (``model_kwargs.lr=3e-4``), values are YAML."""
    name, _, body = text.partition(":")
    cfg: dict = {}
    for item in filter(None, body.split(",")):
        key, _, value = item.partition("=")
        node = cfg
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
        value = yaml.safe_load(value)
        try:  # YAML 1.1 reads "3e-4" as a string
            value = float(value) if isinstance(value, str) else value
        except ValueError:
            pass
        node[leaf] = value
    return name, cfg


FIELDS = ("variant", "method", "seed", "step", "labeled", "miou", "step_seconds")


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return [{**r, "seed": int(r["seed"]), "step": int(r["step"]), "labeled": int(r["labeled"]),
                 "miou": float(r["miou"]), "step_seconds": float(r["step_seconds"])} for r in csv.DictReader(f)]  # fmt: skip


def main(args: Args) -> None:
    """Runs every (variant, method, seed) episode not yet in ``out`` (a killed run resumes), appending
    each finished episode at once, then prints the table over everything in ``out``."""
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {(r["variant"], r["method"], r["seed"]) for r in read_rows(out)}
    for text in [] if args.report_only else args.variants:
        name, overrides = parse_variant(text)
        todo = [(m, s) for m, s in itertools.product(args.methods.split(","), map(int, args.seeds.split(",")))
                if (name, m, s) not in done]  # fmt: skip
        if not todo:
            continue
        env = gym.make(args.env_id, data_root=args.data_root, mode=args.mode, budget=args.budget, **overrides)
        for method, seed in todo:
            agent = make_heuristic_agent(method, env.unwrapped, seed=seed)
            curve, _ = run_agent(env, agent, seed=seed, desc=f"{name} {method} seed {seed}")
            new = not out.exists()
            with out.open("a", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=FIELDS)
                if new:
                    writer.writeheader()
                writer.writerows({"variant": name, "method": method, "seed": seed, "step": step,
                                  "labeled": p["labeled"], "miou": p["miou"], "step_seconds": p["seconds"]}
                                 for step, p in enumerate(curve))  # fmt: skip
            print(
                f"{name} {method} seed {seed}: D_R {100 * curve[0]['miou']:.2f} -> {100 * curve[-1]['miou']:.2f}"
            )
        env.close()
    report(read_rows(out))
    print(f"\nrows -> {out}")


def report(rows: list[dict]) -> None:
    print(f"\n{'variant':>16} {'method':>13} | {'D_R start':>12} | {'D_R middle':>12} | {'D_R end':>12} |"
          f" {'return (end-start)':>22} | {'vs random (Welch t)':>19} | step s")  # fmt: skip
    groups = dict.fromkeys((r["variant"], r["method"]) for r in rows)

    def returns(name: str, method: str) -> np.ndarray:
        mine = [r for r in rows if (r["variant"], r["method"]) == (name, method)]
        if not mine:
            return np.empty(0)
        last = max(r["step"] for r in mine)
        start = {r["seed"]: r["miou"] for r in mine if r["step"] == 0}
        return np.array([100 * (r["miou"] - start[r["seed"]]) for r in mine if r["step"] == last])

    for name, method in groups:
        mine = [r for r in rows if (r["variant"], r["method"]) == (name, method)]
        last = max(r["step"] for r in mine)  # the columns; the returns come from ``returns``
        cols = []
        for step in (0, last // 2, last):
            v = [100 * r["miou"] for r in mine if r["step"] == step]
            cols.append(f"{np.mean(v):6.2f} ± {sample_std(v):4.2f}")
        gain, base = returns(name, method), returns(name, "random")
        if base.size == 0:  # e.g. an oracle_set variant: random does not read it, same episodes
            base = returns(DEFAULT_VARIANT, "random")
        se = sample_std(gain) / np.sqrt(gain.size) if gain.size > 1 else float("nan")
        versus = ""
        if method != "random" and gain.size > 1 and base.size > 1:
            diff, t = welch_t(gain, base)
            versus = f"{diff:+5.2f} (t={t:+5.2f})"
        secs = statistics.median(r["step_seconds"] for r in mine if r["step"] > 0)
        print(f"{name:>16} {method:>13} | {' | '.join(cols)} | {gain.mean():+6.2f} ± {sample_std(gain):4.2f} (SE {se:4.2f})"
              f" | {versus:>19} | {secs:.3f}")  # fmt: skip


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for key, default in vars(Args()).items():
        flag = f"--{key.replace('_', '-')}"
        if isinstance(default, bool):
            p.add_argument(flag, action="store_true")
        elif isinstance(default, list):
            p.add_argument(flag, nargs="+", default=default)
        else:
            p.add_argument(flag, type=type(default) if default is not None else str, default=default)
    main(Args(**vars(p.parse_args())))
