"""Compare RALIS with the heuristic baselines on the paper's CamVid test protocol.

    python benchmarks/compare_methods.py --policy runs/ralis_camvid_fast/ralis_final.zip
    python benchmarks/compare_methods.py --quick                      # 1 seed, 2 budgets, minutes
    python benchmarks/compare_methods.py --report-only                # tables + plots from the CSV
    python benchmarks/compare_methods.py --model paper --device cuda  # the paper's FPN, on a GPU
    python benchmarks/compare_methods.py --ray                        # one Ray task per (method, seed)
    python benchmarks/compare_methods.py --ray-address auto --model paper --gpus-per-run 0.5

Protocol: pool D_V, K = 24 pools of N = 10 candidates per step, start network ``source`` (the env's
test-mode default; see ``ralis_gym.envs.region_al.MODE_START`` for why it is not the reference's
``source+dt``), budgets 480 ... 1920 regions, 5 seeds. One run per (method, seed) walks through all budgets; at each budget it
branches the final training (train on every acquired region until D_R mIoU stops improving, keep
the best D_R weights, evaluate on the test split) and then goes on from the unchanged run.

The final training is the environment's (``RegionALEnv.evaluate``: the acquired regions plus the
start network's labeled images D_S, early stopping on D_R with the model's
``FINAL_TRAINING_DEFAULTS``); ``--final-patience`` / ``--final-max-epochs`` override it (0 = the
default). The oracles (``oracle``: first-order decrease of the test-set loss from the candidate's
and the test images' true labels, see the env's ``oracle_set``; ``oracle_loss``: the candidate's
current loss; references that read labels) run like heuristics.

Every finished (method, seed, budget) cell is appended at once to the results CSV; a killed run
started again skips the finished cells (it replays the acquisition, which is deterministic for a
seed, and only trains where a cell is missing). The report (Markdown + CSV tables, PNG plots) is
written next to the CSV from whatever cells exist.

With ``--ray`` every missing (method, seed) run is a Ray task (``run_ray``): a local Ray with this
machine's CPUs, or the cluster at ``--ray-address``; the driver alone writes the CSV as cells stream
back, retries a run whose worker raised or died for its missing cells (``--max-retries``), and gives
the same cells as the serial run.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
from tqdm.auto import tqdm

import ralis_gym  # noqa: F401  (registers the environments)
from agents import RalisDQN
from agents.heuristics import BASELINE_AGENTS, make_heuristic_agent
from ralis_gym.config import load_yaml, parse_dataclass_args
from ralis_gym.data.camvid import CAMVID_RARE_CLASSES
from ralis_gym.methods import HEURISTICS
from ralis_gym.stats import sample_std, welch_t

RESULTS = Path(__file__).resolve().parent / "results"
PAPER_BUDGETS = "480,720,960,1200,1440,1920"


@dataclass
class Args:
    methods: str = ",".join((*HEURISTICS, "oracle", "ralis"))
    seeds: str = "0,1,2,3,4"
    budgets: str = PAPER_BUDGETS
    policy: str = "runs/ralis_camvid_fast/ralis_final.zip"  # RalisDQN .zip for "ralis" (or "ralis-<tag>")
    model: str = "fast"  # "fast" (CPU) or "paper" (FPN-ResNet-50, for a GPU)
    device: str = "auto"
    data_root: str | None = None
    config: str | None = None  # YAML of env keyword arguments over the protocol (e.g. a tiny test config)
    results: str | None = None  # default benchmarks/results/camvid-<model>.csv
    final_max_epochs: int = 0  # 0: the model's FINAL_TRAINING_DEFAULTS (the paper: 1000)
    final_patience: int = 0  # 0: the model's FINAL_TRAINING_DEFAULTS (the paper: 150 on CamVid)
    mc_passes: int = 20  # BALD
    threads: int = 1
    quick: bool = False  # 1 seed, budgets 48 and 96, tiny final training: a smoke test
    report_only: bool = False
    ray: bool = False  # each missing (method, seed) run as a Ray task (a local Ray with this machine's CPUs)
    ray_address: str | None = (
        None  # join this Ray cluster instead (e.g. auto, or ray://head:10001); implies --ray
    )
    ray_cpus: int = 0  # CPUs of the local Ray (0: all of this machine's)
    cpus_per_run: float = 1.0  # Ray resources of one run
    gpus_per_run: float = 0.0  # e.g. 0.5 for two paper-model runs per GPU (--model paper)
    max_retries: int = 2  # a run whose worker raised or died is started again this often (missing cells only)


def parse_args(argv: list[str] | None = None) -> Args:
    args = parse_dataclass_args(Args, __doc__, argv)
    args.ray = args.ray or bool(args.ray_address)
    if args.cpus_per_run <= 0 or args.gpus_per_run < 0 or args.max_retries < 0 or args.ray_cpus < 0:
        raise SystemExit("--cpus-per-run must be > 0, --gpus-per-run, --max-retries and --ray-cpus >= 0")
    if args.quick:  # preset values, unless given explicitly
        preset = {
            "seeds": "0",
            "budgets": "48,96",
            "final_max_epochs": 20,
            "final_patience": 3,
            "mc_passes": 4,
        }
        for key, value in preset.items():
            if getattr(args, key) == getattr(Args, key):
                setattr(args, key, value)
    return args


# --- results file ------------------------------------------------------------------------------
def columns(class_names: list[str]) -> list[str]:
    return [
        "method", "seed", "budget", "labeled", "test_miou", "d_r_miou", "pixel_accuracy", "final_epochs",
        *[f"iou_{c}" for c in class_names], *[f"pixels_{c}" for c in class_names], "pixels_void",
        "seconds_acquisition", "seconds_final", "model", "policy", "machine", "date",
    ]  # fmt: skip


def read_rows(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def append_row(path: Path, header: list[str], row: dict) -> None:
    """One line per finished cell, flushed and fsynced: a kill loses at most the cell in progress."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        with open(path, newline="") as f:
            existing = next(csv.reader(f))
        if existing != header:
            raise SystemExit(f"{path} has other columns than this run writes; use another --results file")
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        if new:
            writer.writeheader()
        writer.writerow(row)
        f.flush()
        os.fsync(f.fileno())


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {torch.get_num_threads()} torch thread(s), {gpu}"


