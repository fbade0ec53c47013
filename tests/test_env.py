"""RegionALEnv: API conformance for every registered id, determinism, features, episodes, SB3."""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import ralis_gym
from ralis_gym.envs import RegionALEnv
from ralis_gym.errors import ConfigError
from ralis_gym.features import region_vector_dim
from tests.fixtures_data import make_cityscapes_fixture, make_custom_fixture

# Tiny but real: real CamVid images and labels, a real network trained for real, few images per role.
TINY = {
    "start_network": "scratch",
    "num_pools": 3,
    "regions_per_pool": 4,
    "budget": 9,
    "subset": {"pool": 3, "reward": 2, "state": 1, "test": 2},
}
TINY_PAPER_MODEL = {"layers": (1, 1, 1, 1), "crop_size": (64, 64), "batch_size": 4}


@pytest.fixture(scope="module")
def cityscapes_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cityscapes_root")
    make_cityscapes_fixture(root, n_train=24, n_val=3, size=(256, 128))
    return root


def _tiny_kwargs(env_id: str, request: pytest.FixtureRequest) -> dict:
    """Tiny keyword arguments for a registered id; its data root from the fixtures (the synthetic
    Cityscapes for Cityscapes ids, which so run without the real CamVid)."""
    kwargs = dict(TINY)
    spec_kwargs = gym.spec(env_id).kwargs
    is_cs = spec_kwargs["dataset"] == "cityscapes"
    kwargs["data_root"] = str(request.getfixturevalue("cityscapes_root" if is_cs else "camvid_root"))
    if spec_kwargs["model"] == "paper":
        kwargs["model_kwargs"] = TINY_PAPER_MODEL
        kwargs["device"] = "cpu"
    if spec_kwargs["dataset"] == "cityscapes":
        kwargs["dataset_kwargs"] = {"image_size": (256, 128), "region_size": (64, 64)}
        kwargs["subset"] = {"pool": 3, "reward": 1, "state": 1, "test": 1}
        kwargs.update(
            num_pools=2, regions_per_pool=3, budget=4
        )  # the fixture's D_T holds 1 image of 8 regions
    return kwargs


@pytest.mark.parametrize("env_id", sorted(ralis_gym.ENV_IDS))
def test_every_registered_env_passes_gymnasium_and_sb3_checkers(env_id, request):
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    env = gym.make(env_id, render_mode="rgb_array", **_tiny_kwargs(env_id, request))
    check_env(env.unwrapped)
    sb3_check_env(env.unwrapped, warn=True)
    env.reset(seed=0)
    env.step(env.action_space.sample())
    frame = env.render()
    assert frame.dtype == np.uint8 and frame.ndim == 3 and frame.shape[2] == 3
    env.close()
    env.close()


def test_registration_and_time_limit_follow_the_budget(camvid_root):
    assert set(ralis_gym.ENV_IDS) <= set(gym.registry)
    env = gym.make("RegionAL-CamVid-Fast-v0", data_root=str(camvid_root), **{**TINY, "budget": 12})
    assert env.get_wrapper_attr("_max_episode_steps") == math.ceil(12 / 3)
    env.close()


@pytest.fixture(scope="module")
def fast_env(camvid_root):
    env = RegionALEnv(dataset="camvid", data_root=str(camvid_root), model="fast", **{**TINY, "budget": 12})
    yield env
    env.close()


def _run_episode(env: RegionALEnv, seed: int, policy_seed: int):
    obs, info = env.reset(seed=seed)
    rng = np.random.default_rng(policy_seed)
    trace = [(obs, 0.0, info["miou"], ())]
    done = False
    while not done:
        action = np.array([rng.choice(np.flatnonzero(m)) for m in info["action_mask"]])
        obs, reward, done, trunc, info = env.step(action)
        trace.append((obs, reward, info["miou"], info["selected"]))
        assert not trunc
    return trace


