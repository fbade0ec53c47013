"""The ``ralis-gym`` command: the main job end to end (one active-learning loop: the registered
environment driven by the baseline agents) on a tiny real-CamVid configuration, and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

# Scratch start network (no pretraining inside the test), small pools and reward set.
TINY_RUN = {
    "start_network": "scratch",
    "subset": {"pool": 8, "reward": 4, "state": 1, "test": 4},
    "final_training": {"max_epochs": 4, "patience": 2},
}


def ralis_gym(*args: str, root: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "RALIS_GYM_DATA": str(root), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "ralis_gym.cli", *args], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip


def test_run_drives_the_environment_with_every_requested_agent(camvid_root, tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY_RUN))
    out = tmp_path / "out"
    proc = ralis_gym(
        "run", "--config", str(config), "--strategies", "random", "margin", "oracle", "--budget", "16",
        "--num-pools", "4", "--pool-size", "3", "--out", str(out), "--no-download", root=camvid_root, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())["results"]
    assert list(results) == ["random", "margin", "oracle"]
    for r in results.values():
        assert [s["labeled"] for s in r["steps"]] == [0, 4, 8, 12, 16]  # K = 4 regions per step
        assert r["final"]["labeled"] == 16 and 0.0 <= r["final"]["test_miou"] <= 1.0
        assert sum(r["final"]["class_pixels"]) == 16 * 80 * 90
    # Strategies differ in what they pick (same seed, same pools): the oracle reads the labels.
    assert results["random"]["final"]["class_pixels"] != results["oracle"]["final"]["class_pixels"]
    assert (out / "miou_vs_budget.png").stat().st_size > 10_000


@pytest.mark.parametrize(
    "args, message",
    [
        (["--budget", "-5"], "must be positive"),
        (["--num-pools", "0"], "must be positive"),
        (["--threads", "0"], "must be positive"),
        (["--strategies", "coreset"], "invalid choice"),
    ],
)
def test_run_rejects_bad_input_with_one_line(args, message, camvid_root, tmp_path):
    proc = ralis_gym("run", *args, "--no-download", root=camvid_root, cwd=tmp_path)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
