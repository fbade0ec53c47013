"""The RALIS labeling MDP as a Gymnasium environment.

A step reads as a straight line through the layers: the action picks regions (``ralis_gym.regions``:
labeling, the next candidate pools), the segmentation network trains on them and is scored on D_R
(``ralis_gym.segmentation``), and the next observation is built from the network
(``ralis_gym.features.observation``). Start networks come from ``segmentation.pretrain``, the
baselines' scores from ``segmentation.uncertainty``.
"""

from __future__ import annotations

import copy
import math
import os
import time
from typing import Any

import cv2
import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces

from ralis_gym.config import load_yaml, merge_config
from ralis_gym.data import SegmentationSplit, load_dataset
from ralis_gym.errors import ConfigError
from ralis_gym.features import class_distribution, observation, region_vector_dim
from ralis_gym.regions import CandidatePools, RegionGrid, RegionPool
from ralis_gym.segmentation.metrics import SegmentationMetrics
from ralis_gym.segmentation.pretrain import FINAL_TRAINING_DEFAULTS, load_start_network, train_until_plateau
from ralis_gym.segmentation.uncertainty import LABEL_FREE_SCORES, candidate_scores

#: Per-dataset protocol numbers of the reference scripts (their CamVid and Cityscapes launch
#: scripts): K pools, N candidates per pool by mode, budget by mode. Other datasets (custom ones)
#: have no protocol: ``num_pools``, ``regions_per_pool`` and ``budget`` must then be given.
DATASET_PROTOCOL: dict[str, dict[str, Any]] = {
    "camvid": {
        "num_pools": 24,
        "regions_per_pool": {"train": 20, "test": 10},
        "budget": {"train": 480, "test": 1920},
    },
    "cityscapes": {
        "num_pools": 256,
        "regions_per_pool": {"train": 20, "test": 100},
        "budget": {"train": 3840, "test": 30720},
    },
}
#: Which role is the unlabeled pool, and which start network, in each mode. Deviation, measured
#: (BENCHMARKS.md): the reference tests from GTA+D_T (here ``source+dt``); with the fast model that
#: start is within ~2 points of what all 367 train images give, so no budget can move test mIoU and
#: strategies tie. Both modes start from ``source`` (D_S only), which also makes the state features
#: the policy sees at test time the ones it was trained on. ``start_network="source+dt"`` (with
#: ``final_training.include_start_data=False``) is the reference protocol.
MODE_POOL = {"train": "d_t", "test": "d_v"}
#: what the ``oracle`` may read (``oracle_set``): the set an episode is scored on, D_R, or a held-out set
ORACLE_SETS = ("evaluation", "reward", "held_out")
#: which parameters the ``oracle``'s gradients are taken over (``oracle_gradient``)
ORACLE_GRADIENTS = ("classifier", "head")
TRAIN_REGIONS = ("last", "all", "replay")
MODE_START = {"train": "source", "test": "source"}
KL_FEATURES = 64


