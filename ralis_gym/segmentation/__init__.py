"""Segmentation engine: the paper's FPN-ResNet-50, the CPU fast model, metrics and pretraining."""

from __future__ import annotations

from typing import Any

import torch

from ralis_gym.data.base import DatasetInfo
from ralis_gym.segmentation.base import Segmenter, resolve_device
from ralis_gym.segmentation.metrics import SegmentationMetrics, confusion_matrix

MODEL_KINDS = ("fast", "paper")


def build_segmenter(
    kind: str, info: DatasetInfo, device: str | torch.device = "auto", seed: int = 0, **kwargs: Any
) -> Segmenter:
    """Create a segmenter by kind: ``"fast"`` (frozen encoder + head, CPU) or ``"paper"`` (FPN-R50)."""
    if kind == "fast":
        from ralis_gym.segmentation.fast import FastSegmenter

        return FastSegmenter(info, device=device, seed=seed, **kwargs)
    if kind == "paper":
        from ralis_gym.segmentation.paper import PaperSegmenter

        return PaperSegmenter(info, device=device, seed=seed, **kwargs)
    from ralis_gym.errors import ConfigError

    raise ConfigError(f"unknown model {kind!r}; choose one of {MODEL_KINDS}")


__all__ = [
    "MODEL_KINDS",
    "SegmentationMetrics",
    "Segmenter",
    "build_segmenter",
    "confusion_matrix",
    "resolve_device",
]
