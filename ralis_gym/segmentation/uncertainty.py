"""Per-pixel acquisition scores on probability tensors (spec §7), shared by the env and the agents.

All functions are vectorized over any leading axes; the class axis is -3 (``[..., C, H, W]``).
"""

from __future__ import annotations

import torch

EPS = 1e-10


def pixel_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Predictive entropy ``-sum_c p_c log p_c`` (natural log) of ``probs [..., C, H, W]`` -> ``[..., H, W]``."""
    return -(probs * torch.log(probs + EPS)).sum(dim=-3)


def pixel_bald(mc_probs: torch.Tensor) -> torch.Tensor:
    """BALD of T stochastic passes ``mc_probs [T, ..., C, H, W]``: ``H[mean_t p_t] - mean_t H[p_t]``."""
    return pixel_entropy(mc_probs.mean(dim=0)) - pixel_entropy(mc_probs).mean(dim=0)


def pixel_margin(probs: torch.Tensor) -> torch.Tensor:
    """Margin uncertainty ``1 - (p_top1 - p_top2)`` of ``probs [..., C, H, W]``: high where the two best classes tie."""
    top2 = probs.topk(2, dim=-3).values
    return 1.0 - (top2.select(-3, 0) - top2.select(-3, 1))


def pixel_class_rarity(probs: torch.Tensor, class_frequency: torch.Tensor) -> torch.Tensor:
    """Expected rarity ``sum_c p_c(x) * -log(pi_c)`` of the predicted class, for frequencies ``pi [C]``.

    The class-balance heuristic of this project: it favours regions predicted to hold classes that are
    rare in what has been labeled so far (Pole, SignSymbol, Pedestrian, Bicyclist on CamVid).
    """
    pi = class_frequency.to(probs) / class_frequency.sum().clamp_min(EPS)
    rarity = -torch.log(pi + 1e-6)
    shape = [1] * probs.dim()
    shape[-3] = -1
    return (probs * rarity.view(shape)).sum(dim=-3)
