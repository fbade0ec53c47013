"""Heuristic score maps against brute-force loops, and the heuristic agents' choices."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from agents.heuristics import HEURISTIC_AGENTS, RandomAgent, make_heuristic_agent, masked_argmax
from ralis_gym.errors import ConfigError
from ralis_gym.segmentation.uncertainty import pixel_bald, pixel_class_rarity, pixel_entropy, pixel_margin


def _probs(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(*shape, generator=g) * 2, dim=-3)


def test_entropy_margin_rarity_equal_brute_force_loops():
    p = _probs(2, 4, 3, 5)
    freq = torch.tensor([10.0, 1.0, 0.5, 100.0])
    ent, mar, rar = pixel_entropy(p), pixel_margin(p), pixel_class_rarity(p, freq)
    pi = (freq / freq.sum()).tolist()
    for b in range(2):
        for y in range(3):
            for x in range(5):
                col = [float(p[b, c, y, x]) for c in range(4)]
                assert ent[b, y, x].item() == pytest.approx(
                    -sum(v * math.log(v + 1e-10) for v in col), rel=1e-5
                )
                top = sorted(col, reverse=True)
                assert mar[b, y, x].item() == pytest.approx(1 - (top[0] - top[1]), rel=1e-5)
                expect = sum(v * -math.log(q + 1e-6) for v, q in zip(col, pi))
                assert rar[b, y, x].item() == pytest.approx(expect, rel=1e-5)


def test_bald_equals_brute_force_and_is_zero_without_disagreement():
    mc = _probs(6, 2, 3, 4, 4, seed=1)  # [T, B, C, H, W]
    bald = pixel_bald(mc)
    for b in range(2):
        for y in range(4):
            for x in range(4):
                passes = [[float(mc[t, b, c, y, x]) for c in range(3)] for t in range(6)]
                mean = [sum(p[c] for p in passes) / 6 for c in range(3)]
                h = lambda v: -sum(a * math.log(a + 1e-10) for a in v)  # noqa: E731
                assert bald[b, y, x].item() == pytest.approx(
                    h(mean) - sum(h(p) for p in passes) / 6, abs=1e-5
                )
    same = mc[:1].expand(5, -1, -1, -1, -1)
    assert pixel_bald(same).abs().max().item() < 1e-5
    assert (bald >= -1e-6).all()


def test_masked_argmax_never_picks_a_masked_slot():
    rng = np.random.default_rng(0)
    for _ in range(200):
        scores = rng.normal(size=(4, 6))
        mask = rng.random((4, 6)) > 0.5
        mask[0] = False
        mask[1, 2] = True
        best = masked_argmax(scores, mask)
        assert best[0] == 0
        for k in range(1, 4):
            if mask[k].any():
                assert mask[k, best[k]] and scores[k, best[k]] == scores[k][mask[k]].max()


def test_random_agent_respects_masks_and_seed():
    mask = np.zeros((5, 4), dtype=np.float32)
    mask[:, 1:3] = 1
    obs = {"action_mask": mask}
    a = [RandomAgent(seed=3).predict(obs)[0] for _ in range(2)]
    assert (a[0] == a[1]).all() and set(np.unique(a[0])) <= {1, 2}
    assert set(HEURISTIC_AGENTS) == {"random", "entropy", "margin", "bald", "class_balance"}
    with pytest.raises(ConfigError, match="unknown method"):
        make_heuristic_agent("coreset")


def _env_after_one_step(camvid_root, seed: int, pools: int, per_pool: int, subset: dict, **kwargs):
    """A tiny fast-model env (scratch start) after one step: something is labeled and trained."""
    import gymnasium as gym

    import ralis_gym  # noqa: F401

    env = gym.make(
        "RegionAL-CamVid-Fast-v0", data_root=str(camvid_root), start_network="scratch", num_pools=pools,
        regions_per_pool=per_pool, budget=2 * pools, subset={**subset, "state": 1}, **kwargs,
    )  # fmt: skip
    env.reset(seed=seed)
    env.step(np.zeros(pools, dtype=np.int64))
    return env.unwrapped


@pytest.mark.parametrize(
    "name", ["entropy", "margin", "class_balance", "bald", "oracle_loss", "oracle_rarity"]
)
def test_env_scores_equal_full_resolution_region_means(name, camvid_root):
    """``score_candidates`` works on the model's cell grid in chunks; it must give the region means
    of the full-resolution per-pixel maps (BALD: the same dropout masks, drawn in the same order)."""
    # something labeled: class_balance uses it
    base = _env_after_one_step(camvid_root, seed=3, pools=4, per_pool=5, subset={"pool": 12, "reward": 2})
    seg, grid, pools = base.segmenter, base.grid, base._pools
    state = seg.generator.get_state()
    scores = base.score_candidates(name, mc_passes=3)
    image, row, col = grid.split_ids(pools.region_ids[pools.mask])
    images, slot = np.unique(image, return_inverse=True)
    seg.generator.set_state(state)
    chunks = [
        images[i : i + seg.default_batch_size()] for i in range(0, images.size, seg.default_batch_size())
    ]
    if name == "bald":
        maps = torch.cat([pixel_bald(seg.mc_dropout_proba(base.pool_split, c, passes=3)) for c in chunks])
    elif name == "oracle_loss":  # class-weighted CE of each pixel against its true label, void pixels 0
        probs = seg.predict_proba(base.pool_split, images)
        labels = torch.from_numpy(np.asarray(base.pool_split.labels[images])).long()
        maps = torch.nn.functional.nll_loss(
            torch.log(probs), labels, weight=seg.head.class_weights, ignore_index=base.info_.ignore_index,
            reduction="none",
        )  # fmt: skip
    elif name == "oracle_rarity":  # -log(frequency) of each pixel's true class, void pixels 0
        labels = torch.from_numpy(np.asarray(base.pool_split.labels[images])).long()
        freq = torch.as_tensor(base.pool.class_pixels[:-1]).double()
        rh, rw = grid.region_size[1], grid.region_size[0]
        for s, r, c in zip(slot, row, col):
            region = labels[s, r * rh : (r + 1) * rh, c * rw : (c + 1) * rw]
            freq += torch.bincount(region.reshape(-1), minlength=12)[:11].double()
        rarity = torch.cat([-torch.log(freq / freq.sum() + 1e-6), torch.zeros(1, dtype=torch.float64)])
        maps = rarity[labels.clamp(max=11)]
    else:
        probs = seg.predict_proba(base.pool_split, images)
        if name == "entropy":
            maps = pixel_entropy(probs)
        elif name == "margin":
            maps = pixel_margin(probs)
        else:
            freq = torch.as_tensor(base.pool.class_pixels[:-1]).double() + probs.double().sum(dim=(0, 2, 3))
            maps = pixel_class_rarity(probs.double(), freq)
    expected = np.full(pools.shape, -np.inf)
    rh, rw = grid.region_size[1], grid.region_size[0]
    # Brute force on purpose: one region at a time, at full resolution.
    expected[pools.mask] = [
        float(maps[s, r * rh : (r + 1) * rh, c * rw : (c + 1) * rw].double().mean())
        for s, r, c in zip(slot, row, col)
    ]
    assert np.allclose(scores, expected, rtol=1e-5, atol=1e-6)
    assert np.isneginf(scores[~pools.mask]).all()


def test_oracle_is_the_first_order_decrease_of_the_evaluation_loss(camvid_root):
    """``oracle``: <d(region mean pixel loss)/d classifier, d(D_R loss)/d classifier>, both
    losses class-weighted cross-entropy against the true labels at full resolution. Brute force:
    autograd through the classifier of the real head, one region at a time, full-resolution pixels."""
    import torch.nn.functional as F

    base = _env_after_one_step(camvid_root, seed=5, pools=3, per_pool=4, subset={"pool": 10, "reward": 3})
    seg, grid, pools = base.segmenter, base.grid, base._pools
    scores = base.score_candidates("oracle")
    weight = seg.head.class_weights
    ignore = base.info_.ignore_index

    def pixel_losses(split, idx):
        """Per-pixel weighted CE [B, H, W] at full resolution as a function of (W, b) of the classifier."""
        with torch.no_grad():
            h = seg._trunk(split, idx)
        w = seg.head.cls.weight.detach().clone().requires_grad_(True)
        b = seg.head.cls.bias.detach().clone().requires_grad_(True)
        logits = F.interpolate(F.conv2d(h, w, b), scale_factor=seg.stride, mode="nearest")
        labels = torch.from_numpy(np.asarray(split.labels[idx])).long()
        loss = F.nll_loss(
            F.log_softmax(logits, 1), labels, weight=weight, ignore_index=ignore, reduction="none"
        )
        valid = labels != ignore
        pixel_weight = torch.where(valid, weight[labels.clamp(max=len(weight) - 1)], torch.zeros(()))
        return loss, pixel_weight, (w, b)

    held = base.oracle_split  # what the episode is scored on: D_R in train mode
    loss, pw, params = pixel_losses(held, np.arange(len(held)))
    g_reward = torch.autograd.grad(loss.sum() / pw.sum(), params)
    image, row, col = grid.split_ids(pools.region_ids[pools.mask])
    rh, rw = grid.region_size[1], grid.region_size[0]
    expected = []
    for i, r, c in zip(image, row, col):
        loss, _, params = pixel_losses(base.pool_split, np.array([i]))
        region_mean = loss[0, r * rh : (r + 1) * rh, c * rw : (c + 1) * rw].mean()
        g = torch.autograd.grad(region_mean, params)
        expected.append(float(sum((a * b).sum() for a, b in zip(g, g_reward))))
    assert np.allclose(scores[pools.mask], expected, rtol=1e-4, atol=1e-7)
    assert np.isneginf(scores[~pools.mask]).all()
    assert np.ptp(expected) > 0  # the candidates differ, so the test can fail


def test_head_oracle_is_the_first_order_decrease_through_every_head_parameter(camvid_root):
    """``oracle_gradient="head"``: the same inner product as the classifier oracle, with the gradients
    taken w.r.t. every head parameter (forward-mode JVP in the model). Brute force: autograd through
    the whole head (eval mode), one region at a time, full-resolution pixels."""
    import torch.nn.functional as F

    base = _env_after_one_step(
        camvid_root, seed=5, pools=3, per_pool=4, subset={"pool": 10, "reward": 3}, oracle_gradient="head"
    )
    seg, grid, pools = base.segmenter, base.grid, base._pools
    scores = base.score_candidates("oracle")
    weight = seg.head.class_weights
    ignore = base.info_.ignore_index
    params = [p for p in seg.head.parameters()]
    seg.head.eval()

    def pixel_losses(split, idx):
        logits = seg.head(seg._inputs(split, idx), seg._positions, seg.rows, seg.cols)
        logits = F.interpolate(logits, scale_factor=seg.stride, mode="nearest")
        labels = torch.from_numpy(np.asarray(split.labels[idx])).long()
        loss = F.nll_loss(
            F.log_softmax(logits, 1), labels, weight=weight, ignore_index=ignore, reduction="none"
        )
        valid = labels != ignore
        return loss, torch.where(valid, weight[labels.clamp(max=len(weight) - 1)], torch.zeros(()))

    held = base.oracle_split
    loss, pw = pixel_losses(held, np.arange(len(held)))
    g_eval = torch.autograd.grad(loss.sum() / pw.sum(), params)
    image, row, col = grid.split_ids(pools.region_ids[pools.mask])
    rh, rw = grid.region_size[1], grid.region_size[0]
    expected = []
    for i, r, c in zip(image, row, col):
        loss, _ = pixel_losses(base.pool_split, np.array([i]))
        g = torch.autograd.grad(loss[0, r * rh : (r + 1) * rh, c * rw : (c + 1) * rw].mean(), params)
        expected.append(float(sum((a * b).sum() for a, b in zip(g, g_eval))))
    assert np.allclose(scores[pools.mask], expected, rtol=1e-3, atol=1e-6)
    classifier = _env_after_one_step(
        camvid_root, seed=5, pools=3, per_pool=4, subset={"pool": 10, "reward": 3}
    )
    assert not np.allclose(classifier.score_candidates("oracle")[pools.mask], expected, rtol=1e-2)
