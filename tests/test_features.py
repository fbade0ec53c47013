"""State/action features (the reference's ``compute_state``) against slow, obviously-correct loops.

The references loop over regions, cells, candidates and pairs in Python and use ``np.histogram`` and
``scipy.stats.entropy`` (when scipy is installed; else the same formula written out), i.e. what the
reference implementation calls, so the vectorized torch code is checked number by number.
"""

from __future__ import annotations

import math
import resource
import time

import numpy as np
import pytest
import torch

from ralis_gym.features import (
    HIST_FLOOR,
    POOL_FEATURES,
    candidate_features,
    class_distribution,
    kl_histograms,
    pool_kernel,
    region_vector_dim,
    tables_in_id_order,
)
from ralis_gym.features.kl import _row_histograms
from ralis_gym.features.regions import entropy_map, region_tables
from ralis_gym.regions import RegionGrid, RegionPool
from ralis_gym.segmentation.uncertainty import pixel_entropy

try:
    from scipy.stats import entropy as scipy_entropy
except ImportError:  # pragma: no cover - depends on the environment
    scipy_entropy = None

CAMVID_GRID = RegionGrid((480, 360), (80, 90))
# Small grids: one whose kernel does not tile the region (26 = 8*3 + 2 rows, 34 = 8*4 + 2 columns,
# like CamVid's 90 = 8*11 + 2), and one whose kernel tiles it (Cityscapes-like 16 = 8*2).
CROPPED_GRID = RegionGrid((102, 52), (34, 26))
TILED_GRID = RegionGrid((48, 32), (16, 16))
FLOOR32 = float(np.float32(HIST_FLOOR))


def random_probs(n: int, classes: int, grid: RegionGrid, seed: int, sharp: float = 3.0) -> torch.Tensor:
    """Softmax maps with a mix of confident and uncertain pixels."""
    g = torch.Generator().manual_seed(seed)
    w, h = grid.image_size
    logits = torch.randn(n, classes, h, w, generator=g) * sharp
    return torch.softmax(logits, dim=1)


# --- slow references ----------------------------------------------------------------------------
def ref_region_vector(probs: np.ndarray, x: int, y: int, w: int, h: int) -> np.ndarray:
    """The reference's create_feature_vector_3H_region_kl, cell by cell in numpy float64."""
    n_cls = probs.shape[0]
    window = probs[:, y : y + h, x : x + w].astype(np.float64)
    pred = window.argmax(0)
    unique, counts = np.unique(pred, return_counts=True)
    hist = np.zeros(n_cls + 1) + 1e-7
    hist[unique] = counts
    ent = -(window * np.log(window + 1e-10)).sum(0)
    ks_x, ks_y = w // 8, h // 8
    mins, avgs, maxs = [], [], []
    for i in range(8):
        for j in range(8):
            cell = ent[i * ks_y : (i + 1) * ks_y, j * ks_x : (j + 1) * ks_x]
            mins.append(cell.min())
            avgs.append(cell.mean())
            maxs.append(cell.max())
    return np.concatenate([hist, mins, avgs, maxs])


def ref_kl(pk: np.ndarray, qk: np.ndarray) -> float:
    """KL(pk/sum ‖ qk/sum), natural log: scipy.stats.entropy semantics."""
    if scipy_entropy is not None:
        return float(scipy_entropy(pk, qk))
    pk = pk / pk.sum()
    qk = qk / qk.sum()
    terms = [pi * math.log(pi / qi) if pi > 0 else 0.0 for pi, qi in zip(pk, qk)]
    return float(np.sum(terms))


def ref_kl_histograms(p: np.ndarray, q: np.ndarray, bins: int = 32) -> np.ndarray:
    out = np.zeros((len(p), bins))
    if len(q) == 0:
        return out
    for r in range(len(p)):
        values = np.array([ref_kl(p[r], q[j]) for j in range(len(q))])
        counts, _ = np.histogram(values, bins=bins)
        out[r] = counts / counts.sum()
    return out


