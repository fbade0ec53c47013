"""Two processes against one fresh user cache: decoded arrays, encoder features and a start network
are computed once (the second process waits on the lock and reads the first one's files), nothing
is corrupted, and no temporary file is left behind. Synthetic Cityscapes: no CamVid needed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np

from ralis_gym.fileio import atomic_write, file_lock, unique_temporary
from tests.fixtures_data import make_cityscapes_fixture

REPO = Path(__file__).resolve().parents[1]
WORKER = """
import json, os, sys, time
import numpy as np, torch
from ralis_gym.data import load_dataset
from ralis_gym.segmentation.encoder import CellEncoder, EncoderConfig, split_features
from ralis_gym.segmentation.pretrain import pretrain_start_network

torch.set_num_threads(1)
print("ready", flush=True)
while not os.path.exists(sys.argv[2]):  # start together: both reach every cache entry at once
    time.sleep(0.01)
ds = load_dataset("cityscapes", sys.argv[1], image_size=(256, 128), region_size=(64, 64))
split = ds.split("d_r")
feats = split_features(CellEncoder(EncoderConfig(stride=16)), split)
seg, meta = pretrain_start_network(
    ds, "fast", "source", max_epochs=2, patience=1, progress=False, evaluate_test=False,
    model_kwargs={"width": 16},
)
print(json.dumps({
    "train_seconds": meta["train_seconds"], "path": meta["path"],
    "features": float(feats.double().sum()), "images": int(np.asarray(split.images).sum()),
    "weights": float(sum(v.double().sum() for v in seg.model_state()["head"].values() if v.is_floating_point())),
}))
"""


def test_two_processes_share_one_fresh_cache(tmp_path):
    root = make_cityscapes_fixture(tmp_path / "data", n_train=24, n_val=3, size=(256, 128))
    cache = tmp_path / "cache"
    env = {**os.environ, "RALIS_GYM_CACHE": str(cache), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(root), str(go)], env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]  # fmt: skip
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    go.touch()
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    a, b = outs
    # Trained once: the waiting process loaded the first one's file (same metadata, same weights).
    assert a["train_seconds"] == b["train_seconds"] and a["path"] == b["path"]
    assert a["weights"] == b["weights"] and a["features"] == b["features"] and a["images"] == b["images"]
    files = [p for p in cache.rglob("*") if p.is_file()]
    assert not [p for p in files if ".tmp" in p.name], "a temporary file was left behind"
    assert len(list(cache.rglob("*.pt"))) == 1 and list(cache.rglob("features/*/*.npy"))
    assert all(np.load(p).size for p in cache.rglob("*.npy"))  # every cache file is whole


def test_file_lock_serialises_and_atomic_write_replaces_whole_files(tmp_path):
    target = tmp_path / "entry.bin"
    inside, overlaps = [0], []

    def worker(tag: bytes) -> None:
        with file_lock(target):
            inside[0] += 1
            overlaps.append(inside[0])
            atomic_write(target, lambda f: f.write(tag * 100_000))
            inside[0] -= 1

    threads = [threading.Thread(target=worker, args=(bytes([65 + i]),)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert max(overlaps) == 1  # one holder at a time (flock: one lock per open file, threads too)
    data = target.read_bytes()
    assert len(data) == 100_000 and len(set(data)) == 1  # one writer's whole file, never a mix
    names = {unique_temporary(target).name for _ in range(50)}
    assert len(names) == 50 and all(n.endswith(".tmp.bin") for n in names)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry.bin", "entry.bin.lock"]
