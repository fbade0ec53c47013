"""The RALIS query network and an SB3 policy that acts with it on ``RegionALEnv`` observations.

The network is ``QueryNetworkDQN`` of ``models/query_network.py`` in the reference code
(https://github.com/ArantxaCasanova/ralis).

The network scores every candidate region of a pool from (i) the candidate's own features and (ii) the
state of the segmentation network, summarised from the state set D_S. It is a *set* scorer: every layer on
the candidate axis is a shared 1x1 convolution, so the same weights score pools of any size ``N`` (the
reference trains with N = 20 and tests with N = 10 on CamVid).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.type_aliases import PyTorchObs, Schedule
from torch import nn
from torch.nn import functional as F

from ralis_gym.errors import ConfigError

#: Keys of the ``RegionALEnv`` observation Dict.
OBS_KEYS = ("state", "candidates", "action_mask")


class PointwiseConv1d(nn.Conv1d):
    """A 1x1 ``Conv1d`` (same parameters and state-dict keys as the reference's) applied channel-last.

    Input ``[R, C_in]`` (rows = every pool/candidate or state region), output ``[R, C_out]``: the same map
    as ``Conv1d(C_in, C_out, 1)`` on ``[B, C_in, L]`` with ``R = B * L``, computed as one matrix product,
    which is several times faster on CPU than the convolution kernel.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(in_channels, out_channels, kernel_size=1)

    def forward(self, x: th.Tensor) -> th.Tensor:
        return F.linear(x, self.weight.squeeze(-1), self.bias)


def _pre_act_conv(c_in: int, c_out: int) -> list[nn.Module]:
    """BN -> ReLU -> 1x1 conv: the pre-activation block used everywhere in the reference network.

    ``BatchNorm1d`` on ``[R, C]`` normalises each channel over the R rows, i.e. over batch x length, the
    same statistics as on the reference's ``[B, C, L]`` layout.
    """
    return [nn.BatchNorm1d(c_in), nn.ReLU(), PointwiseConv1d(c_in, c_out)]


class RalisQNetwork(nn.Module):
    """Query network ``QueryNetworkDQN`` of the reference code, same layers and parameter count.

    ``Q(s, a_n) = sigmoid(w_g . ReLU(BN(kl_n)) + b_g) * (w_o . BN([phi(a_n); psi(s)]) + b_o)`` with

    - state branch psi: Ds -> 256 -> 128 -> 1 per state region (shared 1x1 convs, pre-activation
      BN -> ReLU -> Conv), then BN1d(M) -> ReLU -> Linear(M -> 128);
    - gate branch on the last ``sim_size`` (64) candidate features (the two KL histograms):
      BN(64) -> ReLU -> Conv(64 -> 1);
    - action branch phi on the first ``Da`` candidate features: Da -> 512 -> 256 -> 128 (no activation
      after the last conv);
    - head BN1d(256) -> Conv(256 -> 1) on ``cat([phi, psi])`` (no ReLU before this conv).

    ``final_q = Linear(256, 1)`` is never used; it exists because the reference defines it, so parameter
    counts (531,732 Cityscapes / 390,356 CamVid) and state dicts line up with it.

    Batching: ``forward(candidates [B, N, Da + 64], state, state_index)`` scores ``B`` pools. The reference
    replicates the state once per pool; here ``state`` holds only the distinct states ``[S, M, Ds]`` (or one
    ``[M, Ds]``) and ``state_index [B]`` says which state each pool belongs to. In eval mode (acting, the
    target net) BatchNorm is a per-element affine map, so the state branch runs once per distinct state and
    its embedding is broadcast: exact, and K times cheaper when the K pools of a step share one state. In
    train mode the batch statistics must see each state as often as the reference does (once per pool), so
    the state rows are gathered per pool first (a view when all pools share one state). ``share_states=True``
    runs the state branch once per distinct state in train mode too: the same batch statistics when every
    state has the same number of pools (whole steps, as ``RalisDQN(q_target="sum")`` samples them; a step
    with empty pools, possible only at the very end of a pool, then weighs as much as the others), and K
    times cheaper (24x on CamVid: the state branch is most of the cost of a training batch).
    """

    def __init__(self, state_regions: int, state_dim: int, action_dim: int, sim_size: int = 64) -> None:
        super().__init__()
        self.state_regions = int(state_regions)
        self.state_dim = int(state_dim)
        self.action_dim = int(action_dim)
        self.sim_size = int(sim_size)
        # State branch: per state region, Ds -> 256 -> 128 -> 1, then over the M regions M -> 128.
        self.state_convs = nn.Sequential(
            *_pre_act_conv(self.state_dim, 256), *_pre_act_conv(256, 128), *_pre_act_conv(128, 1)
        )
        self.bn_last_s = nn.BatchNorm1d(self.state_regions)
        self.state_fc = nn.Linear(self.state_regions, 128)
        # Gate branch on the KL-histogram ("sim") features.
        self.gate = nn.Sequential(*_pre_act_conv(self.sim_size, 1))
        # Action branch on the region vector of each candidate.
        self.action_convs = nn.Sequential(
            *_pre_act_conv(self.action_dim, 512), *_pre_act_conv(512, 256), *_pre_act_conv(256, 128)
        )
        # Head: BN over cat([phi, psi]) then a 1x1 conv, no ReLU in between (as in the reference).
        self.bn_head = nn.BatchNorm1d(256)
        self.head = PointwiseConv1d(256, 1)
        self.final_q = nn.Linear(256, 1)  # unused, kept for parameter-count / state-dict parity

    @property
    def candidate_dim(self) -> int:
        """Feature size of one candidate: ``Da + sim_size``."""
        return self.action_dim + self.sim_size

    def encode_state(
        self, state: th.Tensor, state_index: th.Tensor | None, batch: int, share_states: bool = False
    ) -> th.Tensor:
        """State embedding psi ``[batch, 128]`` for ``batch`` pools (see the class docstring on batching)."""
        if state.dim() == 2:
            state = state.unsqueeze(0)
        if state.dim() != 3 or state.shape[1:] != (self.state_regions, self.state_dim):
            raise ValueError(
                f"state must be [S, {self.state_regions}, {self.state_dim}] or [{self.state_regions}, "
                f"{self.state_dim}], got {tuple(state.shape)}"
            )
        n_states = state.shape[0]
        if state_index is None:
            if n_states not in (1, batch):
                raise ValueError(
                    f"{n_states} states for {batch} pools: pass state_index to map pools to states"
                )
            state_index = th.zeros(batch, dtype=th.long, device=state.device) if n_states == 1 else None
        if self.training and not share_states:
            # Replicate per pool (as the reference) so that BatchNorm batch statistics weight each state by
            # the number of pools that use it.
            if state_index is not None:
                state = state.expand(batch, -1, -1) if n_states == 1 else state.index_select(0, state_index)
            return self._state_branch(state)
        emb = self._state_branch(state)
        return emb if state_index is None else emb.index_select(0, state_index)

    def _state_branch(self, state: th.Tensor) -> th.Tensor:
        n_states = state.shape[0]
        u = self.state_convs(state.reshape(n_states * self.state_regions, self.state_dim))  # [S * M, 1]
        return self.state_fc(th.relu(self.bn_last_s(u.reshape(n_states, self.state_regions))))  # [S, 128]

    def forward(
        self,
        candidates: th.Tensor,
        state: th.Tensor,
        state_index: th.Tensor | None = None,
        share_states: bool = False,
    ) -> th.Tensor:
        """Q-values ``[B, N]`` of ``B`` pools of ``N`` candidates.

        :param candidates: ``[B, N, Da + sim_size]`` candidate features (``[N, D]`` for one pool).
        :param state: distinct states ``[S, M, Ds]`` or a single ``[M, Ds]`` shared by all pools.
        :param state_index: ``[B]`` index into ``state`` per pool; optional when ``S`` is 1 or ``B``.
        :param share_states: state branch once per distinct state in train mode too (class docstring).
        """
        if candidates.dim() == 2:
            candidates = candidates.unsqueeze(0)
        if candidates.dim() != 3 or candidates.shape[-1] != self.candidate_dim:
            raise ValueError(
                f"candidates must be [B, N, {self.candidate_dim}], got {tuple(candidates.shape)}"
            )
        batch, n_cand, dim = candidates.shape
        x = candidates.reshape(batch * n_cand, dim)  # channel-last rows, one per candidate
        gate = self.gate(x[:, self.action_dim :])  # [B * N, 1]
        phi = self.action_convs(x[:, : self.action_dim])  # [B * N, 128]
        psi = self.encode_state(state, state_index, batch, share_states)  # [B, 128]
        h = th.cat([phi, psi.repeat_interleave(n_cand, dim=0)], dim=1)  # [B * N, 256]
        out = self.head(self.bn_head(h))  # [B * N, 1]
        return (th.sigmoid(gate) * out).reshape(batch, n_cand)


def _invalid(mask: th.Tensor) -> th.Tensor:
    return ~mask if mask.dtype == th.bool else mask < 0.5


def masked_argmax(q_values: th.Tensor, mask: th.Tensor) -> th.Tensor:
    """Arg-max over the last axis ignoring slots where ``mask`` is 0 (an all-masked row gives index 0).

    Masked slots are filled with the dtype's lowest finite value rather than a fixed constant such as -1e8,
    so a valid candidate wins even if its Q-value has drifted below that constant.
    """
    return q_values.masked_fill(_invalid(mask), th.finfo(q_values.dtype).min).argmax(dim=-1)


def sample_masked_actions(mask: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
    """One uniformly random UNMASKED index per pool: ``mask [..., K, N]`` -> ``[..., K]`` int64.

    Arg-max of uniform noise restricted to the valid slots is uniform over them. A pool with no valid slot
    gets index 0 (``RegionALEnv`` ignores the action of an empty pool). ``rng=None`` uses the global
    ``np.random`` stream, which SB3's ``set_random_seed`` seeds.
    """
    valid = np.asarray(mask) > 0.5
    noise = rng.random(valid.shape) if rng is not None else np.random.random(valid.shape)  # noqa: NPY002
    return np.where(valid, noise, -1.0).argmax(axis=-1).astype(np.int64)


def check_pool_spaces(
    observation_space: spaces.Space, action_space: spaces.Space
) -> tuple[int, int, int, int, int]:
    """Validate the ``RegionALEnv`` space layout; returns ``(M, Ds, K, N, D)``.

    Fails early with a readable message rather than deep inside a tensor op.
    """
    if not isinstance(observation_space, spaces.Dict) or set(observation_space.spaces) != set(OBS_KEYS):
        raise ConfigError(f"observation space must be a Dict with keys {OBS_KEYS}, got {observation_space}")
    state, cands, mask = (observation_space[k].shape for k in OBS_KEYS)
    if len(state) != 2 or len(cands) != 3 or len(mask) != 2 or tuple(cands[:2]) != tuple(mask):
        raise ConfigError(
            f"expected state [M, Ds], candidates [K, N, D], action_mask [K, N]; got {state}, {cands}, {mask}"
        )
    k_pools, n_cand = cands[:2]
    if not isinstance(action_space, spaces.MultiDiscrete) or action_space.shape != (k_pools,):
        raise ConfigError(f"action space must be MultiDiscrete([{n_cand}] * {k_pools}), got {action_space}")
    if np.any(action_space.nvec != n_cand):
        raise ConfigError(f"every pool must have {n_cand} choices, got nvec {action_space.nvec}")
    return int(state[0]), int(state[1]), int(k_pools), int(n_cand), int(cands[2])


class RalisPolicy(BasePolicy):
    """Per-pool greedy policy with an online and a target :class:`RalisQNetwork` (SB3 ``DQNPolicy`` mould).

    Observations are the ``RegionALEnv`` Dict (``state [M, Ds]``, ``candidates [K, N, Ds + 64]``,
    ``action_mask [K, N]``), single or batched; the action is one candidate index per pool, the per-pool
    arg-max of Q with masked slots never chosen. Only ``M``, ``Ds`` and ``D`` are fixed by the weights:
    ``predict`` accepts any ``K`` and ``N`` (e.g. a policy trained on pools of 20 acting on pools of 10).

    Modes follow the reference: eval (BatchNorm running statistics) for acting, train for the
    optimisation step, and the target network is always in eval mode whatever ``train()`` is called with.
    The optimiser defaults to the reference's SGD (momentum 0.95, weight decay 1e-3) over the online net.
    """

    q_net: RalisQNetwork
    q_net_target: RalisQNetwork

    def __init__(
        self,
        observation_space: spaces.Dict,
        action_space: spaces.MultiDiscrete,
        lr_schedule: Schedule,
        sim_size: int = 64,
        optimizer_class: type[th.optim.Optimizer] = th.optim.SGD,
        optimizer_kwargs: dict[str, Any] | None = None,
        normalize_images: bool = False,
    ) -> None:
        if optimizer_kwargs is None:
            optimizer_kwargs = (
                {"momentum": 0.95, "weight_decay": 1e-3} if optimizer_class is th.optim.SGD else {}
            )
        super().__init__(
            observation_space,
            action_space,
            optimizer_class=optimizer_class,
            optimizer_kwargs=optimizer_kwargs,
            normalize_images=normalize_images,
        )
        self.state_regions, self.state_dim, _, _, cand_dim = check_pool_spaces(
            observation_space, action_space
        )
        self.sim_size = int(sim_size)
        if cand_dim <= self.sim_size:
            raise ConfigError(
                f"candidate features ({cand_dim}) must be longer than sim_size ({self.sim_size})"
            )
        self.action_dim = cand_dim - self.sim_size
        self._build(lr_schedule)

    def _build(self, lr_schedule: Schedule) -> None:
        """Online + target nets (target starts as a copy, in eval mode) and the optimiser of the online net."""
        self.q_net = self.make_q_net()
        self.q_net_target = self.make_q_net()
        self.q_net_target.load_state_dict(self.q_net.state_dict())
        self.q_net_target.train(False)
        self.optimizer = self.optimizer_class(
            self.q_net.parameters(), lr=lr_schedule(1), **self.optimizer_kwargs
        )

    def make_q_net(self) -> RalisQNetwork:
        """A fresh query network sized from the observation space."""
        return RalisQNetwork(self.state_regions, self.state_dim, self.action_dim, self.sim_size).to(
            self.device
        )

    def train(self, mode: bool = True) -> RalisPolicy:
        """``nn.Module.train`` that keeps the target network in eval mode, as the reference does."""
        super().train(mode)
        self.q_net_target.train(False)
        return self

    def set_training_mode(self, mode: bool) -> None:
        self.train(mode)

    def q_values(self, obs: PyTorchObs, target: bool = False) -> th.Tensor:
        """Q ``[B, K, N]`` for a batch of Dict observations (state ``[B, M, Ds]``, candidates ``[B, K, N, D]``).

        The ``K`` pools of an observation share its state (broadcast, not copied, in eval mode).
        """
        net = self.q_net_target if target else self.q_net
        cands = obs["candidates"].float()
        batch, k_pools, n_cand, dim = cands.shape
        index = th.arange(batch, device=cands.device).repeat_interleave(k_pools)
        q = net(cands.reshape(batch * k_pools, n_cand, dim), obs["state"].float(), index)
        return q.reshape(batch, k_pools, n_cand)

    def forward(self, obs: PyTorchObs, deterministic: bool = True) -> th.Tensor:
        return self._predict(obs, deterministic=deterministic)

    def _predict(self, observation: PyTorchObs, deterministic: bool = True) -> th.Tensor:
        """Greedy per-pool arg-max ``[B, K]``; masked candidates are never chosen (:func:`masked_argmax`)."""
        return masked_argmax(self.q_values(observation), observation["action_mask"])

    def is_vectorized_observation(self, observation: np.ndarray | dict[str, np.ndarray]) -> bool:
        """Batched iff ``state`` is 3-D; decided by rank rather than by the space's shape so that any N, K work."""
        if not isinstance(observation, dict) or set(observation) != set(OBS_KEYS):
            raise ValueError(f"observation must be a dict with keys {OBS_KEYS}")
        ndim = np.ndim(observation["state"])
        if ndim not in (2, 3):
            raise ValueError(
                f"state must be [M, Ds] or [B, M, Ds], got shape {np.shape(observation['state'])}"
            )
        return ndim == 3

    def obs_to_tensor(self, observation: np.ndarray | dict[str, np.ndarray]) -> tuple[PyTorchObs, bool]:
        """Dict of float32 tensors with a batch axis, plus whether the input was batched."""
        vectorized = self.is_vectorized_observation(observation)
        obs = {}
        for key in OBS_KEYS:
            arr = np.asarray(observation[key], dtype=np.float32)
            obs[key] = th.as_tensor(arr if vectorized else arr[None], device=self.device)
        return obs, vectorized

    def predict(
        self,
        observation: np.ndarray | dict[str, np.ndarray],
        state: tuple[np.ndarray, ...] | None = None,
        episode_start: np.ndarray | None = None,
        deterministic: bool = False,
    ) -> tuple[np.ndarray, tuple[np.ndarray, ...] | None]:
        """Greedy actions ``[K]`` (single observation) or ``[B, K]`` (batch, e.g. from a VecEnv), eval mode.

        Overrides ``BasePolicy.predict`` only because that one reshapes to the action space's shape, which
        would tie the policy to the training ``K``; exploration lives in ``RalisDQN.predict``.
        """
        self.set_training_mode(False)
        obs, vectorized = self.obs_to_tensor(observation)
        with th.no_grad():
            actions = self._predict(obs, deterministic=deterministic).cpu().numpy().astype(np.int64)
        return (actions if vectorized else actions[0]), state

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        data.update(
            dict(
                lr_schedule=self._dummy_schedule,  # not needed to rebuild the policy alone
                sim_size=self.sim_size,
                optimizer_class=self.optimizer_class,
                optimizer_kwargs=self.optimizer_kwargs,
            )
        )
        return data