def histogram_like(n: int, classes: int, rng: np.random.Generator, pixels: int = 7200) -> np.ndarray:
    """Predicted-histogram-like rows: raw counts with 1e-7 floors, many pure/duplicate regions."""
    out = np.full((n, classes), 1e-7)
    for i in range(n):
        kind = rng.integers(4)
        if kind == 0:  # pure region of one class
            out[i, rng.integers(classes - 1)] = pixels
        else:
            present = rng.choice(classes - 1, size=int(rng.integers(2, classes)), replace=False)
            cuts = np.sort(rng.choice(pixels - 1, size=len(present) - 1, replace=False) + 1)
            out[i, present] = np.diff(np.r_[0, cuts, pixels])
    return out


# --- region vectors -----------------------------------------------------------------------------
@pytest.mark.parametrize("grid", [CROPPED_GRID, TILED_GRID], ids=["cropped", "tiled"])
def test_region_vectors_match_the_per_region_reference(grid: RegionGrid) -> None:
    classes = 5
    probs = random_probs(3, classes, grid, seed=1)
    rng = np.random.default_rng(0)
    ids = rng.choice(3 * grid.per_image, size=10, replace=False)
    image, row, col = grid.split_ids(ids)
    got = region_tables(probs, grid)[torch.from_numpy(image), torch.from_numpy(row), torch.from_numpy(col)]
    assert got.shape == (10, region_vector_dim(classes)) and got.dtype == torch.float32
    rw, rh = grid.region_size
    for k, (i, x, y, _, _) in enumerate(grid.boxes(ids)):
        ref = ref_region_vector(probs[i].numpy(), int(x), int(y), rw, rh)
        np.testing.assert_array_equal(got[k, : classes + 1].numpy(), ref[: classes + 1].astype(np.float32))
        np.testing.assert_allclose(got[k, classes + 1 :].numpy(), ref[classes + 1 :], rtol=0, atol=2e-6)


def test_camvid_geometry_every_region_of_an_image() -> None:
    classes = 11
    probs = random_probs(1, classes, CAMVID_GRID, seed=2, sharp=2.0)
    assert pool_kernel(CAMVID_GRID) == (11, 10)  # 90 // 8 rows, 80 // 8 columns: last 2 rows dropped
    table = region_tables(probs, CAMVID_GRID)[0]
    for rid in range(CAMVID_GRID.per_image):
        _, row, col = CAMVID_GRID.split_ids(np.array([rid]))
        _, x, y, w, h = CAMVID_GRID.boxes(np.array([rid]))[0]
        ref = ref_region_vector(probs[0].numpy(), int(x), int(y), int(w), int(h))
        got = table[int(row[0]), int(col[0])].numpy()
        np.testing.assert_array_equal(got[:12], ref[:12].astype(np.float32))
        np.testing.assert_allclose(got[12:], ref[12:], rtol=0, atol=2e-6)


def test_region_vector_invariants() -> None:
    classes = 11
    probs = random_probs(2, classes, CAMVID_GRID, seed=3, sharp=1.0)
    vecs = tables_in_id_order(region_tables(probs, CAMVID_GRID))
    hist = vecs[:, : classes + 1].double()
    pixels = 80 * 90
    present = hist > 0.5
    assert (hist[present] == hist[present].round()).all()  # raw pixel counts
    assert (hist[~present] == FLOOR32).all() and (hist[:, -1] == FLOOR32).all()  # floors, ignore bin
    total = hist.sum(1)
    assert ((total >= pixels) & (total <= pixels + (classes + 1) * 1e-7 + 1e-9)).all()
    pools = vecs[:, classes + 1 :].view(-1, 3, 64)
    mn, av, mx = pools[:, 0], pools[:, 1], pools[:, 2]
    assert (mn <= av + 1e-6).all() and (av <= mx + 1e-6).all()
    assert pools.min() >= 0 and pools.max() <= math.log(classes) + 1e-5


def test_state_rows_follow_region_id_order() -> None:
    grid = CROPPED_GRID
    probs = random_probs(3, 4, grid, seed=4)
    tables = region_tables(probs, grid)
    state = tables_in_id_order(tables)
    assert state.shape == (3 * grid.per_image, region_vector_dim(4))
    image, row, col = (torch.from_numpy(a) for a in grid.split_ids(np.arange(3 * grid.per_image)))
    torch.testing.assert_close(state, tables[image, row, col], rtol=0, atol=0)
    # x-major: the second region of an image is the one below the first (same column).
    _, x, y, _, _ = grid.boxes(np.array([1]))[0]
    ref = ref_region_vector(probs[0].numpy(), int(x), int(y), *grid.region_size)
    np.testing.assert_allclose(state[1].numpy(), ref, rtol=0, atol=2e-6)


