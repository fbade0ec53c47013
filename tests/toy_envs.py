"""Tiny synthetic envs with the observation/action layout of ``RegionALEnv``, for fast agent tests.

``ToyPoolEnv`` has the same spaces as ``RegionALEnv`` (Dict of float32 ``state [M, Ds]``,
``candidates [K, N, Ds + 64]``, ``action_mask [K, N]``; ``MultiDiscrete([N] * K)``; all-zero observation
on termination; ``info["miou"]``/``info["action_mask"]``; ``action_masks()``) but a known optimum: the
reward is the mean over pools of feature 0 of the chosen candidate, so a learner must rank candidates by
one feature among noise. Everything is drawn from ``self.np_random`` so seeded runs repeat exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

#: Reward of a pool whose chosen slot is masked (only reachable with ``strict_mask=False``).
MASKED_PENALTY = -1.0


class ToyPoolEnv(gym.Env):
    """K pools of N random candidates per step; reward = mean over pools of the chosen candidate's feature 0.

    Masked slots are traps: their feature 0 is 1.0 (the best any real candidate can approach) and every
    other feature 0, so a policy that ignores the mask would pick them. With ``strict_mask=True`` choosing
    one raises ``ValueError`` (as ``RegionALEnv`` does), with ``False`` it costs ``MASKED_PENALTY`` and is
    counted in ``info["masked_chosen"]`` (``action_space.sample()`` ignores masks, and Gymnasium's
    ``check_env`` steps with it).

    :param masked_per_pool: number of masked slots of pool k (cycled over the K pools); ``N`` gives an
        empty pool, which contributes nothing to the reward (as in ``RegionALEnv``).
    :param episode_length: steps until ``terminated``.
    """

    metadata = {"render_modes": [], "render_fps": 4}

    def __init__(
        self,
        state_regions: int = 6,
        state_dim: int = 10,
        num_pools: int = 3,
        pool_size: int = 5,
        episode_length: int = 5,
        masked_per_pool: Sequence[int] = (0, 1, 2),
        sim_size: int = 64,
        strict_mask: bool = False,
    ) -> None:
        super().__init__()
        self.state_regions, self.state_dim = int(state_regions), int(state_dim)
        self.num_pools, self.pool_size = int(num_pools), int(pool_size)
        self.episode_length = int(episode_length)
        self.masked_per_pool = [int(masked_per_pool[k % len(masked_per_pool)]) for k in range(self.num_pools)]
        if any(not 0 <= m <= self.pool_size for m in self.masked_per_pool):
            raise ValueError(f"masked_per_pool must lie in [0, {self.pool_size}], got {masked_per_pool}")
        self.strict_mask = bool(strict_mask)
        self.cand_dim = self.state_dim + int(sim_size)
        k, n = self.num_pools, self.pool_size
        self.observation_space = spaces.Dict(
            {
                "state": spaces.Box(0.0, 1.0, (self.state_regions, self.state_dim), dtype=np.float32),
                "candidates": spaces.Box(0.0, 1.0, (k, n, self.cand_dim), dtype=np.float32),
                "action_mask": spaces.Box(0.0, 1.0, (k, n), dtype=np.float32),
            }
        )
        self.action_space = spaces.MultiDiscrete(np.full(k, n, dtype=np.int64))
        self._obs: dict[str, np.ndarray] | None = None
        self._t = 0
        self._total = 0.0
        self._masked_chosen = 0

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        self._t, self._total, self._masked_chosen = 0, 0.0, 0
        self._obs = self._draw()
        return self._copy_obs(), self._info()

    def step(self, action):
        if self._obs is None:
            raise RuntimeError("call reset() before step()")
        act = np.asarray(action)
        if act.shape != (self.num_pools,) or not np.issubdtype(act.dtype, np.integer):
            raise ValueError(
                f"action must be {self.num_pools} integers, got shape {act.shape} dtype {act.dtype}"
            )
        if np.any((act < 0) | (act >= self.pool_size)):
            raise ValueError(f"action indices must lie in 0..{self.pool_size - 1}, got {act}")
        mask = self._obs["action_mask"] > 0.5
        values = []
        for k, a in enumerate(act.tolist()):
            if not mask[k].any():
                continue  # empty pool: any index is accepted and contributes nothing
            if not mask[k, a]:
                if self.strict_mask:
                    raise ValueError(f"invalid action for pool {k}: slot {a} is masked")
                self._masked_chosen += 1
                values.append(MASKED_PENALTY)
            else:
                values.append(float(self._obs["candidates"][k, a, 0]))
        reward = float(np.mean(values)) if values else 0.0
        self._t += 1
        self._total += reward
        terminated = self._t >= self.episode_length
        self._obs = self._zeros() if terminated else self._draw()
        return self._copy_obs(), reward, terminated, False, self._info()

    def action_masks(self) -> np.ndarray:
        """Flat boolean mask ``[K * N]`` (sb3-contrib ``MaskablePPO`` convention)."""
        if self._obs is None:
            return np.ones(self.num_pools * self.pool_size, dtype=bool)
        return (self._obs["action_mask"] > 0.5).reshape(-1)

    def close(self) -> None:
        self._obs = None

    # --- internals ---------------------------------------------------------------------------------
    def _draw(self) -> dict[str, np.ndarray]:
        rng = self.np_random
        k, n = self.num_pools, self.pool_size
        state = rng.random((self.state_regions, self.state_dim), dtype=np.float32)
        cands = rng.random((k, n, self.cand_dim), dtype=np.float32)
        mask = np.ones((k, n), dtype=np.float32)
        for pool, m in enumerate(self.masked_per_pool):
            slots = rng.permutation(n)[:m]
            mask[pool, slots] = 0.0
            cands[pool, slots] = 0.0
            cands[pool, slots, 0] = 1.0  # trap: looks best on the rewarded feature
        return {"state": state, "candidates": cands, "action_mask": mask}

    def _zeros(self) -> dict[str, np.ndarray]:
        return {
            key: np.zeros(sp.shape, dtype=np.float32) for key, sp in self.observation_space.spaces.items()
        }

    def _copy_obs(self) -> dict[str, np.ndarray]:
        assert self._obs is not None
        return {key: value.copy() for key, value in self._obs.items()}

    def _info(self) -> dict[str, Any]:
        assert self._obs is not None
        return {
            # Stand-in for the D_R mIoU: mean reward per step so far (in [-1, 1]).
            "miou": self._total / self._t if self._t else 0.0,
            "action_mask": self._obs["action_mask"] > 0.5,
            "masked_chosen": self._masked_chosen,
        }


def run_episodes(env: gym.Env, act, episodes: int, seed: int) -> np.ndarray:
    """Undiscounted return of ``episodes`` episodes of ``act(obs) -> action``; episode i uses seed ``seed + i``."""
    returns = np.empty(episodes)
    for i in range(episodes):
        obs, _ = env.reset(seed=seed + i)
        done, total = False, 0.0
        while not done:
            obs, reward, terminated, truncated, _ = env.step(act(obs))
            total += reward
            done = terminated or truncated
        returns[i] = total
    return returns
