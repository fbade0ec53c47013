"""The paper's segmenter: FPN-ResNet-50 trained on region-anchored crops, as in the RALIS reference
code (https://github.com/ArantxaCasanova/ralis: ``models/fpn.py``, ``models/fpn_bayesian.py``).

Training samples follow the reference ``RandomCropRegion``: for every anchor region a crop of
``crop_size`` (h, w) is drawn whose top-left corner is uniform over the inclusive ranges
``y1 in [max(0, cy - th), min(cy, H - th)]``, ``x1 in [max(0, cx - tw), min(cx, W - tw)]`` with
``(cy, cx) = (ry + rh // 2, rx + rw // 2)``, then flipped horizontally with p = 0.5. So the crop
always holds the region's centre point ``(cy, cx)`` (possibly on its border, exactly as the
reference's ``random.randint``) and at least ``rh // 2`` rows and ``rw // 2`` columns of the region.
The target is the ground truth inside every labeled region of that image and the ignore id elsewhere.
Crops are gathered for the whole batch with one fancy-indexing op (the flip is folded into the column
indices), so no per-sample Python work happens besides drawing numbers from ``self.generator``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ralis_gym.data.base import DatasetInfo, SegmentationSplit
from ralis_gym.errors import ConfigError
from ralis_gym.regions.grid import RegionGrid
from ralis_gym.segmentation.base import Segmenter
from ralis_gym.segmentation.fpn import RESNET50_LAYERS, FPNResNet50, build_fpn, load_imagenet_backbone

#: ImageNet normalisation applied after scaling to [0, 1] (the reference's input transform)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: optimiser constants of the reference: SGD momentum and weight decay, grad-norm clip, lr decay per step
MOMENTUM = 0.95
WEIGHT_DECAY = 1e-4
GRAD_CLIP_NORM = 4.0
LR_GAMMA = 0.998


@dataclass(frozen=True)
class CropBatch:
    """A batch of training crops and where they came from (for tests and debugging)."""

    images: np.ndarray  # uint8 [B, th, tw, 3] RGB
    targets: np.ndarray  # uint8 [B, th, tw], ignore id outside labeled regions
    image_index: np.ndarray  # int64 [B], image of the split
    top: np.ndarray  # int64 [B], crop row in the image
    left: np.ndarray  # int64 [B], crop column in the image (before the flip)
    flip: np.ndarray  # bool [B], crop mirrored left-right

    def __len__(self) -> int:
        return len(self.image_index)


def randint_inclusive(low: np.ndarray, high: np.ndarray, generator: torch.Generator) -> np.ndarray:
    """Uniform integers in ``[low, high]`` (both inclusive, like ``random.randint``), elementwise."""
    low = np.asarray(low, dtype=np.int64)
    high = np.asarray(high, dtype=np.int64)
    if np.any(high < low):
        raise ValueError("randint_inclusive needs high >= low everywhere")
    u = torch.rand(low.shape, generator=generator, dtype=torch.float64).numpy()
    return low + np.minimum(np.floor(u * (high - low + 1)).astype(np.int64), high - low)


def clamp_crop(image_hw: tuple[int, int], crop_hw: tuple[int, int]) -> tuple[int, int]:
    """The crop size actually used: a crop larger than the image shrinks to the image (no padding)."""
    return min(crop_hw[0], image_hw[0]), min(crop_hw[1], image_hw[1])


def region_crop_offsets(
    boxes: np.ndarray, image_hw: tuple[int, int], crop_hw: tuple[int, int], generator: torch.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Top-left corners of crops holding each region's centre (the module doc's inclusive ranges).

    ``boxes`` are ``RegionGrid.boxes`` rows (image, x, y, w, h). Draws rows first, then columns.
    """
    (height, width), (th, tw) = image_hw, clamp_crop(image_hw, crop_hw)
    cy = boxes[:, 2] + boxes[:, 4] // 2
    cx = boxes[:, 1] + boxes[:, 3] // 2
    top = randint_inclusive(np.maximum(0, cy - th), np.minimum(cy, height - th), generator)
    left = randint_inclusive(np.maximum(0, cx - tw), np.minimum(cx, width - tw), generator)
    return top, left


