"""The train / predict / evaluate interface shared by the paper model and the fast model.

The environment, the pretraining and the baselines only talk to a ``Segmenter``, so switching
between the FPN-ResNet-50 of the paper and the CPU-friendly fast model is one argument.

Training data is described by region anchors rather than by pixel crops: ``fit_regions`` gets the
split, the regions to anchor training samples on and the boolean ``[images, rows, cols]`` mask of
every labeled region. The target of an anchor's image is its ground truth inside labeled regions and
the ignore id elsewhere (spec §2), so the loss is masked to labeled pixels.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from ralis_gym.data.base import DatasetInfo, SegmentationSplit
from ralis_gym.regions.grid import RegionGrid
from ralis_gym.segmentation.metrics import SegmentationMetrics, confusion_matrix
from ralis_gym.segmentation.uncertainty import pixel_entropy  # noqa: F401  (re-exported)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` is CUDA when present, else CPU; anything else is passed to ``torch.device``."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class Segmenter(ABC):
    """A segmentation network with its optimiser, trained on labeled regions.

    Subclasses implement ``_forward_proba`` (full-resolution softmax of some images), ``fit_regions``
    and the state dict hooks. Everything random draws from ``self.generator`` (seeded), so the same
    seed gives the same training on CPU.
    """

    #: registry name of the model kind ("fast" or "paper")
    kind: str = ""

    def __init__(self, info: DatasetInfo, device: str | torch.device = "auto", seed: int = 0) -> None:
        self.info = info
        self.grid = RegionGrid(info.image_size, info.region_size)
        self.device = resolve_device(device)
        self.generator = torch.Generator().manual_seed(seed)
        self.seed = seed

    # --- to implement ---------------------------------------------------------------------------
    @abstractmethod
    def _forward_proba(
        self, split: SegmentationSplit, indices: np.ndarray, dropout: bool = False
    ) -> torch.Tensor:
        """Softmax ``[B, C, H, W]`` float32 at full resolution on ``self.device`` (eval mode, no grad).

        ``dropout=True`` applies the MC-dropout layer before the classifier (BALD, spec §7).
        """

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

    @torch.no_grad()
    def iter_proba(
        self,
        split: SegmentationSplit,
        indices: Sequence[int] | np.ndarray | None = None,
        batch_size: int | None = None,
        dropout: bool = False,
    ) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """Yield ``(indices, probs [B, C, H, W])`` over the split in batches."""
        idx = np.arange(len(split)) if indices is None else np.asarray(indices, dtype=np.int64)
        bs = batch_size or self.default_batch_size()
        for start in range(0, idx.size, bs):
            chunk = idx[start : start + bs]
            yield chunk, self._forward_proba(split, chunk, dropout=dropout)

    @torch.no_grad()
    def predict_proba(self, split: SegmentationSplit, indices: Sequence[int] | np.ndarray) -> torch.Tensor:
        """Softmax probabilities of the given images, ``[B, C, H, W]`` on ``self.device``."""
        return torch.cat([p for _, p in self.iter_proba(split, indices)])

    @torch.no_grad()
    def predict(self, split: SegmentationSplit, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Arg-max class map ``[B, H, W]`` uint8."""
        return (
            torch.cat([p.argmax(1) for _, p in self.iter_proba(split, indices)]).to(torch.uint8).cpu().numpy()
        )

    @torch.no_grad()
    def mc_dropout_proba(
        self, split: SegmentationSplit, indices: Sequence[int] | np.ndarray, passes: int = 20
    ) -> torch.Tensor:
        """``[T, B, C, H, W]`` softmax of T stochastic (dropout) forward passes, for BALD."""
        idx = np.asarray(indices, dtype=np.int64)
        return torch.stack([self._forward_proba(split, idx, dropout=True) for _ in range(passes)])

    @torch.no_grad()
    def native_proba(
        self, split: SegmentationSplit, indices: Sequence[int] | np.ndarray, passes: int | None = None
    ) -> torch.Tensor:
        """Softmax at the model's own output resolution: ``[B, C, h, w]``, or ``[T, B, C, h, w]`` of
        ``passes`` MC-dropout passes. Nearest-upsampling it to ``H x W`` gives the full-resolution
        probabilities, and ``h``/``w`` are multiples of the region rows/columns, so the mean of any
        per-pixel map over a region can be taken here exactly (the fast model's cell grid is ~100x
        smaller than the image). The default is the full resolution."""
        idx = np.asarray(indices, dtype=np.int64)
        if passes is None:
            return self._forward_proba(split, idx)
        return self.mc_dropout_proba(split, idx, passes=passes)

    @torch.no_grad()
    def prediction_maps(
        self, split: SegmentationSplit, indices: np.ndarray
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Arg-max ``[B, H, W]`` and entropy ``[B, H, W]`` maps at full resolution (the inputs of the
        spec §4 region features). Models with a cheaper exact path (the fast model) override it."""
        from ralis_gym.features.regions import entropy_map

        probs = self.predict_proba(split, indices)
        return probs.argmax(1), entropy_map(probs)

    @torch.no_grad()
    def evaluate(
        self, split: SegmentationSplit, batch_size: int | None = None, progress: bool = False
    ) -> SegmentationMetrics:
        """Confusion matrix over the whole split at full resolution, and the metrics derived from it."""
        from tqdm.auto import tqdm

        cm = torch.zeros(self.info.num_classes, self.info.num_classes, dtype=torch.int64, device=self.device)
        batches = self.iter_proba(split, batch_size=batch_size)
        total = -(-len(split) // (batch_size or self.default_batch_size()))
        for idx, probs in tqdm(
            batches, total=total, desc=f"eval {split.name}", leave=False, disable=not progress
        ):
            target = torch.from_numpy(np.asarray(split.labels[idx])).to(self.device)
            cm += confusion_matrix(probs.argmax(1), target, self.info.num_classes, self.info.ignore_index)
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