def is_policy(method: str) -> bool:
    """``ralis`` or ``ralis-<tag>``: a trained RalisDQN (``--policy``); the tag keeps variants apart."""
    return method == "ralis" or method.startswith("ralis-")


# --- one (method, seed) pass -------------------------------------------------------------------
def make_agent(method: str, env: gym.Env, seed: int, args: Args):
    """The agent of a method that ``check_methods`` accepted."""
    if is_policy(method):
        return RalisDQN.load(args.policy, device="cpu")
    return make_heuristic_agent(
        method, env, seed=seed, **({"mc_passes": args.mc_passes} if method == "bald" else {})
    )


def check_methods(methods: list[str], args: Args) -> None:
    """Refuse unknown methods and missing policies before any run starts (one line, exit 2)."""
    for method in methods:
        if is_policy(method):
            if not Path(args.policy).is_file():
                raise SystemExit(
                    f"method {method!r} needs a trained policy: {args.policy} does not exist "
                    "(train one with examples/train_ralis.py, pass it with --policy)"
                )
        elif method not in BASELINE_AGENTS:
            raise SystemExit(
                f"unknown method {method!r}; choose ralis, ralis-<tag> or one of {sorted(BASELINE_AGENTS)}"
            )


def iter_method_seed(
    env: gym.Env, method: str, seed: int, budgets: list[int], missing: set[int], args: Args,
    progress: bool = True,
) -> Iterator[dict]:  # fmt: skip
    """One (method, seed) pass: acquire up to the largest missing budget and yield the row of each
    missing budget as soon as its final training is done (the caller writes it)."""
    base = env.unwrapped
    names = list(base.info_.class_names)
    agent = make_agent(method, env, seed, args)
    obs, info = env.reset(seed=seed)
    t_acq, done = time.perf_counter(), False
    pending = sorted(missing)
    bar = tqdm(
        total=max(pending), desc=f"{method} seed {seed}", unit="region", leave=False, disable=not progress
    )
    with bar:
        while pending and not done:
            action, _ = agent.predict(obs, deterministic=True)
            obs, _, term, trunc, info = env.step(np.asarray(action).reshape(-1))
            done = term or trunc
            bar.update(min(info["labeled_regions"], bar.total) - bar.n)
            reached = [b for b in budgets if b <= info["labeled_regions"]]
            if not reached or reached[-1] not in pending:
                continue
            budget = reached[-1]
            seconds_acq = time.perf_counter() - t_acq
            t0 = time.perf_counter()
            final = base.evaluate(
                max_epochs=args.final_max_epochs or None,
                patience=args.final_patience or None,
                restore=True,
                progress=False,
            )
            pixels = info["labeled_class_pixels"]
            yield {
                "method": method, "seed": seed, "budget": budget, "labeled": info["labeled_regions"],
                "test_miou": f"{final['test_miou']:.6f}", "d_r_miou": f"{final['d_r_miou']:.6f}",
                "pixel_accuracy": f"{final['pixel_accuracy']:.6f}", "final_epochs": final["epochs"],
                **{f"iou_{c}": ("" if np.isnan(v) else f"{v:.6f}") for c, v in zip(names, final["per_class_iou"])},
                **{f"pixels_{c}": int(v) for c, v in zip(names, pixels[:-1])}, "pixels_void": int(pixels[-1]),
                "seconds_acquisition": f"{seconds_acq:.1f}", "seconds_final": f"{time.perf_counter() - t0:.1f}",
                "model": args.model, "policy": args.policy if is_policy(method) else "", "machine": machine(),
                "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"),
            }  # fmt: skip
            pending.remove(budget)
            t_acq = time.perf_counter()
    if pending:
        raise RuntimeError(f"{method} seed {seed}: the pool ran out before budgets {pending}")