def test_in_place_entropy_is_the_segmenters_pixel_entropy() -> None:
    probs = random_probs(2, 7, TILED_GRID, seed=15, sharp=8.0)
    assert torch.equal(entropy_map(probs), pixel_entropy(probs))


def test_image_chunking_does_not_change_region_vectors() -> None:
    probs = random_probs(5, 4, TILED_GRID, seed=5)
    one = region_tables(probs, TILED_GRID, image_chunk_elems=1)
    torch.testing.assert_close(one, region_tables(probs, TILED_GRID), rtol=0, atol=0)


def test_bad_inputs_are_rejected() -> None:
    with pytest.raises(ValueError, match="full-resolution"):
        region_tables(torch.rand(1, 3, 16, 16), TILED_GRID)
    with pytest.raises(ValueError, match="too small"):
        pool_kernel(RegionGrid((12, 12), (6, 6)))


# --- class distributions ------------------------------------------------------------------------
def test_class_distribution_of_labeled_regions_matches_reference() -> None:
    rng = np.random.default_rng(6)
    classes, ignore = 5, 255
    labels = rng.integers(0, classes, size=(4, 52, 102)).astype(np.uint8)
    labels[0, :26, :34] = 2  # a pure region
    labels[1, 26:, 34:68] = ignore  # an all-ignore region
    labels[2][rng.random((52, 102)) < 0.1] = ignore
    pool = RegionPool(CROPPED_GRID, 4, classes, ignore)
    ids = np.arange(4 * CROPPED_GRID.per_image)
    dist = class_distribution(pool.region_class_histograms(ids, labels))
    assert dist.dtype == torch.float64
    for k, (i, x, y, w, h) in enumerate(CROPPED_GRID.boxes(ids)):
        window = labels[i, y : y + h, x : x + w]
        window = np.where(window == ignore, classes, window)
        unique, counts = np.unique(window, return_counts=True)
        ref = [counts[unique == c].item() / counts.sum() if c in unique else 1e-7 for c in range(classes + 1)]
        np.testing.assert_array_equal(dist[k].numpy(), np.array(ref))
    with pytest.raises(ValueError, match="at least one pixel"):
        class_distribution(np.zeros((1, classes + 1), dtype=np.int64))


# --- KL histograms --------------------------------------------------------------------------------
def test_kl_histograms_match_scipy_and_numpy() -> None:
    rng = np.random.default_rng(7)
    q = histogram_like(60, 12, rng)
    q[10] = q[11]  # duplicated reference distributions: exact ties
    p = np.concatenate([histogram_like(30, 12, rng), q[:10]])  # some rows equal to a reference row
    p[3, :4] = 0.0  # zero bins in p are fine (0 log 0 = 0)
    got = kl_histograms(torch.from_numpy(p), torch.from_numpy(q))
    assert got.shape == (40, 32) and got.dtype == torch.float32
    np.testing.assert_array_equal(got.numpy(), ref_kl_histograms(p, q).astype(np.float32))
    np.testing.assert_allclose(got.sum(1).numpy(), 1.0, rtol=0, atol=1e-6)


def test_kl_histograms_of_a_set_to_itself_include_exact_zeros() -> None:
    rng = np.random.default_rng(8)
    h = histogram_like(50, 20, rng)
    h[5:9] = h[4]  # identical candidates
    got = kl_histograms(torch.from_numpy(h).float(), torch.from_numpy(h).float())
    ref = ref_kl_histograms(h.astype(np.float32).astype(np.float64), h.astype(np.float32).astype(np.float64))
    np.testing.assert_array_equal(got.numpy(), ref.astype(np.float32))
    assert (got[:, 0] > 0).all()  # every row's own KL (0) is its minimum: first bin


def test_constant_rows_follow_numpys_rule() -> None:
    q = np.tile(np.array([5.0, 1.0, 1e-7, 2.0]), (7, 1))  # all references equal
    p = np.array([[1.0, 1.0, 1.0, 1.0], [5.0, 1.0, 1e-7, 2.0]])
    got = kl_histograms(torch.from_numpy(p), torch.from_numpy(q)).numpy()
    np.testing.assert_array_equal(got, ref_kl_histograms(p, q).astype(np.float32))
    # numpy uses [v - 0.5, v + 0.5]: every value falls in the middle bin.
    assert (got[:, 16] == 1).all() and got.sum() == 2
    single = kl_histograms(torch.from_numpy(p), torch.from_numpy(q[:1])).numpy()  # L = 1
    np.testing.assert_array_equal(single, got)