def test_same_seed_gives_the_same_episode(fast_env):
    a = _run_episode(fast_env, seed=3, policy_seed=0)
    b = _run_episode(fast_env, seed=3, policy_seed=0)
    c = _run_episode(fast_env, seed=4, policy_seed=0)
    assert len(a) == len(b) == 5
    for (oa, ra, ma, sa), (ob, rb, mb, sb) in zip(a, b):
        for key in oa:
            np.testing.assert_array_equal(oa[key], ob[key])
        assert ra == rb and ma == mb and sa == sb
    assert any(sa != sc for (_, _, _, sa), (_, _, _, sc) in zip(a, c))


def test_observation_features_follow_the_spec(fast_env):
    env = fast_env
    n_cls = env.info_.num_classes
    obs, info = env.reset(seed=0)
    area = 80 * 90
    for part in (obs["state"], obs["candidates"].reshape(-1, obs["candidates"].shape[-1])):
        counts = part[:, : n_cls + 1]
        np.testing.assert_allclose(counts.sum(1), area + (counts < 1).sum(1) * 1e-7, rtol=1e-6)
        mn, avg, mx = (
            part[:, n_cls + 1 : n_cls + 65],
            part[:, n_cls + 65 : n_cls + 129],
            part[:, n_cls + 129 : n_cls + 193],
        )
        assert (mn <= avg + 1e-5).all() and (avg <= mx + 1e-5).all()  # float32 averaging error
        assert mn.min() >= 0 and mx.max() <= math.log(n_cls) + 1e-4
    kl_lab, kl_pool = obs["candidates"][..., -64:-32], obs["candidates"][..., -32:]
    assert (kl_lab == 0).all()  # nothing labeled yet
    np.testing.assert_allclose(kl_pool.sum(-1), 1.0, rtol=1e-5)
    obs, *_ = env.step(np.zeros(env.num_pools, dtype=np.int64))
    np.testing.assert_allclose(obs["candidates"][..., -64:-32].sum(-1), 1.0, rtol=1e-5)
    assert obs in env.observation_space


def test_info_contents_and_masked_actions(fast_env, monkeypatch):
    env = fast_env
    _, info = env.reset(seed=1)
    assert set(info) >= {
        "miou",
        "per_class_iou",
        "labeled_regions",
        "budget",
        "labeled_class_pixels",
        "selected",
        "action_mask",
    }
    with pytest.raises(ValueError, match="pool 1"):
        env.step(np.array([0, env.pool_size, 0]))
    _, reward, _, _, info = env.step(np.array([1, 2, 3]))
    assert info["labeled_regions"] == 3 and len(info["selected"]) == 3
    assert info["labeled_class_pixels"].sum() == 3 * 80 * 90
    assert np.isfinite(reward)
    # Force a masked slot: label all but this step's K picks and 2 more regions behind the env's back, then
    # let the real step label the picks: the next pools (the step's transition) hold the last 2 regions.
    monkeypatch.setattr(env, "budget", env.pool.num_regions)  # the module's env: undone after the test
    pool = env.pool
    free = np.flatnonzero(~pool.labeled.reshape(-1))
    ids = env.grid.make_ids(*np.unravel_index(free, pool.labeled.shape))
    action = np.argmax(info["action_mask"], axis=1)
    picks = env._pools.region_ids[np.arange(env.num_pools), action]
    pool.label(ids[~np.isin(ids, picks)][:-2])
    _, _, terminated, _, info = env.step(action)
    mask = info["action_mask"]
    assert not terminated and mask.sum() == 2
    k = int(np.flatnonzero(mask.any(1))[0])
    empty = int(np.flatnonzero(~mask[k])[0])
    action = np.argmax(mask, axis=1)
    action[k] = empty
    with pytest.raises(ValueError, match=f"pool {k}.*masked"):
        env.step(action)


