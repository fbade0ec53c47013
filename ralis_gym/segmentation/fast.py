"""The FAST model: frozen label-free cell features + a small trainable head, for CPU-scale RALIS.

Why: the paper's FPN-ResNet-50 needs GPU-days for one RALIS experiment. Here the expensive part is
a fixed encoder (``ralis_gym.segmentation.encoder``) run once per image and cached, and only a
per-cell MLP is trained, so a whole active-learning run (hundreds of fine-tuning steps, each followed
by a full evaluation of the reward set) takes minutes on a 2-core CPU.

Model. The image is cut into ``stride x stride`` cells (the stride divides the region size, so every
cell belongs to one region). Each cell's cached feature vector (appearance + multi-scale context) is
standardised, mapped with ``Linear -> ReLU`` (plus a learned embedding of the cell position) ->
``Linear -> ReLU`` -> [MC dropout] -> ``Linear`` to class logits. Full-resolution probabilities are
the cell probabilities upsampled by nearest neighbour, which makes training and evaluation exact and
cheap:

* loss: per-pixel cross-entropy with ignore, over labeled pixels only, equals
  ``sum_cells hist_cell . (-log p_cell)`` where ``hist_cell`` is the per-class count of labeled
  ground-truth pixels of the cell (cached per split); optional class weights multiply ``hist``;
* evaluation: the full-resolution confusion matrix is ``sum_cells hist_cell (x) onehot(argmax p_cell)``
  (a scatter-add), identical to ``Segmenter.evaluate`` on the upsampled prediction.

Training follows the paper's optimiser (SGD, momentum 0.95, weight decay 1e-4, grad-norm clip 4,
ExponentialLR(0.998) stepped by the caller). A training sample is the anchor region's cells (the
context the head needs is already inside the cached features); cells of unlabeled regions carry no
loss. Two learning rates, both measured on CamVid:

* ``lr`` (default 3e-4) drives ``fit_regions``, i.e. the AL steps (one SGD step on the 24 newest
  regions) and the final training on the acquired regions. Random-acquisition runs on D_T from a
  D_S-trained head (``benchmarks/fast_model_accuracy.py --al-sim``): with 1e-4 / 3e-4 the D_R mIoU
  rises smoothly over 20 steps; with the paper's 1e-3 it rises for ~8 steps and then drifts down as
  the 0.95 momentum accumulates over consecutive steps; with 1e-2 it oscillates by +-5 points, which
  would drown the reward in optimiser noise.
* ``pretrain_lr`` (default 1e-2) drives ``fit_images`` (training on fully labeled images: the
  pretraining of start networks); at 1e-3 or below pretraining needs ten times more epochs. Both
  rates follow the same ExponentialLR decay.

Deviations from the paper, on purpose and measured (``benchmarks/fast_model_accuracy.py``):
* class-weighted cross-entropy by default (``class_weighting="sqrt_median"``: weights
  ``sqrt(median_freq / freq)`` estimated once from the first training data, then frozen in the
  model state). Without it the rare CamVid classes are almost never predicted.
* no horizontal-flip augmentation by default (``hflip=False``); flipping costs nothing (the cached
  features are flip-equivariant up to a channel permutation) but lowered test mIoU because the
  position of pavement/road is asymmetric (driving side).
* MC dropout (p=0.5, before the classifier) is applied only when asked (BALD), as in the reference
  ``FPN50_bayesian``; training without dropout is the default (``train_dropout=False``).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ralis_gym.data.base import DatasetInfo, SegmentationSplit
from ralis_gym.segmentation.base import Segmenter
from ralis_gym.segmentation.encoder import (
    CellEncoder,
    EncoderConfig,
    clear_feature_cache,
    content_fingerprint,
    position_encoding,
    split_features,
)
from ralis_gym.segmentation.metrics import SegmentationMetrics

#: class-weighting schemes understood by ``FastSegmenter``
CLASS_WEIGHTINGS = ("none", "sqrt_median", "median")


def pretrain_schedule() -> dict[str, Any]:
    """The recipe used to pretrain start networks with the fast model (measured on CamVid).

    ``fit_with_early_stopping(seg, train, val, **pretrain_schedule())`` trains one epoch at a time
    (``fit_images``: one pass over every region of ``train`` in minibatches of 32 regions, at
    ``pretrain_lr`` = 1e-2), evaluates ``val`` mIoU after each epoch, decays the learning rate once per
    epoch (x0.998) and keeps the best epoch. Best epochs seen: D_S (10 images) ~130, D_T (100) ~40-60,
    all 367 train images ~30-50; patience 30 costs little because an epoch is cheap.
    """
    return {"max_epochs": 300, "patience": 30}


def default_stride(region_size: tuple[int, int], min_cells: int = 8) -> int:
    """Largest common divisor of the region sides that still leaves ``min_cells`` cells per side.

    CamVid 80x90 -> 10 (8x9 cells per region), Cityscapes 128x128 -> 16 (8x8 cells).
    """
    rw, rh = region_size
    g = math.gcd(rw, rh)
    good = [d for d in range(1, g + 1) if g % d == 0 and min(rw, rh) // d >= min_cells]
    return max(good) if good else 1


class CellHead(nn.Module):
    """Per-cell MLP on standardised features plus a learned position embedding.

    ``feature_mean``/``feature_std`` (input standardisation) and ``class_weights`` are buffers set
    once from unlabeled statistics / the first training labels (``FastSegmenter.initialise``).
    """

    def __init__(self, in_dim: int, pos_dim: int, hidden: int, num_classes: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden)
        self.pos = nn.Linear(pos_dim, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, hidden)
        self.cls = nn.Linear(hidden, num_classes)
        self.register_buffer("feature_mean", torch.zeros(in_dim))
        self.register_buffer("feature_std", torch.ones(in_dim))
        self.register_buffer("class_weights", torch.ones(num_classes))
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))

    def reset_parameters(self, generator: torch.Generator) -> None:
        """PyTorch's default Linear init (uniform +-1/sqrt(fan_in)), drawn from ``generator``."""
        with torch.no_grad():
            for layer in (self.fc1, self.pos, self.fc2, self.cls):
                bound = 1.0 / math.sqrt(layer.in_features)
                w = torch.empty(layer.weight.shape).uniform_(-bound, bound, generator=generator)
                layer.weight.copy_(w)
                if layer.bias is not None:
                    b = torch.empty(layer.bias.shape).uniform_(-bound, bound, generator=generator)
                    layer.bias.copy_(b)

    def folded_input_layer(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``fc1`` with the standardisation folded in: ``fc1((x - m) / s) == x @ W.T + b``."""
        w = self.fc1.weight / self.feature_std
        b = self.fc1.bias - w @ self.feature_mean
        return w, b

    def forward(
        self, x: torch.Tensor, pos_term: torch.Tensor, drop_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits ``[..., C]`` of features ``x [..., D]``; ``pos_term`` broadcasts to ``[..., hidden]``.

        Training path (explicit standardisation, so SGD sees unit-scale inputs); ``drop_mask`` is an
        already scaled keep mask (``bernoulli(1-p) / (1-p)``) or None.
        """
        h = F.relu(self.fc1((x - self.feature_mean) / self.feature_std) + pos_term)
        h = F.relu(self.fc2(h))
        if drop_mask is not None:
            h = h * drop_mask
        return self.cls(h)


# Per-cell ground-truth histograms, shared by every segmenter (keyed by stride and split).
_TARGETS: dict[tuple[int, int, int, str, str], torch.Tensor] = {}
_TARGETS_LOCK = threading.Lock()


def cell_histograms(split: SegmentationSplit, stride: int, chunk: int = 16) -> torch.Tensor:
    """Ground-truth pixels per class of every cell: int16 ``[N, rows * cols, C]`` (ignore excluded).

    Cached in memory per ``(stride, classes, split.key, label fingerprint)``; one ``bincount`` per
    chunk of images.
    """
    info = split.info
    key = (stride, info.num_classes, info.ignore_index, split.key, content_fingerprint(split.labels))
    with _TARGETS_LOCK:
        hit = _TARGETS.get(key)
    if hit is not None:
        return hit
    width, height = info.image_size
    rows, cols, c = height // stride, width // stride, info.num_classes
    if stride * rows != height or stride * cols != width:
        raise ValueError(f"stride {stride} does not divide the image size {width}x{height}")
    if stride * stride > np.iinfo(np.int16).max:
        raise ValueError(f"stride {stride} is too large for int16 cell histograms")
    out = torch.empty((len(split), rows * cols, c), dtype=torch.int16)
    lut = np.full(256, c, dtype=np.int64)  # every non-class id (the ignore id) goes to a dropped bin
    lut[:c] = np.arange(c)
    for start in range(0, len(split), chunk):
        lab = np.asarray(split.labels[start : start + chunk])
        n = lab.shape[0]
        bins = (
            lut[lab]
            .reshape(n, rows, stride, cols, stride)
            .transpose(0, 1, 3, 2, 4)
            .reshape(n * rows * cols, -1)
        )
        flat = bins + (np.arange(n * rows * cols) * (c + 1))[:, None]
        counts = np.bincount(flat.ravel(), minlength=n * rows * cols * (c + 1)).reshape(n, rows * cols, c + 1)
        out[start : start + n] = torch.from_numpy(counts[..., :c].astype(np.int16))
    with _TARGETS_LOCK:
        _TARGETS[key] = out
    return out


def clear_caches() -> None:
    """Drop the in-memory feature and cell-histogram caches (e.g. between experiments in one process)."""
    clear_feature_cache()
    with _TARGETS_LOCK:
        _TARGETS.clear()


def class_weights_from_counts(counts: np.ndarray | torch.Tensor, scheme: str) -> torch.Tensor:
    """Loss weights per class from labeled pixel counts (median-frequency balancing, SegNet-style).

    ``"median"``: ``median(f) / f_c``; ``"sqrt_median"``: its square root (the default: full median
    balancing over-predicts the rare classes and lowered CamVid mIoU); ``"none"``: ones. Classes
    without labeled pixels get the largest weight of the present classes.
    """
    counts_t = torch.as_tensor(np.asarray(counts), dtype=torch.float64)
    if scheme == "none" or counts_t.sum() <= 0:
        return torch.ones(counts_t.numel(), dtype=torch.float32)
    if scheme not in CLASS_WEIGHTINGS:
        raise ValueError(f"unknown class weighting {scheme!r}; choose one of {CLASS_WEIGHTINGS}")
    present = counts_t > 0
    freq = counts_t / counts_t.sum()
    weights = torch.ones_like(freq)
    weights[present] = freq[present].median() / freq[present]
    weights[~present] = weights[present].max()
    if scheme == "sqrt_median":
        weights = weights.sqrt()
    return weights.float()


class FastSegmenter(Segmenter):
    """Fast CPU segmenter: cached frozen cell features + trainable per-cell MLP head.

    Args:
        info: dataset facts (classes, image and region size).
        device: where the head runs (features stay cached on the CPU).
        seed: seeds ``self.generator``, the only source of randomness (init, shuffling, dropout).
        stride: cell size in pixels; must divide the region size (default ``default_stride``).
        hidden: width of the two hidden layers.
        lr: SGD learning rate of ``fit_regions`` (AL steps, final training); see module doc.
        pretrain_lr: SGD learning rate of ``fit_images`` (pretraining on fully labeled images).
        batch_size: anchors (regions) per minibatch (32 as the paper's CamVid setting).
        class_weighting: ``"sqrt_median"`` (default), ``"median"`` or ``"none"`` (see module doc).
        hflip: mirror half of the training samples (cheap; off by default, see module doc).
        dropout: MC-dropout probability before the classifier.
        train_dropout: also apply that dropout while training.
        encoder: encoder configuration; its stride must equal ``stride``.
        disk_cache: keep encoded features under ``<user cache>/features`` as well as in memory.
        eval_batch_size: images per forward in ``iter_proba``/``evaluate`` (8 is the fastest on CPU:
            the activations of 8 images stay in cache).
    """

    kind = "fast"

    def __init__(
        self,
        info: DatasetInfo,
        device: str | torch.device = "auto",
        seed: int = 0,
        *,
        stride: int | None = None,
        hidden: int = 96,
        lr: float = 3e-4,
        pretrain_lr: float = 1e-2,
        momentum: float = 0.95,
        weight_decay: float = 1e-4,
        grad_clip: float = 4.0,
        lr_gamma: float = 0.998,
        batch_size: int = 32,
        class_weighting: str = "sqrt_median",
        hflip: bool = False,
        dropout: float = 0.5,
        train_dropout: bool = False,
        encoder: EncoderConfig | dict | None = None,
        disk_cache: bool = True,
        eval_batch_size: int = 8,
    ) -> None:
        super().__init__(info, device=device, seed=seed)
        if isinstance(encoder, dict):
            encoder = EncoderConfig.from_dict(encoder)
        if encoder is None:
            encoder = EncoderConfig(stride=stride or default_stride(info.region_size))
        if stride is not None and stride != encoder.stride:
            raise ValueError(f"stride {stride} differs from the encoder stride {encoder.stride}")
        s = encoder.stride
        rw, rh = info.region_size
        if rw % s or rh % s:
            raise ValueError(
                f"stride {s} must divide the region size {rw}x{rh} so that every cell lies in one region"
            )
        if class_weighting not in CLASS_WEIGHTINGS:
            raise ValueError(f"unknown class weighting {class_weighting!r}; choose one of {CLASS_WEIGHTINGS}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        self.stride = s
        self.hidden = hidden
        self.lr, self.pretrain_lr = lr, pretrain_lr
        self.momentum, self.weight_decay = momentum, weight_decay
        self.grad_clip, self.lr_gamma, self.batch_size = grad_clip, lr_gamma, batch_size
        self.class_weighting, self.hflip = class_weighting, hflip
        self.dropout, self.train_dropout = dropout, train_dropout
        self.disk_cache, self.eval_batch_size = disk_cache, eval_batch_size
        self.encoder = CellEncoder(encoder)

        self.rows, self.cols = self.encoder.grid_shape(info.image_size)
        self.cells = self.rows * self.cols
        # Flat cell indices of every region (local region id order = regions/grid.py order).
        ch, cw = rh // s, rw // s
        local = np.arange(self.grid.per_image)
        col, row = np.divmod(local, self.grid.rows)
        cy = row[:, None] * ch + np.arange(ch)[None, :]
        cx = col[:, None] * cw + np.arange(cw)[None, :]
        self._region_cells = torch.from_numpy(
            (cy[:, :, None] * self.cols + cx[:, None, :]).reshape(len(local), -1)
        )
        # The same cell seen in the mirrored image (for flip augmentation) and the position features.
        cell = np.arange(self.cells)
        self._mirror_cell = torch.from_numpy(
            (cell // self.cols) * self.cols + (self.cols - 1 - cell % self.cols)
        )
        self._positions = position_encoding(self.rows, self.cols).reshape(self.cells, -1).to(self.device)
        self._flip_perm = self.encoder.flip_permutation()

        self.head = CellHead(self.encoder.dim, self._positions.shape[1], hidden, info.num_classes)
        self.head.reset_parameters(self.generator)
        self.head.to(self.device)
        self.reset_optimizer()

    # --- configuration / state --------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """Everything needed to rebuild this segmenter (saved with the weights)."""
        return {
            "hidden": self.hidden,
            "lr": self.lr,
            "pretrain_lr": self.pretrain_lr,
            "momentum": self.momentum,
            "weight_decay": self.weight_decay,
            "grad_clip": self.grad_clip,
            "lr_gamma": self.lr_gamma,
            "batch_size": self.batch_size,
            "class_weighting": self.class_weighting,
            "hflip": self.hflip,
            "dropout": self.dropout,
            "train_dropout": self.train_dropout,
            "encoder": self.encoder.config.to_dict(),
        }

    def model_state(self) -> dict[str, Any]:
        """Head weights, standardisation/class-weight buffers and the config (a start-network file)."""
        return {
            "kind": self.kind,
            "config": self.config(),
            "encoder_key": self.encoder.config.key,
            "head": {k: v.detach().cpu().clone() for k, v in self.head.state_dict().items()},
        }

    def load_model_state(self, state: dict[str, Any]) -> None:
        if state.get("kind", self.kind) != self.kind:
            raise ValueError(f"state of a {state.get('kind')!r} model cannot load into a {self.kind!r} model")
        hidden = state.get("config", {}).get("hidden", self.hidden)
        if hidden != self.hidden:
            raise ValueError(
                f"state has a head of width {hidden} but this segmenter has {self.hidden}; "
                "build it with FastSegmenter.from_state"
            )
        key = state.get("encoder_key")
        if key is not None and key != self.encoder.config.key:
            raise ValueError(
                f"state was trained on encoder features {key} but this segmenter uses "
                f"{self.encoder.config.key}; build it with FastSegmenter.from_state"
            )
        self.head.load_state_dict({k: v.to(self.device) for k, v in state["head"].items()})

    @classmethod
    def from_state(
        cls,
        info: DatasetInfo,
        state: dict[str, Any],
        device: str | torch.device = "auto",
        seed: int = 0,
        **kw: Any,
    ) -> FastSegmenter:
        """A segmenter built with the saved config (``kw`` overrides it) and loaded with the weights."""
        seg = cls(info, device=device, seed=seed, **{**state["config"], **kw})
        seg.load_model_state(state)
        return seg

    def reset_optimizer(self) -> None:
        self.optimizer = torch.optim.SGD(
            self.head.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.ExponentialLR(self.optimizer, gamma=self.lr_gamma)

    def step_lr(self) -> None:
        self.scheduler.step()

    def fit_images(self, split: SegmentationSplit, epochs: int = 1, progress: bool = False) -> float:
        """Train on fully labeled images at ``pretrain_lr`` (times the current decay factor).

        Pretraining a start network is this call in a loop (see ``fit_with_early_stopping``); the AL
        steps use ``fit_regions`` at ``lr``. Optimiser state (momentum, decay) is shared by both.
        """
        group = self.optimizer.param_groups[0]
        saved = group["lr"]
        group["lr"] = saved * self.pretrain_lr / self.lr
        try:
            return super().fit_images(split, epochs=epochs, progress=progress)
        finally:
            group["lr"] = saved

    def default_batch_size(self) -> int:
        return self.eval_batch_size

    # --- cached data ------------------------------------------------------------------------------
    def features(self, split: SegmentationSplit, progress: bool = False) -> torch.Tensor:
        """Cached encoder features of ``split``, ``[N, cells, dim]`` float16 (computed on first use)."""
        self._check_split(split)
        feats = split_features(self.encoder, split, disk_cache=self.disk_cache, progress=progress)
        return feats.view(len(split), self.cells, -1)

    def targets(self, split: SegmentationSplit) -> torch.Tensor:
        """Cached per-cell ground-truth class histograms of ``split``, int16 ``[N, cells, C]``."""
        self._check_split(split)
        return cell_histograms(split, self.stride)

    def _check_split(self, split: SegmentationSplit) -> None:
        if tuple(split.info.image_size) != tuple(self.info.image_size):
            raise ValueError(
                f"split {split.name!r} has images of {split.info.image_size} but this segmenter was built "
                f"for {self.info.image_size}"
            )

    @property
    def is_initialised(self) -> bool:
        return bool(self.head.initialised)

    @torch.no_grad()
    def initialise(self, split: SegmentationSplit, labeled: np.ndarray | None = None) -> None:
        """Set the input standardisation (from all images of ``split``, no labels) and class weights.

        Class weights come from the labeled pixels of ``split`` (every pixel when ``labeled`` is None).
        Called automatically by the first ``fit_regions``; afterwards both stay frozen (they are part
        of the model state, so a start network carries the statistics of its own training data).
        """
        feats = self.features(split)
        total = torch.zeros(feats.shape[-1], dtype=torch.float64)
        total_sq = torch.zeros_like(total)
        for start in range(0, len(split), 32):
            x = feats[start : start + 32].reshape(-1, feats.shape[-1]).double()
            total += x.sum(0)
            total_sq += (x * x).sum(0)
        n = feats.shape[0] * feats.shape[1]
        mean = total / n
        std = (total_sq / n - mean**2).clamp_min(0).sqrt() + 1e-3
        hist = self.targets(split)
        if labeled is not None:
            labeled = np.asarray(labeled, dtype=bool)
            if labeled.shape != (len(split), self.grid.rows, self.grid.cols):
                raise ValueError(
                    f"labeled has shape {labeled.shape}; expected one mask per image of {split.name!r}"
                )
            mask = self._cell_mask(labeled)
            counts = (hist.double() * mask.unsqueeze(-1)).sum((0, 1))
        else:
            counts = hist.double().sum((0, 1))
        self.head.feature_mean.copy_(mean.float())
        self.head.feature_std.copy_(std.float())
        self.head.class_weights.copy_(class_weights_from_counts(counts, self.class_weighting))
        self.head.initialised.fill_(True)

    def _cell_mask(self, labeled: np.ndarray) -> torch.Tensor:
        """Region mask ``[N, rows, cols]`` -> cell mask ``[N, cells]`` float (1 = labeled)."""
        s = self.stride
        rw, rh = self.info.region_size
        cells = np.repeat(np.repeat(labeled, rh // s, axis=1), rw // s, axis=2)
        return torch.from_numpy(cells.reshape(labeled.shape[0], -1).astype(np.float32))

    # --- inference --------------------------------------------------------------------------------
    def _drop_mask(self, shape: tuple[int, ...]) -> torch.Tensor:
        keep = 1.0 - self.dropout
        mask = (torch.rand(shape, generator=self.generator) < keep).float() / keep
        return mask.to(self.device)

    @torch.no_grad()
    def _hidden(self, split: SegmentationSplit, idx: np.ndarray) -> torch.Tensor:
        """Activations before the (MC-)dropout and the classifier, ``[B, cells, hidden]``."""
        feats = self.features(split)
        if idx.size and np.array_equal(idx, np.arange(idx[0], idx[0] + idx.size)):
            x = feats[int(idx[0]) : int(idx[0]) + idx.size]
        else:
            x = feats[torch.from_numpy(idx)]
        x = x.to(self.device, torch.float32)
        head = self.head
        w, b = head.folded_input_layer()
        pos = torch.addmm(b, self._positions, head.pos.weight.T)  # [cells, hidden], shared by the batch
        h = torch.matmul(x, w.T).add_(pos).relu_()
        return torch.matmul(h, head.fc2.weight.T).add_(head.fc2.bias).relu_()

    @torch.no_grad()
    def cell_proba(
        self, split: SegmentationSplit, indices: np.ndarray, dropout: bool = False
    ) -> torch.Tensor:
        """Softmax per cell, ``[B, C, cells]`` float32 on ``self.device`` (eval path, no grad).

        Tuned for the reward-set evaluation that follows every AL step: a contiguous range of images
        is sliced (no gather), the standardisation is folded into ``fc1``, activations are updated in
        place, and the classifier writes class-major logits so the softmax runs over a leading axis.
        """
        h = self._hidden(split, np.asarray(indices, dtype=np.int64).reshape(-1))
        if dropout and self.dropout > 0:
            h.mul_(self._drop_mask(tuple(h.shape)))
        return self._classify(h)

    def _classify(self, h: torch.Tensor) -> torch.Tensor:
        """``[B, cells, hidden]`` -> softmax ``[B, C, cells]`` (class-major logits)."""
        logits = torch.matmul(self.head.cls.weight, h.transpose(1, 2)).add_(self.head.cls.bias[:, None])
        return torch.softmax(logits, dim=1)

    @torch.no_grad()
    def native_proba(
        self, split: SegmentationSplit, indices: Sequence[int] | np.ndarray, passes: int | None = None
    ) -> torch.Tensor:
        """Per-cell softmax on the cell grid, ``[B, C, rows, cols]`` (``[T, B, C, rows, cols]`` with
        ``passes``). The MC-dropout passes share the deterministic trunk: the hidden activations are
        computed once and only the dropout mask and the classifier are repeated, with the masks drawn
        in the same order as ``mc_dropout_proba`` (same numbers, ~T times cheaper)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if passes is None:
            return self.cell_proba(split, idx).reshape(idx.size, -1, self.rows, self.cols)
        h = self._hidden(split, idx)
        out = []
        for _ in range(passes):
            hd = h * self._drop_mask(tuple(h.shape)) if self.dropout > 0 else h
            out.append(self._classify(hd).reshape(idx.size, -1, self.rows, self.cols))
        return torch.stack(out)

    def _upsample(self, cell_values: torch.Tensor) -> torch.Tensor:
        """``[B, K, cells]`` -> ``[B, K, H, W]`` by nearest-neighbour (every pixel copies its cell)."""
        b, k, _ = cell_values.shape
        grid = cell_values.reshape(b, k, self.rows, self.cols)
        return grid.repeat_interleave(self.stride, dim=2).repeat_interleave(self.stride, dim=3)

    @torch.no_grad()
    def _forward_proba(
        self, split: SegmentationSplit, indices: np.ndarray, dropout: bool = False
    ) -> torch.Tensor:
        return self._upsample(self.cell_proba(split, indices, dropout=dropout)).contiguous()

    @torch.no_grad()
    def prediction_maps(
        self, split: SegmentationSplit, indices: np.ndarray
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Arg-max and entropy maps computed per cell, then expanded: the same numbers as from the
        upsampled softmax without ever building the ``[B, C, H, W]`` tensor."""
        idx = np.asarray(indices, dtype=np.int64)
        preds, ents = [], []
        for start in range(0, idx.size, self.default_batch_size()):
            p = self.cell_proba(split, idx[start : start + self.default_batch_size()])
            ent = -(p * torch.log(p + 1e-10)).sum(1, keepdim=True)
            preds.append(self._upsample(p.argmax(1, keepdim=True))[:, 0])
            ents.append(self._upsample(ent)[:, 0])
        return torch.cat(preds), torch.cat(ents)

    @torch.no_grad()
    def predict(self, split: SegmentationSplit, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Arg-max class map ``[B, H, W]`` uint8 (argmax per cell, then upsampled: same result, cheaper)."""
        idx = np.asarray(indices, dtype=np.int64)
        bs = self.default_batch_size()
        out = []
        for start in range(0, idx.size, bs):
            pred = self.cell_proba(split, idx[start : start + bs]).argmax(1, keepdim=True)
            out.append(self._upsample(pred)[:, 0].to(torch.uint8).cpu())
        if not out:
            h, w = self.info.image_size[1], self.info.image_size[0]
            return np.zeros((0, h, w), dtype=np.uint8)
        return torch.cat(out).numpy()

    @torch.no_grad()
    def evaluate(
        self, split: SegmentationSplit, batch_size: int | None = None, progress: bool = False
    ) -> SegmentationMetrics:
        """Exact full-resolution confusion matrix from per-cell predictions and cached cell histograms.

        Nearest upsampling gives every pixel of a cell the cell's arg-max, so the confusion matrix is
        ``sum_cells hist_cell (x) onehot(pred_cell)``: a scatter-add instead of 170k-pixel bincounts per
        image. Batches match ``Segmenter.evaluate`` so the result equals it exactly.
        """
        from tqdm.auto import tqdm

        c = self.info.num_classes
        hist = self.targets(split)
        cm = torch.zeros(c, c, dtype=torch.int64)
        bs = batch_size or self.default_batch_size()
        starts = range(0, len(split), bs)
        for start in tqdm(starts, desc=f"eval {split.name}", leave=False, disable=not progress):
            idx = np.arange(start, min(start + bs, len(split)))
            pred = self.cell_proba(split, idx).argmax(1).reshape(-1).cpu()
            cm.index_add_(1, pred, hist[start : start + idx.size].reshape(-1, c).T.long())
        return SegmentationMetrics.from_confusion(cm)

    # --- training ---------------------------------------------------------------------------------
    def fit_regions(
        self,
        split: SegmentationSplit,
        anchors: np.ndarray,
        labeled: np.ndarray,
        epochs: int = 1,
        progress: bool = False,
    ) -> float:
        """Train on the cells of the anchor regions; loss over labeled pixels only (see module doc).

        One epoch is one pass over ``anchors`` in shuffled minibatches of ``batch_size`` regions. Each
        sample is the anchor region's ``(rh/stride) x (rw/stride)`` cells; cells of regions that are not
        ``labeled`` contribute nothing. Returns the mean minibatch loss (0.0 if nothing was labeled).
        """
        from tqdm.auto import tqdm

        anchors, labeled = self._check_fit_args(split, anchors, labeled)
        if anchors.size == 0 or epochs <= 0:
            return 0.0
        if not self.is_initialised:
            self.initialise(split, labeled)
        feats, hist = self.features(split), self.targets(split)
        image, row, col = self.grid.split_ids(anchors)
        local = torch.from_numpy(anchors % self.grid.per_image)
        image_t = torch.from_numpy(image)
        anchor_labeled = torch.from_numpy(labeled[image, row, col])
        weights = self.head.class_weights
        self.head.train()
        losses: list[float] = []
        steps = [(e, s) for e in range(epochs) for s in range(0, anchors.size, self.batch_size)]
        bar = tqdm(total=len(steps), desc=f"fit {split.name}", leave=False, disable=not progress)
        for _ in range(epochs):
            order = torch.randperm(anchors.size, generator=self.generator)
            for start in range(0, anchors.size, self.batch_size):
                sel = order[start : start + self.batch_size]
                sel = sel[anchor_labeled[sel]]  # a region without labels carries no loss
                bar.update(1)
                if sel.numel() == 0:
                    continue
                losses.append(self._train_step(feats, hist, image_t[sel], local[sel], weights))
        bar.close()
        self.head.eval()
        return float(np.mean(losses)) if losses else 0.0

    def _train_step(
        self,
        feats: torch.Tensor,
        hist: torch.Tensor,
        image: torch.Tensor,
        local: torch.Tensor,
        weights: torch.Tensor,
    ) -> float:
        cells = self._region_cells[local]  # [A, cells per region]
        x = feats[image[:, None], cells].to(self.device, torch.float32)
        y = hist[image[:, None], cells].to(self.device, torch.float32)
        pos_cells = cells
        if self.hflip:
            flip = torch.rand(image.numel(), generator=self.generator) < 0.5
            if bool(flip.any()):
                x[flip] = x[flip][..., self._flip_perm]
                pos_cells = torch.where(flip[:, None], self._mirror_cell[cells], cells)
        pos_term = self._positions[pos_cells] @ self.head.pos.weight.T
        drop = None
        if self.train_dropout and self.dropout > 0:
            drop = self._drop_mask((*x.shape[:-1], self.hidden))
        logits = self.head(x, pos_term, drop)
        target = y * weights
        norm = target.sum()
        loss = -(target * F.log_softmax(logits, dim=-1)).sum() / norm.clamp_min(1e-12)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip:
            nn.utils.clip_grad_norm_(self.head.parameters(), self.grad_clip)
        self.optimizer.step()
        return float(loss.detach())

    def pixel_loss(self, split: SegmentationSplit, indices: np.ndarray, labeled: np.ndarray) -> float:
        """Weighted cross-entropy over the labeled pixels of some images (eval mode, for checks).

        Uses the cell-histogram identity, like training, but over whole images.
        """
        idx = np.asarray(indices, dtype=np.int64)
        with torch.no_grad():
            p = self.cell_proba(split, idx).transpose(1, 2)
            mask = self._cell_mask(np.asarray(labeled, dtype=bool)[idx]).to(self.device)
            y = self.targets(split)[torch.from_numpy(idx)].to(self.device, torch.float32) * mask.unsqueeze(-1)
            target = y * self.head.class_weights
            return float(-(target * torch.log(p.clamp_min(1e-30))).sum() / target.sum().clamp_min(1e-12))


def fit_with_early_stopping(
    seg: Segmenter,
    train_split: SegmentationSplit,
    val_split: SegmentationSplit,
    max_epochs: int = 300,
    patience: int = 30,
    progress: bool = False,
) -> dict[str, Any]:
    """Pretrain ``seg`` on every region of ``train_split``, keeping the best ``val_split`` mIoU epoch.

    The paper's pretraining protocol (spec §9) at fast-model scale: one epoch = one pass over all
    regions of the fully labeled training images, mIoU on the validation split after each epoch,
    ExponentialLR stepped once per epoch, stop after ``patience`` epochs without improvement, and
    restore the best weights (NaN mIoU never counts as an improvement). Works for any ``Segmenter``.
    Returns ``{"history": [{"epoch", "loss", "val_miou"}], "best_miou", "best_epoch"}``.
    """
    from tqdm.auto import tqdm

    history: list[dict[str, float]] = []
    best_miou, best_epoch, best_state = -1.0, -1, None
    bar = tqdm(range(max_epochs), desc="pretrain", disable=not progress)
    for epoch in bar:
        loss = seg.fit_images(train_split, epochs=1)
        seg.step_lr()
        miou = seg.evaluate(val_split).miou
        history.append({"epoch": epoch, "loss": loss, "val_miou": miou})
        if np.isfinite(miou) and miou > best_miou:
            best_miou, best_epoch = miou, epoch
            best_state = seg.snapshot()
        bar.set_postfix(loss=f"{loss:.3f}", val=f"{miou:.4f}", best=f"{best_miou:.4f}")
        if epoch - best_epoch >= patience:
            break
    if best_state is not None:
        seg.restore(best_state)
    return {"history": history, "best_miou": best_miou, "best_epoch": best_epoch}