class RegionALEnv(gym.Env):
    """Region-based active learning for semantic segmentation (RALIS, Casanova et al., ICLR 2020).

    ## Description
    An agent decides which image regions a person should label next. Each step it sees ``K`` pools
    of ``N`` unlabeled candidate regions (fixed-size rectangles of the images of an unlabeled pool)
    and picks one region per pool. The chosen regions are labeled with their ground truth, a real
    segmentation network is trained one epoch on them (loss masked to labeled pixels; by default
    with 24 earlier labeled regions replayed and one pass over the start network's labeled images,
    see ``train_regions``), and the network is evaluated on a reward set D_R. One class serves every dataset, model and protocol
    through its configuration (``default_config()`` <- YAML <- keyword arguments).

    ## Action Space
    ``MultiDiscrete([N] * K)``: the index of the chosen candidate in each pool. Choosing a masked
    slot (``action_mask[k, n] == 0``, only when fewer than ``K * N`` regions are still unlabeled)
    raises ``ValueError`` naming the pool and the reason.

    ## Observation Space
    A ``Dict`` of float32 arrays, the reference code's state and action features (``C`` classes,
    ``Ds = C + 1 + 192``; built by ``ralis_gym.features.observation``):

    - ``state`` ``[M, Ds]``: one vector per region of the state set D_S (M = 10 images x regions per
      image; CamVid 240 x 204, Cityscapes 1280 x 212): raw pixel counts of the predicted classes
      (C + 1 bins, absent = 1e-7), then min / avg / max pooling of the prediction entropy on an 8x8
      grid of the region.
    - ``candidates`` ``[K, N, Ds + 64]``: the same region vector for every candidate plus two 32-bin
      normalised histograms: of the KL divergences between the candidate's predicted class
      distribution and the ground-truth class distributions of the regions labeled so far (zeros
      before anything is labeled), and to all current candidates (CamVid 24 x N x 268). With
      ``score_features`` (e.g. ``["margin", "class_balance"]``) those heuristics' scores of the
      candidate (``score_candidates``) stand between the region vector and the histograms
      (``[K, N, Ds + E + 64]``, unbounded).
    - ``action_mask`` ``[K, N]``: 1 for real candidates, 0 for empty slots.

    ## Rewards
    ``reward_scale * (mIoU_t - mIoU_{t-1})`` on D_R (``reward_scale`` = 100), with ``mIoU_0``
    measured at reset. ``first_reward="absolute"`` reproduces the reference code, whose first reward
    of an episode is 100 x the absolute mIoU after step 1.
    How much of a reward is the action and how much the step's training noise:
    ``benchmarks/reward_noise.py`` (BENCHMARKS.md §5; ``trial_step`` tries an action and undoes it).

    ## Starting State
    ``reset`` restores the start network (``source`` in both modes, see ``MODE_START``;
    pretrained and cached on first use, see the README), empties the labeled set, measures D_R mIoU
    (``info["miou"]``) and draws the first pools. All randomness derives from ``reset(seed=...)``.

    ## Episode End
    ``terminated`` when ``budget`` regions are labeled (or no unlabeled region is left); the last
    step labels only up to the budget. ``gym.make`` wraps the env in ``TimeLimit(ceil(budget / K))``,
    which coincides with termination. The observation returned on termination is all zeros.

    ## Arguments
    ``gym.make("RegionAL-CamVid-Fast-v0", mode="train", budget=480, data_root=None, device="auto")``;
    every key of ``RegionALEnv.default_config()`` can be passed as a keyword, or ``config=`` a dict or
    a YAML path. Main keys: ``dataset``, ``data_root``, ``model`` (``"fast"`` / ``"paper"``),
    ``device``, ``mode`` (``"train"``: pool D_T, N = 20; ``"test"``: pool D_V, N = 10), ``budget``,
    ``num_pools`` (K), ``regions_per_pool`` (N), ``start_network``, ``first_reward``,
    ``train_regions`` / ``replay_regions`` / ``step_start_data`` (what an AL step trains on: the
    reference's ``"last"`` K new regions, ``"all"`` labeled regions, or the default ``"replay"``: the
    new ones plus ``replay_regions`` earlier ones drawn at random; ``step_start_data`` adds a pass
    over the start network's labeled images), ``final_training`` (for :meth:`evaluate`),
    ``oracle_set`` (whose labels the ``oracle`` reference reads: ``"evaluation"``, the set the
    episode is scored on, D_R in train mode and test in test mode; ``"reward"``; ``"held_out"``,
    the other pool), ``subset`` (image limits per role for tiny configs).

    ## Vectorized environments
    Every registered id runs in subprocesses: ``gym.make_vec(id, num_envs, vectorization_mode="async")``
    with any start method (the pickled spec's entry point imports ``ralis_gym`` in the worker), and
    SB3's ``make_vec_env(id, n_envs, vec_env_cls=SubprocVecEnv, env_kwargs=...)``. The keyword
    arguments are plain data, so they pickle; each copy builds its own dataset view, network and
    generators, and ``reset(seed=s + i)`` (what both vector APIs pass) makes copy ``i`` repeat
    exactly. SB3 re-creates the env from its *id* in the worker; a worker started fresh
    (``forkserver``, SB3's default on Linux, or ``spawn``) re-imports the main script, so a script
    that imports ``ralis_gym`` works with every start method (tested). Where the main module does
    not import it (a notebook, pytest), pass ``"ralis_gym:RegionAL-..."`` (Gymnasium then imports
    the module) or ``start_method="fork"``; a forked worker cannot use CUDA once the parent has, so
    fork with ``device="cpu"`` or before touching the GPU. Use one torch thread per worker (``OMP_NUM_THREADS=1``, inherited). The
    heuristic agents accept a vectorized env and reach ``score_candidates`` through ``env_method``
    / ``call`` (``agents.heuristics``).

    ## Version History
    - v0: initial version.
    - v0, 2026-12-01 (behaviour changed, id kept): test mode starts from ``source`` and the final
      training adds the start network's labeled images (``final_training.include_start_data``);
      the fast model's default head is the v2 conv head; method ``oracle``.
    - v0, 2026-12-01 (later, id kept): AL steps replay 24 earlier labeled regions and pass over the
      start data (``train_regions="replay"``, ``step_start_data=True``): with the reference's K newest
      regions D_R mIoU fell over a random episode (BENCHMARKS.md, "AL-step training").
    - v0, 2026-12-02 (method names): ``oracle`` is the gradient-alignment oracle (first-order
      decrease of the loss on ``oracle_set``, fast model); the former loss oracle is ``oracle_loss``.
    - v0, 2026-12-07 (behaviour changed, id kept): the fast model's head is 48 channels wide (was 64:
      0.79x the step time, the same accuracy); start networks are pretrained with one torch thread.
    - v0, 2026-12-07 (later, id kept; observations unchanged): the next pools are drawn in ``reset``
      and ``step`` (the transition), no longer while building the observation; option
      ``score_features`` (default off); a dataset without a reference protocol (custom YAML) must set
      ``num_pools``, ``regions_per_pool`` and ``budget`` instead of silently getting CamVid's.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 2}

    @staticmethod
    def default_config() -> dict[str, Any]:
        return {
            "dataset": "camvid",
            "dataset_kwargs": {},
            "data_root": None,
            "model": "paper",
            "model_kwargs": {},
            "device": "auto",
            "mode": "train",
            "budget": None,  # None: the protocol's (CamVid 480 train / 1920 test)
            "num_pools": None,  # K; None: the protocol's (CamVid 24)
            "regions_per_pool": None,  # N; None: the protocol's (CamVid 20 train / 10 test)
            "start_network": None,  # None: by mode; "source", "source+dt", "upperbound", "scratch" or a .pt path
            "pretrain": {"max_epochs": None, "patience": None, "seed": 0},
            "reward_scale": 100.0,
            "first_reward": "difference",  # or "absolute" (reference quirk)
            "epochs_per_step": 1,
            # AL-step training set: "last": the K new regions (reference); "all": every labeled region;
            # "replay": the K new regions plus ``replay_regions`` earlier labeled ones drawn at random.
            "train_regions": "replay",
            "replay_regions": 24,
            # Each AL step also trains one pass over the start network's labeled images (D_S for
            # ``source``), so the network does not forget them while it learns the new regions.
            "step_start_data": True,
            # Labeled images whose loss the ``oracle`` decreases: "evaluation" (what the episode is
            # scored on: D_R in train mode, the test split in test mode), "reward" (D_R) or "held_out"
            # (the other pool, D_V in train mode and D_T in test mode, as many images as D_R).
            "oracle_set": "evaluation",
            # The ``oracle``'s gradients: "classifier" (the classifier layer) or "head" (every head
            # parameter, one forward-mode pass; not better on test, 2 seeds: BENCHMARKS.md §4).
            "oracle_gradient": "classifier",
            "lr_decay_steps_per_step": 2,
            # Final training (``evaluate``): until D_R mIoU has not improved for ``patience`` epochs, on the
            # acquired regions plus, with ``include_start_data``, the labeled images the start network
            # was trained on (D_S for ``source``; the reference trains on the acquired regions only).
            "final_training": {"max_epochs": None, "patience": None, "include_start_data": True},
            "subset": {"pool": None, "reward": None, "state": None, "test": None},
            "render_images": 4,
            "progress": False,
            # Acquisition scores (label-free heuristics of ralis_gym.methods, e.g. ["margin",
            # "class_balance"]) appended to every candidate's region vector, before the KL histograms.
            # None by default (the reference's features).
            "score_features": [],
        }

    def __init__(
        self,
        config: dict[str, Any] | str | os.PathLike | None = None,
        render_mode: str | None = None,
        **kwargs: Any,
    ):
        file_cfg = load_yaml(config) if isinstance(config, (str, os.PathLike)) else (config or {})
        self.config = merge_config(self.default_config(), file_cfg, kwargs)
        cfg = self.config
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ConfigError(
                f"render_mode {render_mode!r} is not supported; use one of {self.metadata['render_modes']}"
            )
        self.render_mode = render_mode
        if cfg["mode"] not in MODE_POOL:
            raise ConfigError(f"mode must be 'train' or 'test', got {cfg['mode']!r}")
        if cfg["train_regions"] not in TRAIN_REGIONS:
            raise ConfigError(f"train_regions must be one of {TRAIN_REGIONS}, got {cfg['train_regions']!r}")
        if int(cfg["replay_regions"]) < 0:
            raise ConfigError(f"replay_regions must be >= 0, got {cfg['replay_regions']}")
        if cfg["oracle_set"] not in ORACLE_SETS:
            raise ConfigError(f"oracle_set must be one of {ORACLE_SETS}, got {cfg['oracle_set']!r}")
        if cfg["oracle_gradient"] not in ORACLE_GRADIENTS:
            raise ConfigError(
                f"oracle_gradient must be one of {ORACLE_GRADIENTS}, got {cfg['oracle_gradient']!r}"
            )
        self.score_features = tuple(cfg["score_features"] or ())
        unknown = [m for m in self.score_features if m not in LABEL_FREE_SCORES]
        if unknown:
            raise ConfigError(
                f"score_features {unknown} are not label-free heuristics; choose from {LABEL_FREE_SCORES}"
            )
        if cfg["first_reward"] not in ("difference", "absolute"):
            raise ConfigError(f"first_reward must be 'difference' or 'absolute', got {cfg['first_reward']!r}")

        self.dataset = load_dataset(cfg["dataset"], cfg["data_root"], **cfg["dataset_kwargs"])
        self.info_ = self.dataset.info
        self.num_pools, self.pool_size, self.budget = self._protocol()

        self.pool_split = self._role_split(MODE_POOL[cfg["mode"]], cfg["subset"]["pool"])
        self.reward_split = self._role_split("d_r", cfg["subset"]["reward"])
        self.state_split = self._role_split("d_s", cfg["subset"]["state"])
        self.grid = RegionGrid(self.info_.image_size, self.info_.region_size)
        if self.budget > len(self.pool_split) * self.grid.per_image:
            raise ConfigError(
                f"budget {self.budget} exceeds the {len(self.pool_split) * self.grid.per_image} regions of the pool"
            )
        self.pool = RegionPool(
            self.grid, len(self.pool_split), self.info_.num_classes, self.info_.ignore_index
        )

        self.start_name = str(cfg["start_network"] or MODE_START[cfg["mode"]])
        self.segmenter, self.start_meta, self.start_data = load_start_network(
            self.dataset, cfg["model"], self.start_name, device=cfg["device"], seed=int(cfg["pretrain"]["seed"]),
            model_kwargs=cfg["model_kwargs"], max_epochs=cfg["pretrain"]["max_epochs"],
            patience=cfg["pretrain"]["patience"], progress=cfg["progress"],
        )  # fmt: skip
        self._start = self.segmenter.snapshot()  # with a fresh optimiser: every episode starts from it
        self.device = self.segmenter.device

        n_cls = self.info_.num_classes
        ds = region_vector_dim(n_cls)
        area = self.grid.region_size[0] * self.grid.region_size[1]
        ent_max = math.log(n_cls) + 1e-3
        region_high = np.concatenate([np.full(n_cls + 1, area), np.full(ds - n_cls - 1, ent_max)]).astype(
            np.float32
        )
        m = len(self.state_split) * self.grid.per_image
        self.observation_space = spaces.Dict(
            {
                "state": spaces.Box(0.0, np.broadcast_to(region_high, (m, ds)).copy(), dtype=np.float32),
                "candidates": spaces.Box(
                    np.broadcast_to(
                        np.r_[
                            np.zeros(ds), np.full(len(self.score_features), -np.inf), np.zeros(KL_FEATURES)
                        ],
                        (self.num_pools, self.pool_size, ds + len(self.score_features) + KL_FEATURES),
                    ).astype(np.float32),
                    np.broadcast_to(
                        np.r_[region_high, np.full(len(self.score_features), np.inf), np.ones(KL_FEATURES)],
                        (self.num_pools, self.pool_size, ds + len(self.score_features) + KL_FEATURES),
                    ).astype(np.float32),
                    dtype=np.float32,
                ),
                "action_mask": spaces.Box(0.0, 1.0, (self.num_pools, self.pool_size), dtype=np.float32),
            }
        )
        self.action_space = spaces.MultiDiscrete(np.full(self.num_pools, self.pool_size, dtype=np.int64))

        self._pools: CandidatePools | None = None
        self._labeled_dists = torch.empty(0, n_cls + 1, dtype=torch.float64, device=self.device)
        self._miou = 0.0
        self._metrics: SegmentationMetrics | None = None
        self._selected: tuple[tuple[str, int, int], ...] = ()
        self._last_ids = np.empty(0, dtype=np.int64)
        self._steps = 0
        self.timings: dict[str, float] = {}
        self._oracle_split: SegmentationSplit | None = None

    @property
    def oracle_split(self) -> SegmentationSplit:
        """The labeled images whose loss the ``oracle`` decreases (see ``oracle_set``)."""
        which, mode = self.config["oracle_set"], self.config["mode"]
        if which == "evaluation":
            which = "reward" if mode == "train" else "test"
        if which == "reward":
            return self.reward_split
        if self._oracle_split is None:
            if which == "test":
                self._oracle_split = self._role_split("test", self.config["subset"]["test"])
            else:  # held out: the other pool, as many images as D_R (its cost), spread over sequences
                role = MODE_POOL["test" if mode == "train" else "train"]
                split = self.dataset.split(role)
                n = min(len(split), len(self.reward_split))
                pick = np.unique(np.linspace(0, len(split) - 1, n).round().astype(np.int64))
                self._oracle_split = split.subset(pick, name=f"{role}[oracle]")
        return self._oracle_split

    # --- construction helpers -----------------------------------------------------------------
    def _protocol(self) -> tuple[int, int, int]:
        """``(K, N, budget)``: the configured values, else the dataset's protocol for the mode."""
        cfg, mode = self.config, self.config["mode"]
        keys = ("num_pools", "regions_per_pool", "budget")
        protocol = DATASET_PROTOCOL.get(self.info_.name)
        if protocol is None:
            missing = [k for k in keys if cfg[k] is None]
            if missing:
                raise ConfigError(
                    f"dataset {self.info_.name!r} has no reference protocol (known: {sorted(DATASET_PROTOCOL)}); "
                    f"set {', '.join(missing)} in the config"
                )
            protocol = {k: cfg[k] for k in keys}
        values = []
        for key in keys:
            default = protocol[key][mode] if isinstance(protocol[key], dict) else protocol[key]
            value = default if cfg[key] is None else cfg[key]
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
                raise ConfigError(f"{key} must be a positive whole number, got {value!r}")
            values.append(int(value))
        return values[0], values[1], values[2]

    def _role_split(self, role: str, limit: int | None) -> SegmentationSplit:
        split = self.dataset.split(role)
        if limit is not None:
            if int(limit) <= 0:
                raise ConfigError(f"subset limit for {role} must be positive, got {limit}")
            split = split.subset(np.arange(min(int(limit), len(split))), name=f"{role}[:{limit}]")
        return split

    # --- Gymnasium API -------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        self.segmenter.restore(self._start)
        self.segmenter.generator.manual_seed(int(self.np_random.integers(2**62)))
        self.pool.reset()
        self._labeled_dists = self._labeled_dists[:0]
        self._selected, self._last_ids, self._steps = (), np.empty(0, dtype=np.int64), 0
        self._evaluate_reward_set()
        self._pools = self._next_pools()
        return self._observe(), self._info()

    def step(self, action):
        """One AL step, top to bottom: regions (label the picks, draw the regions the step trains on
        and the next pools), segmentation (train, score on D_R), features (the next observation)."""
        if self._pools is None:
            raise RuntimeError("call reset() before step()")
        t0 = time.perf_counter()
        chosen = self._chosen_regions(action)
        chosen = chosen[: self.budget - self.pool.num_labeled]
        hist = self.pool.label(chosen, self.pool_split.labels)
        new = class_distribution(torch.from_numpy(hist)).to(self.device, torch.float64)
        self._labeled_dists = torch.cat([self._labeled_dists, new])
        boxes = self.grid.boxes(chosen)
        self._selected = tuple((self.pool_split.image_names[b[0]], int(b[1]), int(b[2])) for b in boxes)
        self._last_ids = chosen
        anchors = self._training_anchors(chosen)
        terminated = bool(self.pool.num_labeled >= self.budget or self.pool.num_unlabeled == 0)
        # The transition: the next pools depend on what is labeled, not on the network. Drawn after
        # the replayed regions, as before this order was made explicit, so trajectories are unchanged.
        self._pools = self._no_pools() if terminated else self._next_pools()
        t1 = time.perf_counter()
        self._train_step(anchors)
        t2 = time.perf_counter()
        previous = self._miou
        self._evaluate_reward_set()
        t3 = time.perf_counter()
        if self._steps == 0 and self.config["first_reward"] == "absolute":
            previous = 0.0
        reward = float(self.config["reward_scale"] * (self._miou - previous))
        self._steps += 1
        obs = self._zero_observation() if terminated else self._observe()
        t4 = time.perf_counter()
        self.timings = {
            "label": t1 - t0,
            "train": t2 - t1,
            "reward": t3 - t2,
            "features": t4 - t3,
            "step": t4 - t0,
        }
        return obs, reward, terminated, False, self._info()

    def action_masks(self) -> np.ndarray:
        """Flat boolean mask ``[K * N]`` of valid sub-actions (sb3-contrib ``MaskablePPO``)."""
        if self._pools is None:
            return np.ones(self.num_pools * self.pool_size, dtype=bool)
        return self._pools.mask.reshape(-1).copy()

    def trial_step(self, action, seed: int | None = None) -> float:
        """D_R mIoU after a real AL step with ``action`` from the current state; then everything is
        undone: labels, network (weights, optimiser, schedule, RNG) and the env's generator.

        Without ``seed`` the trial draws the same random numbers as the real step that follows it would
        (common random numbers): two trials from one state differ by their regions alone. With ``seed``
        the step's training randomness (minibatch order, dropout, replayed regions) is drawn from that
        seed instead, which measures how much of a reward is training noise
        (``benchmarks/reward_noise.py``).
        """
        seg, pool = self.segmenter, self.pool
        seg_state, pool_state = seg.snapshot(), pool.snapshot()
        rng_state = copy.deepcopy(self.np_random.bit_generator.state)
        try:
            if seed is not None:
                seg.generator.manual_seed(int(seed))
                self.np_random.bit_generator.state = np.random.PCG64(int(seed)).state
            chosen = self._chosen_regions(action)[: self.budget - pool.num_labeled]
            pool.label(chosen, self.pool_split.labels)
            anchors = self._training_anchors(chosen)
            with torch.enable_grad():
                self._train_step(anchors)
            return float(seg.evaluate(self.reward_split).miou)
        finally:
            seg.restore(seg_state)
            pool.restore(pool_state)
            self.np_random.bit_generator.state = rng_state

    # --- internals ---------------------------------------------------------------------------
    def _train_step(self, anchors: np.ndarray) -> None:
        """The AL step's training on the images of the ``anchors`` regions (``_training_anchors``)."""
        for _ in range(self.config["epochs_per_step"]):
            self.segmenter.fit_regions(self.pool_split, anchors, self.pool.labeled)
            if self.config["step_start_data"] and self.start_data is not None:
                self.segmenter.fit_images(self.start_data)
        for _ in range(self.config["lr_decay_steps_per_step"]):
            self.segmenter.step_lr()

    def _training_anchors(self, chosen: np.ndarray) -> np.ndarray:
        """The regions whose images the AL step trains on (see ``train_regions``)."""
        how = self.config["train_regions"]
        if how == "last":
            return chosen
        order = self.pool.order
        if how == "all":
            return order
        earlier = order[: order.size - chosen.size]
        r = min(int(self.config["replay_regions"]), earlier.size)
        if r == 0:
            return chosen
        return np.concatenate([chosen, self.np_random.choice(earlier, size=r, replace=False)])

    def _chosen_regions(self, action) -> np.ndarray:
        act = np.asarray(action)
        if act.shape != (self.num_pools,) or not np.issubdtype(act.dtype, np.integer):
            raise ValueError(
                f"action must be {self.num_pools} integers (one index per pool), got shape {act.shape} dtype {act.dtype}"
            )
        bad = np.flatnonzero((act < 0) | (act >= self.pool_size))
        if bad.size:
            k = int(bad[0])
            raise ValueError(
                f"invalid action for pool {k}: index {int(act[k])} is outside 0..{self.pool_size - 1}"
            )
        mask = self._pools.mask
        valid_pool = mask.any(axis=1)
        picked_ok = mask[np.arange(self.num_pools), act]
        bad = np.flatnonzero(~picked_ok & valid_pool)
        if bad.size:
            k = int(bad[0])
            raise ValueError(
                f"invalid action for pool {k}: slot {int(act[k])} is masked (empty: fewer than K*N unlabeled regions "
                f"remain, pool {k} has {int(mask[k].sum())} candidates); choose where action_mask[{k}] is 1"
            )
        # Pools left entirely empty (fewer than K regions remain) contribute nothing.
        return self._pools.region_ids[np.arange(self.num_pools), act][valid_pool]

    def _evaluate_reward_set(self) -> None:
        self._metrics = self.segmenter.evaluate(self.reward_split)
        self._miou = self._metrics.miou

    def _next_pools(self) -> CandidatePools:
        """The MDP's transition to the next candidates: K disjoint pools of N unlabeled regions."""
        return self.pool.sample_pools(self.num_pools, self.pool_size, self.np_random)

    def _no_pools(self) -> CandidatePools:
        """The empty candidate set of a finished episode (every slot masked)."""
        return CandidatePools(
            np.full((self.num_pools, self.pool_size), -1, dtype=np.int64),
            np.zeros((self.num_pools, self.pool_size), dtype=bool),
        )

    def _observe(self) -> dict[str, np.ndarray]:
        """The observation of the current pools (``features.observation``); draws nothing."""
        scores = None
        if self.score_features:
            ids = self._pools.region_ids[self._pools.mask]
            scores = np.stack(
                [candidate_scores(m, self.segmenter, self.pool_split, self.pool, ids, self.np_random)
                 for m in self.score_features], axis=-1,
            )  # fmt: skip
        return observation(
            self.segmenter,
            self.pool_split,
            self.state_split,
            self.grid,
            self._pools,
            self._labeled_dists,
            scores,
        )

    def _zero_observation(self) -> dict[str, np.ndarray]:
        return {k: np.zeros(s.shape, dtype=np.float32) for k, s in self.observation_space.spaces.items()}

    def _info(self) -> dict[str, Any]:
        return {
            "miou": float(self._miou),
            "per_class_iou": self._metrics.iou.astype(np.float32),
            "labeled_regions": int(self.pool.num_labeled),
            "budget": self.budget,
            "labeled_class_pixels": self.pool.class_pixels.copy(),
            "selected": self._selected,
            "action_mask": self._pools.mask.copy(),
        }

    # --- beyond the Gymnasium API ---------------------------------------------------------------
    def evaluate(
        self,
        split: str = "test",
        max_epochs: int | None = None,
        patience: int | None = None,
        restore: bool = False,
        progress: bool | None = None,
    ) -> dict[str, Any]:
        """The final protocol: train on every acquired region until D_R mIoU stops improving.

        The reference code trains the network on the acquired regions for up to 1000 epochs with
        early stopping on D_R (patience 150 for the FPN), then reports test mIoU.

        The training set is the acquired regions plus, with ``final_training.include_start_data``,
        the labeled images the start network was trained on; it starts from a fresh optimiser and
        schedule and follows ``train_until_plateau`` (the pretraining rule: one decay step per epoch,
        defaults ``FINAL_TRAINING_DEFAULTS``). Keeps the best-D_R weights, then evaluates them on
        ``split`` (default the test split). With
        ``restore=True`` the segmenter is put back as it was afterwards, so active learning can go on
        from the same point (the benchmarks branch the final training at several budgets this way).
        Returns ``test_miou``, ``per_class_iou``, ``confusion``, ``pixel_accuracy``, ``d_r_miou``,
        ``epochs`` and ``labeled_regions``.
        """
        ft = self.config["final_training"]
        defaults = FINAL_TRAINING_DEFAULTS.get(self.config["model"], FINAL_TRAINING_DEFAULTS["fast"])
        max_epochs = max_epochs if max_epochs is not None else ft.get("max_epochs") or defaults["max_epochs"]
        patience = patience if patience is not None else ft.get("patience") or defaults["patience"]
        progress = self.config["progress"] if progress is None else progress
        if self.pool.num_labeled == 0:
            raise RuntimeError("nothing is labeled yet: step the environment before evaluate()")
        before = self.segmenter.snapshot() if restore else None
        ids = self.pool.order.copy()
        seg = self.segmenter
        extra = self.start_data if ft.get("include_start_data") else None

        def epoch() -> float:
            loss = seg.fit_regions(self.pool_split, ids, self.pool.labeled)
            if extra is not None:
                seg.fit_images(extra)
            return loss

        # The pretraining recipe: a fresh optimiser and schedule, one decay step per epoch.
        seg.reset_optimizer()
        result = train_until_plateau(
            seg, epoch, self.reward_split, max_epochs, patience, progress=progress, desc="final training"
        )
        target = self._role_split(split, self.config["subset"]["test"] if split == "test" else None)
        metrics = self.segmenter.evaluate(target, progress=progress)
        if before is not None:
            self.segmenter.restore(before)
        return {
            "test_miou": metrics.miou,
            "per_class_iou": metrics.iou,
            "pixel_accuracy": metrics.pixel_accuracy,
            "confusion": metrics.confusion,
            "d_r_miou": result["best_miou"],
            "epochs": result["epochs"],
            "labeled_regions": self.pool.num_labeled,
        }

    @torch.no_grad()
    def score_candidates(self, heuristic: str, mc_passes: int = 20) -> np.ndarray:
        """Scores ``[K, N]`` of the current candidates for a method of ``ralis_gym.methods`` (-inf in
        masked slots), for the baseline agents: ``segmentation.uncertainty.candidate_scores`` with this
        env's network, pool and generator (``random`` draws from it), and for ``oracle`` its
        ``oracle_split`` (D_R in train mode, the test split in test mode) and ``oracle_gradient``.
        Scoring does not change the environment's state (it draws MC-dropout masks from the
        segmenter's own generator, so it does shift later training randomness deterministically).
        """
        if self._pools is None:
            raise RuntimeError("call reset() before score_candidates()")
        mask = self._pools.mask
        scores = np.full(mask.shape, -np.inf)
        scores[mask] = candidate_scores(
            heuristic, self.segmenter, self.pool_split, self.pool, self._pools.region_ids[mask], self.np_random,
            mc_passes=mc_passes, oracle_split=self.oracle_split if heuristic == "oracle" else None,
            oracle_gradient=self.config["oracle_gradient"],
        )  # fmt: skip
        return scores

    def render(self) -> np.ndarray | None:
        """``rgb_array``: mosaic of pool images, prediction blended in, labeled regions outlined in
        white and the regions chosen at the last step in red."""
        if self.render_mode != "rgb_array":
            return None
        n_show = max(1, int(self.config["render_images"]))
        last = self.grid.split_ids(self._last_ids)[0] if self._last_ids.size else np.empty(0, np.int64)
        labeled_imgs = np.flatnonzero(self.pool.labeled.any(axis=(1, 2)))
        order = list(dict.fromkeys([*last.tolist(), *labeled_imgs.tolist(), *range(len(self.pool_split))]))[
            :n_show
        ]
        pred = self.segmenter.predict(self.pool_split, np.asarray(order))
        palette = self.info_.palette_array()
        rw, rh = self.grid.region_size
        tiles = []
        for img_idx, p in zip(order, pred):
            image = np.asarray(self.pool_split.images[img_idx])
            tile = cv2.addWeighted(image, 0.6, palette[p], 0.4, 0.0)
            for r, c in zip(*np.nonzero(self.pool.labeled[img_idx])):
                cv2.rectangle(
                    tile,
                    (int(c * rw), int(r * rh)),
                    (int(c * rw + rw - 1), int(r * rh + rh - 1)),
                    (255, 255, 255),
                    1,
                )
            chosen_here = self._last_ids[last == img_idx] if last.size else []
            for _i, x, y, w, h in self.grid.boxes(np.asarray(chosen_here, dtype=np.int64)):
                cv2.rectangle(tile, (int(x), int(y)), (int(x + w - 1), int(y + h - 1)), (255, 0, 0), 3)
            tiles.append(tile)
        while len(tiles) < n_show:
            tiles.append(np.zeros_like(tiles[0]))
        cols = math.ceil(math.sqrt(n_show))
        rows = [np.concatenate(tiles[i : i + cols], axis=1) for i in range(0, len(tiles), cols)]
        rows[-1] = np.pad(rows[-1], ((0, 0), (0, rows[0].shape[1] - rows[-1].shape[1]), (0, 0)))
        return np.ascontiguousarray(np.concatenate(rows, axis=0), dtype=np.uint8)

    def close(self) -> None:
        self._pools = None