def test_bad_config_key_and_values_raise_clear_errors(camvid_root):
    with pytest.raises(ConfigError, match="budjet.*did you mean 'budget'"):
        RegionALEnv(data_root=str(camvid_root), model="fast", budjet=3)
    with pytest.raises(ConfigError, match="mode"):
        RegionALEnv(data_root=str(camvid_root), model="fast", mode="eval")
    with pytest.raises(ConfigError, match="exceeds"):
        RegionALEnv(data_root=str(camvid_root), model="fast", **{**TINY, "budget": 10_000})


def test_al_step_training_sets_follow_train_regions(camvid_root):
    """``last`` trains on the K new regions, ``all`` on every labeled one, ``replay`` on the new ones
    plus ``replay_regions`` distinct earlier labeled regions (a seeded draw)."""
    env = RegionALEnv(data_root=str(camvid_root), model="fast", **{**TINY, "budget": 12, "replay_regions": 2})
    rng = np.random.default_rng(0)
    obs, _ = env.reset(seed=3)
    for _ in range(2):
        obs, *_ = env.step(np.array([rng.choice(np.flatnonzero(m)) for m in obs["action_mask"] > 0]))
    order = env.pool.order
    chosen = order[-3:]
    anchors = env._training_anchors(chosen)
    assert anchors.size == 5 and np.array_equal(anchors[:3], chosen)
    assert np.unique(anchors).size == 5 and np.isin(anchors[3:], order[:-3]).all()
    env.config["train_regions"] = "all"
    assert np.array_equal(env._training_anchors(chosen), order)
    env.config["train_regions"] = "last"
    assert np.array_equal(env._training_anchors(chosen), chosen)
    env.close()
    with pytest.raises(ConfigError, match="train_regions"):
        RegionALEnv(data_root=str(camvid_root), model="fast", **{**TINY, "train_regions": "newest"})


@pytest.mark.parametrize("mode", ["train", "test"])
def test_oracle_sets(camvid_root, mode):
    """``oracle_set``: "evaluation" is what the episode is scored on (D_R in train mode, the test
    split in test mode), "reward" is D_R, "held_out" a set disjoint from the pool, D_R and test
    (the other pool), as many images as D_R, spread over it."""
    env = RegionALEnv(data_root=str(camvid_root), model="fast", mode=mode, **TINY)
    if mode == "train":
        assert env.oracle_split is env.reward_split
    else:
        assert env.oracle_split.image_names == env._role_split("test", TINY["subset"]["test"]).image_names
    env.close()
    env = RegionALEnv(data_root=str(camvid_root), model="fast", mode=mode, oracle_set="held_out", **TINY)
    held = env.oracle_split
    names = set(held.image_names)
    assert len(held) == len(env.reward_split)
    for other in (env.pool_split, env.reward_split, env._role_split("test", None)):
        assert names.isdisjoint(other.image_names)
    assert names <= set(env.dataset.split("d_v" if mode == "train" else "d_t").image_names)
    env.config["oracle_set"] = "reward"
    assert env.oracle_split is env.reward_split
    with pytest.raises(ConfigError, match="oracle_set"):
        RegionALEnv(data_root=str(camvid_root), model="fast", **{**TINY, "oracle_set": "test"})


def test_final_training_on_fully_labeled_images_is_the_pretraining_recipe(camvid_root):
    """The final-training path (every region of N images acquired, ``evaluate``) and the pretraining
    recipe (``fit_images`` under ``train_until_plateau``) on the same N images, from the same scratch
    network and with the same epochs and patience, are the same computation: equal mIoU to the bit.
    So whether the final training converges is only its stopping rule
    (``benchmarks/final_training_convergence.py`` measures that on 100 images)."""
    from ralis_gym.segmentation import build_segmenter
    from ralis_gym.segmentation.pretrain import train_until_plateau

    cfg = {**TINY, "budget": 48, "final_training": {"include_start_data": False}}
    env = RegionALEnv(data_root=str(camvid_root), model="fast", mode="train", **cfg)
    env.reset(seed=0)
    seg = build_segmenter("fast", env.info_, device="cpu", seed=0)
    seg.generator.set_state(env.segmenter.generator.get_state())  # same minibatch and dropout draws
    env.pool.label(np.arange(env.pool.num_regions), env.pool_split.labels)
    result = env.evaluate(max_epochs=4, patience=4)
    test_split = env._role_split("test", TINY["subset"]["test"])
    recipe = train_until_plateau(
        seg, lambda: seg.fit_images(env.pool_split), env.reward_split, 4, 4, progress=False
    )
    assert result["epochs"] == recipe["epochs"] and result["d_r_miou"] == recipe["best_miou"]
    assert result["test_miou"] == seg.evaluate(test_split).miou
    env.close()


