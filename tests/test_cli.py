"""The ``ralis-gym`` command: the main job end to end (one active-learning loop: the registered
environment driven by the baseline agents) on a tiny real-CamVid configuration, and bad input."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from ralis_gym.data.camvid import CAMVID_COUNTS
from tests.fixtures_data import make_camvid_fixture
from tests.helpers import run_python, write_yaml

# Scratch start network (no pretraining inside the test), small pools and reward set.
TINY_RUN = {
    "start_network": "scratch",
    "subset": {"pool": 8, "reward": 4, "state": 1, "test": 4},
    "final_training": {"max_epochs": 4, "patience": 2},
}


def ralis_gym(*args: str, root: Path, cwd: Path, **kw) -> subprocess.CompletedProcess:
    return run_python("-m", "ralis_gym.cli", *args, root=root, cwd=cwd, **kw)


def test_run_drives_the_environment_with_every_requested_agent(camvid_root, tmp_path):
    config = write_yaml(tmp_path / "tiny.yaml", TINY_RUN)
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


def assert_one_line_error(proc: subprocess.CompletedProcess, message: str) -> None:
    """Exit status 2 and one line on stderr, ``ralis-gym: error: ...`` holding ``message``."""
    lines = proc.stderr.splitlines()  # a progress bar's carriage returns would count as lines too
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("ralis-gym: error: ") and message in lines[0], proc.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--budget", "-5"], "argument --budget: must be positive"),
        (["--budget", "999999"], "exceeds the 6168 regions of the pool"),  # D_V: 257 images x 24
        (["--num-pools", "0"], "argument --num-pools: must be positive"),
        (["--pool-size", "-1"], "argument --pool-size: must be positive"),
        (["--threads", "0"], "argument --threads: must be positive"),
        (["--strategies", "coreset"], "invalid choice: 'coreset'"),
        (["--data-root", "/nonexistent"], "CamVid not found: /nonexistent/camvid does not exist"),
        (["--config", "missing.yaml"], "config file missing.yaml does not exist"),
    ],
)
def test_run_rejects_bad_input_with_one_line(args, message, camvid_root, tmp_path):
    """Refused before any long work (the budget against the pool is checked before pretraining)."""
    proc = ralis_gym(
        "run", *args, "--no-download", "--out", str(tmp_path / "out"), root=camvid_root, cwd=tmp_path
    )
    assert_one_line_error(proc, message)


def test_run_refuses_a_corrupt_image_with_one_line(tmp_path):
    """A CamVid folder with every file present but one training image overwritten by garbage."""
    root = make_camvid_fixture(tmp_path / "data", counts=CAMVID_COUNTS, size=(16, 12))
    corrupt = root / "camvid" / "train" / "train_0000.png"
    corrupt.write_bytes(bytes(range(256)) * 4)
    proc = ralis_gym(
        "run", "--no-download", "--out", str(tmp_path / "out"), root=root, cwd=tmp_path,
        env={"RALIS_GYM_CACHE": str(tmp_path / "cache")},
    )  # fmt: skip
    assert_one_line_error(proc, str(corrupt))