def cell_line(row: dict) -> str:
    return (
        f"{row['method']:13s} seed {row['seed']} budget {int(row['budget']):5d}: "
        f"test mIoU {100 * float(row['test_miou']):.2f}%"
    )


def run_serial(
    env: gym.Env, todo: list[tuple[str, int]], budgets: list[int], done: set, args: Args,
    save: Callable[[dict], None],
) -> list[str]:  # fmt: skip
    """Every (method, seed) run in this process, one after the other, on one environment."""
    for method, seed in todo:
        missing = {b for b in budgets if (method, seed, b) not in done}
        for row in iter_method_seed(env, method, seed, budgets, missing, args):
            save(row)
    return []


def _ray_run(env_id: str, env_kwargs: dict, method: str, seed: int, budgets: list[int], missing: set[int],
             args: Args) -> Iterator[dict]:  # fmt: skip
    """A Ray generator task: a fresh environment in the worker, one (method, seed) pass, each
    finished cell streamed back to the driver (which alone writes the CSV)."""
    torch.set_num_threads(args.threads)
    env = gym.make(env_id, **env_kwargs)
    try:
        yield from iter_method_seed(env, method, seed, budgets, missing, args, progress=False)
    finally:
        env.close()


def import_ray():
    """The ``ray`` module, or one line saying how to install it."""
    try:
        import ray
    except ImportError:
        raise SystemExit('--ray needs Ray: pip install "ralis-gym[ray]" (or pip install ray)') from None
    return ray


