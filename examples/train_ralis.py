"""Train the RALIS query network (DQN) over episodes on the D_T pool (BENCHMARKS.md §5 for the schedules).

    python examples/train_ralis.py                       # additive schedule: 25 episodes x 80 steps, fast model
    python examples/train_ralis.py --schedule reference  # the paper's: 100 episodes x 20 steps
    python examples/train_ralis.py --config examples/configs/camvid_fast.yaml --episodes 10
    python examples/train_ralis.py --out runs/ralis      # again: resumes from the last checkpoint
    python examples/train_ralis.py --n-envs 2            # episodes collected in 2 subprocesses

Checkpoints (policy + replay buffer) go to OUT/checkpoints every `checkpoint_every` steps; a killed
run started again with the same OUT resumes from the newest one. TensorBoard: `tensorboard --logdir OUT`.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

import gymnasium as gym
import torch
from stable_baselines3.common.callbacks import BaseCallback, CheckpointCallback
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import SubprocVecEnv

import ralis_gym  # noqa: F401  (registers the environments)
from agents import RalisDQN
from agents.ralis_dqn import SCHEDULES
from ralis_gym.config import load_yaml, parse_dataclass_args


@dataclass
class Args:
    env_id: str = "RegionAL-CamVid-Fast-v0"
    config: str | None = None  # YAML of env keyword arguments (see RegionALEnv.default_config)
    data_root: str | None = None
    episodes: int | None = None  # None: the schedule's (reference 100, additive 25)
    budget: int | None = (
        None  # regions per training episode; None: the schedule's (additive 1920), else the protocol's
    )
    seed: int = 20
    out: str = "runs/ralis_camvid_fast"
    schedule: str = "additive"  # a preset of agents.ralis_dqn.SCHEDULES ("reference": the paper's); the
    # flags below override single values of it
    learning_rate: float | None = None
    lr_decay: float | None = None  # per env step (and per finished episode)
    gamma: float | None = None
    q_target: str | None = (
        None  # "pool": every pool regressed on the step's reward (reference); "sum": additive
    )
    batch_size: int | None = None  # transitions ("pool") or steps with all their pools ("sum")
    gradient_steps: int | None = None  # gradient steps per environment step
    buffer_size: int | None = None  # pool transitions (600 = 25 steps of 24 pools)
    checkpoint_every: int = 20  # environment steps
    keep_checkpoints: int = 2  # newest checkpoints (policy + replay buffer, ~45 MB each) kept on disk
    threads: int = 1  # torch threads; 1 is fastest for these small networks on a busy CPU
    n_envs: int = 1  # environments stepped in parallel subprocesses (SB3 SubprocVecEnv), one core each


def parse_args() -> Args:
    args = parse_dataclass_args(Args, __doc__)
    if args.schedule not in SCHEDULES:
        raise SystemExit(f"--schedule must be one of {sorted(SCHEDULES)}, got {args.schedule!r}")
    return args


class EpisodeLog(BaseCallback):
    """Appends the final D_R mIoU of every finished episode to OUT/episodes.csv (the learning curve)."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path

    def _on_step(self) -> bool:
        for done, info in zip(self.locals["dones"], self.locals["infos"]):
            if done:
                new = not self.path.exists()
                with open(self.path, "a") as f:
                    f.write("timestep,episode_miou\n" if new else "")
                    f.write(f"{self.num_timesteps},{info['miou']:.6f}\n")
        return True


def checkpoints_by_step(folder: Path) -> list[Path]:
    return sorted(folder.glob("ralis_*_steps.zip"), key=lambda p: int(re.findall(r"(\d+)_steps", p.name)[0]))


def replay_buffer_of(ckpt: Path) -> Path:
    return ckpt.with_name(ckpt.name.replace("ralis_", "ralis_replay_buffer_").replace(".zip", ".pkl"))


class PruningCheckpoint(CheckpointCallback):
    """SB3's CheckpointCallback that keeps only the newest ``keep`` checkpoints (and their buffers)."""

    def __init__(self, keep: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.keep = max(1, keep)

    def _on_step(self) -> bool:
        result = super()._on_step()
        if self.n_calls % self.save_freq == 0:
            for old in checkpoints_by_step(Path(self.save_path))[: -self.keep]:
                old.unlink(missing_ok=True)
                replay_buffer_of(old).unlink(missing_ok=True)
        return result


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    schedule = SCHEDULES[args.schedule]
    env_kwargs = {"mode": "train", "progress": True, **(load_yaml(args.config) if args.config else {})}
    if args.budget is not None:  # --budget, else the config's, else the schedule's, else the protocol's
        env_kwargs["budget"] = args.budget
    elif "budget" not in env_kwargs and schedule["budget"] is not None:
        env_kwargs["budget"] = schedule["budget"]
    if args.data_root:
        env_kwargs["data_root"] = args.data_root
    if args.n_envs > 1:  # each worker re-imports this script (forkserver), which registers the ids
        env = make_vec_env(args.env_id, n_envs=args.n_envs, seed=args.seed, vec_env_cls=SubprocVecEnv,
                           env_kwargs={**env_kwargs, "progress": False})  # fmt: skip
        steps_per_episode = env.env_method("get_wrapper_attr", "_max_episode_steps")[0]
    else:
        env = gym.make(args.env_id, **env_kwargs)
        steps_per_episode = env.get_wrapper_attr("_max_episode_steps")
    total = (args.episodes or schedule["episodes"]) * steps_per_episode

    found = checkpoints_by_step(out / "checkpoints")
    if found:
        ckpt = found[-1]
        model = RalisDQN.load(ckpt, env=env, tensorboard_log=str(out))
        buffer = replay_buffer_of(ckpt)
        if buffer.exists():
            model.load_replay_buffer(buffer)
        print(f"resuming from {ckpt} at step {model.num_timesteps}/{total}")
        log = out / "episodes.csv"
        if log.exists():  # episodes finished after the checkpoint are trained again: drop their lines
            lines = log.read_text().splitlines()
            keep = [lines[0]] + [x for x in lines[1:] if int(x.split(",")[0]) <= model.num_timesteps]
            log.write_text("\n".join(keep) + "\n")
    else:
        settings = {**schedule["agent"]}
        for key in settings:
            if getattr(args, key) is not None:
                settings[key] = getattr(args, key)
        model = RalisDQN("RalisPolicy", env, **settings, seed=args.seed, tensorboard_log=str(out), verbose=0)
    checkpoints = PruningCheckpoint(
        keep=args.keep_checkpoints,
        save_freq=args.checkpoint_every,
        save_path=str(out / "checkpoints"),
        name_prefix="ralis",
        save_replay_buffer=True,
    )
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model.learn(
        total_timesteps=max(total - model.num_timesteps, 0), callback=[checkpoints, EpisodeLog(out / "episodes.csv")], log_interval=1,
        progress_bar=True, reset_num_timesteps=False, tb_log_name="dqn",
    )  # fmt: skip
    model.save(out / "ralis_final")
    print(
        f"trained {model.num_timesteps} steps in {time.perf_counter() - t0:.0f} s -> {out / 'ralis_final.zip'}"
    )


if __name__ == "__main__":
    main()
