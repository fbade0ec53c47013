"""Grid tiling, labeled bookkeeping, pool sampling and training targets (synthetic labels: no data)."""

from __future__ import annotations

import numpy as np
import pytest

from ralis_gym.data import CAMVID_INFO
from ralis_gym.errors import ConfigError
from ralis_gym.regions import RegionGrid, RegionPool, check_tiling

CAMVID_GRID = RegionGrid((480, 360), (80, 90))


def test_camvid_and_cityscapes_tiling_is_exact():
    assert (CAMVID_GRID.cols, CAMVID_GRID.rows, CAMVID_GRID.per_image) == (6, 4, 24)
    assert RegionGrid((2048, 1024), (128, 128)).per_image == 128
    cover = np.zeros((360, 480), dtype=int)
    for _img, x, y, w, h in CAMVID_GRID.boxes(np.arange(24)):
        cover[y : y + h, x : x + w] += 1
    assert (cover == 1).all()


def test_non_tiling_region_size_is_rejected():
    with pytest.raises(ConfigError, match="does not tile"):
        RegionGrid((480, 360), (100, 90))
    with pytest.raises(ConfigError, match=r"^my.yaml: region size 100x90 does not tile .*480 % 100 = 80"):
        check_tiling((480, 360), (100, 90), "my.yaml")
    with pytest.raises(ConfigError, match="must be positive"):
        RegionGrid((480, 360), (0, 90))


def test_region_ids_are_x_major_and_round_trip():
    boxes = CAMVID_GRID.boxes(np.arange(3))
    assert boxes[:, 1:3].tolist() == [[0, 0], [0, 90], [0, 180]]  # x-major like the reference state order
    ids = np.arange(5 * 24)
    assert (CAMVID_GRID.make_ids(*CAMVID_GRID.split_ids(ids)) == ids).all()


def _label_random(pool: RegionPool, rng: np.random.Generator, n: int) -> np.ndarray:
    ids = rng.choice(pool.num_regions, size=n, replace=False)
    pool.label(ids)
    return ids


def test_sampling_never_returns_labeled_regions_and_pools_are_disjoint():
    rng = np.random.default_rng(0)
    pool = RegionPool(CAMVID_GRID, 100, 11, 11)
    labeled = _label_random(pool, rng, 1500)
    for _ in range(20):
        pools = pool.sample_pools(24, 20, rng)
        ids = pools.region_ids[pools.mask]
        assert pools.mask.all()
        assert not np.isin(ids, labeled).any()
        assert np.unique(ids).size == ids.size


def test_sampling_repeats_under_a_seed():
    pool = RegionPool(CAMVID_GRID, 257, 11, 11)
    _label_random(pool, np.random.default_rng(1), 300)
    a = pool.sample_pools(24, 10, np.random.default_rng(7)).region_ids
    b = pool.sample_pools(24, 10, np.random.default_rng(7)).region_ids
    c = pool.sample_pools(24, 10, np.random.default_rng(8)).region_ids
    assert (a == b).all()
    assert not (a == c).all()


def test_fewer_regions_than_slots_are_masked_and_dealt_over_pools():
    pool = RegionPool(CAMVID_GRID, 2, 11, 11)
    _label_random(pool, np.random.default_rng(0), 18)  # 30 left for 24x10 = 240 slots
    pools = pool.sample_pools(24, 10, np.random.default_rng(0))
    assert pools.mask.sum() == 30
    assert pools.mask.any(axis=1).all()  # every pool has a candidate
    assert (pools.region_ids[~pools.mask] == -1).all()
    assert not pool.is_labeled(pools.region_ids[pools.mask]).any()


def _reference_sample(labeled: np.ndarray, total: int, rng: np.random.Generator) -> list[int]:
    """Spec §3.2 as the reference code does it, one draw at a time (slow, obviously correct)."""
    n_img, per = labeled.shape
    unl = {i: [r for r in range(per) if not labeled[i, r]] for i in range(n_img)}
    chosen, count = [], 0
    for i in rng.permutation(n_img):
        if unl[i]:
            chosen.append(i)
            count += len(unl[i])
        if count > total:
            break
    lists = {i: list(unl[i]) for i in chosen}
    out = []
    for _ in range(min(total, count)):
        live = [i for i in chosen if lists[i]]
        img = live[rng.integers(len(live))]
        out.append(img * per + lists[img].pop(rng.integers(len(lists[img]))))
    return out


def test_vectorized_sampling_matches_reference_distribution():
    grid = RegionGrid((4, 2), (1, 1))  # 8 regions per image, row-major locals for the reference
    labeled = np.zeros((3, 8), dtype=bool)
    labeled[0, 1:] = True  # image 0 has one free region, image 1 all 8, image 2 three
    labeled[2, 3:] = True
    pool = RegionPool(grid, 3, 2, 2)
    pool.label(_to_ids(grid, labeled))
    rng_a, rng_b = np.random.default_rng(0), np.random.default_rng(1)
    trials, total = 6000, 4
    freq_vec = np.zeros(24)
    freq_ref = np.zeros(24)
    for _ in range(trials):
        ids = pool.sample_pools(1, total, rng_a).region_ids.reshape(-1)
        image, row, col = grid.split_ids(ids[ids >= 0])
        np.add.at(freq_vec, image * 8 + row * 4 + col, 1)
        np.add.at(freq_ref, _reference_sample(labeled, total, rng_b), 1)
    free = ~labeled.reshape(-1)
    assert freq_vec[~free].sum() == 0 and freq_ref[~free].sum() == 0
    p_vec, p_ref = freq_vec[free] / trials, freq_ref[free] / trials
    assert np.abs(p_vec - p_ref).max() < 0.035, (p_vec, p_ref)


def _to_ids(grid: RegionGrid, labeled_rowmajor: np.ndarray) -> np.ndarray:
    img, local = np.nonzero(labeled_rowmajor)
    row, col = np.divmod(local, grid.cols)
    return grid.make_ids(img, row, col)


def test_labeling_twice_or_out_of_range_raises():
    pool = RegionPool(CAMVID_GRID, 3, 11, 11)
    pool.label(np.array([5]))
    with pytest.raises(ValueError, match="already labeled"):
        pool.label(np.array([5]))
    with pytest.raises(ValueError, match="0..71"):
        pool.label(np.array([72]))
    assert pool.num_labeled == 1 and pool.order.tolist() == [5]


def test_masks_are_void_outside_labeled_regions_and_histograms_count_pixels():
    # ten CamVid-sized label maps of classes 0..10 and the void id 11, in blobs as in real labels
    rng = np.random.default_rng(0)
    labels = np.repeat(np.repeat(rng.integers(0, 12, (10, 36, 48), dtype=np.uint8), 10, 1), 10, 2)
    pool = RegionPool(CAMVID_GRID, len(labels), 11, CAMVID_INFO.ignore_index)
    ids = np.array([0, 30, 47, 200])
    hist = pool.label(ids, labels)
    target = pool.masked_labels(labels, np.arange(len(labels)))
    for rid, h in zip(ids, hist):
        img, x, y, w, hgt = CAMVID_GRID.boxes(np.array([rid]))[0]
        window = labels[img, y : y + hgt, x : x + w]
        assert (target[img, y : y + hgt, x : x + w] == window).all()
        brute = np.array([(window == c).sum() for c in range(11)] + [(window == 11).sum()])
        assert (h == brute).all()
    inside = pool.pixel_mask(np.arange(len(labels)))
    assert (target[~inside] == 11).all()
    assert inside.sum() == 4 * 80 * 90
    assert pool.class_pixels.sum() == 4 * 80 * 90