def uniform_crop_offsets(
    n: int, image_hw: tuple[int, int], crop_hw: tuple[int, int], generator: torch.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Top-left corners of ``n`` uniformly random crops (plain ``RandomCrop``, used for pretraining)."""
    (height, width), (th, tw) = image_hw, clamp_crop(image_hw, crop_hw)
    zeros = np.zeros(n, dtype=np.int64)
    top = randint_inclusive(zeros, np.full(n, height - th), generator)
    left = randint_inclusive(zeros, np.full(n, width - tw), generator)
    return top, left


def gather_crops(
    images: np.ndarray,
    labels: np.ndarray,
    image_index: np.ndarray,
    top: np.ndarray,
    left: np.ndarray,
    flip: np.ndarray,
    crop_hw: tuple[int, int],
    ignore_index: int,
    labeled: np.ndarray | None = None,
    grid: RegionGrid | None = None,
) -> CropBatch:
    """Cut (and mirror) crops out of ``images``/``labels`` in one vectorised gather.

    With ``labeled`` (bool ``[images, rows, cols]``) and ``grid``, target pixels outside labeled
    regions become ``ignore_index``; this equals cropping ``grid.pixel_mask(labeled[img])`` but
    only looks up the region of each cropped pixel instead of expanding whole images.
    """
    th, tw = clamp_crop(images.shape[1:3], crop_hw)
    img = np.asarray(image_index, dtype=np.int64)
    ys = np.asarray(top, dtype=np.int64)[:, None] + np.arange(th)[None, :]
    cols = np.arange(tw)[None, :]
    flip = np.asarray(flip, dtype=bool)
    xs = np.asarray(left, dtype=np.int64)[:, None] + np.where(flip[:, None], tw - 1 - cols, cols)
    ii, yy, xx = img[:, None, None], ys[:, :, None], xs[:, None, :]
    crops = np.asarray(images[ii, yy, xx])
    targets = np.asarray(labels[ii, yy, xx])
    if labeled is not None:
        if grid is None:
            raise ValueError("gather_crops needs the region grid to mask with `labeled`")
        rw, rh = grid.region_size
        keep = labeled[ii, yy // rh, xx // rw]
        targets = np.where(keep, targets, np.uint8(ignore_index)).astype(np.uint8)
    return CropBatch(crops, targets, img, np.asarray(top, np.int64), np.asarray(left, np.int64), flip)


def sample_region_crops(
    split: SegmentationSplit,
    grid: RegionGrid,
    anchors: np.ndarray,
    labeled: np.ndarray,
    crop_hw: tuple[int, int],
    generator: torch.Generator,
    ignore_index: int,
) -> CropBatch:
    """One training crop per anchor region: position (module doc), flip p=0.5, target masked to labeled."""
    boxes = grid.boxes(np.asarray(anchors, dtype=np.int64))
    image_hw = (split.images.shape[1], split.images.shape[2])
    top, left = region_crop_offsets(boxes, image_hw, crop_hw, generator)
    flip = torch.rand(len(boxes), generator=generator).numpy() < 0.5
    return gather_crops(
        split.images, split.labels, boxes[:, 0], top, left, flip, crop_hw, ignore_index, labeled, grid
    )


def sample_image_crops(
    split: SegmentationSplit,
    image_index: np.ndarray,
    crop_hw: tuple[int, int],
    generator: torch.Generator,
) -> CropBatch:
    """One uniformly placed, randomly flipped crop per image of fully labeled images (pretraining)."""
    idx = np.asarray(image_index, dtype=np.int64)
    image_hw = (split.images.shape[1], split.images.shape[2])
    top, left = uniform_crop_offsets(idx.size, image_hw, crop_hw, generator)
    flip = torch.rand(idx.size, generator=generator).numpy() < 0.5
    return gather_crops(split.images, split.labels, idx, top, left, flip, crop_hw, split.info.ignore_index)


def normalise_images(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 ``[B, H, W, 3]`` RGB -> ImageNet-normalised float32 ``[B, 3, H, W]`` on ``device``.

    The uint8 array is moved first (4x fewer bytes over PCIe) and normalised there in one fused
    multiply-add: ``(x / 255 - mean) / std = x * (1 / (255 std)) - mean / std``.
    """
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device, non_blocking=True)
    x = x.permute(0, 3, 1, 2).float()
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    return torch.addcmul(-mean / std, x, 1.0 / (255.0 * std))


