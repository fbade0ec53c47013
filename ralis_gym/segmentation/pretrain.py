"""Start networks: pretraining with early stopping, cached under a key of (dataset, model, config).

The paper starts DQN-training episodes from a GTA-only network (it never saw a CamVid label, in
particular none of the D_T pool it acquires from) and evaluation episodes from GTA + D_T. GTA is not
available here. Substitute (documented in the README): the 10 labeled images of the state set D_S
play GTA's role as the *source* set, which is disjoint from both pools D_T and D_V.

- ``source``  (training episodes, pool D_T): trained on D_S only. Never saw D_T or D_V labels.
- ``source+dt`` (evaluation episodes, pool D_V): ``source`` fine-tuned on D_T. Never saw D_V labels.
- ``upperbound`` (reference only): trained on the whole train split (D_T + D_V + D_S).

Model selection is the best D_R (val) mIoU with early stopping, as the reference pretraining does.

Start networks are trained with one torch thread whatever the caller set (``_one_torch_thread``):
CPU reductions sum in a thread-count-dependent order, so the same key gave different weights under
different thread counts (the README main job, one seed: a start network cached by a one-thread
benchmark vs one pretrained fresh with two threads moved its test mIoU by up to 0.9 points). The
cache key cannot see the thread count, so the network behind a key must not depend on it.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ralis_gym.data.base import SegmentationSplit
from ralis_gym.data.dataset import SegmentationDataset
from ralis_gym.errors import ConfigError
from ralis_gym.fileio import atomic_write, file_lock
from ralis_gym.paths import user_cache_dir
from ralis_gym.segmentation import build_segmenter
from ralis_gym.segmentation.base import Segmenter


@contextmanager
def _one_torch_thread() -> Iterator[None]:
    """Run the block with one intra-op torch thread, then restore the caller's setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass(frozen=True)
class StartNetworkSpec:
    """What a start network is trained on: splits (by role), and the start network it continues."""

    name: str
    train_roles: tuple[str, ...]
    init_from: str | None
    description: str


START_NETWORKS: dict[str, StartNetworkSpec] = {
    "source": StartNetworkSpec("source", ("d_s",), None, "D_S only (GTA-only substitute; training episodes)"),
    "source+dt": StartNetworkSpec(
        "source+dt", ("d_t",), "source", "source fine-tuned on D_T (GTA+D_T substitute; test)"
    ),
    "upperbound": StartNetworkSpec(
        "upperbound", ("train",), None, "all train images (fully supervised reference)"
    ),
}

#: Pretraining defaults per model kind: epochs are passes over the training images.
PRETRAIN_DEFAULTS: dict[str, dict[str, Any]] = {
    "fast": {"max_epochs": 300, "patience": 20},
    "paper": {"max_epochs": 1500, "patience": 30},
}
#: Final training (``RegionALEnv.evaluate``) per model kind: the same trainer, rule and recipe as
#: pretraining, because the final training must converge. Measured
#: (``benchmarks/final_training_convergence.py``, all regions of 100 D_T images from scratch, seed 0):
#: the pretraining recipe (300/20) 41.99% test mIoU; the final-training path with 300/20 42.38%
#: (70 epochs, 172 s), with the former 100/5 40.85% (stopped after 24 epochs). The paper's numbers for
#: the FPN.
FINAL_TRAINING_DEFAULTS: dict[str, dict[str, Any]] = {
    "fast": dict(PRETRAIN_DEFAULTS["fast"]),
    "paper": {"max_epochs": 1000, "patience": 150},
}


def start_data_roles(name: str) -> tuple[str, ...]:
    """Every labeled role a named start network was trained on, its parents' included
    (``source`` -> ``("d_s",)``, ``source+dt`` -> ``("d_s", "d_t")``)."""
    spec = START_NETWORKS[name]
    parent = start_data_roles(spec.init_from) if spec.init_from else ()
    return parent + tuple(r for r in spec.train_roles if r not in parent)


