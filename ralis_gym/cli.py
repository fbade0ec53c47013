"""``ralis-gym`` command line: download data, pretrain start networks, run active learning."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from ralis_gym.errors import RalisGymError
from ralis_gym.methods import METHODS

#: set to 1 to see the traceback of a user error too (``main`` prints one line by default)
TRACEBACK_ENV = "RALIS_GYM_TRACEBACK"

MAIN_JOB_HELP = """\
The main job, end to end on CamVid: find the data (download it if absent), pretrain the start
network if it is not cached, run active learning with each strategy to the budget, train on the
acquired regions until D_R mIoU stops improving, then print test mIoU and save a plot and JSON."""


class OneLineParser(argparse.ArgumentParser):
    """``argparse`` whose errors are one line, like every other user error of ``main``: the usage
    block is left out and the line points to ``--help`` instead."""

    def error(self, message: str):
        self.exit(2, f"ralis-gym: error: {message} (see `{self.prog} --help`)\n")


def positive_int(text: str) -> int:
    """An ``argparse`` type: an integer > 0 (refused at parse time, before any data is read)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data-root",
        default=None,
        help="folder holding camvid/ (default: $RALIS_GYM_DATA or the user cache)",
    )
    p.add_argument(
        "--dataset", default="camvid", help="camvid, cityscapes or a custom dataset YAML (default: camvid)"
    )
    p.add_argument(
        "--model", default="fast", choices=["fast", "paper"], help="segmentation model (default: fast)"
    )
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1 ...")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")


def _open_dataset(args: argparse.Namespace, download: bool = False):
    from ralis_gym.data import load_dataset
    from ralis_gym.errors import DatasetError

    try:
        return load_dataset(args.dataset, args.data_root)
    except DatasetError as err:
        if not (download and args.dataset == "camvid"):
            raise
        print(f"{err}\n-> downloading CamVid", file=sys.stderr)
        from ralis_gym.data.download import download_camvid

        download_camvid(args.data_root)
        return load_dataset(args.dataset, args.data_root)