def test_values_on_bin_edges_are_binned_like_numpy() -> None:
    """Values exactly on (and one ulp around) numpy's linspace edges, where the index estimate
    ``(v - lo) / span * bins`` is off by one and numpy's edge correction decides."""
    rng = np.random.default_rng(14)
    rows = []
    for _ in range(300):
        lo, hi = np.sort(rng.random(2) * 10 ** rng.uniform(-3, 2, size=2))
        edges = np.linspace(lo, hi, 33)
        vals = np.concatenate([edges, np.nextafter(edges, -np.inf), np.nextafter(edges, np.inf)])
        rows.append(np.clip(vals, lo, hi))
    values = np.stack(rows)
    got = _row_histograms(torch.from_numpy(values), torch.ones(values.shape[1], dtype=torch.int64), 32)
    ref = np.stack([np.histogram(v, bins=32)[0] for v in values])
    np.testing.assert_array_equal(got.numpy(), ref)


def test_nothing_labeled_gives_zero_histograms() -> None:
    p = torch.rand(6, 12) + 0.1
    assert torch.equal(kl_histograms(p, torch.empty(0, 12)), torch.zeros(6, 32))
    assert kl_histograms(torch.empty(0, 12), p).shape == (0, 32)


def test_kl_chunking_does_not_change_results() -> None:
    rng = np.random.default_rng(9)
    p = torch.from_numpy(histogram_like(37, 8, rng))
    q = torch.from_numpy(histogram_like(53, 8, rng))
    full = kl_histograms(p, q, chunk_elems=1 << 30)
    for chunk in (1, 53, 54 * 3, 1000):
        assert torch.equal(kl_histograms(p, q, chunk_elems=chunk), full)


def test_kl_rejects_zero_reference_bins() -> None:
    with pytest.raises(ValueError, match="infinite"):
        kl_histograms(torch.ones(2, 3), torch.tensor([[1.0, 0.0, 1.0]]))


# --- candidate features -----------------------------------------------------------------------------
def ref_candidate_features(
    vecs: np.ndarray, labeled: np.ndarray, k: int, n: int, mask: np.ndarray
) -> np.ndarray:
    n_hist = vecs.shape[1] - POOL_FEATURES
    valid = [i for i in range(k * n) if mask.reshape(-1)[i]]
    all_cand = vecs[valid, :n_hist]
    out = np.zeros((k * n, vecs.shape[1] + 64))
    for i in valid:
        lab = ref_kl_histograms(vecs[i : i + 1, :n_hist], labeled)[0]
        pool = ref_kl_histograms(vecs[i : i + 1, :n_hist], all_cand)[0]
        out[i] = np.concatenate([vecs[i], lab, pool])
    return out.reshape(k, n, -1)


def synthetic_vectors(rows: int, classes: int, rng: np.random.Generator) -> np.ndarray:
    """Region-vector-like rows: histogram part as in real vectors, random pooled entropies."""
    hist = histogram_like(rows, classes + 1, rng).astype(np.float32).astype(np.float64)
    return np.concatenate([hist, rng.random((rows, POOL_FEATURES))], axis=1)


def test_candidate_features_match_reference_with_masked_slots() -> None:
    rng = np.random.default_rng(10)
    k, n, classes = 4, 5, 6
    vecs = synthetic_vectors(k * n, classes, rng)
    vecs[7] = vecs[2]  # identical candidates
    labeled = class_distribution(rng.integers(0, 50, size=(9, classes + 1))).numpy()
    mask = np.ones((k, n), dtype=bool)
    mask[3, 2:] = False
    mask[1, 4] = False
    ref = ref_candidate_features(vecs, labeled, k, n, mask)
    t_vecs = torch.from_numpy(vecs).float()
    got = candidate_features(t_vecs, torch.from_numpy(labeled), (k, n), mask=mask)
    assert got.shape == (k, n, vecs.shape[1] + 64) and got.dtype == torch.float32
    np.testing.assert_array_equal(got.numpy(), ref.astype(np.float32))
    assert (got[torch.from_numpy(~mask)] == 0).all()
    compact = candidate_features(
        t_vecs[torch.from_numpy(mask.reshape(-1))], torch.from_numpy(labeled), (k, n), mask
    )
    assert torch.equal(compact, got)