class PaperSegmenter(Segmenter):
    """FPN-ResNet-50 with the reference's training recipe.

    * ``fit_regions``: one crop per anchor (shuffled each epoch), batches of ``batch_size``,
      CrossEntropyLoss(ignore_index), SGD(lr, momentum 0.95, weight decay 1e-4), grad-norm clip 4,
      network in train() mode (BatchNorm not frozen, as the reference).
    * ``fit_images`` (pretraining): one uniformly random crop per fully labeled image per epoch, as
      the reference's supervised training (not one sample per region: that would be 24x longer
      epochs than the reference's on CamVid).
    * ``step_lr``: ExponentialLR(0.998); ``reset_optimizer``: fresh SGD + schedule.
    * inference: eval() mode, no grad, full resolution, batch ``eval_batch_size`` (4, the reference's
      CamVid validation batch), float32 softmax. ``amp=True`` uses bfloat16 autocast on CUDA only
      (training and inference); on CPU it is ignored so CPU numbers stay exact.
    * ``dropout=True`` (BALD): element-wise dropout p=0.5 on the 512-channel concat, masks drawn on
      the network's device from a generator seeded by ``self.generator``, so MC passes differ from
      each other and a run with the same seed repeats them exactly.

    ImageNet initialisation only from a local torchvision ResNet-50 file (``imagenet_weights``);
    without it the backbone is randomly initialised as in the released reference code.
    """

    kind = "paper"

    def __init__(
        self,
        info: DatasetInfo,
        device: str | torch.device = "auto",
        seed: int = 0,
        lr: float = 1e-3,
        batch_size: int = 32,
        crop_size: tuple[int, int] = (224, 224),
        imagenet_weights: str | None = None,
        eval_batch_size: int = 4,
        amp: bool = False,
        layers: tuple[int, int, int, int] = RESNET50_LAYERS,
    ) -> None:
        super().__init__(info, device=device, seed=seed)
        if batch_size <= 0 or eval_batch_size <= 0:
            raise ConfigError(f"batch sizes must be positive, got {batch_size} and {eval_batch_size}")
        if len(crop_size) != 2 or min(crop_size) <= 0:
            raise ConfigError(f"crop_size must be (height, width) > 0, got {crop_size}")
        self.lr = lr
        self.batch_size = batch_size
        self.crop_size = (int(crop_size[0]), int(crop_size[1]))
        self.eval_batch_size = eval_batch_size
        self.amp = amp
        self.imagenet_weights = imagenet_weights
        self.layers = tuple(layers)
        model = build_fpn(info.num_classes, self.generator, self.layers)
        if imagenet_weights is not None:
            load_imagenet_backbone(model, imagenet_weights)
        self.model: FPNResNet50 = model.to(self.device)
        self.criterion = nn.CrossEntropyLoss(ignore_index=info.ignore_index)
        self.optimizer: torch.optim.SGD
        self.scheduler: torch.optim.lr_scheduler.ExponentialLR
        self.reset_optimizer()

    # --- Segmenter hooks ------------------------------------------------------------------------
    def default_batch_size(self) -> int:
        return self.eval_batch_size

    def reset_optimizer(self) -> None:
        self.optimizer = torch.optim.SGD(
            self.model.parameters(), lr=self.lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY
        )
        self.scheduler = torch.optim.lr_scheduler.ExponentialLR(self.optimizer, gamma=LR_GAMMA)

    def step_lr(self) -> None:
        # The reference decays after every AL step even when no batch was trained (e.g. right
        # after a reset), which makes torch warn about the call order; that order is intended.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
            self.scheduler.step()

    def config(self) -> dict[str, Any]:
        return {
            **super().config(), "lr": self.lr, "batch_size": self.batch_size, "crop_size": self.crop_size,
            "imagenet_weights": self.imagenet_weights, "layers": list(self.layers),
        }  # fmt: skip

    def model_state(self) -> dict[str, Any]:
        """The live ``state_dict`` (tensors share storage with the network, as torch's own).

        ``snapshot`` deep-copies it; callers that keep it across training must copy it too.
        """
        return self.model.state_dict()

    def load_model_state(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state)

    @torch.no_grad()
    def native_logits(
        self, split: SegmentationSplit, indices: np.ndarray, dropout: bool = False
    ) -> torch.Tensor:
        """Full-resolution logits (the FPN upsamples bilinearly inside, so ``native_stride`` is 1)."""
        self.model.eval()
        x = normalise_images(np.asarray(split.images[np.asarray(indices, dtype=np.int64)]), self.device)
        gen = self._dropout_generator() if dropout else None
        with self._autocast():
            logits = self.model(x, dropout_generator=gen)
        return logits.float()

    def fit_regions(
        self,
        split: SegmentationSplit,
        anchors: np.ndarray,
        labeled: np.ndarray,
        epochs: int = 1,
        progress: bool = False,
    ) -> float:
        anchors, labeled = self._check_fit_args(split, anchors, labeled)

        def batches() -> Iterator[CropBatch]:
            for _ in range(epochs):
                order = anchors[torch.randperm(anchors.size, generator=self.generator).numpy()]
                for start in range(0, order.size, self.batch_size):
                    yield sample_region_crops(
                        split,
                        self.grid,
                        order[start : start + self.batch_size],
                        labeled,
                        self.crop_size,
                        self.generator,
                        self.info.ignore_index,
                    )

        total = epochs * -(-anchors.size // self.batch_size)
        return self._train(batches(), total, progress, desc=f"train {split.name}")

    def fit_images(self, split: SegmentationSplit, epochs: int = 1, progress: bool = False) -> float:
        """Pretraining epochs: one uniformly random crop + flip per (fully labeled) image per epoch."""

        def batches() -> Iterator[CropBatch]:
            for _ in range(epochs):
                order = torch.randperm(len(split), generator=self.generator).numpy()
                for start in range(0, order.size, self.batch_size):
                    yield sample_image_crops(
                        split, order[start : start + self.batch_size], self.crop_size, self.generator
                    )

        total = epochs * -(-len(split) // self.batch_size)
        return self._train(batches(), total, progress, desc=f"pretrain {split.name}")

    # --- internals ------------------------------------------------------------------------------
    def train_batch(self, batch: CropBatch) -> float | None:
        """One SGD step on a crop batch; returns the loss, or None if no pixel carries a label."""
        target = torch.from_numpy(np.ascontiguousarray(batch.targets)).to(self.device).long()
        if not bool((target != self.info.ignore_index).any()):
            return None
        self.model.train()
        x = normalise_images(batch.images, self.device)
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            logits = self.model(x)
        loss = self.criterion(logits.float(), target)
        loss.backward()
        nn.utils.clip_grad_norm_(self.model.parameters(), GRAD_CLIP_NORM)
        self.optimizer.step()
        return float(loss.detach())

    def _train(self, batches: Iterator[CropBatch], total: int, progress: bool, desc: str) -> float:
        """Run the batches; mean loss over the batches that had labeled pixels (0.0 if none)."""
        from tqdm.auto import tqdm

        losses = []
        for batch in tqdm(batches, total=total, desc=desc, leave=False, disable=not progress):
            loss = self.train_batch(batch)
            if loss is not None:
                losses.append(loss)
        return float(np.mean(losses)) if losses else 0.0

    def _dropout_generator(self) -> torch.Generator:
        """A device generator for one MC pass, seeded from ``self.generator`` (reproducible per seed).

        Masks are drawn on the network's device because a CPU-drawn mask for a 2048x1024 batch
        (4 x 512 x 256 x 512 floats) would cost more than the forward pass to build and transfer.
        """
        seed = int(torch.randint(0, 2**62, (1,), generator=self.generator))
        return torch.Generator(device=self.device).manual_seed(seed)

    def _autocast(self) -> Any:
        if self.amp and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()
