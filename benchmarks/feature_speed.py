"""Timings of the state/action features (region vectors, KL histograms) on random inputs: a Markdown table.

* ``kl_histograms`` of the KL-to-candidates term (all K·N candidates against each other) and the
  whole ``candidate_features`` (region vector + KL-to-labeled + KL-to-candidates) for pool shapes
  from the CamVid test (24 x 10) to the Cityscapes test (256 x 100, 25,600 candidates);
* ``region_tables`` (every region vector) of a batch of CamVid (480x360, 11 classes) and Cityscapes
  (2048x1024, 19 classes) softmax maps.

Candidate histograms are drawn from random class probabilities (multinomial pixel counts with the
1e-7 floor, a quarter of them pure regions), the labeled set from random GT counts. Every row runs
in a fresh subprocess so its peak RSS (``resource.getrusage``) is its own.

    python benchmarks/feature_speed.py [--threads 1] [--repeats 3] [--device cpu]
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
from collections.abc import Callable

import numpy as np
import torch

# (K, N, labeled regions L, classes C, pixels per region): CamVid test/train, CS train/test.
POOL_CASES = [
    (24, 10, 480, 11, 80 * 90),
    (24, 20, 480, 11, 80 * 90),
    (256, 20, 3840, 19, 128 * 128),
    (256, 100, 3840, 19, 128 * 128),
]
# (name, images per batch, classes, width, height, region width, region height)
IMAGE_CASES = [
    ("CamVid", 4, 11, 480, 360, 80, 90),
    ("Cityscapes", 2, 19, 2048, 1024, 128, 128),
]


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``repeats`` calls (seconds)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def random_histograms(rows: int, classes: int, pixels: int, rng: np.random.Generator) -> torch.Tensor:
    """Predicted class histograms ``[rows, C + 1]``: multinomial counts of random probabilities."""
    probs = rng.dirichlet(np.full(classes, 0.3), size=rows)
    pure = rng.random(rows) < 0.25
    probs[pure] = np.eye(classes)[rng.integers(classes, size=int(pure.sum()))]
    counts = rng.multinomial(pixels, probs).astype(np.float64)
    counts = np.concatenate([counts, np.zeros((rows, 1))], axis=1)
    return torch.from_numpy(np.where(counts > 0, counts, 1e-7)).float()


def run_pool_case(k: int, n: int, n_lab: int, classes: int, pixels: int, repeats: int, device: str) -> dict:
    from ralis_gym.features import POOL_FEATURES, candidate_features, class_distribution, kl_histograms

    rng = np.random.default_rng(0)
    hist = random_histograms(k * n, classes, pixels, rng)
    vecs = torch.cat([hist, torch.rand(k * n, POOL_FEATURES)], dim=1).to(device)
    gt = rng.multinomial(pixels, rng.dirichlet(np.full(classes + 1, 0.3), size=n_lab))
    labeled = class_distribution(gt).to(device)
    reps = 1 if k * n > 10_000 else repeats
    t_kl = timed(lambda: kl_histograms(vecs[:, : classes + 1], vecs[:, : classes + 1]), reps)
    t_cand = timed(lambda: candidate_features(vecs, labeled, (k, n)), reps)
    return {"kl_pool_s": t_kl, "candidate_s": t_cand}


def run_image_case(
    images: int, classes: int, w: int, h: int, rw: int, rh: int, repeats: int, device: str
) -> dict:
    from ralis_gym.features import region_tables
    from ralis_gym.regions import RegionGrid

    grid = RegionGrid((w, h), (rw, rh))
    gen = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(images, classes, h, w, generator=gen) * 3, dim=1).to(device)
    t = timed(lambda: region_tables(probs, grid), repeats)
    return {"seconds": t, "regions": int(images * grid.per_image)}


def child(spec: dict) -> None:
    """Run one case and print its timings plus this process's peak RSS as JSON."""
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    if spec["kind"] == "pool":
        out = run_pool_case(*spec["case"], spec["repeats"], spec["device"])
    else:
        out = run_image_case(*spec["case"][1:], spec["repeats"], spec["device"])
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(out))


def spawn(spec: dict) -> dict:
    res = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True, check=True
    )
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    threads = args.threads or torch.get_num_threads()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{threads} threads, device {args.device}, load average {os.getloadavg()[0]:.1f}\n"
    )
    base = {"threads": args.threads, "repeats": args.repeats, "device": args.device}
    print(
        "| K | N | candidates | labeled L | C+1 | kl_histograms (pool) s | candidate_features s | peak RSS MiB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for case in POOL_CASES:
        k, n, n_lab, classes, _ = case
        r = spawn({**base, "kind": "pool", "case": list(case)})
        print(
            f"| {k} | {n} | {k * n} | {n_lab} | {classes + 1} | {r['kl_pool_s']:.3f} | "
            f"{r['candidate_s']:.3f} | {r['peak_rss_mib']:.0f} |",
            flush=True,
        )
    print("\n| dataset | images | image WxH | C | regions | region_tables s | s / image | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for case in IMAGE_CASES:
        name, images, classes, w, h, _, _ = case
        r = spawn({**base, "kind": "image", "case": list(case)})
        print(
            f"| {name} | {images} | {w}x{h} | {classes} | {r['regions']} | {r['seconds']:.3f} | "
            f"{r['seconds'] / images:.3f} | {r['peak_rss_mib']:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