def test_candidate_features_camvid_shape_and_empty_labeled_set() -> None:
    rng = np.random.default_rng(11)
    k, n, classes = 24, 20, 11
    vecs = torch.from_numpy(synthetic_vectors(k * n, classes, rng)).float()
    assert vecs.shape[1] == region_vector_dim(classes) == 204
    got = candidate_features(vecs, torch.empty(0, classes + 1, dtype=torch.float64), (k, n))
    assert got.shape == (24, 20, 268)
    assert (got[..., 204:236] == 0).all()  # nothing labeled yet
    np.testing.assert_allclose(got[..., 236:].sum(-1).numpy(), 1.0, rtol=0, atol=1e-6)
    assert torch.equal(got[..., :204].reshape(-1, 204), vecs)
    with pytest.raises(ValueError, match="labeled_dists"):
        candidate_features(vecs, torch.ones(3, classes), (k, n))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_features_on_cuda_equal_cpu() -> None:  # pragma: no cover - exercised on GPU machines
    probs = random_probs(2, 5, CROPPED_GRID, seed=12)
    cpu = region_tables(probs, CROPPED_GRID)
    torch.testing.assert_close(region_tables(probs.cuda(), CROPPED_GRID).cpu(), cpu, rtol=0, atol=1e-5)
    rng = np.random.default_rng(12)
    vecs = torch.from_numpy(synthetic_vectors(60, 5, rng)).float()
    lab = class_distribution(rng.integers(0, 50, size=(9, 6)))
    ref = candidate_features(vecs, lab, (6, 10))
    assert torch.equal(candidate_features(vecs.cuda(), lab.cuda(), (6, 10)).cpu(), ref)


# --- scale -----------------------------------------------------------------------------------------------
def test_cityscapes_test_scale_is_memory_bounded() -> None:
    """R = L = 25,600 candidates, 20 bins (Cityscapes test: K=256, N=100): the full KL matrix alone
    would be 5.2 GB in float64; the chunked computation must stay far below that. Run on one thread:
    on a shared 2-core machine OpenMP barriers across busy cores cost more than the second core gains.
    """
    rng = np.random.default_rng(13)
    h = torch.from_numpy(histogram_like(25_600, 20, rng, pixels=128 * 128)).float()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.perf_counter()
        out = kl_histograms(h, h)
        seconds = time.perf_counter() - start
        grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    finally:
        torch.set_num_threads(threads)
    print(f"\nkl_histograms R=L=25,600 K=20: {seconds:.1f} s on 1 thread, peak RSS grew {grown_mib:.0f} MiB")
    assert out.shape == (25_600, 32)
    np.testing.assert_allclose(out.sum(1).numpy(), 1.0, rtol=0, atol=1e-5)
    assert (out[:, 0] > 0).all()
    assert grown_mib < 1024


def test_region_tables_from_cell_predictions_equal_full_resolution() -> None:
    """A piecewise-constant prediction given on its cell grid (``prediction_stride``) gives the same
    region tables, to the bit, as the same prediction expanded to full resolution; a stride that does
    not tile the regions is refused."""
    from ralis_gym.features import region_tables_from_maps

    grid = RegionGrid((480, 360), (80, 90))
    g = torch.Generator().manual_seed(0)
    cells = torch.randint(0, 12, (3, 36, 48), generator=g)
    cells[0, :9, :8] = 4  # a region of one class: its count is the whole region
    entropy = torch.rand(3, 360, 480, generator=g)
    full = cells.repeat_interleave(10, -2).repeat_interleave(10, -1)
    expected = region_tables_from_maps(full, entropy, 11, grid)
    got = region_tables_from_maps(cells, entropy, 11, grid, prediction_stride=10)
    assert torch.equal(got, expected)
    assert float(got[0, 0, 0, 4]) == 80 * 90
    with pytest.raises(ValueError, match="does not tile"):
        region_tables_from_maps(cells[:, :, :45], entropy, 11, grid, prediction_stride=10)
    with pytest.raises(ValueError, match="does not tile"):
        region_tables_from_maps(full[:, :120, :120], entropy, 11, grid, prediction_stride=3)