def run_agent(
    env: gym.Env, agent: Any, seed: int | None = None, desc: str = "active learning", progress: bool = True
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The active-learning loop: reset ``env`` with ``seed`` and let ``agent`` (anything with SB3's
    ``predict(obs, deterministic=True)``) act greedily until the episode ends. Returns the D_R curve
    ``[{"labeled", "miou", "seconds"}]`` (the reset first) and the last ``info``; the environment is
    left at the end of the episode, so ``env.unwrapped.evaluate()`` runs the final training next."""
    from tqdm.auto import tqdm

    base = env.unwrapped
    obs, info = env.reset(seed=seed)
    curve = [{"labeled": info["labeled_regions"], "miou": info["miou"], "seconds": 0.0}]
    done = False
    with tqdm(total=base.budget, desc=desc, unit="region", disable=not progress) as bar:
        while not done:
            action, _ = agent.predict(obs, deterministic=True)
            obs, _, terminated, truncated, info = env.step(np.asarray(action).reshape(-1))
            done = terminated or truncated
            curve.append({"labeled": info["labeled_regions"], "miou": info["miou"],
                          "seconds": base.timings.get("step", 0.0)})  # fmt: skip
            bar.update(info["labeled_regions"] - bar.n)
            bar.set_postfix(miou=f"{info['miou']:.3f}")
    return curve, info


def make_region_al_env(**kwargs: Any) -> gym.Env:
    """Registry entry point: the env in a ``TimeLimit`` of ``ceil(budget / K)`` steps for its config."""
    env = RegionALEnv(**kwargs)
    return gym.wrappers.TimeLimit(env, max_episode_steps=math.ceil(env.budget / env.num_pools))
