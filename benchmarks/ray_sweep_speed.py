"""Wall-clock of one method-comparison sweep, serial vs ``--ray``, measured side by side.

The same 4-run sweep (``--quick`` preset: the real CamVid test protocol from the cached ``source``
start network, budgets 240 and 480 with the preset's short final training; methods random and
entropy, seeds 0 and 1) runs as a whole process, first serially, then on a local Ray with
``--workers`` CPUs (one run per CPU), alternating ``--repeats`` times, each into a fresh results file. The ratio serial / Ray is taken pair by pair;
the cells of both must be equal (the script checks it). Results: ``benchmarks/results/ray-sweep-speed.json``.

    python benchmarks/ray_sweep_speed.py --data-root ../shared/data
"""

from __future__ import annotations

import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from ralis_gym.config import parse_dataclass_args

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "ray-sweep-speed.json"
RESULT_COLUMNS = ("method", "seed", "budget", "labeled", "test_miou", "d_r_miou", "final_epochs")


@dataclass
class Args:
    data_root: str | None = None
    methods: str = "random,entropy"
    seeds: str = "0,1"
    budgets: str = "240,480"  # long enough that a run outweighs a worker's start (imports, env build)
    workers: int = 2  # CPUs of the local Ray (one run per CPU)
    repeats: int = 2
    out: str = str(OUT)


def sweep(args: Args, results: Path, ray: bool) -> float:
    cmd = [
        sys.executable, str(HERE / "compare_methods.py"), "--quick", "--methods", args.methods,
        "--seeds", args.seeds, "--budgets", args.budgets, "--results", str(results),
    ]  # fmt: skip
    if args.data_root:
        cmd += ["--data-root", args.data_root]
    if ray:
        cmd += ["--ray", "--ray-cpus", str(args.workers)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return seconds


def cells(path: Path) -> set[tuple[str, ...]]:
    with open(path, newline="") as f:
        return {tuple(row[c] for c in RESULT_COLUMNS) for row in csv.DictReader(f)}


def main(argv: list[str] | None = None) -> int:
    args = parse_dataclass_args(Args, __doc__, argv)
    runs = len(args.methods.split(",")) * len(args.seeds.split(","))
    pairs = []
    with tempfile.TemporaryDirectory() as tmp:
        sweep(args, Path(tmp) / "warmup.csv", ray=False)  # caches (decoded data, features, start network)
        for i in range(args.repeats):
            serial_csv, ray_csv = Path(tmp) / f"serial{i}.csv", Path(tmp) / f"ray{i}.csv"
            serial = sweep(args, serial_csv, ray=False)
            on_ray = sweep(args, ray_csv, ray=True)
            if cells(serial_csv) != cells(ray_csv):
                raise SystemExit("the Ray sweep's cells differ from the serial sweep's")
            pairs.append(
                {"serial_s": round(serial, 1), "ray_s": round(on_ray, 1), "ratio": round(serial / on_ray, 2)}
            )
            print(f"repeat {i}: serial {serial:.1f} s, Ray ({args.workers} workers) {on_ray:.1f} s, "
                  f"ratio {serial / on_ray:.2f}")  # fmt: skip
    ratios = [p["ratio"] for p in pairs]
    summary = {
        "sweep": f"--quick, methods {args.methods}, seeds {args.seeds}, budgets {args.budgets} ({runs} runs)",
        "workers": args.workers,
        "pairs": pairs,
        "median_ratio": statistics.median(ratios),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "args": {k: v for k, v in asdict(args).items() if k not in ("out", "data_root")},  # no machine paths
    }
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    print(f"median serial / Ray wall-clock ratio over {len(pairs)} pair(s): {summary['median_ratio']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
