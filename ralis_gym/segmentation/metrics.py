"""Segmentation metrics from one confusion matrix accumulated over a whole split.

Absent-class policy: a class that appears neither in the ground truth nor in the prediction has
an undefined IoU (0/0). Its IoU is reported as NaN and it is left out of the mean, so mIoU is the
mean over the classes that occur. (The reference code's ``np.mean`` turns the whole mIoU into NaN
instead.) If no class occurs at all, mIoU is 0.0. A class present in the ground truth but never
predicted has IoU 0, and a class predicted but absent from the ground truth also has IoU 0.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import torch

from ralis_gym.data.base import SegmentationSplit
from ralis_gym.errors import ConfigError


def confusion_matrix(
    pred: torch.Tensor | np.ndarray,
    target: torch.Tensor | np.ndarray,
    num_classes: int,
    ignore_index: int,
) -> torch.Tensor:
    """Confusion counts ``[C, C]`` (rows = ground truth, columns = prediction), ignore pixels excluded.

    ``pred`` and ``target`` are integer arrays of the same shape; computed with one ``bincount``.
    """
    pred_t = torch.as_tensor(pred)
    target_t = torch.as_tensor(target, device=pred_t.device)
    if pred_t.shape != target_t.shape:
        raise ValueError(f"prediction shape {tuple(pred_t.shape)} != target shape {tuple(target_t.shape)}")
    target_t = target_t.reshape(-1).long()
    pred_t = pred_t.reshape(-1).long()
    keep = target_t != ignore_index
    if not bool(keep.all()):
        target_t, pred_t = target_t[keep], pred_t[keep]
    if target_t.numel() and (int(target_t.max()) >= num_classes or int(target_t.min()) < 0):
        raise ValueError(f"target holds ids outside 0..{num_classes - 1} and ignore id {ignore_index}")
    if pred_t.numel() and (int(pred_t.max()) >= num_classes or int(pred_t.min()) < 0):
        raise ValueError(f"prediction holds ids outside 0..{num_classes - 1}")
    flat = target_t * num_classes + pred_t
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


@dataclass(frozen=True)
class SegmentationMetrics:
    """Per-class IoU, mIoU and pixel accuracy derived from a confusion matrix (see module doc)."""

    confusion: np.ndarray  # int64 [C, C], rows = ground truth

    @classmethod
    def from_confusion(cls, confusion: torch.Tensor | np.ndarray) -> SegmentationMetrics:
        cm = (
            confusion.detach().cpu().numpy() if isinstance(confusion, torch.Tensor) else np.asarray(confusion)
        )
        return cls(cm.astype(np.int64))

    @property
    def num_classes(self) -> int:
        return self.confusion.shape[0]

    @property
    def iou(self) -> np.ndarray:
        """IoU per class, NaN for classes absent from both ground truth and prediction."""
        tp = np.diag(self.confusion).astype(np.float64)
        union = self.confusion.sum(0) + self.confusion.sum(1) - tp
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(union > 0, tp / np.maximum(union, 1), np.nan)

    @property
    def miou(self) -> float:
        iou = self.iou
        return float(np.nanmean(iou)) if np.isfinite(iou).any() else 0.0

    @property
    def pixel_accuracy(self) -> float:
        total = self.confusion.sum()
        return float(np.trace(self.confusion) / total) if total else 0.0

    @property
    def class_accuracy(self) -> np.ndarray:
        """Recall per class (NaN where the class is absent from the ground truth)."""
        gt = self.confusion.sum(1).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(gt > 0, np.diag(self.confusion) / np.maximum(gt, 1), np.nan)

    def to_dict(self, class_names: tuple[str, ...] | None = None) -> dict:
        names = class_names or tuple(str(i) for i in range(self.num_classes))
        return {
            "miou": self.miou,
            "pixel_accuracy": self.pixel_accuracy,
            "per_class_iou": {n: (None if np.isnan(v) else float(v)) for n, v in zip(names, self.iou)},
        }

    def __add__(self, other: SegmentationMetrics) -> SegmentationMetrics:
        return SegmentationMetrics(self.confusion + other.confusion)


# Per-cell ground-truth histograms, shared by every segmenter (keyed by stride and split).
_TARGETS: dict[tuple[int, int, int, str, str], torch.Tensor] = {}
_TARGETS_LOCK = threading.Lock()


def cell_histograms(split: SegmentationSplit, stride: int, chunk: int = 16) -> torch.Tensor:
    """Ground-truth pixels per class of every cell: int16 ``[N, rows * cols, C]`` (ignore excluded).

    The targets of a model whose output is a grid of ``stride x stride``-pixel cells: its masked
    cross-entropy and its full-resolution confusion matrix are exact sums over these. Cached in
    memory per ``(stride, classes, split.key, label fingerprint)``; one ``bincount`` per chunk of images.
    """
    from ralis_gym.segmentation.encoder import content_fingerprint

    info = split.info
    key = (stride, info.num_classes, info.ignore_index, split.key, content_fingerprint(split.labels))
    with _TARGETS_LOCK:
        hit = _TARGETS.get(key)
    if hit is not None:
        return hit
    width, height = info.image_size
    rows, cols, c = height // stride, width // stride, info.num_classes
    if stride * rows != height or stride * cols != width:
        raise ConfigError(f"stride {stride} does not divide the image size {width}x{height}")
    if stride * stride > np.iinfo(np.int16).max:
        raise ConfigError(f"stride {stride} is too large for int16 cell histograms")
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