def run_ray(
    env_id: str, env_kwargs: dict, todo: list[tuple[str, int]], budgets: list[int], done: set, args: Args,
    save: Callable[[dict], None],
) -> list[str]:  # fmt: skip
    """Every (method, seed) run as a Ray task with ``--cpus-per-run`` / ``--gpus-per-run``.

    Cells stream back as they finish (Ray generator tasks) and are saved by this driver at once, so a
    killed driver or worker loses only cells in progress. A run whose worker raises or dies is
    reported with its (method, seed) and submitted again, up to ``--max-retries`` times, for the
    budgets still missing; the other runs go on. Returns the runs that failed for good.
    """
    ray = import_ray()
    here = str(Path(__file__).resolve().parent)
    runtime_env = {"env_vars": {
        "OMP_NUM_THREADS": str(args.threads),
        "PYTHONPATH": os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH", "")) if p),
    }}  # fmt: skip
    if args.ray_address:
        ray.init(address=args.ray_address, runtime_env=runtime_env)
    else:
        ray.init(num_cpus=args.ray_cpus or os.cpu_count(), include_dashboard=False, runtime_env=runtime_env)
    task = ray.remote(_ray_run).options(
        num_cpus=args.cpus_per_run,
        num_gpus=args.gpus_per_run,
        max_retries=0,  # retried here, per cell
    )
    if args.gpus_per_run > 0:
        env_kwargs = {**env_kwargs, "device": "cuda"}  # Ray sets CUDA_VISIBLE_DEVICES per task
    live: dict = {}  # generator -> (method, seed, attempt)

    def submit(method: str, seed: int, attempt: int) -> None:
        missing = {b for b in budgets if (method, seed, b) not in done}
        live[task.remote(env_id, env_kwargs, method, seed, budgets, missing, args)] = (method, seed, attempt)

    for method, seed in todo:
        submit(method, seed, 0)
    failed: list[str] = []
    try:
        while live:
            ready, _ = ray.wait(list(live), num_returns=1, timeout=1.0)  # a timeout lets Ctrl-C through
            if not ready:
                continue
            gen = ready[0]
            method, seed, attempt = live[gen]
            try:
                row = ray.get(next(gen))
            except StopIteration:
                del live[gen]
                continue
            except ray.exceptions.RayError as err:
                del live[gen]
                cause = getattr(err, "cause", None) or err
                reason = f"{type(cause).__name__}: {str(cause).strip().splitlines()[-1] if str(cause).strip() else ''}"
                if attempt < args.max_retries:
                    tqdm.write(
                        f"{method} seed {seed}: run failed ({reason}); retry {attempt + 1}/{args.max_retries}"
                    )
                    submit(method, seed, attempt + 1)
                else:
                    tqdm.write(
                        f"{method} seed {seed}: run failed for good after {attempt + 1} attempt(s) ({reason})"
                    )
                    failed.append(f"{method} seed {seed}")
                continue
            save(row)
    finally:
        ray.shutdown()
    return failed