def train_until_plateau(
    seg: Segmenter,
    train_epoch: Callable[[], float],
    val_split: SegmentationSplit,
    max_epochs: int,
    patience: int,
    progress: bool = True,
    desc: str = "training",
    lr_steps_per_epoch: int = 1,
) -> dict[str, Any]:
    """Run ``train_epoch`` until D_R mIoU has not improved for ``patience`` epochs; keep the best weights.

    The one early-stopping trainer of the library: start networks (``pretrain_start_network``), the
    final training of the environment (``RegionALEnv.evaluate``) and the accuracy benchmark all stop
    by this rule. Returns ``{"best_miou", "best_epoch", "epochs", "history": [{"epoch", "loss",
    "miou"}]}``; the segmenter ends holding the best weights (NaN mIoU never counts as best).
    """
    if max_epochs < 0 or patience < 0:
        raise ConfigError(f"max_epochs ({max_epochs}) and patience ({patience}) must be >= 0")
    best = seg.evaluate(val_split).miou
    best_state = seg.snapshot()
    best_epoch, history, bad = 0, [], 0
    bar = tqdm(range(1, max_epochs + 1), desc=desc, disable=not progress, leave=False)
    for epoch in bar:
        loss = train_epoch()
        for _ in range(lr_steps_per_epoch):
            seg.step_lr()
        miou = seg.evaluate(val_split).miou
        history.append({"epoch": epoch, "loss": float(loss), "miou": float(miou)})
        if np.isfinite(miou) and miou > best:
            best, best_epoch, bad = miou, epoch, 0
            best_state = seg.snapshot()
        else:
            bad += 1
        bar.set_postfix(loss=f"{loss:.3f}", miou=f"{miou:.3f}", best=f"{best:.3f}")
        if bad > patience:
            break
    seg.restore(best_state)
    return {"best_miou": float(best), "best_epoch": best_epoch, "epochs": len(history), "history": history}


def _config_key(payload: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:12]


def start_network_path(dataset: str, kind: str, name: str, key: str, cache_dir: Path | None = None) -> Path:
    folder = cache_dir or user_cache_dir() / "start_networks"
    return folder / f"{dataset}-{kind}-{name.replace('+', '_')}-{key}.pt"


def union_split(dataset: SegmentationDataset, roles: tuple[str, ...]) -> SegmentationSplit:
    """One split of the images of several roles (in that order)."""
    if len(roles) == 1:
        return dataset.split(roles[0])
    splits = [dataset.split(r) for r in roles]
    return SegmentationSplit(
        splits[0].info,
        "+".join(roles),
        tuple(n for s in splits for n in s.image_names),
        np.concatenate([s.images for s in splits]),
        np.concatenate([s.labels for s in splits]),
    )