def test_evaluate_runs_the_final_protocol_and_can_restore(fast_env):
    env = fast_env
    _run_episode(env, seed=0, policy_seed=0)
    before = env.segmenter.snapshot()
    result = env.evaluate(max_epochs=3, patience=1, restore=True)
    assert 0.0 <= result["test_miou"] <= 1.0
    assert result["confusion"].shape == (11, 11) and result["labeled_regions"] == 12
    after = env.segmenter.snapshot()
    for key, value in before["model"].items():
        if hasattr(value, "shape"):
            np.testing.assert_array_equal(np.asarray(value), np.asarray(after["model"][key]))


def test_random_episode_runs_to_the_budget_and_the_reward_set_miou_rises(camvid_root):
    env = gym.make(
        "RegionAL-CamVid-Fast-v0", data_root=str(camvid_root), mode="train", start_network="scratch",
        subset={"reward": 20}, model_kwargs={"lr": 0.01},  # a scratch head needs the pretraining rate
    )  # fmt: skip
    _, info = env.reset(seed=0)
    start = info["miou"]
    rng = np.random.default_rng(0)
    steps, rewards, done = 0, [], False
    while not done:
        action = np.array([rng.choice(np.flatnonzero(m)) for m in info["action_mask"]])
        _, reward, term, trunc, info = env.step(action)
        rewards.append(reward)
        steps, done = steps + 1, term or trunc
    assert term and steps == 20 and info["labeled_regions"] == 480
    assert info["miou"] > start + 0.05
    assert sum(rewards) == pytest.approx(100 * (info["miou"] - start), abs=1e-6)
    env.close()


def test_branching_a_final_training_does_not_change_the_rest_of_the_episode(fast_env):
    """compare_methods branches ``evaluate(restore=True)`` off a run at each budget; the run must go
    on exactly as without the branch (weights, momentum, learning-rate schedule, RNG)."""

    def episode(branch: bool) -> list:
        obs, _ = fast_env.reset(seed=11)
        rng, out, done = np.random.default_rng(0), [], False
        while not done:
            action = np.array([rng.choice(np.flatnonzero(m)) for m in obs["action_mask"] > 0])
            obs, reward, term, trunc, info = fast_env.step(action)
            out.append((reward, info["miou"], obs["candidates"].copy()))
            if branch and not term:
                fast_env.evaluate(max_epochs=3, patience=5, restore=True)
            done = term or trunc
        return out

    plain, branched = episode(False), episode(True)
    assert len(plain) == len(branched) >= 3
    for (ra, ma, ca), (rb, mb, cb) in zip(plain, branched):
        assert ra == rb and ma == mb
        np.testing.assert_array_equal(ca, cb)


