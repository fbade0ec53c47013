"""The FAST model: frozen label-free cell features + a small trainable head, for CPU-scale RALIS.

Why: the paper's FPN-ResNet-50 needs GPU-days for one RALIS experiment. Here the expensive part is
a fixed encoder (``ralis_gym.segmentation.encoder``) run once per image and cached, and only a
small head is trained, so a whole active-learning run (hundreds of fine-tuning steps, each followed
by a full evaluation of the reward set) takes minutes on a 2-core CPU.

Model (v2, ``GridHead``). The image is cut into ``stride x stride`` cells (the stride divides the
region size, so every cell belongs to one region). Each cell's cached feature vector (appearance +
multi-scale context, float16) goes through an input layer with the standardisation folded in, plus
a learned embedding of the cell position, then residual context blocks over the cell grid (3x3,
dilations 1/2/4, depthwise-separable, BatchNorm), [MC dropout] and a 1x1 classifier. The v1 per-cell
MLP is the same class with ``MLP_HEAD`` settings. Full-resolution probabilities are the cell
probabilities upsampled by nearest neighbour, which makes training and evaluation exact and cheap:

* loss: per-pixel cross-entropy with ignore, over labeled pixels only, equals
  ``sum_cells hist_cell . (-log p_cell)`` where ``hist_cell`` is the per-class count of labeled
  ground-truth pixels of the cell (cached per split); class weights multiply ``hist``;
* evaluation: the full-resolution confusion matrix is ``sum_cells hist_cell (x) onehot(argmax p_cell)``
  (a scatter-add), identical to ``Segmenter.evaluate`` on the upsampled prediction.

Training: the head sees whole images (it needs the context of the grid); the loss of an image covers
every labeled region of it, unlabeled cells carry none. Adam (lr 1e-3, weight decay 1e-4) with an
ExponentialLR decay stepped by the caller; ``optimizer="sgd"`` is the reference's SGD with momentum.
``lr`` drives ``fit_regions`` (AL steps and the final training), ``pretrain_lr`` drives ``fit_images``
(start networks); both default to 1e-3. Head width, depth, separability and the MLP baseline were
measured with ``benchmarks/fast_model_accuracy.py`` (README, "Fast model").

Deviations from the paper, on purpose and measured (``benchmarks/fast_model_accuracy.py``):
* class-weighted cross-entropy by default (``class_weighting="sqrt_median"``: weights
  ``sqrt(median_freq / freq)`` estimated once from the first training data, then frozen in the
  model state). Without it the rare CamVid classes are almost never predicted.
* no horizontal-flip augmentation by default (``hflip=False``); flipping costs nothing (the cached
  features are flip-equivariant up to a channel permutation) but lowered test mIoU because the
  position of pavement/road is asymmetric (driving side).
* MC dropout (p=0.5, before the classifier) is applied only when asked (BALD), as in the reference
  ``FPN50_bayesian``; training without dropout is the default (``train_dropout=False``).

Speed: the float16 feature caches are shared by every segmenter of a process; a float32 copy of a
split's features is kept beside them (up to ``FLOAT32_CACHE_BYTES`` per process), because
converting the reward set's features on every evaluation cost about as much as the input layer.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ralis_gym.data.base import DatasetInfo, SegmentationSplit
from ralis_gym.errors import ConfigError
from ralis_gym.segmentation.base import Segmenter
from ralis_gym.segmentation.encoder import (
    CellEncoder,
    EncoderConfig,
    position_encoding,
    split_features,
)
from ralis_gym.segmentation.metrics import cell_histograms

#: class-weighting schemes understood by ``FastSegmenter``
CLASS_WEIGHTINGS = ("none", "sqrt_median", "median")
#: optimisers of the head
OPTIMIZERS = ("adam", "sgd")


#: per-process budget of the float32 feature copies (``float32_features``)
FLOAT32_CACHE_BYTES = 1 << 30
_FLOAT32: dict[int, tuple[weakref.ref, torch.Tensor]] = {}


def float32_features(feats: torch.Tensor) -> torch.Tensor:
    """A float32 copy of a cached float16 feature tensor, kept while the float16 one lives and the
    copies fit in ``FLOAT32_CACHE_BYTES``; otherwise ``feats`` itself (converted per batch later).
    The copy is exact (float16 -> float32), so results do not depend on whether it was cached.
    Keyed by identity (tensors compare elementwise, so no ``WeakKeyDictionary``)."""
    key = id(feats)
    hit = _FLOAT32.get(key)
    if hit is not None and hit[0]() is feats:
        return hit[1]
    used = sum(copy.numel() * 4 for ref, copy in _FLOAT32.values() if ref() is not None)
    if used + feats.numel() * 4 > FLOAT32_CACHE_BYTES:
        return feats
    copy = feats.float()
    _FLOAT32[key] = (weakref.ref(feats, lambda _, k=key: _FLOAT32.pop(k, None)), copy)
    return copy


def default_stride(region_size: tuple[int, int], min_cells: int = 8) -> int:
    """Largest common divisor of the region sides that still leaves ``min_cells`` cells per side.

    CamVid 80x90 -> 10 (8x9 cells per region), Cityscapes 128x128 -> 16 (8x8 cells).
    """
    rw, rh = region_size
    g = math.gcd(rw, rh)
    good = [d for d in range(1, g + 1) if g % d == 0 and min(rw, rh) // d >= min_cells]
    return max(good) if good else 1


class ContextBlock(nn.Module):
    """Residual block ``h + relu(norm(conv(h)))`` over the cell grid.

    ``dilation > 0``: a 3x3 convolution with that dilation (depthwise then pointwise when
    ``separable``: ~9x fewer multiply-adds than a full 3x3 at the same width); ``dilation == 0``: a
    1x1 convolution (a per-cell layer, which is what the MLP head is made of).
    """

    def __init__(self, width: int, dilation: int, separable: bool, norm: bool) -> None:
        super().__init__()
        if dilation == 0:
            self.spatial = None
        elif separable:
            self.spatial = nn.Conv2d(width, width, 3, padding=dilation, dilation=dilation, groups=width)
        else:
            self.spatial = nn.Conv2d(width, width, 3, padding=dilation, dilation=dilation)
        self.mix = nn.Conv2d(width, width, 1) if (dilation == 0 or separable) else None
        self.norm = nn.BatchNorm2d(width) if norm else None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """``h [B, width, rows, cols]`` in any memory layout (the plain module semantics)."""
        y = h if self.spatial is None else self.spatial(h)
        if self.mix is not None:
            y = self.mix(y)
        if self.norm is not None:
            y = self.norm(y)
        return h + F.relu(y)

    def forward_cells_last(self, h: torch.Tensor) -> torch.Tensor:
        """The same block on ``h [B, rows, cols, width]`` (contiguous), returning that layout.

        Why: the head's activations are born cells-last (the input layer is a matmul over cells);
        ``forward`` on their channels-last view sent the 1x1 convolutions through ``_slow_conv2d``
        with layout copies and made the residual adds strided. Here the 3x3 convolution runs on the
        channels-last view (oneDNN), the 1x1 mix is a matmul over the last axis and the norm a batch
        norm over all cells, so nothing is copied: the same bits as ``forward`` (an episode and its
        final training reproduce to the last digit; ``tests/test_fast_model.py`` checks outputs and
        gradients), and the reward evaluation of a step ~8% faster (one thread, idle machine:
        0.207-0.214 s -> 0.195 s; ``benchmarks/env_throughput.py``). The rest of the head is matmul
        bound (the 282 -> width input layer is half of its multiply-adds).
        """
        y = h
        if self.spatial is not None:
            y = self.spatial(h.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        if self.mix is not None:
            y = F.linear(y, self.mix.weight.flatten(1), self.mix.bias)
        if self.norm is not None:
            y = batch_norm_cells_last(y, self.norm)
        return h + F.relu(y)


def batch_norm_cells_last(h: torch.Tensor, norm: nn.BatchNorm2d) -> torch.Tensor:
    """``norm`` (a ``BatchNorm2d``, its buffers and momentum rules) applied to ``[..., channels]``:
    batch statistics over every other axis in training (updating the running ones as the module
    does), running statistics in eval mode."""
    if norm.training and norm.track_running_stats:
        norm.num_batches_tracked.add_(1)
    momentum = norm.momentum
    if momentum is None:  # cumulative moving average, as nn.BatchNorm2d
        momentum = 1.0 / float(norm.num_batches_tracked)
    shape = h.shape
    y = F.batch_norm(
        h.reshape(-1, shape[-1]), norm.running_mean, norm.running_var, norm.weight, norm.bias,
        norm.training, momentum, norm.eps,
    )  # fmt: skip
    return y.view(shape)


class GridHead(nn.Module):
    """Trainable head over the cell grid: per-cell input layer + position embedding, a stack of
    (dilated) context blocks, MC dropout, a 1x1 classifier.

    ``feature_mean``/``feature_std`` (input standardisation, folded into the input layer so the
    282-channel input is read once) and ``class_weights`` are buffers set once from unlabeled
    statistics / the first training labels (``FastSegmenter.initialise``).
    """

    def __init__(
        self,
        in_dim: int,
        pos_dim: int,
        width: int,
        num_classes: int,
        dilations: Sequence[int],
        separable: bool,
        norm: bool,
    ) -> None:
        super().__init__()
        self.inp = nn.Linear(in_dim, width)
        self.pos = nn.Linear(pos_dim, width, bias=False)
        self.norm0 = nn.BatchNorm2d(width) if norm else None
        self.blocks = nn.ModuleList(ContextBlock(width, int(d), separable, norm) for d in dilations)
        self.cls = nn.Conv2d(width, num_classes, 1)
        self.register_buffer("feature_mean", torch.zeros(in_dim))
        self.register_buffer("feature_std", torch.ones(in_dim))
        self.register_buffer("class_weights", torch.ones(num_classes))
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))

    def reset_parameters(self, generator: torch.Generator) -> None:
        """PyTorch's default init (uniform +-1/sqrt(fan_in)), drawn from ``generator``; norms reset."""
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, (nn.Linear, nn.Conv2d)):
                    fan_in = module.weight[0].numel()
                    bound = 1.0 / math.sqrt(fan_in)
                    module.weight.copy_(
                        torch.empty(module.weight.shape).uniform_(-bound, bound, generator=generator)
                    )
                    if module.bias is not None:
                        module.bias.copy_(
                            torch.empty(module.bias.shape).uniform_(-bound, bound, generator=generator)
                        )
                elif isinstance(module, nn.BatchNorm2d):
                    module.reset_parameters()
                    module.reset_running_stats()

    def trunk(self, x: torch.Tensor, positions: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        """Features ``x [B, cells, D]`` (raw, standardised here) -> activations ``[B, width, rows, cols]``
        before the dropout and the classifier. The input layer is a matmul over the cells, so the
        activations are cells-last; they stay so through the blocks (``forward_cells_last``) and the
        result is a channels-last view of them (``classify`` reads it without a copy)."""
        w = self.inp.weight / self.feature_std
        b = self.inp.bias - w @ self.feature_mean
        pos = torch.addmm(b, positions, self.pos.weight.T)  # [cells, width], shared by the batch
        h = torch.matmul(x, w.T).add_(pos).view(x.shape[0], rows, cols, -1)
        if self.norm0 is not None:
            h = batch_norm_cells_last(h, self.norm0)
        h = F.relu(h)
        for block in self.blocks:
            h = block.forward_cells_last(h)
        return h.permute(0, 3, 1, 2)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        """Logits ``[B, C, rows, cols]`` of features ``x [B, cells, D]`` (no dropout)."""
        return self.classify(self.trunk(x, positions, rows, cols))

    def classify(self, h: torch.Tensor, drop_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[B, C, rows, cols]`` (a channels-last view); ``drop_mask`` is an already scaled
        keep mask of ``h``'s shape, or None."""
        if drop_mask is not None:
            h = h * drop_mask
        logits = F.linear(h.permute(0, 2, 3, 1), self.cls.weight.flatten(1), self.cls.bias)
        return logits.permute(0, 3, 1, 2)


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
        raise ConfigError(f"unknown class weighting {scheme!r}; choose one of {CLASS_WEIGHTINGS}")
    present = counts_t > 0
    freq = counts_t / counts_t.sum()
    weights = torch.ones_like(freq)
    weights[present] = freq[present].median() / freq[present]
    weights[~present] = weights[present].max()
    if scheme == "sqrt_median":
        weights = weights.sqrt()
    return weights.float()


def cell_cross_entropy(logits: torch.Tensor, hist: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The training loss: class-weighted per-pixel cross-entropy over the labeled pixels, computed on
    the cell grid (module doc). ``logits`` ``[B, cells, C]``, ``hist`` the cells' labeled-pixel class
    counts ``[B, cells, C]`` (zero in unlabeled cells), ``weights`` ``[C]``; mean over weighted pixels."""
    target = hist * weights
    return -(target * F.log_softmax(logits, dim=-1)).sum() / target.sum().clamp_min(1e-12)


#: the head of the fast model before v2 (a per-cell MLP): ``FastSegmenter(**MLP_HEAD)``
MLP_HEAD: dict[str, Any] = {"width": 96, "dilations": (0,), "separable": False, "norm": False}


class FastSegmenter(Segmenter):
    """Fast CPU segmenter: cached frozen cell features + a trainable head over the cell grid.

    Args:
        info: dataset facts (classes, image and region size).
        device: where the head runs (features stay cached on the CPU).
        seed: seeds ``self.generator``, the only source of randomness (init, shuffling, dropout).
        stride: cell size in pixels; must divide the region size (default ``default_stride``).
        width: channels of the head (48 by default since 2026-12-07, 64 before: 0.79x the step time at the same accuracy, BENCHMARKS.md §4).
        dilations: one residual context block per entry (3x3 conv with that dilation; 0 = 1x1).
        separable: depthwise + pointwise 3x3 convolutions (cheap) instead of full ones.
        norm: BatchNorm in the head (batch statistics in training, running statistics at inference).
        optimizer: ``"adam"`` (default) or ``"sgd"`` (momentum ``momentum``, the reference's choice).
        lr: learning rate of ``fit_regions`` (AL steps, final training); see the module doc.
        pretrain_lr: learning rate of ``fit_images`` (pretraining on fully labeled images).
        batch_size: images per minibatch (the loss of an image covers all its labeled regions).
        class_weighting: ``"sqrt_median"`` (default), ``"median"`` or ``"none"`` (see module doc).
        hflip: mirror half of the training images (cheap; off by default, see module doc).
        dropout: MC-dropout probability before the classifier.
        train_dropout: also apply that dropout while training.
        encoder: encoder configuration; its stride must equal ``stride``.
        disk_cache: keep encoded features under ``<user cache>/features`` as well as in memory.
        eval_batch_size: images per forward at inference.
    """

    kind = "fast"

    def __init__(
        self,
        info: DatasetInfo,
        device: str | torch.device = "auto",
        seed: int = 0,
        *,
        stride: int | None = None,
        width: int = 48,
        dilations: Sequence[int] = (1, 2, 4),
        separable: bool = True,
        norm: bool = True,
        optimizer: str = "adam",
        lr: float = 1e-3,
        pretrain_lr: float = 1e-3,
        momentum: float = 0.95,
        weight_decay: float = 1e-4,
        grad_clip: float = 4.0,
        lr_gamma: float = 0.998,
        batch_size: int = 8,
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
            raise ConfigError(f"stride {stride} differs from the encoder stride {encoder.stride}")
        s = encoder.stride
        rw, rh = info.region_size
        if rw % s or rh % s:
            raise ConfigError(
                f"stride {s} must divide the region size {rw}x{rh} so that every cell lies in one region"
            )
        if class_weighting not in CLASS_WEIGHTINGS:
            raise ConfigError(
                f"unknown class weighting {class_weighting!r}; choose one of {CLASS_WEIGHTINGS}"
            )
        if optimizer not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer {optimizer!r}; choose one of {OPTIMIZERS}")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"dropout must lie in [0, 1), got {dropout}")
        if width <= 0 or batch_size <= 0 or eval_batch_size <= 0:
            raise ConfigError("width, batch_size and eval_batch_size must be positive")
        if any(int(d) < 0 for d in dilations):
            raise ConfigError(f"dilations must be >= 0 (0 = a 1x1 block), got {tuple(dilations)}")
        self.stride = self.native_stride = s
        self.width, self.dilations = int(width), tuple(int(d) for d in dilations)
        self.separable, self.norm, self.optimizer_name = bool(separable), bool(norm), optimizer
        self.lr, self.pretrain_lr = lr, pretrain_lr
        self.momentum, self.weight_decay = momentum, weight_decay
        self.grad_clip, self.lr_gamma, self.batch_size = grad_clip, lr_gamma, batch_size
        self.class_weighting, self.hflip = class_weighting, hflip
        self.dropout, self.train_dropout = dropout, train_dropout
        self.disk_cache, self.eval_batch_size = disk_cache, eval_batch_size
        self.encoder = CellEncoder(encoder)

        self.rows, self.cols = self.encoder.grid_shape(info.image_size)
        self.cells = self.rows * self.cols
        # Region mask [images, rows, cols] -> cell mask: which grid rows/cols of cells each region covers.
        self._cells_per_region = (rh // s, rw // s)
        self._positions = position_encoding(self.rows, self.cols).reshape(self.cells, -1).to(self.device)
        self._flip_perm = self.encoder.flip_permutation()

        self.head = GridHead(
            self.encoder.dim, self._positions.shape[1], self.width, info.num_classes,
            self.dilations, self.separable, self.norm,
        )  # fmt: skip
        self.head.reset_parameters(self.generator)
        self.head.to(self.device)
        self.head.eval()
        self.reset_optimizer()

    # --- configuration / state --------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """Everything needed to rebuild this segmenter (saved with the weights)."""
        return {
            "width": self.width,
            "dilations": list(self.dilations),
            "separable": self.separable,
            "norm": self.norm,
            "optimizer": self.optimizer_name,
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

    def _architecture(self) -> dict[str, Any]:
        return {"width": self.width, "dilations": list(self.dilations), "separable": self.separable,
                "norm": self.norm}  # fmt: skip

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
            raise ConfigError(
                f"state of a {state.get('kind')!r} model cannot load into a {self.kind!r} model"
            )
        saved = state.get("config", {})
        arch = {k: saved.get(k, v) for k, v in self._architecture().items()}
        arch["dilations"] = list(arch["dilations"])
        if arch != self._architecture():
            raise ConfigError(
                f"state has a head {arch} but this segmenter has {self._architecture()}; "
                "build it with FastSegmenter.from_state"
            )
        key = state.get("encoder_key")
        if key is not None and key != self.encoder.config.key:
            raise ConfigError(
                f"state was trained on encoder features {key} but this segmenter uses "
                f"{self.encoder.config.key}; build it with FastSegmenter.from_state"
            )
        self.head.load_state_dict({k: v.to(self.device) for k, v in state["head"].items()})
        self.head.eval()

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
        params = self.head.parameters()
        if self.optimizer_name == "adam":
            self.optimizer = torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        else:
            self.optimizer = torch.optim.SGD(
                params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay
            )
        self.scheduler = torch.optim.lr_scheduler.ExponentialLR(self.optimizer, gamma=self.lr_gamma)

    def step_lr(self) -> None:
        self.scheduler.step()

    def fit_images(self, split: SegmentationSplit, epochs: int = 1, progress: bool = False) -> float:
        """Train on fully labeled images at ``pretrain_lr`` (times the current decay factor).

        Pretraining a start network is this call in a loop (``train_until_plateau``); the AL steps
        and the final training use ``fit_regions`` at ``lr``. Optimiser state is shared by both.
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
            raise ConfigError(
                f"split {split.name!r} has images of {split.info.image_size} but this segmenter was built "
                f"for {self.info.image_size}"
            )

    @property
    def class_weights(self) -> torch.Tensor:
        return self.head.class_weights

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
        ch, cw = self._cells_per_region
        cells = np.repeat(np.repeat(labeled, ch, axis=1), cw, axis=2)
        return torch.from_numpy(cells.reshape(labeled.shape[0], -1).astype(np.float32))

    # --- inference --------------------------------------------------------------------------------
    def _drop_mask(self, shape: tuple[int, ...]) -> torch.Tensor:
        keep = 1.0 - self.dropout
        mask = (torch.rand(shape, generator=self.generator) < keep).float() / keep
        return mask.to(self.device)

    def _inputs(self, split: SegmentationSplit, idx: np.ndarray) -> torch.Tensor:
        """Float32 features ``[B, cells, D]`` of some images (a contiguous range is sliced, not gathered)."""
        self._check_split(split)
        base = split_features(self.encoder, split, disk_cache=self.disk_cache)
        feats = float32_features(base).view(len(split), self.cells, -1)
        if idx.size and np.array_equal(idx, np.arange(idx[0], idx[0] + idx.size)):
            x = feats[int(idx[0]) : int(idx[0]) + idx.size]
        else:  # index_select copies rows ~3x faster than advanced indexing (same values)
            x = feats.index_select(0, torch.from_numpy(idx))
        return x.to(self.device, torch.float32)

    @torch.no_grad()
    def _trunk(self, split: SegmentationSplit, idx: np.ndarray) -> torch.Tensor:
        """Head activations before the (MC-)dropout and the classifier, ``[B, width, rows, cols]``."""
        self.head.eval()
        return self.head.trunk(self._inputs(split, idx), self._positions, self.rows, self.cols)

    @torch.no_grad()
    def native_logits(
        self, split: SegmentationSplit, indices: np.ndarray, dropout: bool = False
    ) -> torch.Tensor:
        """Logits on the cell grid, ``[B, C, rows, cols]``."""
        h = self._trunk(split, np.asarray(indices, dtype=np.int64).reshape(-1))
        drop = self._drop_mask(tuple(h.shape)) if dropout and self.dropout > 0 else None
        return self.head.classify(h, drop)

    @torch.no_grad()
    def _mc_logits(self, split: SegmentationSplit, indices: np.ndarray, passes: int) -> torch.Tensor:
        """MC-dropout passes share the deterministic trunk: it runs once and only the dropout mask and
        the classifier are repeated, with the masks drawn in the order of ``passes`` separate
        ``native_logits(dropout=True)`` calls (same numbers, ~T times cheaper)."""
        h = self._trunk(split, np.asarray(indices, dtype=np.int64).reshape(-1))
        out = []
        for _ in range(passes):
            drop = self._drop_mask(tuple(h.shape)) if self.dropout > 0 else None
            out.append(self.head.classify(h, drop))
        return torch.stack(out)

    # --- training ---------------------------------------------------------------------------------
    def fit_regions(
        self,
        split: SegmentationSplit,
        anchors: np.ndarray,
        labeled: np.ndarray,
        epochs: int = 1,
        progress: bool = False,
    ) -> float:
        """Train on the images of the anchor regions; loss over labeled pixels only (see module doc).

        One epoch is one pass over the distinct images of ``anchors`` in shuffled minibatches of
        ``batch_size`` images. The head sees each whole image (its context), and the loss of an
        image covers every region of it that ``labeled`` marks, as the reference's masked targets
        do. Returns the mean minibatch loss (0.0 if nothing was labeled).
        """
        from tqdm.auto import tqdm

        anchors, labeled = self._check_fit_args(split, anchors, labeled)
        if anchors.size == 0 or epochs <= 0:
            return 0.0
        if not self.is_initialised:
            self.initialise(split, labeled)
        images = np.unique(self.grid.split_ids(anchors)[0])
        images = images[labeled[images].any(axis=(1, 2))]  # an image without labels carries no loss
        if images.size == 0:
            return 0.0
        hist = self.targets(split)
        mask = self._cell_mask(labeled[images])
        images_t = torch.from_numpy(images)
        weights = self.head.class_weights
        self.head.train()
        losses: list[float] = []
        per_epoch = -(-images.size // self.batch_size)
        bar = tqdm(total=epochs * per_epoch, desc=f"fit {split.name}", leave=False, disable=not progress)
        for _ in range(epochs):
            order = torch.randperm(images.size, generator=self.generator)
            for start in range(0, images.size, self.batch_size):
                sel = order[start : start + self.batch_size]
                y = hist[images_t[sel]].float() * mask[sel].unsqueeze(-1)
                x = self._inputs(split, images[sel.numpy()])
                losses.append(self._train_step(x, y.to(self.device), weights))
                bar.update(1)
        bar.close()
        self.head.eval()
        return float(np.mean(losses)) if losses else 0.0

    def _train_step(self, x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor) -> float:
        """One optimiser step on whole images: features ``x [B, cells, D]``, masked cell histograms
        ``y [B, cells, C]``. The loss is the class-weighted pixel cross-entropy over labeled pixels."""
        if self.hflip:
            flip = torch.rand(x.shape[0], generator=self.generator) < 0.5
            if bool(flip.any()):
                b, d, c = x.shape[0], x.shape[-1], y.shape[-1]
                xf = x.view(b, self.rows, self.cols, d)[flip].flip(2)[..., self._flip_perm]
                yf = y.view(b, self.rows, self.cols, c)[flip].flip(2)
                x, y = x.clone(), y.clone()
                x[flip] = xf.reshape(-1, self.cells, d)
                y[flip] = yf.reshape(-1, self.cells, c)
        h = self.head.trunk(x, self._positions, self.rows, self.cols)
        drop = None
        if self.train_dropout and self.dropout > 0:
            drop = self._drop_mask(tuple(h.shape))
        logits = self.head.classify(h, drop).flatten(2).transpose(1, 2)  # [B, cells, C]
        loss = cell_cross_entropy(logits, y, weights)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip:
            nn.utils.clip_grad_norm_(self.head.parameters(), self.grad_clip)
        self.optimizer.step()
        return float(loss.detach())

    @torch.no_grad()
    def _classifier_gradient_parts(
        self, split: SegmentationSplit, idx: np.ndarray
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per cell, the gradient of the class-weighted cross-entropy summed over the cell's labeled
        pixels with respect to the cell's logits, ``a [B, cells, C]`` (= ``(sum_c w_c y_c) p - w * y``),
        and the classifier's input ``h [B, cells, width]``: the classifier's weight gradient of a
        set of cells is ``sum a (x) h`` and its bias gradient ``sum a`` (eval mode, no dropout)."""
        h = self._trunk(split, idx)
        return self._cell_logit_gradient(split, idx, self.head.classify(h)), h.flatten(2).transpose(1, 2)

    def _cell_logit_gradient(
        self, split: SegmentationSplit, idx: np.ndarray, logits: torch.Tensor
    ) -> torch.Tensor:
        """``a [B, cells, C] = (sum_c w_c y_c) p - w * y``: per cell, the gradient of the class-weighted
        cross-entropy summed over its labeled pixels w.r.t. its logits ``[B, C, rows, cols]``."""
        p = torch.softmax(logits, dim=1).flatten(2).transpose(1, 2)
        y = (
            self.targets(split)[torch.from_numpy(idx)].to(self.device, torch.float32)
            * self.head.class_weights
        )
        return y.sum(-1, keepdim=True) * p - y

    def _mean_loss_denominator(self, split: SegmentationSplit, idx: np.ndarray) -> float:
        """Class-weighted count of the labeled pixels of some images (the mean loss's denominator)."""
        counts = self.targets(split)[torch.from_numpy(idx)].sum((0, 1)).double()
        return max(float(counts @ self.head.class_weights.double().cpu()), 1e-12)

    @torch.no_grad()
    def classifier_gradient(
        self, split: SegmentationSplit, indices: np.ndarray | None = None
    ) -> torch.Tensor:
        """Gradient of the mean class-weighted cross-entropy over all labeled pixels of some images
        (all of ``split`` by default) w.r.t. the classifier ``[weight | bias]``, ``[C, width + 1]``."""
        idx = np.arange(len(split)) if indices is None else np.asarray(indices, dtype=np.int64)
        grad = torch.zeros(self.info.num_classes, self.width + 1, dtype=torch.float64, device=self.device)
        for start in range(0, idx.size, self.eval_batch_size):
            a, h = self._classifier_gradient_parts(split, idx[start : start + self.eval_batch_size])
            grad[:, :-1] += torch.einsum("bnc,bnw->cw", a, h).double()
            grad[:, -1] += a.sum((0, 1)).double()
        return (grad / self._mean_loss_denominator(split, idx)).float()

    @torch.no_grad()
    def gradient_alignment_maps(
        self, split: SegmentationSplit, indices: np.ndarray, direction: torch.Tensor
    ) -> torch.Tensor:
        """``<d loss_cell / d classifier, direction> / cell area`` per cell, ``[B, rows, cols]``, with
        ``loss_cell`` the class-weighted cross-entropy summed over the cell's labeled pixels. The mean
        over a region is the inner product of its mean pixel loss's classifier gradient with
        ``direction``: with ``direction = classifier_gradient(D_R)`` the first-order decrease of the
        D_R loss per unit gradient step on the region (the ``oracle``). Linear in the cells, so it is
        a per-cell map like the heuristics' and needs no per-region backward pass."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        a, h = self._classifier_gradient_parts(split, idx)
        direction = direction.to(self.device, torch.float32)
        u = h @ direction[:, :-1].T + direction[:, -1]  # [B, cells, C]
        maps = (a * u).sum(-1) / float(self.stride**2)
        return maps.view(idx.size, self.rows, self.cols)

    def head_gradient(
        self, split: SegmentationSplit, indices: np.ndarray | None = None
    ) -> dict[str, torch.Tensor]:
        """Gradient of the mean class-weighted cross-entropy over all labeled pixels of some images
        (all of ``split`` by default) w.r.t. every trainable parameter of the head (eval mode: running
        batch-norm statistics, no dropout), as ``{name: tensor}``."""
        idx = np.arange(len(split)) if indices is None else np.asarray(indices, dtype=np.int64)
        params = dict(self.head.named_parameters())
        grad = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in params.items()}
        hist = self.targets(split)
        self.head.eval()
        for start in range(0, idx.size, self.eval_batch_size):
            b = idx[start : start + self.eval_batch_size]
            y = hist[torch.from_numpy(b)].to(self.device, torch.float32) * self.head.class_weights
            with torch.enable_grad():
                h = self.head.trunk(self._inputs(split, b), self._positions, self.rows, self.cols)
                logp = F.log_softmax(self.head.classify(h).flatten(2).transpose(1, 2), dim=-1)
                parts = torch.autograd.grad(-(y * logp).sum(), list(params.values()))
            for k, g in zip(params, parts):
                grad[k] += g.double()
        total = self._mean_loss_denominator(split, idx)
        return {k: (g / total).float() for k, g in grad.items()}

    @torch.no_grad()
    def head_alignment_maps(
        self, split: SegmentationSplit, indices: np.ndarray, direction: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """``<d loss_cell / d head, direction> / cell area`` per cell, ``[B, rows, cols]``: the
        directional derivative of each cell's loss along ``direction`` (one forward-mode pass,
        ``torch.func.jvp``), i.e. the inner product of the cell's full-head loss gradient with it."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        x = self._inputs(split, idx)
        params = {k: v.detach() for k, v in self.head.named_parameters()}
        buffers = dict(self.head.named_buffers())
        tangents = {k: direction[k].to(self.device, torch.float32) for k in params}
        self.head.eval()

        def logits_of(p: dict[str, torch.Tensor]) -> torch.Tensor:
            return torch.func.functional_call(
                self.head, {**p, **buffers}, (x, self._positions, self.rows, self.cols)
            )

        logits, dlogits = torch.func.jvp(logits_of, (params,), (tangents,))
        a = self._cell_logit_gradient(split, idx, logits)
        maps = (a * dlogits.flatten(2).transpose(1, 2)).sum(-1) / float(self.stride**2)
        return maps.view(idx.size, self.rows, self.cols)
