"""Accuracy and speed of the fast model on real CamVid (the numbers quoted in fast.py's docs).

Prints: encoder time for all 701 images (cold, then cached), the time of one AL-step-sized
``fit_regions`` (24 anchors) + a full ``evaluate`` of D_R, and test mIoU of heads pretrained with
``train_until_plateau`` with the pretraining recipe of ``ralis-gym pretrain`` (model selection on D_R = val) on D_S (10 images), D_S then D_T (the
``source+dt`` start network), D_T (100) and all 367 train images, with the pretraining time of each.
``--al-sim 1e-4,3e-4,1e-3`` adds 20 random-acquisition AL steps on D_T from the D_S head per lr.

    RALIS_GYM_CACHE=/tmp/ralis-cache python benchmarks/fast_model_accuracy.py [--data-root DIR]
        [--stride 10] [--head conv|mlp] [--width 64] [--dilations 1,2,4] [--lr 3e-4] [--pretrain-lr 1e-2] [--class-weighting sqrt_median]
        [--hflip] [--offset-context 3] [--sets d_s,source+dt,d_t,train] [--max-epochs 300]
        [--patience 30] [--al-sim 3e-4,1e-3] [--threads 2] [--skip-cold]
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
import torch

from ralis_gym.data import load_dataset
from ralis_gym.segmentation import encoder as encoder_module
from ralis_gym.segmentation.encoder import EncoderConfig
from ralis_gym.segmentation.fast import MLP_HEAD, FastSegmenter, default_stride
from ralis_gym.segmentation.pretrain import PRETRAIN_DEFAULTS, train_until_plateau


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--stride", type=int, default=None)
    parser.add_argument(
        "--head", default="conv", choices=["conv", "mlp"], help="conv: the default head; mlp: pre-v2"
    )
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--dilations", default=None, help="context blocks, e.g. 1,2,4 (0 = a 1x1 block)")
    parser.add_argument("--lr", type=float, default=None, help="AL-step learning rate (fit_regions)")
    parser.add_argument("--pretrain-lr", type=float, default=None, help="fit_images learning rate")
    parser.add_argument(
        "--al-sim", default="", help="comma-separated AL lrs: 20 random-acquisition steps from the d_s head"
    )
    parser.add_argument("--class-weighting", default="sqrt_median")
    parser.add_argument("--hflip", action="store_true")
    parser.add_argument("--offset-context", type=int, default=None, help="encoder offset_context (cells)")
    parser.add_argument("--context-sizes", default=None, help="encoder box context sizes, e.g. 3,7,15")
    parser.add_argument("--train-dropout", action="store_true")
    parser.add_argument("--sets", default="d_s,source+dt,d_t,train")
    parser.add_argument("--max-epochs", type=int, default=PRETRAIN_DEFAULTS["fast"]["max_epochs"])
    parser.add_argument("--patience", type=int, default=PRETRAIN_DEFAULTS["fast"]["patience"])
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
        **(MLP_HEAD if args.head == "mlp" else {}),
        **({} if args.width is None else {"width": args.width}),
        **({} if args.dilations is None else {"dilations": tuple(int(d) for d in args.dilations.split(","))}),
        **({} if args.lr is None else {"lr": args.lr}),
        **({} if args.pretrain_lr is None else {"pretrain_lr": args.pretrain_lr}),
        class_weighting=args.class_weighting,
        hflip=args.hflip,
        train_dropout=args.train_dropout,
    )

    def make() -> FastSegmenter:
        return FastSegmenter(ds.info, device="cpu", seed=args.seed, **kw)

    probe = make()
    print(
        f"stride {probe.stride}, grid {probe.rows}x{probe.cols}, feature dim {probe.encoder.dim}, head {probe._architecture()}"
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
    d_t, d_r = splits["d_t"], splits["val"]
    times = []
    for _, ids, labeled in random_acquisition(seg, d_t, steps=20):
        t0 = time.perf_counter()
        seg.fit_regions(d_t, ids, labeled, epochs=1)
        miou = seg.evaluate(d_r).miou
        times.append(time.perf_counter() - t0)
    print(
        f"AL step (fit 24 anchors + evaluate D_R 101 images): median {np.median(times) * 1000:.0f} ms "
        f"(min {min(times) * 1000:.0f} ms) over {len(times)} steps, last D_R mIoU {miou:.4f}"
    )

    heads: dict[str, dict] = {}
    for name in [s for s in args.sets.split(",") if s]:
        seg = make()
        parent = None
        if name == "source+dt":  # the start network of evaluation episodes: D_S head fine-tuned on D_T
            parent = heads.get("d_s")
            if parent is None:
                raise SystemExit("--sets: put d_s before source+dt")
            seg.load_model_state(parent)
        train = splits["d_t" if name == "source+dt" else name]
        t0 = time.perf_counter()
        out = train_until_plateau(
            seg, lambda s=seg, t=train: s.fit_images(t), d_r, args.max_epochs, args.patience, progress=False
        )
        elapsed = time.perf_counter() - t0
        heads[name] = seg.model_state()
        test = seg.evaluate(splits["test"])
        ious = " ".join(f"{v * 100:.0f}" for v in test.iou)
        print(
            f"head on {name:9s} ({len(train)} img): test mIoU {test.miou * 100:.1f} "
            f"(pixel acc {test.pixel_accuracy * 100:.1f}), best val {out['best_miou'] * 100:.1f} at epoch "
            f"{out['best_epoch']} of {len(out['history'])}, {elapsed:.0f} s; test IoU per class: {ious}",
            flush=True,
        )

    if args.al_sim:
        if "d_s" not in heads:
            raise SystemExit("--al-sim needs d_s in --sets (the start network of the simulation)")
        for lr in (float(v) for v in args.al_sim.split(",")):
            seg = FastSegmenter.from_state(ds.info, heads["d_s"], device="cpu", seed=args.seed, lr=lr)
            trajectory = [seg.evaluate(d_r).miou]
            for _, ids, labeled in random_acquisition(seg, d_t, steps=20):
                seg.fit_regions(d_t, ids, labeled, epochs=1)
                seg.step_lr()
                seg.step_lr()
                trajectory.append(seg.evaluate(d_r).miou)
            print(f"AL sim lr {lr:g}: D_R mIoU per step " + " ".join(f"{m * 100:.1f}" for m in trajectory))


def random_acquisition(seg: FastSegmenter, pool, steps: int, k: int = 24, seed: int = 0):
    """Yield ``(step, new region ids, labeled mask)`` labeling ``k`` uniformly random regions per step."""
    rng = np.random.default_rng(seed)
    labeled = np.zeros((len(pool), seg.grid.rows, seg.grid.cols), dtype=bool)
    for step in range(steps):
        free = np.flatnonzero(~labeled.reshape(-1))
        flat = rng.choice(free, k, replace=False)
        labeled.reshape(-1)[flat] = True
        yield step, seg.grid.make_ids(*np.unravel_index(flat, labeled.shape)), labeled


if __name__ == "__main__":
    main()