# --- report ------------------------------------------------------------------------------------
def report(path: Path, class_names: list[str], pool_pixels: np.ndarray | None) -> str:
    """Tables (CSV + Markdown) and plots from the results file; returns the Markdown."""
    rows = read_rows(path)
    if not rows:
        return f"no results in {path} yet\n"
    stem = path.with_suffix("")
    methods = list(dict.fromkeys(r["method"] for r in rows))
    budgets = sorted({int(r["budget"]) for r in rows})

    def cells(method: str, budget: int, key: str = "test_miou") -> np.ndarray:
        vals = [r[key] for r in rows if r["method"] == method and int(r["budget"]) == budget]
        return np.array([float(v) if v != "" else np.nan for v in vals])

    lines = [f"### Test mIoU (%) vs budget, mean ± std over seeds ({path.name})", ""]
    lines += ["| method | " + " | ".join(str(b) for b in budgets) + " |", "|---" * (len(budgets) + 1) + "|"]
    table = []
    for m in methods:
        out = []
        for b in budgets:
            v = 100 * cells(m, b)
            out.append(f"{v.mean():.2f} ± {sample_std(v):.2f} (n={v.size})" if v.size else "")
            table.append({"method": m, "budget": b, "mean": v.mean() if v.size else "", "std": sample_std(v) if v.size > 1 else "", "n": v.size})  # fmt: skip
        lines.append(f"| {m} | " + " | ".join(out) + " |")
    with open(f"{stem}-table.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["method", "budget", "mean", "std", "n"])
        writer.writeheader()
        writer.writerows(table)

    # Each method against random: difference of means and Welch's t (unequal variances), per budget.
    if "random" in methods:
        lines += ["", "### Difference to random (points of test mIoU), Welch t in brackets", ""]
        lines += [
            "| method | " + " | ".join(str(b) for b in budgets) + " |",
            "|---" * (len(budgets) + 1) + "|",
        ]
        for m in methods:
            if m == "random":
                continue
            out = []
            for b in budgets:
                a, r = 100 * cells(m, b), 100 * cells("random", b)
                if a.size > 1 and r.size > 1:
                    diff, t = welch_t(a, r)
                    out.append(f"{diff:+.2f} (t={t:+.2f})")
                else:
                    out.append("")
            lines.append(f"| {m} | " + " | ".join(out) + " |")

    # Labeled-data saving: budget at which a RALIS policy's mean curve reaches the best baseline's
    # final mIoU (every method named ralis* is a policy, e.g. ralis-nodecay).
    top = budgets[-1]
    baselines = [m for m in methods if not is_policy(m) and cells(m, top).size]
    for policy in [m for m in methods if is_policy(m)] if baselines else []:
        best = max(baselines, key=lambda m: cells(m, top).mean())
        target = cells(best, top).mean()
        curve = np.array([cells(policy, b).mean() if cells(policy, b).size else np.nan for b in budgets])
        reach = next((i for i, v in enumerate(curve) if v >= target), None)
        lines += [""]
        if reach is None:
            lines.append(
                f"Labeled-data saving: {policy} does not reach the best baseline's mIoU at {top} regions "
                f"({best}, {100 * target:.2f}%) within the budgets (its best: {100 * np.nanmax(curve):.2f}%)."
            )
        else:
            if reach == 0:
                needed = float(budgets[0])
            else:
                b0, b1, v0, v1 = budgets[reach - 1], budgets[reach], curve[reach - 1], curve[reach]
                needed = b0 + (target - v0) / (v1 - v0) * (b1 - b0)
            lines.append(
                f"Labeled-data saving: {policy} reaches {best}'s {top}-region mIoU ({100 * target:.2f}%) at "
                f"{needed:.0f} regions (linear interpolation), i.e. {100 * (1 - needed / top):.1f}% fewer regions."
            )

    # Per-class IoU and acquired class distribution at the largest budget.
    lines += ["", f"### Per-class test IoU (%) at {top} regions, mean over seeds", ""]
    lines += ["| method | " + " | ".join(class_names) + " |", "|---" * (len(class_names) + 1) + "|"]
    for m in methods:
        if not cells(m, top).size:  # a method run at other budgets only has no row here
            continue
        vals = [np.nanmean(100 * cells(m, top, f"iou_{c}")) for c in class_names]
        lines.append(f"| {m} | " + " | ".join(f"{v:.1f}" for v in vals) + " |")
    lines += ["", f"### Class distribution of the acquired labels at {top} regions (% of labeled pixels)", ""]
    header = class_names + ["entropy (nats)", "rare-class share"]
    lines += ["| source | " + " | ".join(header) + " |", "|---" * (len(header) + 1) + "|"]
    rare = [class_names.index(c) for c in CAMVID_RARE_CLASSES if c in class_names]

    def dist_line(label: str, px: np.ndarray) -> str:
        frac = px / max(px.sum(), 1)
        ent = float(-(frac[frac > 0] * np.log(frac[frac > 0])).sum())
        return (
            f"| {label} | "
            + " | ".join(f"{100 * v:.2f}" for v in frac)
            + f" | {ent:.3f} | {100 * frac[rare].sum():.2f} |"
        )

    if pool_pixels is not None:
        lines.append(dist_line("pool D_V (all labels)", pool_pixels[: len(class_names)].astype(float)))
    acquired = {}
    for m in methods:
        rs = [r for r in rows if r["method"] == m and int(r["budget"]) == top]
        if rs:
            acquired[m] = np.array([[float(r[f"pixels_{c}"]) for c in class_names] for r in rs]).sum(0)
            lines.append(dist_line(m, acquired[m]))
    md = "\n".join(lines) + "\n"
    Path(f"{stem}-report.md").write_text(md)
    plot(stem, methods, budgets, cells, class_names, acquired, pool_pixels)
    return md


def plot(stem: Path, methods, budgets, cells, class_names, acquired, pool_pixels) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for m in methods:
        bs = [b for b in budgets if cells(m, b).size]
        mean = np.array([100 * cells(m, b).mean() for b in bs])
        std = np.array([100 * sample_std(cells(m, b)) for b in bs])  # as in the tables
        (line,) = ax.plot(bs, mean, marker="o", lw=2.5 if is_policy(m) else 1.5, label=m)
        ax.fill_between(bs, mean - std, mean + std, color=line.get_color(), alpha=0.15)
    ax.set_xlabel("labeled regions (budget)")
    ax.set_ylabel("test mIoU (%)")
    ax.set_title(f"CamVid test mIoU vs budget\n{stem.name}: mean ± std over seeds", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(f"{stem}-miou-vs-budget.png")
    plt.close(fig)

    if acquired:
        fig, ax = plt.subplots(figsize=(9, 4), dpi=120)
        series = dict(acquired)
        if pool_pixels is not None:
            series = {"pool D_V": pool_pixels[: len(class_names)].astype(float), **series}
        width = 0.8 / len(series)
        x = np.arange(len(class_names))
        for i, (name, px) in enumerate(series.items()):
            ax.bar(x + i * width, 100 * px / max(px.sum(), 1), width, label=name)
        ax.set_xticks(x + 0.4 - width / 2, class_names, rotation=30, ha="right")
        ax.set_yscale("log")
        ax.set_ylabel("% of labeled pixels (log)")
        ax.set_title(f"Class distribution of the acquired labels at {budgets[-1]} regions")
        ax.legend(fontsize=8, ncol=2)
        fig.tight_layout()
        fig.savefig(f"{stem}-class-distribution.png")
        plt.close(fig)


# --- main ----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    tag = f"camvid-{args.model}" + ("-quick" if args.quick else "")
    path = Path(args.results) if args.results else RESULTS / f"{tag}.csv"
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    seeds = [int(s) for s in args.seeds.split(",")]
    budgets = sorted(int(b) for b in args.budgets.split(","))
    env_id = "RegionAL-CamVid-Fast-v0" if args.model == "fast" else "RegionAL-CamVid-v0"
    env_kwargs = {"mode": "test", "budget": budgets[-1], "device": args.device}
    if args.data_root:
        env_kwargs["data_root"] = args.data_root
    if args.quick:  # the reward set is evaluated every step: a 20-image D_R keeps the smoke test short
        env_kwargs["subset"] = {"reward": 20}
    if args.config:
        env_kwargs.update(load_yaml(args.config))
        env_kwargs["budget"] = budgets[-1]
    env, failed = None, []
    if not args.report_only:
        check_methods(methods, args)
        if args.ray:
            import_ray()  # before minutes of setup
        # The driver's environment names the columns and, on first use, pretrains the start network
        # into the cache, so that Ray workers load it instead of each training it again.
        env = gym.make(env_id, **env_kwargs)
        names = list(env.unwrapped.info_.class_names)
        header = columns(names)
        done = {(r["method"], int(r["seed"]), int(r["budget"])) for r in read_rows(path)}
        todo = [(m, s) for s in seeds for m in methods if any((m, s, b) not in done for b in budgets)]
        cells = sum((m, s, b) not in done for m, s in todo for b in budgets)
        print(
            f"{len(done)} cells already in {path}; {len(todo)} (method, seed) runs ({cells} cells) to go"
            + (" on Ray" if args.ray else ""),
            file=sys.stderr,
        )
        bar = tqdm(total=cells, desc="cells", unit="cell")

        def save(row: dict) -> None:
            append_row(path, header, row)
            done.add((row["method"], int(row["seed"]), int(row["budget"])))
            bar.update(1)
            tqdm.write(cell_line(row))

        try:
            if args.ray:
                failed = run_ray(env_id, env_kwargs, todo, budgets, done, args, save)
            else:
                failed = run_serial(env, todo, budgets, done, args, save)
        except KeyboardInterrupt:
            bar.close()
            print(f"interrupted: {len(done)} cells are saved in {path}; the same command finishes the rest",
                  file=sys.stderr)  # fmt: skip
            return 130
        bar.close()
        if failed:
            print(f"{len(failed)} run(s) failed: {', '.join(failed)}; rerun to retry them", file=sys.stderr)
        pool_split = env.unwrapped.pool_split
    else:
        from ralis_gym.data import load_dataset
        from ralis_gym.errors import RalisGymError

        try:  # the report shows the D_V pool's class distribution next to the acquired one
            ds = load_dataset("camvid", args.data_root)
        except RalisGymError as error:
            raise SystemExit(f"the report needs the CamVid data: {error}") from None
        names, pool_split = list(ds.info.class_names), ds.split("d_v")
    md = report(path, names, np.asarray(pool_split.class_pixel_counts(), dtype=float))
    print(md)
    if env is not None:  # what produced the newest cells (a report-only call computes nothing)
        meta = {"command": " ".join(sys.argv), "machine": machine(), "args": vars(args)}
        Path(f"{path.with_suffix('')}-last-run.json").write_text(json.dumps(meta, indent=2, default=str))
        env.close()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