def pretrain_start_network(
    dataset: SegmentationDataset,
    kind: str = "fast",
    name: str = "source",
    *,
    device: str = "auto",
    seed: int = 0,
    model_kwargs: dict[str, Any] | None = None,
    max_epochs: int | None = None,
    patience: int | None = None,
    force: bool = False,
    progress: bool = True,
    evaluate_test: bool = True,
    cache_dir: Path | None = None,
) -> tuple[Segmenter, dict[str, Any]]:
    """Train (or load from the cache) a start network; returns the segmenter and its metadata.

    Metadata holds the D_R and test mIoU, the training history and the cache path. The cache key
    covers the dataset, model kind, model kwargs, pretraining settings, seed and the start network it
    continues, so changing any of them trains a new network instead of reusing a stale one.
    """
    if name not in START_NETWORKS:
        raise ConfigError(f"unknown start network {name!r}; choose one of {sorted(START_NETWORKS)}")
    spec = START_NETWORKS[name]
    defaults = PRETRAIN_DEFAULTS.get(kind, PRETRAIN_DEFAULTS["fast"])
    max_epochs = defaults["max_epochs"] if max_epochs is None else max_epochs
    patience = defaults["patience"] if patience is None else patience
    model_kwargs = dict(model_kwargs or {})
    parent_meta = None
    if spec.init_from is not None:
        _, parent_meta = pretrain_start_network(
            dataset, kind, spec.init_from, device=device, seed=seed, model_kwargs=model_kwargs,
            max_epochs=max_epochs, patience=patience, force=False, progress=progress,
            evaluate_test=evaluate_test, cache_dir=cache_dir,
        )  # fmt: skip
    seg = build_segmenter(kind, dataset.info, device=device, seed=seed, **model_kwargs)
    payload = {
        # The segmenter's full configuration (defaults included), so changing a default retrains.
        "model_config": seg.config(),
        "dataset": dataset.info.name, "kind": kind, "name": name, "roles": spec.train_roles,
        "model_kwargs": model_kwargs, "max_epochs": max_epochs, "patience": patience, "seed": seed,
        "parent": parent_meta["key"] if parent_meta else None, "version": 1,
    }  # fmt: skip
    key = _config_key(payload)
    path = start_network_path(dataset.info.name, kind, name, key, cache_dir)
    # One process trains a given network; others that need it meanwhile wait here, then load it.
    with file_lock(path):
        if path.exists() and not force:
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
            seg.load_model_state(ckpt["model_state"])
            seg.reset_optimizer()
            return seg, ckpt["meta"]
        if parent_meta is not None:
            parent = torch.load(parent_meta["path"], map_location="cpu", weights_only=False)
            seg.load_model_state(parent["model_state"])
            seg.reset_optimizer()
        train_split = union_split(dataset, spec.train_roles)
        val_split = dataset.split("d_r")
        t0 = time.perf_counter()
        with _one_torch_thread():  # the weights behind a key must not depend on the thread count
            result = train_until_plateau(
                seg, lambda: seg.fit_images(train_split), val_split, max_epochs, patience,
                progress=progress, desc=f"pretrain {kind}/{name}",
            )  # fmt: skip
        meta: dict[str, Any] = {
            "key": key, "path": str(path), "name": name, "kind": kind, "dataset": dataset.info.name,
            "description": spec.description, "train_images": len(train_split), "seed": seed,
            "d_r_miou": result["best_miou"], "best_epoch": result["best_epoch"], "epochs": result["epochs"],
            "history": result["history"], "train_seconds": time.perf_counter() - t0,
        }  # fmt: skip
        if evaluate_test:
            test = seg.evaluate(dataset.split("test"))
            meta["test_miou"] = test.miou
            meta["test_per_class_iou"] = test.to_dict(dataset.info.class_names)["per_class_iou"]
        atomic_write(path, lambda f: torch.save({"model_state": seg.model_state(), "meta": meta}, f))
    seg.reset_optimizer()
    return seg, meta


def load_start_network(
    dataset: SegmentationDataset, kind: str, name: str, *, device: str = "auto", seed: int = 0,
    model_kwargs: dict[str, Any] | None = None, **pretrain: Any,
) -> tuple[Segmenter, dict[str, Any], SegmentationSplit | None]:  # fmt: skip
    """The start network an episode begins from, by name or checkpoint path, with a fresh optimiser.

    ``name`` is one of ``START_NETWORKS`` (pretrained with ``pretrain_start_network`` the first time,
    then loaded from the cache; ``pretrain`` holds that function's ``max_epochs``, ``patience``,
    ``progress``), ``"scratch"`` (random weights from ``seed``) or the path of a ``.pt``
    file holding ``{"model_state": ...}`` (or the state itself). Returns the segmenter, its metadata
    and the labeled images it was trained on (``union_split`` of ``start_data_roles``; ``None`` for
    scratch and files, whose training data is unknown).
    """
    model_kwargs = dict(model_kwargs or {})
    if name in START_NETWORKS:
        seg, meta = pretrain_start_network(
            dataset, kind, name, device=device, seed=seed, model_kwargs=model_kwargs, **pretrain
        )
        start_data = union_split(dataset, start_data_roles(name))
    elif name == "scratch":
        seg = build_segmenter(kind, dataset.info, device=device, seed=seed, **model_kwargs)
        meta, start_data = {"name": "scratch"}, None
    else:
        path = Path(str(name)).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"start_network {name!r} is neither one of {sorted(START_NETWORKS) + ['scratch']} nor an existing "
                "checkpoint file"
            )
        seg = build_segmenter(kind, dataset.info, device=device, seed=seed, **model_kwargs)
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        seg.load_model_state(ckpt.get("model_state", ckpt))
        meta, start_data = {"name": str(path)}, None
    seg.reset_optimizer()  # every episode starts with a fresh optimiser and schedule
    return seg, meta, start_data
