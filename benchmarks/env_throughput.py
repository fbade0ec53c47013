"""Where the time of one ``RegionALEnv.step`` goes, fast vs paper model, and how features scale.

Part 1 runs each model on the same protocol (default: the CamVid test protocol, pool D_V, K = 24,
N = 10, reward on all 101 D_R images, state from the 10 D_S images), in its own subprocess so that
its peak memory (RSS, and CUDA when used) is its own, and prints the median of each part of a step:
segmentation training on the new regions, reward evaluation on D_R, features of the next
observation (pool sampling, predictions, state and candidate features), and the agent's decision (the RALIS
Q-network on the observation; the entropy baseline's scoring of the candidates). All parts are
measured in the same run; the last column is paper / fast.

Part 2 is the feature computation alone for K x N from 24 x 10 (CamVid test) to 256 x 100
(Cityscapes test, 25,600 candidates), each case in a fresh process (``feature_speed.py``'s cases).

    python benchmarks/env_throughput.py --data-root ../shared/data            # both models
    python benchmarks/env_throughput.py --models fast --steps 10              # fast model only
    python benchmarks/env_throughput.py --models fast,paper --device cuda     # on a GPU machine

On a CPU the paper model (FPN-ResNet-50, full-resolution 480x360 forwards) needs minutes per step;
``--paper-steps`` (default 1) bounds its part.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

PARTS = ("train", "reward", "features", "agent_ralis", "agent_entropy", "step")


@dataclass
class Args:
    models: str = "fast,paper"
    mode: str = "test"
    steps: int = 5
    paper_steps: int = 1
    device: str = "auto"
    data_root: str | None = None
    threads: int = 1
    seed: int = 0
    skip_features: bool = False


def parse_args() -> Args:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    for name, default in asdict(Args()).items():
        flag = f"--{name.replace('_', '-')}"
        if isinstance(default, bool):
            p.add_argument(flag, action="store_true")
        else:
            p.add_argument(flag, type=type(default) if default is not None else str, default=default)
    ns = vars(p.parse_args())
    child = ns.pop("child")
    if child:
        measure_model(json.loads(child))
        sys.exit(0)
    return Args(**ns)


def measure_model(spec: dict) -> None:
    """Child process: build the env for one model, time ``steps`` steps, print JSON."""
    import gymnasium as gym

    import ralis_gym  # noqa: F401
    from agents import RalisDQN
    from agents.heuristics import make_heuristic_agent

    torch.set_num_threads(spec["threads"])
    env_id = "RegionAL-CamVid-Fast-v0" if spec["model"] == "fast" else "RegionAL-CamVid-v0"
    # Step times do not depend on the weights: a scratch network spares the paper model's pretraining.
    kwargs = {"mode": spec["mode"], "device": spec["device"], "start_network": "scratch"}
    if spec["data_root"]:
        kwargs["data_root"] = spec["data_root"]
    t0 = time.perf_counter()
    env = gym.make(env_id, **kwargs)
    make_s = time.perf_counter() - t0
    ralis = RalisDQN("RalisPolicy", env, seed=spec["seed"], learning_starts=10**9, device="cpu")
    entropy = make_heuristic_agent("entropy", env)
    t0 = time.perf_counter()
    obs, _ = env.reset(seed=spec["seed"])
    reset_s = time.perf_counter() - t0
    parts: dict[str, list[float]] = {k: [] for k in PARTS}
    for _ in range(spec["steps"]):
        t0 = time.perf_counter()
        action, _ = ralis.predict(obs, deterministic=True)
        t1 = time.perf_counter()
        entropy.predict(obs)
        t2 = time.perf_counter()
        obs, _, term, trunc, _ = env.step(np.asarray(action).reshape(-1))
        timings = env.unwrapped.timings
        parts["agent_ralis"].append(t1 - t0)
        parts["agent_entropy"].append(t2 - t1)
        for key in ("train", "reward", "features"):
            parts[key].append(timings[key])
        parts["step"].append(timings["step"] + (t1 - t0))
        if term or trunc:
            obs, _ = env.reset()
    out = {k: statistics.median(v) for k, v in parts.items()}
    out.update(
        make_s=make_s, reset_s=reset_s, steps=spec["steps"], device=str(env.unwrapped.device),
        peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        peak_cuda_mib=torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0,
    )  # fmt: skip
    print(json.dumps(out))


def spawn(spec: dict) -> dict:
    res = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True
    )
    if res.returncode != 0:
        raise SystemExit(f"{spec['model']} model run failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    args = parse_args()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{args.threads} thread(s), load average {os.getloadavg()[0]:.1f}, "
        f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}\n"
    )
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    results = {}
    for model in models:
        steps = args.paper_steps if model == "paper" else args.steps
        spec = {**asdict(args), "model": model, "steps": steps}
        print(f"measuring the {model} model ({steps} step(s)) ...", file=sys.stderr, flush=True)
        results[model] = spawn(spec)
    header = "| part of a step (median s) | " + " | ".join(models)
    header += " | paper / fast |" if {"fast", "paper"} <= set(results) else " |"
    print(f"protocol: CamVid {args.mode} (env defaults), agent = RALIS Q-network\n\n{header}")
    print("|---" * (len(models) + 1 + ({"fast", "paper"} <= set(results))) + "|")
    for key in (*PARTS, "reset_s", "make_s", "peak_rss_mib", "peak_cuda_mib"):
        row = f"| {key} | " + " | ".join(f"{results[m][key]:.3f}" for m in models)
        if {"fast", "paper"} <= set(results):
            fast = results["fast"][key]
            row += f" | {results['paper'][key] / fast:.0f}x" if fast > 0 else " | "
        print(row + " |")
    print(", ".join(f"{m}: {r['steps']} step(s) on {r['device']}" for m, r in results.items()))

    if not args.skip_features:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from feature_speed import POOL_CASES
        from feature_speed import spawn as spawn_feature_case

        print("\nfeature computation alone (candidate_features: region vectors + both KL histograms)\n")
        print(
            "| K x N | candidates | labeled L | classes | seconds | vs 24x10 | peak RSS MiB |\n|---|---|---|---|---|---|---|"
        )
        base = None
        for case in POOL_CASES:
            k, n, n_lab, classes, _ = case
            device = "cpu" if args.device == "auto" else args.device
            r = spawn_feature_case(
                {"threads": args.threads, "repeats": 3, "device": device, "kind": "pool", "case": list(case)}
            )
            base = base or r["candidate_s"]
            print(
                f"| {k} x {n} | {k * n} | {n_lab} | {classes} | {r['candidate_s']:.4f} | "
                f"{r['candidate_s'] / base:.0f}x | {r['peak_rss_mib']:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
