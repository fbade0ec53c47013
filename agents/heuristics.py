"""Baseline acquisition agents (the heuristics and the ground-truth oracles) that act like the DQN.

The scores are those of ``ralis_gym.segmentation.uncertainty`` (per-pixel maps, pure vectorized torch
functions on probability tensors; a region's score is the map's mean over its pixels). The agents
share the DQN's ``predict(obs)`` interface and pick the best candidate of each pool (never a masked
one); they obtain the scores of the current candidates from ``RegionALEnv.score_candidates``, which
runs the real segmentation network.

The scores live where the network lives: in the environment, which may be a plain ``gym.Env``, an
SB3 ``VecEnv`` or a Gymnasium ``VectorEnv`` whose copies run in subprocesses. The agents only ever
ask the environment for the scores (``score_candidates`` directly, ``env_method`` or ``call``), so
one code path serves one environment and many; with a vectorized environment ``predict`` takes and
returns batches (``action_mask`` ``[n_envs, K, N]`` -> actions ``[n_envs, K]``).
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from stable_baselines3.common.vec_env import VecEnv

from ralis_gym.errors import ConfigError


def masked_argmax(scores: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Best unmasked index per pool, ``[..., K]`` for scores and mask ``[..., K, N]`` (one env or a
    batch of them); a pool without candidates gets 0 (the env ignores it)."""
    filled = np.where(np.asarray(mask) > 0, scores, -np.inf)
    best = filled.argmax(axis=-1)
    return np.where(np.isfinite(filled.max(axis=-1)), best, 0).astype(np.int64)


AgentEnv = gym.Env | VecEnv | gym.vector.VectorEnv


def env_scores(env: AgentEnv, heuristic: str, **kwargs: Any) -> np.ndarray:
    """``score_candidates(heuristic, **kwargs)`` of ``env``: ``[K, N]`` for a plain env, stacked to
    ``[n_envs, K, N]`` for a vectorized one (in the order of its observations).

    A subprocess ``VecEnv`` holds its environments in other processes, so their methods are reached
    through the vector API: SB3's ``env_method`` (wrappers such as ``VecNormalize`` forward it) or
    Gymnasium's ``call`` (on ``unwrapped``: Gymnasium's vector wrappers do not forward it). Both look
    the method up through the per-env wrappers (``TimeLimit``, ``Monitor``) with ``get_wrapper_attr``.
    """
    if isinstance(env, VecEnv):
        return np.stack(env.env_method("score_candidates", heuristic, **kwargs))
    if isinstance(env, gym.vector.VectorEnv):
        return np.stack(env.unwrapped.call("score_candidates", heuristic, **kwargs))
    return env.unwrapped.score_candidates(heuristic, **kwargs)


class HeuristicAgent:
    """Picks the highest-scoring candidate of each pool; ``predict`` mirrors SB3's signature.

    ``env`` is a plain ``gym.Env`` (observations ``[K, N]``-masked, actions ``[K]``) or a vectorized
    one, SB3 ``VecEnv`` or Gymnasium ``VectorEnv`` (batched observations, actions ``[n_envs, K]``):
    the agent scores whatever the environment's current candidates are, so it must be the env that
    produced ``obs``.
    """

    heuristic: str = ""

    def __init__(self, env: AgentEnv | None = None, seed: int | None = None, **score_kwargs: Any) -> None:
        self.env = env
        self.rng = np.random.default_rng(seed)
        self.score_kwargs = score_kwargs

    def scores(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        """Scores shaped like ``obs["action_mask"]`` (``[K, N]`` or ``[n_envs, K, N]``)."""
        if self.env is None:
            raise ConfigError(f"{type(self).__name__} needs the environment to score candidates; pass env=")
        return env_scores(self.env, self.heuristic, **self.score_kwargs)

    def predict(
        self,
        obs: dict[str, np.ndarray],
        state: Any = None,
        episode_start: Any = None,
        deterministic: bool = True,
    ):
        mask = np.asarray(obs["action_mask"])
        scores = self.scores(obs)
        if scores.shape != mask.shape:
            # e.g. a vectorized env's batch with a plain env's agent: argmax would broadcast silently
            raise ConfigError(
                f"{type(self).__name__}: scores {scores.shape} do not match action_mask {mask.shape}; "
                "the agent's env= must be the environment (plain or vectorized) that produced obs"
            )
        return masked_argmax(scores, mask), None


class RandomAgent(HeuristicAgent):
    """One uniformly random unmasked candidate per pool (the reference's random baseline)."""

    heuristic = "random"

    def scores(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        """Uniform noise from the agent's own seeded generator, one ``[K, N]`` draw per env of a batch
        (in env order), so the agent needs no env and a batch of envs gets independent choices."""
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
    name: str, env: AgentEnv | None = None, seed: int | None = None, **kwargs: Any
) -> HeuristicAgent:
    """A baseline agent by method name (one of ``BASELINE_AGENTS``: the heuristics and the oracles);
    ``env`` may be plain or vectorized (see ``HeuristicAgent``)."""
    if name not in BASELINE_AGENTS:
        raise ConfigError(f"unknown method {name!r}; choose one of {sorted(BASELINE_AGENTS)}")
    return BASELINE_AGENTS[name](env, seed=seed, **kwargs)
