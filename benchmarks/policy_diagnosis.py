"""What a trained RALIS policy does in training mode, against random on the same episodes (issue 10).

For each policy (and ``random``), greedy episodes of ``RegionAL-CamVid-Fast-v0`` in training mode on the
same seeds: the episode return (D_R mIoU gain, points), the class shares of the acquired pixels, and for
the policies the calibration of their Q-values: the predicted value of the step's picks (the mean over
pools of ``Q(s_k, a_k)`` for ``q_target="pool"``, where every pool predicts the whole step; their sum for
``"sum"``) against the realised discounted return from that step with the policy's own gamma.

    OMP_NUM_THREADS=1 python benchmarks/policy_diagnosis.py \\
        --policies benchmarks/results/ralis-camvid-fast.zip,benchmarks/results/ralis-camvid-fast-nodecay.zip

``--curves`` draws the DQNs' training curves (final D_R mIoU per episode, ``episodes.csv`` of
``examples/train_ralis.py``) against the 10-seed training-mode returns of random, entropy and the oracle
(``benchmarks/results/al-step-training.csv``, default variant) to ``ralis-training-curves.png``.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

import ralis_gym  # noqa: F401  (registers the environments)
from agents import RalisDQN
from agents.heuristics import RandomAgent
from ralis_gym.config import parse_dataclass_args
from ralis_gym.data.camvid import CAMVID_RARE_CLASSES
from ralis_gym.stats import sample_std, welch_t

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Args:
    policies: str = "benchmarks/results/ralis-camvid-fast.zip"  # comma-separated .zip files
    env_id: str = "RegionAL-CamVid-Fast-v0"
    data_root: str | None = None
    seeds: str = "100,101,102,103,104,105,106,107,108,109"
    out: str = "benchmarks/results/policy-diagnosis.json"
    threads: int = 1
    curves: str = ""  # comma-separated episodes.csv files to plot (label = file stem)
    curves_only: bool = False


def run(env, agent, seed: int, model: RalisDQN | None) -> dict:
    obs, info = env.reset(seed=seed)
    start, rewards, predicted = info["miou"], [], []
    done = False
    while not done:
        action, _ = agent.predict(obs, deterministic=True)
        if model is not None:
            with torch.no_grad():
                tensors, _ = model.policy.obs_to_tensor(obs)
                q = model.policy.q_values(tensors)[0].gather(1, torch.as_tensor(action)[:, None]).squeeze(1)
            valid = obs["action_mask"].any(1)
            q = q[torch.as_tensor(valid)]
            predicted.append(float(q.sum() if model.q_target == "sum" else q.mean()))
        obs, reward, terminated, truncated, info = env.step(np.asarray(action).reshape(-1))
        rewards.append(float(reward))
        done = terminated or truncated
    pixels = info["labeled_class_pixels"][:-1].astype(float)
    out = {"return": 100.0 * (info["miou"] - start), "class_share": (pixels / pixels.sum()).tolist()}
    if model is not None:
        realised, g = [], 0.0
        for r in reversed(rewards):
            g = r + model.gamma * g
            realised.append(g)
        out |= {"predicted": predicted, "realised": realised[::-1], "rewards": rewards}
    return out


def plot_curves(files: list[str], out: Path, reference: Path = RESULTS / "al-step-training.csv") -> None:
    """Final D_R mIoU per training episode (10-episode moving mean) with the heuristics' bands."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    rows = list(csv.DictReader(open(reference)))
    colors = {"random": "tab:gray", "entropy": "tab:blue", "oracle": "tab:green"}
    for method, color in colors.items():
        ends: dict[str, float] = {}
        for r in rows:  # the last step of each seed's episode
            if r["variant"] == "replay24+S" and r["method"] == method:
                ends[r["seed"]] = 100.0 * float(r["miou"])
        v = np.array(list(ends.values()))
        ax.axhspan(v.mean() - sample_std(v), v.mean() + sample_std(v), color=color, alpha=0.15)
        ax.axhline(v.mean(), color=color, ls="--", label=f"{method} ({len(v)} seeds, mean ± std)")
    for f, color in zip(files, ("tab:red", "tab:purple", "tab:orange", "tab:brown", "tab:pink", "tab:olive")):
        data = list(csv.DictReader(open(f)))
        miou = 100.0 * np.array([float(r["episode_miou"]) for r in data])
        episodes = np.arange(1, miou.size + 1)
        ax.plot(episodes, miou, alpha=0.25, color=color)
        k = min(10, miou.size)
        name = Path(f).parent.name if Path(f).stem == "episodes" else Path(f).stem.removesuffix("-episodes")
        ax.plot(episodes[k - 1 :], np.convolve(miou, np.ones(k) / k, "valid"), color=color,
                label=f"{name} (10-episode mean)")  # fmt: skip
    ax.set_xlabel("training episode")
    ax.set_ylabel("D_R mIoU at the episode's end (%)")
    ax.set_title("RALIS DQN training curves, training mode (pool D_T, 20 steps of 24 regions)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"plot -> {out}")


def main() -> None:
    args = parse_dataclass_args(Args, __doc__)
    torch.set_num_threads(args.threads)
    if args.curves:
        plot_curves(args.curves.split(","), RESULTS / "ralis-training-curves.png")
    if args.curves_only:
        return
    kwargs = {"mode": "train", "model": "fast"} | ({"data_root": args.data_root} if args.data_root else {})
    env = gym.make(args.env_id, **kwargs)
    seeds = [int(s) for s in args.seeds.split(",")]
    classes = list(env.unwrapped.info_.class_names)
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    agents = {"random": (None, lambda: RandomAgent(env, seed=0))}
    for path in filter(None, args.policies.split(",")):
        agents[Path(path).stem] = (path, None)
    for name, (path, make) in agents.items():
        if name in results:
            continue
        model = RalisDQN.load(path, device="cpu") if path else None
        agent = model if model is not None else make()
        results[name] = [run(env, agent, s, model) for s in seeds]
        out.write_text(json.dumps(results, indent=1))
        print(f"{name}: done")
    report(results, classes)


def report(results: dict, classes: list[str]) -> None:
    base = np.array([e["return"] for e in results["random"]])
    print(
        "| agent | return (points, mean ± std) | vs random (Welch t) | Q: predicted | Q: realised | corr |"
        " rare-class share | top class |"
    )
    print("|---|---|---|---|---|---|---|---|")
    rare = [classes.index(c) for c in CAMVID_RARE_CLASSES if c in classes]
    for name, eps in results.items():
        ret = np.array([e["return"] for e in eps])
        share = np.mean([e["class_share"] for e in eps], axis=0)
        cal = ""
        if "predicted" in eps[0]:
            p = np.concatenate([e["predicted"] for e in eps])
            r = np.concatenate([e["realised"] for e in eps])
            cal = f"{p.mean():+.2f} | {r.mean():+.2f} | {np.corrcoef(p, r)[0, 1]:+.2f}"
        else:
            cal = " | | "
        diff, t = welch_t(ret, base)
        vs = "" if name == "random" else f"{diff:+.2f} (t={t:+.2f})"
        top = int(share.argmax())
        print(f"| {name} | {ret.mean():+.2f} ± {sample_std(ret):.2f} | {vs} | {cal} | "
              f"{100 * share[rare].sum():.1f}% | {classes[top]} {100 * share[top]:.0f}% |")  # fmt: skip


if __name__ == "__main__":
    main()