def cmd_info(args: argparse.Namespace) -> int:
    import numpy as np

    ds = _open_dataset(args)
    print(f"{ds.info.name}: {ds.root}")
    print(f"classes ({ds.info.num_classes}, ignore {ds.info.ignore_index}): {', '.join(ds.info.class_names)}")
    print(
        f"image {ds.info.image_size[0]}x{ds.info.image_size[1]}, region {ds.info.region_size[0]}x{ds.info.region_size[1]}"
    )
    for role in ("d_t", "d_v", "d_s", "d_r", "test"):
        split = ds.split(role)
        counts = split.class_pixel_counts()
        frac = counts[:-1] / max(counts.sum(), 1)
        rare = ", ".join(f"{ds.info.class_names[i]} {100 * frac[i]:.2f}%" for i in np.argsort(frac)[:3])
        print(f"  {role:5s} {len(split):4d} images   rarest: {rare}")
    if args.verify:
        n = ds.verify_checksums()
        print(f"checksums: {n} files OK")
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from ralis_gym.segmentation.pretrain import pretrain_start_network

    ds = _open_dataset(args, download=not args.no_download)
    rows = []
    for name in args.start:
        t0 = time.perf_counter()
        _, meta = pretrain_start_network(
            ds, args.model, name, device=args.device, seed=args.seed, force=args.force,
            max_epochs=args.max_epochs, patience=args.patience,
        )  # fmt: skip
        rows.append((name, meta, time.perf_counter() - t0))
    print(f"{'start network':12s} {'images':>6s} {'D_R mIoU':>9s} {'test mIoU':>9s} {'time':>8s}  cache")
    for name, meta, secs in rows:
        test = meta.get("test_miou", float("nan"))
        print(
            f"{name:12s} {meta['train_images']:6d} {100 * meta['d_r_miou']:8.2f}% {100 * test:8.2f}% {secs:7.1f}s  {meta['path']}"
        )
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """The main job: the registered environment in test mode, driven by each baseline agent."""
    import gymnasium as gym
    import numpy as np
    import torch

    import ralis_gym  # noqa: F401  (registers the environments)
    from agents.heuristics import make_heuristic_agent
    from ralis_gym.envs.region_al import run_agent

    # Float sums run in another order with another thread count, and training amplifies the last
    # bits: one thread (the default) gives the README's numbers on any machine.
    torch.set_num_threads(args.threads)
    _open_dataset(args, download=not args.no_download)  # clear errors (or the download) before the env
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env_id = "RegionAL-CamVid-Fast-v0" if args.model == "fast" else "RegionAL-CamVid-v0"
    kwargs = {
        "mode": "test", "dataset": args.dataset, "data_root": args.data_root, "device": args.device,
        "budget": args.budget, "num_pools": args.num_pools, "regions_per_pool": args.pool_size,
        "progress": True, "pretrain": {"max_epochs": None, "patience": None, "seed": args.seed},
    }  # fmt: skip
    if args.config:
        from ralis_gym.config import load_yaml

        kwargs.update(load_yaml(args.config))
    env = gym.make(env_id, **kwargs)
    base = env.unwrapped
    meta = base.start_meta
    print(
        f"start network {meta.get('name')}: D_R mIoU {100 * meta.get('d_r_miou', float('nan')):.2f}%, "
        f"test mIoU {100 * meta.get('test_miou', float('nan')):.2f}%"
    )
    results = {}
    for strategy in args.strategies:
        agent = make_heuristic_agent(strategy, env, seed=args.seed)
        steps, info = run_agent(env, agent, seed=args.seed, desc=f"active learning ({strategy})")
        final = base.evaluate()
        results[strategy] = {
            "steps": steps,
            "final": {
                "labeled": final["labeled_regions"], "d_r_miou": final["d_r_miou"], "test_miou": final["test_miou"],
                "epochs": final["epochs"], "class_pixels": info["labeled_class_pixels"].tolist(),
                "per_class_iou": dict(zip(base.info_.class_names, np.nan_to_num(final["per_class_iou"]).tolist())),
            },
        }  # fmt: skip
    env.close()
    start = {k: v for k, v in meta.items() if k not in ("history", "test_per_class_iou")}
    (out / "results.json").write_text(json.dumps({"start": start, "results": results}, indent=2, default=str))
    _plot_run(results, out / "miou_vs_budget.png", base.info_.name, meta)
    print(f"\n{'strategy':13s} {'regions':>7s} {'D_R mIoU (AL)':>13s} {'test mIoU (final)':>17s}")
    for strategy, r in results.items():
        print(
            f"{strategy:13s} {r['final']['labeled']:7d} {100 * r['steps'][-1]['miou']:12.2f}% {100 * r['final']['test_miou']:16.2f}%"
        )
    print(f"\nwrote {out / 'results.json'} and {out / 'miou_vs_budget.png'}")
    return 0


