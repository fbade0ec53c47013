"""Vectorized environments: every registered id in subprocesses (SB3 ``SubprocVecEnv``, Gymnasium
``AsyncVectorEnv``), per-env seeding, and the heuristic agents driving a batch of envs.

Each test builds two tiny but real envs (``tests.test_env._tiny_kwargs``) in two subprocesses and steps
them twice: a subprocess env must be built from picklable arguments, keep its Dict observation space
through batching, and derive everything from its own seed, so one seed per env gives one trajectory per
env whichever process it runs in.
"""

from __future__ import annotations

import os

import gymnasium as gym
import numpy as np
import pytest
import torch
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import SubprocVecEnv

import ralis_gym
from agents.heuristics import EntropyAgent, RandomAgent, masked_argmax
from tests.test_env import TINY, _tiny_kwargs, cityscapes_root  # noqa: F401  (cityscapes_root: a fixture)

# The workers inherit the environment: one torch thread each, on a machine shared with others.
os.environ.setdefault("OMP_NUM_THREADS", "1")

STEPS = 2
FAST_ID = "RegionAL-CamVid-Fast-v0"
#: one pool image (24 regions) for K * N = 30 slots: 2 of each pool's 10 slots are masked from reset on
MASKED = {**TINY, "regions_per_pool": 10, "subset": {**TINY["subset"], "pool": 1}}


def _sb3_vec(env_id: str, kwargs: dict, seed: int, start_method: str = "forkserver") -> SubprocVecEnv:
    """Two subprocess envs seeded ``seed`` and ``seed + 1`` (SB3 seeds each at its first reset).

    Fresh workers (``forkserver``, SB3's default): a forked copy of this process would inherit its
    torch/OpenMP thread pool and can hang. SB3 re-creates each env from its id there and pytest's
    main module does not import ``ralis_gym``, so the id carries the module (``ralis_gym:<id>``,
    Gymnasium imports it; a user script that imports ``ralis_gym`` needs no prefix, see
    ``test_fresh_sb3_workers_build_the_registered_ids``).
    """
    env_id = env_id if ":" in env_id else f"ralis_gym:{env_id}"
    return make_vec_env(
        env_id, n_envs=2, seed=seed, vec_env_cls=SubprocVecEnv, env_kwargs={**kwargs, "device": "cpu"},
        vec_env_kwargs={"start_method": start_method},
    )  # fmt: skip


def _valid_actions(mask: np.ndarray, step: int) -> np.ndarray:
    """Fixed, valid actions ``[n_envs, K]`` for a batch of masks: the same masks give the same actions."""
    return masked_argmax(np.random.default_rng(step).random(mask.shape), mask)


def _assert_same(trace_a: list, trace_b: list) -> None:
    assert len(trace_a) == len(trace_b)
    for (obs_a, rew_a), (obs_b, rew_b) in zip(trace_a, trace_b):
        assert obs_a.keys() == obs_b.keys()
        for key in obs_a:
            np.testing.assert_array_equal(obs_a[key], obs_b[key], err_msg=key)
        np.testing.assert_array_equal(rew_a, rew_b)


def _sb3_trace(env_id: str, kwargs: dict, seed: int) -> list:
    venv = _sb3_vec(env_id, kwargs, seed)
    try:
        obs = venv.reset()
        for key, sub in venv.observation_space.spaces.items():  # the single env's Dict space, batched
            assert obs[key].shape == (2, *sub.shape) and obs[key].dtype == sub.dtype
            assert all(o in sub for o in obs[key])
        trace = [(obs, np.zeros(2))]
        for t in range(STEPS):
            action = _valid_actions(obs["action_mask"], t)
            assert action.shape == (2, venv.action_space.shape[0])
            obs, reward, _, _ = venv.step(action)
            trace.append((obs, reward))
        return trace
    finally:
        venv.close()


def _gym_trace(env_id: str, kwargs: dict, seed: int) -> list:
    """Two ``AsyncVectorEnv`` workers started by ``forkserver``: fresh interpreters that rebuild the
    env from the pickled spec (its entry point imports ``ralis_gym``) and keyword arguments. The
    entropy agent acts, so Gymnasium's ``call`` path of the agents runs too."""
    envs = gym.make_vec(
        env_id, num_envs=2, vectorization_mode="async", vector_kwargs={"context": "forkserver"}, **kwargs
    )
    try:
        agent = EntropyAgent(envs)
        obs, _ = envs.reset(seed=seed)
        trace = [(obs, np.zeros(2))]
        for _ in range(STEPS):
            action, _ = agent.predict(obs)
            assert action.shape == (2, envs.single_action_space.shape[0])
            assert np.take_along_axis(obs["action_mask"], action[..., None], -1).all()
            obs, reward, _, _, _ = envs.step(action)
            trace.append((obs, reward))
        return trace
    finally:
        envs.close()


@pytest.mark.parametrize("env_id", sorted(ralis_gym.ENV_IDS))
@pytest.mark.parametrize("vector_api", ["sb3", "gymnasium"])
def test_subprocess_envs_differ_by_seed_and_reproduce(vector_api, env_id, request):
    """SB3 ``SubprocVecEnv`` and Gymnasium ``AsyncVectorEnv``: seeds ``s`` and ``s + 1`` draw different
    candidate pools, so the two envs see different candidates, and the same seed repeats exactly."""
    trace = _sb3_trace if vector_api == "sb3" else _gym_trace
    kwargs = _tiny_kwargs(env_id, request)
    first = trace(env_id, kwargs, seed=3)
    obs0 = first[0][0]
    assert not np.array_equal(obs0["candidates"][0], obs0["candidates"][1])
    _assert_same(first, trace(env_id, kwargs, seed=3))