def test_trial_step_is_the_real_step_and_is_undone(fast_env):
    """``trial_step`` without a seed draws the step's own random numbers (common random numbers): its
    D_R mIoU is the real step's, and trying actions in between leaves the episode unchanged."""

    def episode(trials: bool) -> list:
        obs, _ = fast_env.reset(seed=5)
        rng, out, done = np.random.default_rng(1), [], False
        while not done:
            action = np.array([rng.choice(np.flatnonzero(m)) for m in obs["action_mask"] > 0])
            tried = None
            if trials:
                other = np.array([np.flatnonzero(m)[-1] for m in obs["action_mask"] > 0])
                fast_env.unwrapped.trial_step(other, seed=7)
                tried = fast_env.unwrapped.trial_step(action)
            obs, reward, term, trunc, info = fast_env.step(action)
            if trials:
                assert tried == info["miou"]
            out.append((reward, info["miou"], info["labeled_regions"], obs["candidates"].copy()))
            done = term or trunc
        return out

    plain, tried = episode(False), episode(True)
    assert len(plain) == len(tried) >= 3
    for (ra, ma, la, ca), (rb, mb, lb, cb) in zip(plain, tried):
        assert ra == rb and ma == mb and la == lb
        np.testing.assert_array_equal(ca, cb)


def test_score_features_append_the_heuristics_scores_before_the_kl_histograms(camvid_root):
    """``score_features``: each candidate's row is ``[region vector | scores | KL histograms]``, the
    scores those of ``score_candidates`` (masked slots zero), and the rest as without them."""
    kwargs = {"data_root": str(camvid_root), "model": "fast", **TINY}
    plain = RegionALEnv(**kwargs)
    scored = RegionALEnv(**kwargs, score_features=["margin", "class_balance"])
    a, _ = plain.reset(seed=5)
    b, _ = scored.reset(seed=5)
    ds = region_vector_dim(plain.info_.num_classes)
    assert b["candidates"].shape[-1] == a["candidates"].shape[-1] + 2 and b in scored.observation_space
    np.testing.assert_array_equal(b["candidates"][..., :ds], a["candidates"][..., :ds])
    np.testing.assert_array_equal(b["candidates"][..., ds + 2 :], a["candidates"][..., ds:])
    mask = b["action_mask"] > 0
    for j, method in enumerate(("margin", "class_balance")):
        expected = scored.score_candidates(method)[mask]
        np.testing.assert_allclose(b["candidates"][..., ds + j][mask], expected, rtol=1e-6)
    with pytest.raises(ConfigError, match="score_features"):
        RegionALEnv(**kwargs, score_features=["oracle"])


def test_a_dataset_without_a_reference_protocol_must_set_pools_and_budget(tmp_path):
    """A custom dataset has no K / N / budget of the reference scripts: the env names what to set
    instead of silently using CamVid's (no real data needed: refused before the network is built)."""
    path = make_custom_fixture(tmp_path, n=20)
    with pytest.raises(ConfigError, match="no reference protocol.*set num_pools, regions_per_pool, budget"):
        RegionALEnv(dataset=str(path), model="fast", start_network="scratch")
    with pytest.raises(ConfigError, match="set budget in the config"):
        RegionALEnv(dataset=str(path), model="fast", start_network="scratch", num_pools=2, regions_per_pool=3)
    with pytest.raises(ConfigError, match="num_pools must be a positive whole number"):
        RegionALEnv(dataset=str(path), model="fast", num_pools=0, regions_per_pool=3, budget=4)


def test_rank_regions_serves_the_training_features_and_refuses_other_policies(fast_env):
    """``agents.suggest.rank_regions`` scores every region of a split with the env's observation;
    a policy trained with ``score_features`` (a wider candidate vector) is refused in one line."""
    from agents.policies import RalisQNetwork
    from agents.suggest import rank_regions

    env = fast_env
    ds = region_vector_dim(env.info_.num_classes)
    m = env.observation_space["state"].shape[0]
    images = env.pool_split.subset(np.arange(2), name="two")
    queue = rank_regions(RalisQNetwork(m, ds, ds), env.segmenter, images, env.state_split)
    assert len(queue) == 2 * env.grid.per_image and [q["rank"] for q in queue] == list(
        range(1, len(queue) + 1)
    )
    scores = [q["score"] for q in queue]
    assert np.isfinite(scores).all() and scores == sorted(scores, reverse=True)
    with pytest.raises(ConfigError, match="score_features"):
        rank_regions(RalisQNetwork(m, ds, ds + 2), env.segmenter, images, env.state_split)