def _plot_run(results: dict, path: Path, dataset: str, start: dict) -> None:
    """Left: D_R mIoU after every acquisition step; right: test mIoU of the start network and after
    each strategy's final training (what the labels bought)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4), dpi=120, gridspec_kw={"width_ratios": [3, 2]})
    for strategy, r in results.items():
        ax.plot(
            [s["labeled"] for s in r["steps"]],
            [100 * s["miou"] for s in r["steps"]],
            marker=".",
            label=strategy,
        )
    ax.set_xlabel("labeled regions")
    ax.set_ylabel("D_R mIoU (%)")
    ax.set_title(
        f"{dataset}: reward-set mIoU after each step\n(start: {start.get('name')}, pool D_V)", fontsize=9
    )
    ax.grid(alpha=0.3)
    ax.legend()
    names, test = list(results), [100 * r["final"]["test_miou"] for r in results.values()]
    colors = [f"C{i}" for i in range(len(results))]
    if "test_miou" in start:  # a named start network carries its test mIoU (a scratch one does not)
        names, test, colors = ["start", *names], [100 * start["test_miou"], *test], ["0.6", *colors]
    bars = bx.bar(names, test, color=colors)
    bx.bar_label(bars, fmt="%.1f", fontsize=8)
    budget = max(r["final"]["labeled"] for r in results.values())
    bx.set_ylabel("test mIoU (%)")
    bx.set_title(
        f"test mIoU: start network vs after the final\ntraining on {budget} regions (oracle reads labels)",
        fontsize=9,
    )
    bx.set_ylim(max(0.0, min(test) - 5), max(test) + 3)
    bx.tick_params(axis="x", labelrotation=20)
    bx.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="ralis-gym",
        description="Region-based active learning for semantic segmentation (RALIS, ICLR 2020).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    try:
        from ralis_gym.data.download import add_download_subcommand

        add_download_subcommand(sub)
    except ImportError:  # pragma: no cover - download module missing in a partial install
        pass

    p = sub.add_parser("info", help="check a dataset and print its splits and class balance")
    _add_common(p)
    p.add_argument("--verify", action="store_true", help="also verify the SHA-256 manifest")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser(
        "pretrain", help="train and cache the start networks, print their D_R/test mIoU",
        description="Train the start networks (GTA substitutes, see README) and cache them by (dataset, model, config).",
    )  # fmt: skip
    _add_common(p)
    p.add_argument("--start", nargs="+", default=["source", "source+dt"],
                   choices=["source", "source+dt", "upperbound"], help="which start networks (default: source source+dt)")  # fmt: skip
    p.add_argument("--max-epochs", type=int, default=None, help="override the model's default")
    p.add_argument("--patience", type=int, default=None, help="early-stopping patience on D_R mIoU")
    p.add_argument("--force", action="store_true", help="retrain even if cached")
    p.add_argument("--no-download", action="store_true", help="fail instead of downloading missing data")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("run", help="the main job: pretrain if needed, active learning, final training, plot",
                       description=MAIN_JOB_HELP)  # fmt: skip
    _add_common(p)
    p.add_argument("--strategies", nargs="+", default=["random", "entropy", "oracle"], choices=list(METHODS),
                   help="baseline agents to run (default: random entropy oracle; oracle reads the labels)")  # fmt: skip
    p.add_argument("--budget", type=positive_int, default=480, help="regions to label (default: 480)")
    p.add_argument(
        "--num-pools",
        type=positive_int,
        default=None,
        help="K, regions labeled per step (default: the dataset protocol's test value, CamVid 24)",
    )
    p.add_argument(
        "--pool-size",
        type=positive_int,
        default=None,
        help="N, candidates per pool (default: the dataset protocol's test value, CamVid 10)",
    )
    p.add_argument("--out", default="outputs/run", help="output folder (default: outputs/run)")
    p.add_argument("--config", default=None,
                   help="YAML of environment settings (RegionALEnv.default_config() keys) over these")  # fmt: skip
    p.add_argument("--threads", type=positive_int, default=1,
                   help="torch threads (default 1: the same numbers on every machine; more is faster, other numbers)")  # fmt: skip
    p.add_argument("--no-download", action="store_true", help="fail instead of downloading missing data")
    p.set_defaults(func=cmd_run)
    add_label_subcommand(sub)
    return parser


LABEL_HELP = """\
The labeling loop on your own images: `init` a project, `suggest` the regions to annotate next,
annotate them in Label Studio or CVAT (the round folder holds their import files), `import` the
results, `train`, and repeat; `status` shows the rounds, the class balance and the validation curve."""


def add_label_subcommand(sub: Any) -> None:
    from ralis_gym.labeling.project import STRATEGIES

    p = sub.add_parser("label", help="the labeling loop for annotation teams", description=LABEL_HELP)
    lsub = p.add_subparsers(dest="label_command", required=True, metavar="STEP")
    q = lsub.add_parser("init", help="create a labeling project over a folder of images")
    q.add_argument("project", help="the project folder to create")
    q.add_argument("--images", required=True, help="folder of the images to label")
    q.add_argument("--config", required=True,
                   help="dataset YAML: class_names, region_size, optional ignore_index, image_size, palette")  # fmt: skip
    q.add_argument(
        "--start", default=None, help="fast-model checkpoint to suggest with before the first train"
    )
    q = lsub.add_parser("suggest", help="request the next regions to annotate and write the round's files")
    q.add_argument("project")
    q.add_argument("--budget", type=int, required=True, help="regions to request")
    q.add_argument("--strategy", default="entropy", choices=list(STRATEGIES), help="default: entropy")
    q.add_argument("--policy", default=None, help="RalisDQN .zip for --strategy ralis")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--image-url", default=None,
                   help="URL prefix of the images in the Label Studio tasks (default: local files)")  # fmt: skip
    q = lsub.add_parser("import", help="record annotations (Label Studio JSON, CVAT XML, PNG masks)")
    q.add_argument("project")
    q.add_argument("--from", dest="source", required=True, help="export file or folder of PNG masks")
    q.add_argument(
        "--format", default=None, choices=["label-studio", "cvat", "png"], help="default: from the path"
    )
    q.add_argument("--validation", action="store_true", help="whole images held out for validation")
    q.add_argument("--annotator", default=None, help="who labeled them (recorded)")
    q = lsub.add_parser("train", help="fine-tune the model on every labeled region")
    q.add_argument("project")
    q.add_argument("--max-epochs", type=int, default=60)
    q.add_argument("--patience", type=int, default=8)
    q.add_argument("--seed", type=int, default=0)
    q = lsub.add_parser("status", help="rounds, labeled fraction, class balance, validation curve")
    q.add_argument("project")
    p.set_defaults(func=cmd_label)


def cmd_label(args: argparse.Namespace) -> int:
    from ralis_gym.labeling import LabelingProject

    step = args.label_command
    if step == "init":
        with LabelingProject.init(args.project, args.images, args.config, start=args.start) as proj:
            n = len(proj.image_names())
            print(f"project {proj.folder}: {n} images, {n * proj.grid.per_image} regions of "
                  f"{proj.info.region_size[0]}x{proj.info.region_size[1]}, classes {', '.join(proj.info.class_names)}")  # fmt: skip
        return 0
    with LabelingProject(args.project) as proj:
        if step == "suggest":
            out = proj.suggest(
                args.budget, args.strategy, policy=args.policy, seed=args.seed, image_url=args.image_url
            )
            print(f"round {out['round']}: {out['regions']} regions ({out['strategy']}) -> {out['folder']}")
        elif step == "import":
            out = proj.import_annotations(
                args.source, args.format, validation=args.validation, annotator=args.annotator
            )
            print(f"import {out['import']} ({out['format']}): {out['regions']} regions labeled; "
                  f"{out['requested_regions_left_empty']} requested regions came back empty, "
                  f"{out['pixels_outside_requests']} pixels outside requested regions dropped")  # fmt: skip
        elif step == "train":
            out = proj.train(args.max_epochs, args.patience, seed=args.seed, progress=True)
            val = (
                "no validation images"
                if out["val_miou"] is None
                else f"validation mIoU {100 * out['val_miou']:.2f}%"
            )
            print(
                f"model {out['model']}: {out['labeled_regions']} labeled regions, {out['epochs']} epochs, {val}"
            )
        else:
            st = proj.status()
            print(f"{st['project']}: {st['labeled_regions']}/{st['pool_regions']} pool regions labeled "
                  f"({100 * st['labeled_fraction']:.1f}%), {st['validation_images']} validation images")  # fmt: skip
            for r in st["rounds"]:
                print(
                    f"  round {r['round']} ({r['strategy']}, {r['created_at']}): {r['labeled']}/{r['requested']} labeled"
                )
            for m in st["models"]:
                val = "" if m["val_miou"] is None else f", validation mIoU {100 * m['val_miou']:.2f}%"
                print(f"  model {m['model']}: {m['labeled_regions']} regions{val}")
            total = max(sum(st["class_pixels"].values()), 1)
            print(
                "  labels: " + ", ".join(f"{c} {100 * n / total:.1f}%" for c, n in st["class_pixels"].items())
            )
            print(f"  plot: {st['plot']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run one ``ralis-gym`` command; returns its exit status.

    A user error ends in ONE line on stderr, ``ralis-gym: error: <what, and how to fix it>``, and
    exit status 2, never a traceback. User errors are: bad arguments (argparse, raised as
    ``SystemExit(2)``); ``RalisGymError`` (``ConfigError``: a wrong value in the arguments or the
    config; ``DatasetError``: data missing, incomplete or corrupt, naming the file;
    ``DownloadError``); and ``OSError`` (a file or folder the user named cannot be read or written:
    missing, no permission, disk full). Any other exception is a bug and keeps its traceback.
    ``RALIS_GYM_TRACEBACK=1`` shows the traceback of user errors as well (for a bug report).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (RalisGymError, OSError) as err:
        if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
            raise
        print(f"ralis-gym: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _one_line(err: BaseException) -> str:
    """The error's message on one line (a multi-line message, e.g. a YAML parser's, is joined)."""
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    return text or type(err).__name__


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
