"""The example scripts and the method-comparison benchmark, run end to end as a user runs them.

Real CamVid, a real (fast) segmentation network and a real RalisDQN; tiny configurations so that
each script finishes in seconds. The scripts run in subprocesses, with their own argument parsing.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import run_python, write_yaml

REPO = Path(__file__).resolve().parents[1]
# Same state set and pool shape in train and test: a policy trained here acts there unchanged.
TINY_TRAIN = {
    "model": "fast", "start_network": "scratch", "num_pools": 3, "regions_per_pool": 4, "budget": 6,
    "subset": {"pool": 6, "reward": 4, "state": 1, "test": 4},
}  # fmt: skip


def run_script(script: str, *args: str, root: Path, cwd: Path) -> str:
    proc = run_python(str(REPO / script), *args, root=root, cwd=cwd)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def trained_policy(camvid_root, tmp_path_factory) -> tuple[Path, Path]:
    """train_ralis.py for 2 episodes, killed (a checkpoint is all that is left), resumed to 3."""
    work = tmp_path_factory.mktemp("train_ralis")
    config = write_yaml(work / "tiny.yaml", TINY_TRAIN)
    out = work / "run"
    common = ["--config", str(config), "--out", str(out), "--checkpoint-every", "2", "--buffer-size", "50"]
    run_script("examples/train_ralis.py", *common, "--episodes", "2", root=camvid_root, cwd=work)
    return config, out


def test_train_ralis_checkpoints_logs_and_resumes(trained_policy, camvid_root):
    config, out = trained_policy
    rows = list(csv.DictReader(open(out / "episodes.csv")))
    assert [int(r["timestep"]) for r in rows] == [2, 4]
    assert all(0.0 <= float(r["episode_miou"]) <= 1.0 for r in rows)
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("ralis_*_steps.zip"))
    assert ckpts == ["ralis_2_steps.zip", "ralis_4_steps.zip"]  # keep_checkpoints = 2 prunes older ones
    assert (out / "checkpoints" / "ralis_replay_buffer_4_steps.pkl").exists()
    assert (out / "ralis_final.zip").exists()
    assert any(p.name.startswith("events.out.tfevents") for p in out.rglob("*"))

    # Resume: a later line than the newest checkpoint (as after a kill) must be replaced, not duplicated.
    resumed = out.parent / "resumed"
    shutil.copytree(out, resumed)
    (resumed / "checkpoints" / "ralis_4_steps.zip").unlink()
    text = run_script(
        "examples/train_ralis.py", "--config", str(config), "--out", str(resumed), "--checkpoint-every", "2",
        "--buffer-size", "50", "--episodes", "3", root=camvid_root, cwd=resumed.parent,
    )  # fmt: skip
    assert "resuming from" in text and "at step 2/6" in text
    rows = list(csv.DictReader(open(resumed / "episodes.csv")))
    assert [int(r["timestep"]) for r in rows] == [2, 4, 6]


def test_train_ralis_collects_episodes_in_subprocesses(camvid_root, tmp_path):
    """``--n-envs 2``: SB3's SubprocVecEnv steps two envs in worker processes; both episodes of the
    first vector step end together and are logged, and the additive target trains on their pools."""
    config = write_yaml(tmp_path / "tiny.yaml", TINY_TRAIN)
    out = tmp_path / "run"
    run_script(
        "examples/train_ralis.py", "--config", str(config), "--out", str(out), "--n-envs", "2", "--episodes", "4",
        "--q-target", "sum", "--gamma", "0", "--buffer-size", "60", "--checkpoint-every", "2",
        root=camvid_root, cwd=tmp_path,
    )  # fmt: skip
    rows = list(csv.DictReader(open(out / "episodes.csv")))
    assert [int(r["timestep"]) for r in rows] == [4, 4, 8, 8]
    assert rows[0]["episode_miou"] != rows[1]["episode_miou"]  # two envs, two seeds
    from agents import RalisDQN

    model = RalisDQN.load(out / "ralis_final.zip", device="cpu")
    assert model.q_target == "sum" and model.gamma == 0.0 and model.num_timesteps == 8


def test_reward_noise_tries_each_action_under_each_training_seed(camvid_root, tmp_path):
    config = write_yaml(tmp_path / "tiny.yaml", TINY_TRAIN)
    out = tmp_path / "noise.csv"
    text = run_script(
        "benchmarks/reward_noise.py", "--config", str(config), "--states", "0", "--warm", "0,1", "--train-seeds", "0,1,2",
        "--random-actions", "2", "--methods", "entropy", "--out", str(out), root=camvid_root, cwd=tmp_path,
    )  # fmt: skip
    rows = list(csv.DictReader(open(out)))
    assert len(rows) == 2 * 3 * 3  # states x actions x training seeds
    by_state = {}
    for r in rows:
        by_state.setdefault(r["warm"], {}).setdefault(r["action"], []).append(float(r["reward"]))
    for actions in by_state.values():  # the regions chosen change the reward
        assert len({round(float(np.mean(v)), 9) for v in actions.values()}) > 1
    assert "signal / noise" in text and "| **mean** |" in text


def test_evaluate_policy_with_a_trained_policy_and_a_heuristic(trained_policy, camvid_root, tmp_path):
    config, out = trained_policy
    for policy, name in ((str(out / "ralis_final.zip"), "ralis"), ("entropy", "entropy")):
        text = run_script(
            "examples/evaluate_policy.py", "--policy", policy, "--config", str(config), "--budget", "6",
            "--final-max-epochs", "3", "--final-patience", "1", "--out", str(tmp_path), root=camvid_root, cwd=tmp_path,
        )  # fmt: skip
        result = json.loads((tmp_path / f"{name}_seed20_b6.json").read_text())
        assert 0.0 < result["test_miou"] <= 1.0 and f"{100 * result['test_miou']:.2f}%" in text
        assert len(result["per_class_iou"]) == 11 and result["d_r_curve"][-1]["labeled"] == 6
        assert sum(result["labeled_class_pixels"]) == 6 * 80 * 90


def test_suggest_regions_writes_a_ranked_queue_and_overlays(trained_policy, camvid_root, tmp_path):
    from ralis_gym.data import load_dataset
    from ralis_gym.segmentation import build_segmenter

    _, out = trained_policy
    images = tmp_path / "unlabeled"
    images.mkdir()
    for name in sorted(os.listdir(camvid_root / "camvid" / "test"))[:2]:
        shutil.copy(camvid_root / "camvid" / "test" / name, images / name)
    dataset = load_dataset("camvid", camvid_root)
    seg = build_segmenter("fast", dataset.info, seed=0)
    seg.initialise(dataset.split("d_s"))
    import torch

    torch.save({"model_state": seg.model_state()}, tmp_path / "seg.pt")
    queue_dir = tmp_path / "queue"
    run_script(
        "examples/suggest_regions.py", "--policy", str(out / "ralis_final.zip"), "--images", str(images),
        "--segmentation", str(tmp_path / "seg.pt"), "--out", str(queue_dir), "--top", "5",
        "--data-root", str(camvid_root), root=camvid_root, cwd=tmp_path,
    )  # fmt: skip
    queue = json.loads((queue_dir / "queue.json").read_text())
    assert len(queue) == 2 * 24 and [q["rank"] for q in queue] == list(range(1, 49))
    scores = [q["score"] for q in queue]
    assert scores == sorted(scores, reverse=True)
    assert {q["image"] for q in queue} == set(os.listdir(images))
    assert all(q["box"][2:] == [80, 90] for q in queue)
    assert list(queue_dir.glob("*.png"))


def test_compare_methods_quick_preset_resumes_and_reports(trained_policy, camvid_root, tmp_path):
    """The --quick preset (1 seed, 2 budgets, tiny final training) on a tiny pool, from a scratch
    network (the preset's own start network, source+dt, would need minutes of pretraining)."""
    config, out = trained_policy
    results = tmp_path / "quick.csv"
    args = [
        "--quick", "--methods", "random,entropy,ralis", "--budgets", "3,6", "--results", str(results),
        "--policy", str(out / "ralis_final.zip"), "--final-max-epochs", "2", "--config", str(config),
    ]  # fmt: skip
    run_script("benchmarks/compare_methods.py", *args, root=camvid_root, cwd=tmp_path)
    rows = list(csv.DictReader(open(results)))
    assert {(r["method"], int(r["budget"])) for r in rows} == {
        (m, b) for m in ("random", "entropy", "ralis") for b in (3, 6)
    }
    assert all(0.0 < float(r["test_miou"]) <= 1.0 for r in rows)
    assert all(
        sum(int(r[k]) for k in r if k.startswith("pixels_")) == int(r["budget"]) * 80 * 90 for r in rows
    )

    # Kill-and-resume: drop one finished cell; the rerun recomputes only that cell, keeps the others.
    with open(results) as f:
        lines = f.read().splitlines()
    kept = [x for x in lines if not x.startswith("entropy,0,6,")]
    results.write_text("\n".join(kept) + "\n")
    text = run_script("benchmarks/compare_methods.py", *args, root=camvid_root, cwd=tmp_path)
    assert "5 cells already" in text and "1 (method, seed) runs (1 cells) to go" in text
    after = results.read_text().splitlines()
    assert after[: len(kept)] == kept and len(after) == len(lines)
    for suffix in ("-table.csv", "-report.md", "-miou-vs-budget.png", "-class-distribution.png"):
        assert (tmp_path / f"quick{suffix}").stat().st_size > 0
    report = (tmp_path / "quick-report.md").read_text()
    assert "| ralis |" in report and "Labeled-data saving" in report


@pytest.mark.slow
def test_compare_methods_quick_preset_as_documented(camvid_root, tmp_path):
    """``--quick`` exactly as a user runs it: the real test protocol (pool D_V, K = 24, N = 10) from
    the ``source+dt`` start network, pretrained here on first use (minutes; cached afterwards)."""
    results = tmp_path / "quick.csv"
    run_script(
        "benchmarks/compare_methods.py", "--quick", "--methods", "random,entropy,bald", "--results", str(results),
        root=camvid_root, cwd=tmp_path,
    )  # fmt: skip
    rows = list(csv.DictReader(open(results)))
    assert {(r["method"], int(r["seed"]), int(r["budget"])) for r in rows} == {
        (m, 0, b) for m in ("random", "entropy", "bald") for b in (48, 96)
    }
    # From the `source` start network (~34% test mIoU), 96 regions and a short final training keep
    # it far above a scratch network and below what the whole pool gives.
    assert all(0.25 < float(r["test_miou"]) < 0.45 for r in rows), [r["test_miou"] for r in rows]
    assert (tmp_path / "quick-miou-vs-budget.png").stat().st_size > 0


def test_parse_dataclass_args_types_switches_and_defaults():
    from dataclasses import dataclass

    from ralis_gym.config import parse_dataclass_args

    @dataclass
    class Demo:
        episodes: int = 100
        lr: float = 1e-3
        policy: str | None = None
        quick: bool = False

    assert parse_dataclass_args(Demo, argv=[]) == Demo()
    got = parse_dataclass_args(Demo, argv=["--episodes", "3", "--lr", "0.5", "--policy", "p.zip", "--quick"])
    assert got == Demo(episodes=3, lr=0.5, policy="p.zip", quick=True)
    with pytest.raises(SystemExit):
        parse_dataclass_args(Demo, argv=["--episodes", "three"])


def test_welch_t_of_the_benchmark_reports():
    """Welch's t as in the reports, against the textbook formula worked by hand."""
    from ralis_gym.stats import welch_t

    diff, t = welch_t(np.array([1.0, 2.0, 3.0, 4.0]), np.array([2.0, 4.0, 6.0, 8.0, 10.0]))
    # means 2.5 and 6; variances 5/3 and 10; se = sqrt(5/12 + 2)
    assert diff == pytest.approx(-3.5) and t == pytest.approx(-3.5 / np.sqrt(5 / 12 + 2))


def test_sample_std_of_the_benchmark_reports():
    """The reports' ± is the ddof-1 standard deviation Welch's t uses (variance 5/3 here), 0 for one value."""
    from ralis_gym.stats import sample_std

    assert sample_std(np.array([1.0, 2.0, 3.0, 4.0])) == pytest.approx(np.sqrt(5 / 3))
    assert sample_std(np.array([7.0])) == 0.0
