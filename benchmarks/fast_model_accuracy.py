"""Accuracy and speed of the fast model on real CamVid (the numbers quoted in fast.py's docs).

Prints: encoder time for all 701 images (cold, then cached), the time of one AL-step-sized
``fit_regions`` (24 anchors) + a full ``evaluate`` of D_R, and test mIoU of heads pretrained with
``fit_with_early_stopping`` (model selection on D_R = val) on D_S (10 images), D_T (100) and all 367
train images, with the pretraining time of each.

    RALIS_GYM_CACHE=/tmp/ralis-cache python benchmarks/fast_model_accuracy.py [--data-root DIR]
        [--stride 10] [--hidden 128] [--lr 0.01] [--class-weighting sqrt_median] [--hflip]
        [--sets d_s,d_t,train] [--max-epochs 60] [--patience 15] [--threads 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time

import numpy as np
import torch

from ralis_gym.data import load_dataset
from ralis_gym.segmentation import encoder as encoder_module
from ralis_gym.segmentation.encoder import EncoderConfig
from ralis_gym.segmentation.fast import (
    FastSegmenter,
    default_stride,
    fit_with_early_stopping,
    pretrain_schedule,
)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--stride", type=int, default=None)
    parser.add_argument("--hidden", type=int, default=None)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--class-weighting", default="sqrt_median")
    parser.add_argument("--hflip", action="store_true")
    parser.add_argument("--offset-context", type=int, default=None, help="encoder offset_context (cells)")
    parser.add_argument("--context-sizes", default=None, help="encoder box context sizes, e.g. 3,7,15")
    parser.add_argument("--train-dropout", action="store_true")
    parser.add_argument("--sets", default="d_s,d_t,train")
    parser.add_argument("--max-epochs", type=int, default=pretrain_schedule()["max_epochs"])
    parser.add_argument("--patience", type=int, default=pretrain_schedule()["patience"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-cold", action="store_true", help="do not time a cold encoding of all splits")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    ds = load_dataset("camvid", args.data_root)
    splits = {name: ds.split(name) for name in ("train", "val", "test", "d_s", "d_t")}
    enc = EncoderConfig(stride=args.stride or default_stride(ds.info.region_size))
    if args.offset_context is not None:
        enc = dataclasses.replace(enc, offset_context=args.offset_context)
    if args.context_sizes is not None:
        enc = dataclasses.replace(
            enc, context_sizes=tuple(int(k) for k in args.context_sizes.split(",") if k)
        )
    kw = dict(
        encoder=enc,
        **({} if args.hidden is None else {"hidden": args.hidden}),
        lr=args.lr,
        class_weighting=args.class_weighting,
        hflip=args.hflip,
        train_dropout=args.train_dropout,
    )

    def make() -> FastSegmenter:
        return FastSegmenter(ds.info, device="cpu", seed=args.seed, **kw)

    probe = make()
    print(
        f"stride {probe.stride}, grid {probe.rows}x{probe.cols}, feature dim {probe.encoder.dim}, hidden {probe.hidden}"
    )

    if not args.skip_cold:
        # Cold encoding of the 701 physical images, without touching the on-disk cache.
        cold = FastSegmenter(ds.info, device="cpu", seed=args.seed, disk_cache=False, **kw)
        encoder_module.clear_feature_cache()
        t0 = time.perf_counter()
        for name in ("train", "val", "test"):
            cold.features(splits[name])
        print(f"encoder, 701 images cold: {time.perf_counter() - t0:.1f} s")
        encoder_module.clear_feature_cache()
    t0 = time.perf_counter()
    for name in ("train", "val", "test", "d_s", "d_t"):
        probe.features(splits[name])
        probe.targets(splits[name])
    print(f"features of all splits via the cache (disk or encode): {time.perf_counter() - t0:.1f} s")

    # An AL step: fit on 24 newly labeled regions of D_T, then evaluate the reward set D_R (val).
    seg = make()
    seg.fit_images(splits["d_s"], epochs=1)
    rng = np.random.default_rng(0)
    d_t, d_r = splits["d_t"], splits["val"]
    labeled = np.zeros((len(d_t), seg.grid.rows, seg.grid.cols), dtype=bool)
    times = []
    for _ in range(10):
        free = np.flatnonzero(~labeled.reshape(-1))
        anchors = rng.choice(free, 24, replace=False)
        labeled.reshape(-1)[anchors] = True
        t0 = time.perf_counter()
        seg.fit_regions(d_t, anchors, labeled, epochs=1)
        miou = seg.evaluate(d_r).miou
        times.append(time.perf_counter() - t0)
    print(
        f"AL step (fit 24 anchors + evaluate D_R 101 images): median {np.median(times) * 1000:.0f} ms "
        f"(min {min(times) * 1000:.0f} ms), last D_R mIoU {miou:.4f}"
    )

    with tempfile.TemporaryDirectory():
        for name in [s for s in args.sets.split(",") if s]:
            seg = make()
            t0 = time.perf_counter()
            out = fit_with_early_stopping(
                seg, splits[name], splits["val"], max_epochs=args.max_epochs, patience=args.patience
            )
            elapsed = time.perf_counter() - t0
            test = seg.evaluate(splits["test"])
            ious = " ".join(f"{v * 100:.0f}" for v in test.iou)
            print(
                f"head on {name:5s} ({len(splits[name])} img): test mIoU {test.miou * 100:.1f} "
                f"(pixel acc {test.pixel_accuracy * 100:.1f}), best val {out['best_miou'] * 100:.1f} at epoch "
                f"{out['best_epoch']} of {len(out['history'])}, {elapsed:.0f} s; test IoU per class: {ious}"
            )


if __name__ == "__main__":
    main()
