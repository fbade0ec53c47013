"""Heuristic acquisition baselines (spec §7): per-pixel score maps and agents that act like the DQN.

Score maps are pure, vectorized torch functions on probability tensors; a region's score is the
mean of the map over its pixels. The agents share the DQN's ``predict(obs)`` interface and pick the
best candidate of each pool (never a masked one); they obtain the scores of the current candidates
from ``RegionALEnv.score_candidates``, which runs the real segmentation network.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

from ralis_gym.segmentation.uncertainty import (  # noqa: F401  (re-exported)
    pixel_bald,
    pixel_class_rarity,
    pixel_entropy,
    pixel_margin,
)


def masked_argmax(scores: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Best unmasked index per pool, ``[K]``; a pool without candidates gets 0 (the env ignores it)."""
    filled = np.where(np.asarray(mask) > 0, scores, -np.inf)
    best = filled.argmax(axis=-1)
    return np.where(np.isfinite(filled.max(axis=-1)), best, 0).astype(np.int64)


class HeuristicAgent:
    """Picks the highest-scoring candidate of each pool; ``predict`` mirrors SB3's signature."""

    heuristic: str = ""

    def __init__(self, env: gym.Env | None = None, seed: int | None = None, **score_kwargs: Any) -> None:
        self.env = env
        self.rng = np.random.default_rng(seed)
        self.score_kwargs = score_kwargs

    def scores(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        if self.env is None:
            raise ValueError(f"{type(self).__name__} needs the environment to score candidates; pass env=")
        return self.env.unwrapped.score_candidates(self.heuristic, **self.score_kwargs)

    def predict(
        self,
        obs: dict[str, np.ndarray],
        state: Any = None,
        episode_start: Any = None,
        deterministic: bool = True,
    ):
        return masked_argmax(self.scores(obs), obs["action_mask"]), None


class RandomAgent(HeuristicAgent):
    """One uniformly random unmasked candidate per pool (the reference's random baseline)."""

    heuristic = "random"

    def scores(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        return self.rng.random(np.asarray(obs["action_mask"]).shape)


class EntropyAgent(HeuristicAgent):
    heuristic = "entropy"


class MarginAgent(HeuristicAgent):
    heuristic = "margin"


class BALDAgent(HeuristicAgent):
    """MC-dropout BALD: T = 20 passes with p = 0.5 dropout before the classifier of the real model."""

    heuristic = "bald"


class ClassBalanceAgent(HeuristicAgent):
    heuristic = "class_balance"


HEURISTIC_AGENTS: dict[str, type[HeuristicAgent]] = {
    cls.heuristic: cls for cls in (RandomAgent, EntropyAgent, MarginAgent, BALDAgent, ClassBalanceAgent)
}


class OracleAgent(HeuristicAgent):
    """Ground-truth upper reference, not a heuristic: picks the candidate whose labeling decreases
    the loss of the set the episode is scored on most to first order (``oracle_set``: D_R in train
    mode, the test split in test mode), i.e. whose loss gradient at the classifier layer is most
    aligned with that set's. It reads labels no annotation team has, so it is a reference for what
    choosing can gain, not a strategy. Fast model only."""

    heuristic = "oracle"


class LossOracleAgent(HeuristicAgent):
    """Ground-truth reference: picks the candidate on which the network's current class-weighted
    loss against the true labels is largest (``Segmenter.loss_maps``); works with every model."""

    heuristic = "oracle_loss"


class RarityOracleAgent(HeuristicAgent):
    """Ground-truth reference: picks the candidate whose true pixels are rarest among the labels so
    far (the class-balance heuristic given the ground truth)."""

    heuristic = "oracle_rarity"


#: the ground-truth references by method name
ORACLE_AGENTS: dict[str, type[HeuristicAgent]] = {
    cls.heuristic: cls for cls in (OracleAgent, LossOracleAgent, RarityOracleAgent)
}
#: every baseline agent by method name: the heuristics and the ground-truth oracles
BASELINE_AGENTS: dict[str, type[HeuristicAgent]] = {**HEURISTIC_AGENTS, **ORACLE_AGENTS}


def make_heuristic_agent(
    name: str, env: gym.Env | None = None, seed: int | None = None, **kwargs: Any
) -> HeuristicAgent:
    """A baseline agent by method name (one of ``BASELINE_AGENTS``: the heuristics and the oracles)."""
    if name not in BASELINE_AGENTS:
        from ralis_gym.errors import ConfigError

        raise ConfigError(f"unknown method {name!r}; choose one of {sorted(BASELINE_AGENTS)}")
    return BASELINE_AGENTS[name](env, seed=seed, **kwargs)