USER_SCRIPT = """
import sys
import ralis_gym  # noqa: F401  (a fresh worker re-imports this script, and so registers the ids)
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import SubprocVecEnv

if __name__ == "__main__":
    kwargs = {"start_network": "scratch", "num_pools": 3, "regions_per_pool": 4, "budget": 9,
              "subset": {"pool": 3, "reward": 2, "state": 1, "test": 2}, "data_root": sys.argv[2]}
    venv = make_vec_env("RegionAL-CamVid-Fast-v0", n_envs=2, seed=0, vec_env_cls=SubprocVecEnv,
                        env_kwargs=kwargs, vec_env_kwargs={"start_method": sys.argv[1]})
    print(venv.reset()["candidates"].shape)
    venv.close()
"""


@pytest.mark.parametrize("start_method", ["forkserver", "spawn"])
def test_fresh_sb3_workers_build_the_registered_ids(start_method, camvid_root, tmp_path):
    """SB3 re-creates each env from its id in the worker; a worker started fresh (``forkserver``,
    SB3's default on Linux, or ``spawn``) re-imports the user's main script, which imported
    ``ralis_gym``, so the plain id works there. Where the main module does not import it (a
    notebook, pytest), the ``ralis_gym:`` prefix makes Gymnasium import it in the worker."""
    import subprocess
    import sys

    script = tmp_path / "user.py"
    script.write_text(USER_SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), start_method, str(camvid_root)], capture_output=True, text=True,
        cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("(2, 3, 4,")
    venv = _sb3_vec(f"ralis_gym:{FAST_ID}", {**TINY, "data_root": str(camvid_root)}, 0, start_method)
    assert venv.reset()["candidates"].shape[:3] == (2, 3, 4)
    venv.close()


def test_masked_argmax_on_a_batch_equals_it_per_env():
    rng = np.random.default_rng(1)
    scores = rng.normal(size=(3, 4, 6))
    mask = rng.random((3, 4, 6)) > 0.4
    mask[1, 2] = False  # an empty pool: index 0, which the env ignores
    best = masked_argmax(scores, mask)
    assert best.shape == (3, 4) and best.dtype == np.int64
    np.testing.assert_array_equal(best, np.stack([masked_argmax(s, m) for s, m in zip(scores, mask)]))
    assert best[1, 2] == 0


def _checked_choice(agent, obs) -> tuple[np.ndarray, np.ndarray]:
    """The agent's scores and actions for ``obs`` (one env or a batch), the actions checked valid."""
    mask = np.asarray(obs["action_mask"])
    scores = agent.scores(obs)
    action, _ = agent.predict(obs)
    assert action.shape == mask.shape[:-1] and action.dtype == np.int64
    assert (mask == 0).any()  # the config leaves masked slots to avoid ...
    assert (np.take_along_axis(mask, action[..., None], -1) == 1).all()  # ... and none is chosen
    return scores, action


def test_heuristic_agents_drive_a_subprocess_vec_env_like_separate_envs(camvid_root):
    """The entropy agent on a 2-env ``SubprocVecEnv`` (scores via ``env_method``) acts exactly as the
    same agent on two plain envs with the same seeds; the random agent picks valid slots per env."""
    kwargs = {**MASKED, "data_root": str(camvid_root), "device": "cpu"}  # the vec env's device
    venv = _sb3_vec(FAST_ID, kwargs, seed=7)
    try:
        obs = venv.reset()
        entropy, random = EntropyAgent(venv), RandomAgent(venv, seed=0)
        vec_scores, vec_actions = [], []
        for _ in range(STEPS):
            scores, action = _checked_choice(entropy, obs)
            _checked_choice(random, obs)
            vec_scores.append(scores)
            vec_actions.append(action)
            obs, *_ = venv.step(action)
    finally:
        venv.close()
    assert vec_scores[0].shape == (2, 3, 10)
    # Seeded: the same random agent on the same masks repeats itself, and draws per env.
    mask = {"action_mask": np.ones((2, 3, 10), dtype=np.float32)}
    a, b = RandomAgent(seed=0).predict(mask)[0], RandomAgent(seed=0).predict(mask)[0]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a[0], a[1])
    # The workers run one torch thread (OMP_NUM_THREADS=1, inherited); so must the plain envs here,
    # or the float sums run in another order and the scores differ in the last bits.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for i, seed in enumerate((7, 8)):
            env = gym.make(FAST_ID, **kwargs)
            try:
                agent = EntropyAgent(env)
                obs, _ = env.reset(seed=seed)
                for t in range(STEPS):
                    scores, action = _checked_choice(agent, obs)
                    obs, *_ = env.step(action)
                    np.testing.assert_array_equal(vec_scores[t][i], scores)
                    np.testing.assert_array_equal(vec_actions[t][i], action)
            finally:
                env.close()
    finally:
        torch.set_num_threads(threads)
