"""Regions: grid tiling, labeled/unlabeled bookkeeping, candidate-pool sampling, training targets."""

from ralis_gym.regions.grid import RegionGrid, check_tiling
from ralis_gym.regions.pool import CandidatePools, RegionPool

__all__ = ["CandidatePools", "RegionGrid", "RegionPool", "check_tiling"]
