"""Unmodified SB3 algorithms train on the environment (small config: real CamVid, real network)."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

import ralis_gym  # noqa: F401

SMALL = {
    "model": "fast",
    "start_network": "scratch",
    "num_pools": 3,
    "regions_per_pool": 4,
    "budget": 9,
    "subset": {"pool": 4, "reward": 2, "state": 1},
}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("algo", ["ppo", "a2c", "maskable_ppo"])
def test_sb3_algorithm_trains_a_few_hundred_steps(algo, camvid_root):
    from stable_baselines3 import A2C, PPO

    env = gym.make("RegionAL-CamVid-Fast-v0", data_root=str(camvid_root), **SMALL)
    if algo == "ppo":
        model = PPO("MultiInputPolicy", env, n_steps=60, batch_size=30, n_epochs=2, seed=0)
    elif algo == "a2c":
        model = A2C("MultiInputPolicy", env, n_steps=10, seed=0)
    else:
        from sb3_contrib import MaskablePPO

        model = MaskablePPO("MultiInputPolicy", env, n_steps=60, batch_size=30, n_epochs=2, seed=0)
    model.learn(total_timesteps=240)
    assert model.num_timesteps >= 240
    obs, _ = env.reset(seed=1)
    if algo == "maskable_ppo":
        action, _ = model.predict(obs, action_masks=env.unwrapped.action_masks(), deterministic=True)
    else:
        action, _ = model.predict(obs, deterministic=True)
    assert np.asarray(action).shape == (3,)
    env.step(action)
    env.close()


def test_ralis_dqn_acts_on_the_real_environment(camvid_root):
    from agents import RalisDQN

    env = gym.make("RegionAL-CamVid-Fast-v0", data_root=str(camvid_root), **SMALL)
    model = RalisDQN("RalisPolicy", env, seed=0, buffer_size=60)
    model.learn(total_timesteps=12)
    obs, info = env.reset(seed=2)
    action, _ = model.predict(obs, deterministic=True)
    assert info["action_mask"][np.arange(3), action].all()
    env.close()


@pytest.mark.parametrize("name", ["random", "entropy", "margin", "bald", "class_balance"])
def test_heuristic_agents_pick_real_candidates_with_the_env_scores(name, camvid_root):
    from agents.heuristics import make_heuristic_agent

    env = gym.make("RegionAL-CamVid-Fast-v0", data_root=str(camvid_root), **SMALL)
    agent = make_heuristic_agent(name, env, seed=0, **({"mc_passes": 4} if name == "bald" else {}))
    obs, info = env.reset(seed=0)
    action, _ = agent.predict(obs)
    if name != "random":
        scores = env.unwrapped.score_candidates(name, **({"mc_passes": 4} if name == "bald" else {}))
        assert np.isfinite(scores[info["action_mask"]]).all()
        if name != "bald":  # bald draws fresh dropout masks on each call
            assert (scores[np.arange(3), action] == scores.max(axis=1)).all()
    _, _, _, _, info = env.step(action)
    assert info["labeled_regions"] == 3
    env.close()
