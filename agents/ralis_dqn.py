"""RALIS DQN as a Stable-Baselines3 ``DQN`` subclass, with a per-pool replay buffer.

The reference code (https://github.com/ArantxaCasanova/ralis) trains its query network in ``run.py``
with ``select_action`` and ``optimize_model_conv`` of ``models/model_utils.py``; this is the same
algorithm inside SB3's hooks.

What SB3's DQN is missing for RALIS, and where it is added (the training loop itself is SB3's,
``OffPolicyAlgorithm.learn`` / ``collect_rollouts``):

- ``MultiDiscrete`` actions (one candidate index per pool): ``__init__`` passes
  ``supported_action_spaces`` and the per-pool :class:`~agents.policies.RalisPolicy`.
- One transition per pool sharing the step's reward: :class:`PoolReplayBuffer` stores a step once (its
  state tensor once, not once per pool) and samples (step, pool) pairs.
- Double-DQN target with masks, reference ε schedule and learning-rate decay: ``train``, ``_on_step``,
  ``_sample_action``/``predict``, ``_update_learning_rate``.
- Episode mIoU in the logger: ``_update_info_buffer`` / ``dump_logs``.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any, ClassVar, NamedTuple, TypeVar

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3 import DQN
from stable_baselines3.common.buffers import ReplayBuffer
from stable_baselines3.common.off_policy_algorithm import OffPolicyAlgorithm
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.type_aliases import GymEnv, MaybeCallback, Schedule
from stable_baselines3.common.utils import polyak_update, safe_mean, update_learning_rate
from stable_baselines3.common.vec_env import VecNormalize
from torch.nn import functional as F

from agents.policies import RalisPolicy, check_pool_spaces, masked_argmax, sample_masked_actions
from ralis_gym.errors import ConfigError

SelfRalisDQN = TypeVar("SelfRalisDQN", bound="RalisDQN")
#: how a step's reward is assigned to its K pool decisions (``RalisDQN(q_target=...)``)
Q_TARGETS = ("pool", "sum")
#: Named training schedules (``examples/train_ralis.py --schedule``): ``agent`` holds ``RalisDQN`` keyword
#: arguments, ``episodes`` and ``budget`` the training episodes (``budget`` None: the protocol's, CamVid 480).
#: ``reference``: the paper's CamVid settings (lr 1e-3 decayed x0.97 per step, so learning stops after
#: ~10 episodes; gamma 0.999; every pool regressed on the step's reward; 600 pool transitions replayed;
#: 100 episodes of 480 regions). ``additive``: this project's (BENCHMARKS.md §5): the additive target
#: over the K pools, gamma 0 (a step's reward is nearly all immediate, and bootstrapping diverged with a
#: held lr), a held lr of 3e-4 (the sum's error moves all K outputs at once), 2 gradient steps of 8 whole
#: steps each per env step, 400 steps of replay, and 25 episodes of 1,920 regions: the test protocol's
#: episode length (trained on 480-region episodes the same agent lost to random at 1,920 regions).
#: Both are 2,000 environment steps.
SCHEDULES: dict[str, dict[str, Any]] = {
    "reference": {
        "agent": {"learning_rate": 1e-3, "lr_decay": 0.97, "gamma": 0.999, "q_target": "pool",
                  "batch_size": 16, "gradient_steps": 1, "buffer_size": 600},
        "episodes": 100, "budget": None,
    },
    "additive": {
        "agent": {"learning_rate": 3e-4, "lr_decay": 1.0, "gamma": 0.0, "q_target": "sum",
                  "batch_size": 8, "gradient_steps": 2, "buffer_size": 24 * 400},
        "episodes": 25, "budget": 1920,
    },
}  # fmt: skip


class PoolReplayBufferSamples(NamedTuple):
    """A minibatch of B (step, pool) transitions.

    The states of the sampled steps are returned once each (``states [U, M, Ds]``, U <= B distinct steps)
    with ``state_index [B]`` mapping every transition to its state, which is what
    :class:`~agents.policies.RalisQNetwork` takes.
    """

    states: th.Tensor  # [U, M, Ds]
    state_index: th.Tensor  # [B] long
    candidates: th.Tensor  # [B, N, D]
    masks: th.Tensor  # [B, N] bool
    actions: th.Tensor  # [B] long
    next_states: th.Tensor  # [U, M, Ds]
    next_state_index: th.Tensor  # [B] long
    next_candidates: th.Tensor  # [B, N, D]
    next_masks: th.Tensor  # [B, N] bool
    dones: th.Tensor  # [B] float, 1 = terminal (time-limit truncations excluded)
    rewards: th.Tensor  # [B] float


class PoolReplayBuffer(ReplayBuffer):
    """Ring buffer of environment steps of a K-pool env; sampled as K transitions per step.

    The reference pushes K transitions per step, ``(pool_k(s_t), S_t, a_t^k, pool_k(s_{t+1}), S_{t+1}, r)``,
    sharing the state tensor ``S`` by reference. Here one row per step (and env) holds

    ===================  ===========================  =========
    array                shape                        dtype
    ===================  ===========================  =========
    ``states``           ``[steps, n_envs, M, Ds]``   float32
    ``next_states``      ``[steps, n_envs, M, Ds]``   float32
    ``candidates``       ``[steps, n_envs, K, N, D]`` float32
    ``next_candidates``  ``[steps, n_envs, K, N, D]`` float32
    ``masks``            ``[steps, n_envs, K, N]``    bool
    ``next_masks``       ``[steps, n_envs, K, N]``    bool
    ``actions``          ``[steps, n_envs, K]``       int64
    ``rewards``          ``[steps, n_envs]``          float32
    ``dones``/``timeouts`` ``[steps, n_envs]``        float32
    ===================  ===========================  =========

    so the state costs ``2 * M * Ds * 4`` bytes per step whatever K is (the next state is stored rather
    than linked to the following row because vectorised envs reset automatically at episode ends).

    ``buffer_size`` counts pool transitions, like the reference's ``--rl-buffer`` (CamVid 600 = 25 steps
    of 24 pools); the ring holds ``max(buffer_size // (K * n_envs), 1)`` steps and evicts whole steps.
    ``size()`` returns the number of stored steps (per env), as SB3's buffers count rows.

    Sampling draws (step, env, pool) triples uniformly among the pools that had at least one candidate
    (an empty pool, possible only when fewer than K*N regions are left, carries no transition), with
    replacement, from the global ``np.random`` stream seeded by SB3.
    """

    def __init__(
        self,
        buffer_size: int,
        observation_space: spaces.Dict,
        action_space: spaces.MultiDiscrete,
        device: th.device | str = "auto",
        n_envs: int = 1,
        optimize_memory_usage: bool = False,
        handle_timeout_termination: bool = True,
    ) -> None:
        # BaseBuffer only: ReplayBuffer.__init__ would allocate flat per-transition observation arrays.
        super(ReplayBuffer, self).__init__(
            buffer_size, observation_space, action_space, device, n_envs=n_envs
        )
        if optimize_memory_usage:
            raise ConfigError("PoolReplayBuffer does not support optimize_memory_usage")
        m, ds, k, n, d = check_pool_spaces(observation_space, action_space)
        self.optimize_memory_usage = False
        self.transition_capacity = int(buffer_size)
        self.num_pools = k
        self.buffer_size = max(int(buffer_size) // (k * n_envs), 1)
        steps = (self.buffer_size, n_envs)
        self.states = np.zeros((*steps, m, ds), dtype=np.float32)
        self.next_states = np.zeros((*steps, m, ds), dtype=np.float32)
        self.candidates = np.zeros((*steps, k, n, d), dtype=np.float32)
        self.next_candidates = np.zeros((*steps, k, n, d), dtype=np.float32)
        self.masks = np.zeros((*steps, k, n), dtype=bool)
        self.next_masks = np.zeros((*steps, k, n), dtype=bool)
        self.actions = np.zeros((*steps, k), dtype=np.int64)
        self.rewards = np.zeros(steps, dtype=np.float32)
        self.dones = np.zeros(steps, dtype=np.float32)
        self.timeouts = np.zeros(steps, dtype=np.float32)
        self.handle_timeout_termination = handle_timeout_termination

    @property
    def nbytes(self) -> int:
        """Bytes held by the buffer's arrays."""
        names = ("states", "next_states", "candidates", "next_candidates", "masks", "next_masks")
        names += ("actions", "rewards", "dones", "timeouts")
        return int(sum(getattr(self, name).nbytes for name in names))

    def add(  # type: ignore[override]
        self,
        obs: dict[str, np.ndarray],
        next_obs: dict[str, np.ndarray],
        action: np.ndarray,
        reward: np.ndarray,
        done: np.ndarray,
        infos: list[dict[str, Any]],
    ) -> None:
        """Store one environment step (all envs) as one row; arrays carry the leading ``n_envs`` axis."""
        pos = self.pos
        self.states[pos] = np.asarray(obs["state"]).reshape(self.states.shape[1:])
        self.candidates[pos] = np.asarray(obs["candidates"]).reshape(self.candidates.shape[1:])
        self.masks[pos] = np.asarray(obs["action_mask"]).reshape(self.masks.shape[1:]) > 0.5
        self.next_states[pos] = np.asarray(next_obs["state"]).reshape(self.states.shape[1:])
        self.next_candidates[pos] = np.asarray(next_obs["candidates"]).reshape(self.candidates.shape[1:])
        self.next_masks[pos] = np.asarray(next_obs["action_mask"]).reshape(self.masks.shape[1:]) > 0.5
        self.actions[pos] = np.asarray(action).reshape(self.actions.shape[1:])
        self.rewards[pos] = np.asarray(reward).reshape(self.n_envs)
        self.dones[pos] = np.asarray(done).reshape(self.n_envs)
        if self.handle_timeout_termination:
            self.timeouts[pos] = np.array([info.get("TimeLimit.truncated", False) for info in infos])
        self.pos += 1
        if self.pos == self.buffer_size:
            self.full = True
            self.pos = 0

    def num_transitions(self) -> int:
        """Number of sampleable (step, env, pool) transitions currently stored."""
        return int(self.masks[: self.size()].any(axis=-1).sum())

    def sample(self, batch_size: int, env: VecNormalize | None = None) -> PoolReplayBufferSamples:  # type: ignore[override]
        """``batch_size`` (step, env, pool) transitions drawn uniformly with replacement."""
        if env is not None:
            raise NotImplementedError("PoolReplayBuffer does not support VecNormalize")
        valid = self.masks[: self.size()].any(axis=-1)  # [steps, n_envs, K]
        flat = np.flatnonzero(valid)
        if flat.size == 0:
            raise RuntimeError("the replay buffer holds no transition yet (or only empty pools)")
        # The global stream, as in SB3's own buffers (seeded by ``set_random_seed``).
        picks = flat[np.random.randint(0, flat.size, size=batch_size)]  # noqa: NPY002
        step, env_idx, pool = np.unravel_index(picks, valid.shape)
        return self._get_samples((step, env_idx, pool))

    def sample_steps(self, batch_size: int) -> PoolReplayBufferSamples:
        """Every pool transition of ``batch_size`` (step, env) rows drawn uniformly with replacement;
        ``state_index`` numbers the draws, so it groups the transitions of one step (the additive target
        of ``RalisDQN``; a row drawn twice is two groups)."""
        valid = self.masks[: self.size()].any(axis=-1)  # [steps, n_envs, K]
        rows = np.flatnonzero(valid.any(axis=-1))
        if rows.size == 0:
            raise RuntimeError("the replay buffer holds no transition yet (or only empty pools)")
        picks = rows[np.random.randint(0, rows.size, size=batch_size)]  # noqa: NPY002
        step, env_idx = np.unravel_index(picks, valid.shape[:2])
        group, pool = np.nonzero(valid[step, env_idx])
        return self._gather(step[group], env_idx[group], pool, step, env_idx, group)

    def _get_samples(  # type: ignore[override]
        self, batch_inds: tuple[np.ndarray, np.ndarray, np.ndarray], env: VecNormalize | None = None
    ) -> PoolReplayBufferSamples:
        step, env_idx, pool = batch_inds
        uniq, inverse = np.unique(step * self.n_envs + env_idx, return_inverse=True)
        u_step, u_env = np.divmod(uniq, self.n_envs)
        return self._gather(step, env_idx, pool, u_step, u_env, inverse.reshape(-1))

    def _gather(self, step, env_idx, pool, u_step, u_env, index) -> PoolReplayBufferSamples:
        """Transitions (step, env, pool) with the states of rows (u_step, u_env); ``index`` maps each
        transition to its state row."""
        t = self.to_torch
        not_timeout = 1.0 - self.timeouts[step, env_idx]
        index = t(np.asarray(index, dtype=np.int64))
        return PoolReplayBufferSamples(
            states=t(self.states[u_step, u_env]),
            state_index=index,
            candidates=t(self.candidates[step, env_idx, pool]),
            masks=t(self.masks[step, env_idx, pool]),
            actions=t(self.actions[step, env_idx, pool]),
            next_states=t(self.next_states[u_step, u_env]),
            next_state_index=index,
            next_candidates=t(self.next_candidates[step, env_idx, pool]),
            next_masks=t(self.next_masks[step, env_idx, pool]),
            dones=t((self.dones[step, env_idx] * not_timeout).astype(np.float32)),
            rewards=t(self.rewards[step, env_idx]),
        )


def _per_step_sum(values: th.Tensor, data: PoolReplayBufferSamples) -> th.Tensor:
    """Sum of per-transition ``values [B]`` over the pools of each sampled step ``[steps]``."""
    out = th.zeros(data.states.shape[0], dtype=values.dtype, device=values.device)
    return out.index_add(0, data.state_index, values)


class ExponentialEpsilon:
    """The reference ε schedule ``final + (initial - final) * exp(-t / decay)``, ``t`` = env steps done.

    A plain class (not a lambda) so that models pickle. Note: called with a step count, not with SB3's
    "progress remaining".
    """

    def __init__(self, initial: float = 0.9, final: float = 0.05, decay: float = 10.0) -> None:
        if decay <= 0:
            raise ConfigError(f"exploration_decay must be positive, got {decay}")
        self.initial, self.final, self.decay = float(initial), float(final), float(decay)

    def __call__(self, steps_done: int) -> float:
        return self.final + (self.initial - self.final) * math.exp(-float(steps_done) / self.decay)

    def __repr__(self) -> str:
        return f"ExponentialEpsilon(initial={self.initial}, final={self.final}, decay={self.decay})"


class RalisDQN(DQN):
    """RALIS' DQN on ``RegionALEnv``-shaped envs: one candidate per pool, pools as transitions.

    Defaults are the reference's CamVid settings: SGD (momentum 0.95, weight decay 1e-3, in the policy),
    ``learning_rate=1e-3`` decayed ×``lr_decay`` (0.97) per environment step and once more per finished
    episode (``lr_decay_on_episode_end``), ``gamma=0.999``, Huber loss, batch 16, one gradient step per
    env step, target net copied every 5 env steps, replay of 600 pool transitions, no gradient clipping
    (``max_grad_norm=None``), ε = 0.05 + 0.85·exp(−t/10), ``learning_starts=0`` (the reference optimises
    after its very first step: one step already gives K >= batch transitions on the real protocols).

    Learning-rate decay warning: 0.97 per step is what the reference does, and it makes the lr vanish:
    after one CamVid episode (20 steps + 1) it is ×0.53, after 10 episodes ×0.0017, and 0.97^2000 (the
    reference's 100 CamVid episodes) ≈ 3e-27, so learning effectively stops after ~10–15 episodes whatever
    the number of episodes. Set ``lr_decay=1.0`` (or closer to 1) for longer runs.

    Acting: with probability ε (ONE Bernoulli draw per env step) all K sub-actions are uniformly random
    among the unmasked candidates of their pool, otherwise all are the per-pool greedy arg-max; masked
    candidates are never chosen either way. Steps before ``learning_starts`` are random (masked) too.
    ``predict(obs, deterministic=True)`` is the greedy policy; ``deterministic=False`` applies the
    current ``exploration_rate``.

    Targets: ``y = r + γ · Q_target(s'_k, argmax_n Q_online(s'_k, n))`` with masked next candidates
    excluded from the arg-max, ``y = r`` at terminal steps. ``s'_k`` is pool k of the next step, paired
    with pool k of this step as in the reference (the pools are unrelated random draws). As in the
    reference the online arg-max pass runs in train mode (batch statistics over the non-terminal next
    states of the minibatch; eval mode if there is only one). A next pool with no candidate at all
    (only when fewer than K regions are left) contributes no bootstrap term.

    Credit assignment (``q_target``): a step has one reward for its K picks together. ``"pool"`` (the
    reference) regresses every pool's ``Q(s_k, a_k)`` on the step's whole target, so each pool's target
    carries the other K − 1 picks' effects as noise (K = 24 on CamVid). ``"sum"`` (value decomposition,
    VDN, Sunehag et al. 2018) regresses the step's ``Σ_k Q(s_k, a_k)`` on
    ``r + γ · Σ_k Q_target(s'_k, argmax_n Q_online(s'_k, n))``, which attributes the reward to the picks
    that earned it; ``batch_size`` then counts steps (each with all its pools). Acting is the same: the
    per-pool arg-max maximises the sum.

    Target-network timing differs slightly from the reference: SB3 copies after every
    ``target_update_interval``-th env step counted over the whole run (before that step's gradient step),
    the reference after steps 0, 5, 10, … of every episode (after the gradient step).

    Logging: ``train/loss``, ``train/learning_rate``, ``train/q_mean``, ``rollout/exploration_rate`` and,
    for envs that put ``miou`` in ``info``, ``rollout/ep_miou_mean`` (over the stats window) and
    ``rollout/ep_miou_last`` at every log dump (every ``log_interval`` episodes; use ``log_interval=1`` for
    one point per episode).

    Resuming: ``CheckpointCallback(save_replay_buffer=True)``, then ``RalisDQN.load(zip, env=env)``,
    ``model.load_replay_buffer(pkl)`` and ``model.learn(n, reset_num_timesteps=False)``. (SB3's
    callback runs before the step's transition is stored, so a checkpoint's buffer lacks its last step.)
    To act on pools of another size (reference: train N = 20, test N = 10) load without env and call
    ``predict``, or pass ``custom_objects={"observation_space": ..., "action_space": ...}`` to ``load``.
    """

    policy_aliases: ClassVar[dict[str, type[BasePolicy]]] = {
        "RalisPolicy": RalisPolicy,
        "MultiInputPolicy": RalisPolicy,
    }
    supported_action_spaces: ClassVar[tuple[type[spaces.Space], ...]] = (spaces.MultiDiscrete,)
    policy: RalisPolicy
    replay_buffer: PoolReplayBuffer
    exploration_schedule: ExponentialEpsilon  # type: ignore[assignment]

    def __init__(
        self,
        policy: str | type[RalisPolicy] = "RalisPolicy",
        env: GymEnv | str | None = None,
        learning_rate: float | Schedule = 1e-3,
        buffer_size: int = 600,
        learning_starts: int = 0,
        batch_size: int = 16,
        tau: float = 1.0,
        gamma: float = 0.999,
        train_freq: int | tuple[int, str] = 1,
        gradient_steps: int = 1,
        replay_buffer_class: type[PoolReplayBuffer] | None = None,
        replay_buffer_kwargs: dict[str, Any] | None = None,
        target_update_interval: int = 5,
        exploration_initial_eps: float = 0.9,
        exploration_final_eps: float = 0.05,
        exploration_decay: float = 10.0,
        lr_decay: float = 0.97,
        lr_decay_on_episode_end: bool = True,
        q_target: str = "pool",
        max_grad_norm: float | None = None,
        stats_window_size: int = 100,
        tensorboard_log: str | None = None,
        policy_kwargs: dict[str, Any] | None = None,
        verbose: int = 0,
        seed: int | None = None,
        device: th.device | str = "auto",
        _init_setup_model: bool = True,
    ) -> None:
        if batch_size < 2:
            raise ConfigError(
                "batch_size must be >= 2: the query network's BatchNorm needs a batch in train mode"
            )
        if not 0.0 < lr_decay <= 1.0:
            raise ConfigError(f"lr_decay must be in (0, 1], got {lr_decay}")
        if q_target not in Q_TARGETS:
            raise ConfigError(f"q_target must be one of {Q_TARGETS}, got {q_target!r}")
        # DQN.__init__ hard-codes Discrete actions, so its body is inlined here around the base call.
        OffPolicyAlgorithm.__init__(
            self,
            policy,
            env,  # type: ignore[arg-type]
            learning_rate,
            buffer_size,
            learning_starts,
            batch_size,
            tau,
            gamma,
            train_freq,
            gradient_steps,
            action_noise=None,
            replay_buffer_class=replay_buffer_class,
            replay_buffer_kwargs=replay_buffer_kwargs,
            optimize_memory_usage=False,
            policy_kwargs=policy_kwargs,
            stats_window_size=stats_window_size,
            tensorboard_log=tensorboard_log,
            verbose=verbose,
            device=device,
            seed=seed,
            sde_support=False,
            supported_action_spaces=self.supported_action_spaces,
            support_multi_env=True,
        )
        self.exploration_initial_eps = exploration_initial_eps
        self.exploration_final_eps = exploration_final_eps
        self.exploration_decay = exploration_decay
        # DQN._setup_model builds SB3's linear schedule from this before ours replaces it (ε decays
        # with ExponentialEpsilon, not with this fraction)
        self.exploration_fraction = 1.0
        self.target_update_interval = target_update_interval
        self._n_calls = 0
        self.max_grad_norm = max_grad_norm
        self.lr_decay = lr_decay
        self.lr_decay_on_episode_end = lr_decay_on_episode_end
        self.q_target = q_target
        self.exploration_rate = exploration_initial_eps
        self.ep_miou_buffer: deque[float] | None = None
        if env is not None:
            check_pool_spaces(self.observation_space, self.action_space)
        if _init_setup_model:
            self._setup_model()

    # --- model set-up ------------------------------------------------------------------------------
    def _setup_model(self) -> None:
        """DQN's set-up with :class:`PoolReplayBuffer` and the reference ε schedule."""
        if self.replay_buffer_class is None:
            self.replay_buffer_class = PoolReplayBuffer
        if not issubclass(self.replay_buffer_class, PoolReplayBuffer):
            raise ConfigError(f"RalisDQN needs a PoolReplayBuffer, got {self.replay_buffer_class.__name__}")
        super()._setup_model()
        self.exploration_schedule = ExponentialEpsilon(
            self.exploration_initial_eps, self.exploration_final_eps, self.exploration_decay
        )

    def _setup_learn(
        self,
        total_timesteps: int,
        callback: MaybeCallback = None,
        reset_num_timesteps: bool = True,
        tb_log_name: str = "run",
        progress_bar: bool = False,
    ):
        if self.ep_miou_buffer is None or reset_num_timesteps:
            self.ep_miou_buffer = deque(maxlen=self._stats_window_size)
        return super()._setup_learn(total_timesteps, callback, reset_num_timesteps, tb_log_name, progress_bar)

    # --- acting ------------------------------------------------------------------------------------
    def exploration_rate_at(self, steps_done: int) -> float:
        """ε after ``steps_done`` environment steps (0.90 at 0, 0.363 at 10, 0.165 at 20)."""
        return self.exploration_schedule(steps_done)

    def predict(
        self,
        observation: np.ndarray | dict[str, np.ndarray],
        state: tuple[np.ndarray, ...] | None = None,
        episode_start: np.ndarray | None = None,
        deterministic: bool = False,
    ) -> tuple[np.ndarray, tuple[np.ndarray, ...] | None]:
        """Per-pool actions ``[K]`` (or ``[B, K]`` for a batch); ε-greedy unless ``deterministic``.

        One Bernoulli(ε) draw per observation decides whether ALL its K sub-actions are random (uniform
        over unmasked candidates) or all greedy.
        """
        if deterministic or self.exploration_rate <= 0.0:
            return self.policy.predict(observation, state, episode_start, deterministic=True)
        vectorized = self.policy.is_vectorized_observation(observation)
        mask = np.asarray(observation["action_mask"])
        mask = mask if vectorized else mask[None]
        explore = np.random.random(mask.shape[0]) < self.exploration_rate  # noqa: NPY002
        if explore.all():
            actions = sample_masked_actions(mask)
        else:
            actions, _ = self.policy.predict(observation, deterministic=True)
            actions = np.array(actions if vectorized else actions[None])
            if explore.any():
                actions[explore] = sample_masked_actions(mask[explore])
        return (actions if vectorized else actions[0]), state

    def _sample_action(
        self, learning_starts: int, action_noise: Any = None, n_envs: int = 1
    ) -> tuple[np.ndarray, np.ndarray]:
        """ε-greedy with ε from the steps done so far; random masked actions before ``learning_starts``."""
        assert self._last_obs is not None, "self._last_obs was not set"
        if self.num_timesteps < learning_starts:
            action = sample_masked_actions(np.asarray(self._last_obs["action_mask"]))
        else:
            self.exploration_rate = self.exploration_rate_at(self.num_timesteps)
            action, _ = self.predict(self._last_obs, deterministic=False)
        action = np.asarray(action, dtype=np.int64).reshape(n_envs, -1)
        return action, action

    def _on_step(self) -> None:
        """Target copy every ``target_update_interval`` env steps (as DQN) and ε for the next step."""
        self._n_calls += 1
        if self._n_calls % max(self.target_update_interval // self.n_envs, 1) == 0:
            polyak_update(self.q_net.parameters(), self.q_net_target.parameters(), self.tau)
            polyak_update(self.batch_norm_stats, self.batch_norm_stats_target, 1.0)
        self.exploration_rate = self.exploration_rate_at(self.num_timesteps)
        self.logger.record("rollout/exploration_rate", self.exploration_rate)

    # --- learning ----------------------------------------------------------------------------------
    def _update_learning_rate(self, optimizers: list[th.optim.Optimizer] | th.optim.Optimizer) -> None:
        """SB3's schedule times ``lr_decay ** (env steps [+ finished episodes])``, the reference's ExponentialLR."""
        n_decays = self.num_timesteps + (self._episode_num if self.lr_decay_on_episode_end else 0)
        lr = self.lr_schedule(self._current_progress_remaining) * self.lr_decay**n_decays
        self.logger.record("train/learning_rate", lr)
        for optimizer in optimizers if isinstance(optimizers, list) else [optimizers]:
            update_learning_rate(optimizer, lr)

    @th.no_grad()
    def _td_targets(self, data: PoolReplayBufferSamples) -> th.Tensor:
        """Double-DQN targets ``[B]`` with masked next candidates excluded and ``y = r`` at terminals."""
        return data.rewards + self.gamma * self._next_values(data)

    @th.no_grad()
    def _next_values(self, data: PoolReplayBufferSamples) -> th.Tensor:
        """``Q_target(s'_k, argmax_n Q_online(s'_k, n))`` per transition ``[B]``; 0 at terminals and for
        empty next pools."""
        bootstrap = (1.0 - data.dones) * data.next_masks.any(dim=1).float()
        rows = th.nonzero(bootstrap > 0, as_tuple=True)[0]
        next_value = th.zeros_like(data.rewards)
        if rows.numel() > 0:
            cands, masks = data.next_candidates[rows], data.next_masks[rows]
            index = data.next_state_index[rows]
            # BatchNorm batch statistics need more than one sample: fall back to eval mode for one row.
            switch = self.q_net.training and rows.numel() == 1
            if switch:
                self.q_net.train(False)
            share = self.q_target == "sum"  # whole steps: every state has its K pools
            best = masked_argmax(self.q_net(cands, data.next_states, index, share_states=share), masks)
            if switch:
                self.q_net.train(True)
            q_target = self.q_net_target(cands, data.next_states, index)
            next_value[rows] = q_target.gather(1, best.unsqueeze(1)).squeeze(1)
        return bootstrap * next_value

    def train(self, gradient_steps: int, batch_size: int = 16) -> None:
        """``gradient_steps`` double-DQN updates on ``batch_size`` uniformly sampled (step, pool)
        transitions (``q_target="pool"``) or steps with all their pools (``"sum"``)."""
        self.policy.set_training_mode(True)
        self._update_learning_rate(self.policy.optimizer)
        losses, q_means = [], []
        additive = self.q_target == "sum"
        for _ in range(gradient_steps):
            if additive:
                data = self.replay_buffer.sample_steps(batch_size)
                # Every transition of a step carries the step's reward: one copy per step.
                reward = data.rewards.new_zeros(data.states.shape[0]).index_put(
                    (data.state_index,), data.rewards
                )
                target = reward + self.gamma * _per_step_sum(self._next_values(data), data)
            else:
                data = self.replay_buffer.sample(batch_size)
                target = self._td_targets(data)
            q_all = self.q_net(data.candidates, data.states, data.state_index, share_states=additive)
            q_taken = q_all.gather(1, data.actions.long().unsqueeze(1)).squeeze(1)
            loss = F.smooth_l1_loss(_per_step_sum(q_taken, data) if additive else q_taken, target)
            self.policy.optimizer.zero_grad()
            loss.backward()
            if self.max_grad_norm is not None:
                th.nn.utils.clip_grad_norm_(self.policy.q_net.parameters(), self.max_grad_norm)
            self.policy.optimizer.step()
            losses.append(loss.item())
            q_means.append(q_taken.mean().item())
        self._n_updates += gradient_steps
        self.logger.record("train/n_updates", self._n_updates, exclude="tensorboard")
        self.logger.record("train/loss", float(np.mean(losses)))
        self.logger.record("train/q_mean", float(np.mean(q_means)))

    # --- logging -----------------------------------------------------------------------------------
    def _update_info_buffer(self, infos: list[dict[str, Any]], dones: np.ndarray | None = None) -> None:
        """SB3's episode stats plus the final ``info["miou"]`` of every finished episode."""
        super()._update_info_buffer(infos, dones)
        if dones is None or self.ep_miou_buffer is None:
            return
        for info, done in zip(infos, dones):
            if done and "miou" in info:
                self.ep_miou_buffer.append(float(info["miou"]))

    def dump_logs(self) -> None:
        if self.ep_miou_buffer:
            self.logger.record("rollout/ep_miou_mean", safe_mean(list(self.ep_miou_buffer)))
            self.logger.record("rollout/ep_miou_last", self.ep_miou_buffer[-1])
        super().dump_logs()

    def learn(
        self: SelfRalisDQN,
        total_timesteps: int,
        callback: MaybeCallback = None,
        log_interval: int = 4,
        tb_log_name: str = "RalisDQN",
        reset_num_timesteps: bool = True,
        progress_bar: bool = False,
    ) -> SelfRalisDQN:
        return super().learn(
            total_timesteps=total_timesteps,
            callback=callback,
            log_interval=log_interval,
            tb_log_name=tb_log_name,
            reset_num_timesteps=reset_num_timesteps,
            progress_bar=progress_bar,
        )
