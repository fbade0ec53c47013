"""The train / predict / evaluate interface shared by the paper model and the fast model.

The environment, the pretraining and the baselines only talk to a ``Segmenter``, so switching
between the FPN-ResNet-50 of the paper and the CPU-friendly fast model is one argument.

Training data is described by region anchors rather than by pixel crops: ``fit_regions`` gets the
split, the regions to anchor training samples on and the boolean ``[images, rows, cols]`` mask of
every labeled region. The target of an anchor's image is its ground truth inside labeled regions and
the ignore id elsewhere, as in the RALIS reference code (https://github.com/ArantxaCasanova/ralis),
so the loss is masked to labeled pixels.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ralis_gym.data.base import DatasetInfo, SegmentationSplit
from ralis_gym.features.regions import class_argmax, entropy_map
from ralis_gym.regions.grid import RegionGrid
from ralis_gym.segmentation.metrics import SegmentationMetrics, cell_histograms, confusion_matrix


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` is CUDA when present, else CPU; anything else is passed to ``torch.device``."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class Segmenter(ABC):
    """A segmentation network with its optimiser, trained on labeled regions.

    A model implements one inference method, ``native_logits`` (class scores of some images at its
    own output resolution: a grid of ``native_stride x native_stride``-pixel cells that nearest
    upsampling maps onto the image; 1 means full resolution), plus ``fit_regions`` and the state
    hooks. Everything else that reads predictions (full-resolution probabilities, arg-max and
    entropy maps, MC-dropout passes, the confusion matrix of a split) is defined here once on top
    of it, so a cheaper model cannot drift from the exact full-resolution definitions. Everything
    random draws from ``self.generator`` (seeded), so the same seed gives the same training on CPU.
    """

    #: registry name of the model kind ("fast" or "paper")
    kind: str = ""
    #: pixels per side of one native output cell (nearest upsampling to the image; 1 = full resolution)
    native_stride: int = 1

    def __init__(self, info: DatasetInfo, device: str | torch.device = "auto", seed: int = 0) -> None:
        self.info = info
        self.grid = RegionGrid(info.image_size, info.region_size)
        self.device = resolve_device(device)
        self.generator = torch.Generator().manual_seed(seed)
        self.seed = seed

    # --- to implement ---------------------------------------------------------------------------
    @abstractmethod
    def native_logits(
        self, split: SegmentationSplit, indices: np.ndarray, dropout: bool = False
    ) -> torch.Tensor:
        """Class scores ``[B, C, H / s, W / s]`` float32 on ``self.device`` (eval mode, no grad),
        ``s = native_stride``. ``dropout=True`` applies the MC-dropout layer before the classifier
        (for BALD's stochastic passes)."""

    def _mc_logits(self, split: SegmentationSplit, indices: np.ndarray, passes: int) -> torch.Tensor:
        """``[T, B, C, h, w]`` logits of ``passes`` MC-dropout passes. Models whose dropout sits after
        a deterministic trunk override this to run the trunk once (same numbers, cheaper)."""
        return torch.stack([self.native_logits(split, indices, dropout=True) for _ in range(passes)])

    @abstractmethod
    def fit_regions(
        self,
        split: SegmentationSplit,
        anchors: np.ndarray,
        labeled: np.ndarray,
        epochs: int = 1,
        progress: bool = False,
    ) -> float:
        """Train on samples anchored at ``anchors`` (region ids of ``split``); returns the mean loss.

        ``labeled`` (bool ``[images, rows, cols]``) says which pixels carry ground truth.
        """

    def _check_fit_args(
        self, split: SegmentationSplit, anchors: np.ndarray, labeled: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """``fit_regions`` inputs as flat int64 anchor ids and a bool ``[images, rows, cols]`` mask,
        with a clear error when the mask does not match ``split`` or an anchor id is out of range."""
        anchors = np.asarray(anchors, dtype=np.int64).reshape(-1)
        labeled = np.asarray(labeled, dtype=bool)
        expected = (len(split), self.grid.rows, self.grid.cols)
        if labeled.shape != expected:
            raise ValueError(
                f"labeled mask has shape {labeled.shape}; expected {expected} for split {split.name!r}"
            )
        n_regions = len(split) * self.grid.per_image
        if anchors.size and (anchors.min() < 0 or anchors.max() >= n_regions):
            raise ValueError(f"anchor region ids must lie in 0..{n_regions - 1}")
        return anchors, labeled

    @abstractmethod
    def model_state(self) -> dict[str, Any]:
        """Network weights only (what a start network checkpoint holds)."""

    @abstractmethod
    def load_model_state(self, state: dict[str, Any]) -> None: ...

    @abstractmethod
    def reset_optimizer(self) -> None:
        """Fresh optimiser and learning-rate schedule (start of an episode)."""

    @abstractmethod
    def step_lr(self) -> None:
        """One learning-rate decay step (the reference decays twice per AL step / final epoch)."""

    # --- shared ---------------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """Hyper-parameters that define the model (cache keys of start networks include them)."""
        return {"kind": self.kind, "seed": self.seed}

    def default_batch_size(self) -> int:
        return 4

    def upsample(self, native: torch.Tensor) -> torch.Tensor:
        """Nearest upsampling of ``[..., h, w]`` native maps to the image (every pixel copies its cell)."""
        s = self.native_stride
        if s == 1:
            return native
        return native.repeat_interleave(s, dim=-2).repeat_interleave(s, dim=-1)

    @torch.no_grad()
    def native_proba(
        self, split: SegmentationSplit, indices: Sequence[int] | np.ndarray, passes: int | None = None
    ) -> torch.Tensor:
        """Softmax at the model's own output resolution: ``[B, C, h, w]``, or ``[T, B, C, h, w]`` of
        ``passes`` MC-dropout passes. ``h``/``w`` are multiples of the region rows/columns, so the mean
        of any per-pixel map over a region can be taken here exactly (the fast model's cell grid is
        ~100x smaller than the image)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        logits = self.native_logits(split, idx) if passes is None else self._mc_logits(split, idx, passes)
        return torch.softmax(logits, dim=-3)

    @torch.no_grad()
    def iter_native_proba(
        self,
        split: SegmentationSplit,
        indices: Sequence[int] | np.ndarray | None = None,
        batch_size: int | None = None,
    ) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """Yield ``(indices, native probs [B, C, h, w])`` over the split in batches."""
        idx = np.arange(len(split)) if indices is None else np.asarray(indices, dtype=np.int64).reshape(-1)
        bs = batch_size or self.default_batch_size()
        for start in range(0, idx.size, bs):
            chunk = idx[start : start + bs]
            yield chunk, self.native_proba(split, chunk)

    @torch.no_grad()
    def iter_proba(
        self,
        split: SegmentationSplit,
        indices: Sequence[int] | np.ndarray | None = None,
        batch_size: int | None = None,
    ) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """Yield ``(indices, probs [B, C, H, W])`` at full resolution over the split in batches."""
        for chunk, probs in self.iter_native_proba(split, indices, batch_size):
            yield chunk, self.upsample(probs).contiguous()

    @torch.no_grad()
    def predict_proba(self, split: SegmentationSplit, indices: Sequence[int] | np.ndarray) -> torch.Tensor:
        """Softmax probabilities of the given images, ``[B, C, H, W]`` on ``self.device``."""
        return torch.cat([p for _, p in self.iter_proba(split, indices)])

    @torch.no_grad()
    def predict(self, split: SegmentationSplit, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Arg-max class map ``[B, H, W]`` uint8 (arg-max on the native grid, then upsampled: the
        same result as the arg-max of the upsampled probabilities)."""
        maps = [
            self.upsample(class_argmax(p)).to(torch.uint8).cpu()
            for _, p in self.iter_native_proba(split, indices)
        ]
        if not maps:
            return np.zeros((0, self.info.image_size[1], self.info.image_size[0]), dtype=np.uint8)
        return torch.cat(maps).numpy()

    @torch.no_grad()
    def mc_dropout_proba(
        self, split: SegmentationSplit, indices: Sequence[int] | np.ndarray, passes: int = 20
    ) -> torch.Tensor:
        """``[T, B, C, H, W]`` softmax of T stochastic (dropout) forward passes at full resolution."""
        return self.upsample(self.native_proba(split, indices, passes=passes)).contiguous()

    @torch.no_grad()
    def prediction_maps(
        self, split: SegmentationSplit, indices: np.ndarray, native_prediction: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Arg-max ``[B, H, W]`` and entropy ``[B, H, W]`` maps at full resolution (the inputs of the
        state and candidate region features), computed on the native grid and then expanded: the same numbers as
        from the upsampled softmax without building the ``[B, C, H, W]`` tensor. With
        ``native_prediction`` the arg-max map stays on the native grid (``native_stride`` px a cell)."""
        preds, ents = [], []
        for _, p in self.iter_native_proba(split, indices):
            argmax = class_argmax(p)
            preds.append(argmax if native_prediction else self.upsample(argmax))
            ents.append(self.upsample(entropy_map(p)))
        return torch.cat(preds), torch.cat(ents)

    @property
    def class_weights(self) -> torch.Tensor | None:
        """Per-class loss weights of the training loss (None: unweighted)."""
        return None

    @torch.no_grad()
    def loss_maps(self, split: SegmentationSplit, indices: Sequence[int] | np.ndarray) -> torch.Tensor:
        """The training loss against the true labels per native cell, ``[B, h, w]``: class-weighted
        cross-entropy summed over the cell's pixels and divided by its area (void pixels count 0),
        so the mean over a region is its mean per-pixel loss at full resolution (``oracle_loss``)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        logp = torch.log_softmax(self.native_logits(split, idx), dim=1)  # [B, C, h, w]
        weights = self.class_weights
        if self.native_stride == 1:
            target = torch.from_numpy(np.asarray(split.labels[idx])).to(logp.device).long()
            return F.nll_loss(
                logp, target, weight=weights, ignore_index=self.info.ignore_index, reduction="none"
            )
        hist = cell_histograms(split, self.native_stride)[torch.from_numpy(idx)]  # [B, cells, C]
        hist = hist.to(logp.device, torch.float32).transpose(1, 2).reshape(logp.shape)
        if weights is not None:
            hist = hist * weights.to(logp.device).view(1, -1, 1, 1)
        return -(hist * logp).sum(1) / float(self.native_stride**2)

    @torch.no_grad()
    def evaluate(
        self, split: SegmentationSplit, batch_size: int | None = None, progress: bool = False
    ) -> SegmentationMetrics:
        """Confusion matrix over the whole split at full resolution, and the metrics derived from it.

        With a native grid coarser than the image, every pixel of a cell gets the cell's arg-max, so
        the confusion matrix is ``sum_cells hist_cell (x) onehot(pred_cell)`` with the cached per-cell
        ground-truth histograms: a scatter-add instead of per-pixel bincounts, and exactly equal.
        """
        from tqdm.auto import tqdm

        c = self.info.num_classes
        cm = torch.zeros(c, c, dtype=torch.int64, device=self.device)
        hist = cell_histograms(split, self.native_stride) if self.native_stride > 1 else None
        bs = batch_size or self.default_batch_size()
        batches = self.iter_native_proba(split, batch_size=bs)
        total = -(-len(split) // bs)
        for idx, probs in tqdm(
            batches, total=total, desc=f"eval {split.name}", leave=False, disable=not progress
        ):
            pred = class_argmax(probs)
            if hist is None:
                target = torch.from_numpy(np.asarray(split.labels[idx])).to(self.device)
                cm += confusion_matrix(pred, target, c, self.info.ignore_index)
            else:
                cells = hist[torch.from_numpy(idx)].reshape(-1, c).to(self.device).long()
                cm.index_add_(1, pred.reshape(-1), cells.T)
        return SegmentationMetrics.from_confusion(cm)

    def fit_images(self, split: SegmentationSplit, epochs: int = 1, progress: bool = False) -> float:
        """Train on fully labeled images (every region labeled, one anchor per region)."""
        labeled = np.ones((len(split), self.grid.rows, self.grid.cols), dtype=bool)
        anchors = np.arange(len(split) * self.grid.per_image)
        return self.fit_regions(split, anchors, labeled, epochs=epochs, progress=progress)

    def snapshot(self) -> dict[str, Any]:
        """Deep copy of everything that training changes (weights, optimiser momentum, learning-rate
        schedule, RNG), so that ``restore`` continues exactly as if nothing had happened in between
        (the benchmarks branch a final training off an active-learning run and then go on)."""
        snap = {"model": copy.deepcopy(self.model_state()), "rng": self.generator.get_state()}
        for name in ("optimizer", "scheduler"):
            if getattr(self, name, None) is not None:
                snap[name] = copy.deepcopy(getattr(self, name).state_dict())
        return snap

    def restore(self, snapshot: dict[str, Any]) -> None:
        self.load_model_state(copy.deepcopy(snapshot["model"]))
        self.generator.set_state(snapshot["rng"])
        self.reset_optimizer()
        for name in ("optimizer", "scheduler"):
            if name in snapshot:
                getattr(self, name).load_state_dict(copy.deepcopy(snapshot[name]))
