"""``benchmarks/compare_methods.py --ray``: a real local Ray, real CamVid, real fast networks.

The driver runs in a subprocess as a user runs it; the tests compare its cells with the serial
run's, kill the driver after its first cell and resume, and kill a Ray worker in the middle of a run
(the run is retried for its missing cells only).
"""

from __future__ import annotations

import csv
import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("ray") is None, reason='Ray is not installed (pip install "ralis-gym[ray]")'
)

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "compare_methods.py"
# Small but real: the fast model trained for real on real CamVid regions, a short pool and reward set.
TINY_SWEEP = {
    "start_network": "scratch", "num_pools": 6, "regions_per_pool": 4,
    "subset": {"pool": 24, "reward": 6, "state": 2, "test": 6},
}  # fmt: skip
#: what a cell computed (the rest of a row says when, where and how long)
RESULT_COLUMNS = ("labeled", "test_miou", "d_r_miou", "pixel_accuracy", "final_epochs")


@pytest.fixture()
def sweep(camvid_root, tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY_SWEEP))
    env = {**os.environ, "RALIS_GYM_DATA": str(camvid_root), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

    def command(results: Path, *extra: str, budgets: str = "6,12") -> list[str]:
        return [
            sys.executable, str(SCRIPT), "--quick", "--methods", "random,entropy", "--seeds", "0",
            "--budgets", budgets, "--final-max-epochs", "3", "--config", str(config),
            "--results", str(results), "--ray-cpus", "2", *extra,
        ]  # fmt: skip

    return command, env, tmp_path


def _run(cmd: list[str], env: dict, cwd: Path) -> str:
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def _cells(path: Path) -> dict[tuple[str, int, int], dict[str, str]]:
    rows = list(csv.DictReader(open(path)))
    cells = {(r["method"], int(r["seed"]), int(r["budget"])): r for r in rows}
    assert len(cells) == len(rows), "a cell was written twice"
    return cells


def _wait_for_rows(path: Path, proc: subprocess.Popen, n: int, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= n + 1:  # header + n cells
            return
        assert proc.poll() is None, f"the sweep ended before {n} cell(s):\n{proc.stderr.read()[-3000:]}"
        time.sleep(0.05)
    raise AssertionError(f"no {n} cell(s) in {path} after {timeout} s")


def _ray_task_pids(name: str = "_ray_run") -> list[int]:
    """Ray workers running a task of ``name`` (Ray sets their process title to ``ray::<name>``)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if cmdline.startswith(f"ray::{name}".encode()):
                pids.append(int(entry.name))
    return pids


def test_ray_sweep_gives_the_serial_cells(sweep):
    command, env, tmp = sweep
    _run(command(tmp / "serial.csv"), env, tmp)
    text = _run(command(tmp / "ray.csv", "--ray", "--max-retries", "0"), env, tmp)
    assert "on Ray" in text and "random        seed 0 budget     6" in text
    serial, on_ray = _cells(tmp / "serial.csv"), _cells(tmp / "ray.csv")
    assert set(serial) == set(on_ray) == {(m, 0, b) for m in ("random", "entropy") for b in (6, 12)}
    for key, row in serial.items():
        assert all(on_ray[key][c] == row[c] for c in RESULT_COLUMNS), key
        assert all(on_ray[key][c] == row[c] for c in row if c.startswith(("iou_", "pixels_"))), key


def test_killed_ray_sweep_resumes_without_recomputing_a_cell(sweep):
    command, env, tmp = sweep
    results = tmp / "killed.csv"
    cmd = command(results, "--ray", budgets="6,12,18,24")
    proc = subprocess.Popen(
        cmd, env=env, cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        _wait_for_rows(results, proc, 1)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    before = _cells(results)
    assert 1 <= len(before) < 8, "the driver was killed after its first cell, before the last"
    text = _run(cmd, env, tmp)
    assert f"{len(before)} cells already" in text
    after = _cells(results)
    assert set(after) == {(m, 0, b) for m in ("random", "entropy") for b in (6, 12, 18, 24)}
    assert all(after[key] == row for key, row in before.items()), "a finished cell was recomputed"


def test_a_killed_worker_is_retried_for_its_missing_cells(sweep):
    command, env, tmp = sweep
    results = tmp / "retried.csv"
    cmd = command(results, "--ray", "--max-retries", "2", budgets="6,12,18,24")
    proc = subprocess.Popen(
        cmd, env=env, cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        _wait_for_rows(results, proc, 1)
        victims = _ray_task_pids()
        assert victims, "no Ray worker is running a (method, seed) task"
        os.kill(victims[0], signal.SIGKILL)
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]
    assert "run failed" in out and "retry 1/2" in out, out[-3000:]
    cells = _cells(results)  # each cell once: the retry computed only the missing budgets
    assert set(cells) == {(m, 0, b) for m in ("random", "entropy") for b in (6, 12, 18, 24)}


def test_ray_flag_errors_are_one_line(sweep):
    command, env, tmp = sweep
    proc = subprocess.run(
        command(tmp / "x.csv", "--ray", "--cpus-per-run", "0"),
        env=env,
        cwd=tmp,
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "--cpus-per-run must be > 0" in proc.stderr.strip().splitlines()[-1]


def test_ray_without_ray_installed_says_how_to_install_it(sweep):
    command, env, tmp = sweep
    argv = command(tmp / "x.csv", "--ray")
    code = (
        "import runpy, sys; sys.modules['ray'] = None; "  # `import ray` now raises ImportError
        f"sys.argv = {argv[1:]!r}; runpy.run_path(sys.argv[0], run_name='__main__')"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp, capture_output=True, text=True)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert 'pip install "ralis-gym[ray]"' in proc.stderr.strip().splitlines()[-1]
