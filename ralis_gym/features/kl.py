"""KL-divergence histograms and the candidate (action) features of the RALIS reference code
(https://github.com/ArantxaCasanova/ralis, ``compute_state`` in ``models/model_utils.py``).

Each candidate gets two 32-bin histograms: of its KL divergences to the GT class distributions of the
labeled regions, and to the predicted class distributions of all current candidates. The reference
loops over candidates in Python and calls ``scipy.stats.entropy`` + ``np.histogram`` per candidate,
O((K·N)²·(C+1)) Python-driven work. Here:

* ``KL(p̂_r ‖ q̂_j) = Σ_c p̂ log p̂ − p̂ · log q̂`` is one matrix product per chunk of rows, in float64.
* Distributions are deduplicated first (``torch.unique`` over the normalised rows). Each distinct
  (p̂, q̂) pair is then computed exactly once, so equal pairs give bit-identical values and p̂ = q̂
  gives exactly 0 — what the elementwise reference gives (``p·log(p/p) = 0``). Without this, the
  matrix-product form would leave ~1e-16 noise where the reference has exact ties, and a row whose
  values are all equal (e.g. every candidate predicted as pure sky) would be spread over 32 bins
  instead of following numpy's ``[v − 0.5, v + 0.5]`` rule. Deduplication also shrinks the work
  when many regions share a histogram (pure regions of one class are identical).
* Histograms replicate ``np.histogram(values, bins=32)``: numpy's linspace edges over
  ``[min, max]`` of the row, numpy's index estimate and its ±1 correction against the edges (bin i
  holds ``e_i <= v < e_{i+1}``, the last bin is closed), and ``[v − 0.5, v + 0.5]`` for a constant
  row. Counts are accumulated per row with ``scatter_add_`` weighted by the multiplicity of each
  distinct reference distribution, then divided by their sum.
* Rows are processed in chunks of ``max(1, chunk_elems // L)`` so the peak memory is a few times
  ``chunk_elems`` float64 values whatever R and L are (Cityscapes test: R = L = 25,600).

Precision note: the reference computes the labeled histogram in float64 but the candidate one on the
float32 state tensor; both are computed here in float64 (the exact values the reference rounds), so
results can differ from it only for values within float32 rounding of a bin edge.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ralis_gym.errors import ConfigError
from ralis_gym.features.regions import HIST_FLOOR, POOL_FEATURES

#: Bins of each KL histogram (the reference's ``np.histogram(..., bins=32)``).
KL_BINS = 32
#: Default bound on the KL values materialised per chunk of rows on CPU (float64: 8 MiB per
#: temporary; the chunk stays cache-friendly while the per-op threading overhead is amortised).
DEFAULT_CHUNK_ELEMS = 1 << 20
#: The same on GPUs, where per-chunk launch overhead dominates instead (128 MiB per temporary).
DEFAULT_CUDA_CHUNK_ELEMS = 1 << 24


def default_chunk_elems(device: torch.device) -> int:
    """Chunk size of :func:`kl_histograms` when none is given: larger on accelerators."""
    return DEFAULT_CHUNK_ELEMS if device.type == "cpu" else DEFAULT_CUDA_CHUNK_ELEMS


def class_distribution(counts: torch.Tensor | np.ndarray, floor: float = HIST_FLOOR) -> torch.Tensor:
    """GT class distributions ``[R, C + 1]`` float64 from per-class pixel counts ``[R, C + 1]``.

    As the reference's ``check_class_region``: fraction of the region's pixels per class over C+1
    bins (last = ignore), absent classes set to ``floor`` = 1e-7 rather than 0 so that the KL of a
    candidate to this distribution stays finite. Input is e.g. ``RegionPool.region_class_histograms``
    or the histograms returned by ``RegionPool.label``. Rows without any pixel are rejected: they come
    from labeling without ground truth and would silently give a uniform distribution.
    """
    c = torch.as_tensor(counts)
    if c.dim() != 2:
        raise ValueError(f"counts must be [regions, C + 1], got shape {tuple(c.shape)}")
    c = c.to(torch.float64)
    total = c.sum(1, keepdim=True)
    if c.numel() and (c.min() < 0 or (total <= 0).any()):
        raise ValueError("class counts must be non-negative with at least one pixel per region")
    return torch.where(c > 0, c / total, torch.full((), floor, dtype=torch.float64, device=c.device))


def _normalise(x: torch.Tensor, name: str) -> torch.Tensor:
    """Rows divided by their sums in float64 (``scipy.stats.entropy`` normalises ``pk`` and ``qk``)."""
    x = x.to(torch.float64)
    if not torch.isfinite(x).all() or (x < 0).any():
        raise ValueError(f"{name} must be finite and non-negative")
    total = x.sum(1, keepdim=True)
    if (total <= 0).any():
        raise ValueError(f"every row of {name} needs a positive sum")
    return x / total


def _row_histograms(values: torch.Tensor, weights: torch.Tensor, bins: int) -> torch.Tensor:
    """``np.histogram(row, bins)`` counts of every row of ``values`` ``[c, U]``, weighted ``[U]``.

    Mirrors numpy exactly: edges ``e_i = i * ((hi - lo) / bins) + lo`` (``np.linspace``, last edge =
    hi), index estimate ``int((v - lo) / (hi - lo) * bins)`` clipped to ``bins - 1``, then one bin down
    if ``v < e_i`` and one up if ``v >= e_{i+1}`` unless already in the last bin. The edges are
    recomputed with the same two float64 operations instead of gathered from a table (gathers are
    the slowest op here), which gives the same bits. Both corrections come from the same estimate:
    after a decrement ``v < e_i <= e_{i+1}``, so numpy could not increment next.
    """
    n = values.shape[0]
    lo, hi = values.amin(1, keepdim=True), values.amax(1, keepdim=True)
    same = lo == hi
    lo = torch.where(same, lo - 0.5, lo)
    hi = torch.where(same, hi + 0.5, hi)
    span = hi - lo
    step = span / bins
    pos = values - lo
    pos.div_(span).mul_(bins).floor_().clamp_(max=bins - 1)  # estimate (values >= lo: no negatives)
    edge = pos * step
    edge += lo
    down = values < edge  # e_0 = lo exactly, so never below bin 0
    torch.add(pos, 1, out=edge)
    edge.mul_(step).add_(lo)
    up = values >= edge  # may point past the last bin: undone by the clamp below
    del edge
    pos += up
    pos -= down.to(pos.dtype)
    idx = pos.clamp_(max=bins - 1).to(torch.int64)
    del pos, up, down
    counts = torch.zeros(n, bins, dtype=torch.int64, device=values.device)
    return counts.scatter_add_(1, idx, weights[None, :].expand(n, -1))


@torch.no_grad()
def kl_histograms(
    p: torch.Tensor, q: torch.Tensor, bins: int = KL_BINS, chunk_elems: int | None = None
) -> torch.Tensor:
    """Normalised ``np.histogram`` of ``KL(p̂_r ‖ q̂_j)`` over j, for every row r: ``[R, bins]`` float32.

    ``p`` ``[R, K]`` and ``q`` ``[L, K]`` are non-negative class histograms; both are normalised along
    the class axis (``scipy.stats.entropy(pk, qk)`` semantics, natural log). ``q`` must be strictly
    positive (the reference floors absent classes at 1e-7; a zero bin makes KL infinite and
    ``np.histogram`` fail). Row r of the result is the 32-bin histogram of its L values over their own
    ``[min, max]`` range, divided by L; ``L == 0`` gives zeros (the reference's "nothing labeled yet").
    Memory is bounded by ``chunk_elems`` (default: :func:`default_chunk_elems`): rows are handled
    ``max(1, chunk_elems // L)`` at a time, and a few float64 temporaries of that size are alive.
    """
    if p.dim() != 2 or q.dim() != 2 or p.shape[1] != q.shape[1]:
        raise ValueError(f"p [R, K] and q [L, K] must share K; got {tuple(p.shape)} and {tuple(q.shape)}")
    if bins < 1:
        raise ConfigError(f"bins must be positive, got {bins}")
    n_rows, n_ref = p.shape[0], q.shape[0]
    device = p.device
    out = torch.zeros(n_rows, bins, dtype=torch.float32, device=device)
    if n_rows == 0 or n_ref == 0:
        return out
    q = q.to(device)
    p_hat, q_hat = _normalise(p, "p"), _normalise(q, "q")
    if (q_hat <= 0).any():
        raise ValueError("q has zero bins: KL(p̂ ‖ q̂) is infinite; floor absent classes (1e-7)")
    # Distinct distributions of p and q in one id space, so p̂ == q̂ share an id.
    uniq, inverse = torch.unique(torch.cat([p_hat, q_hat]), dim=0, return_inverse=True)
    row_ids, row_pos = torch.unique(inverse[:n_rows], return_inverse=True)
    col_ids, col_counts = torch.unique(inverse[n_rows:], return_counts=True)
    pu, qu = uniq[row_ids], uniq[col_ids]
    self_term = torch.xlogy(pu, pu).sum(1, keepdim=True)  # Σ p̂ log p̂ (0 log 0 = 0)
    log_qt = qu.log().T.contiguous()  # [K, Uq]
    # Column of each row's own distribution among the reference ones (-1 when absent).
    pos = torch.searchsorted(col_ids, row_ids).clamp_(max=col_ids.numel() - 1)
    own_col = torch.where(col_ids[pos] == row_ids, pos, -1)
    hist = torch.empty(row_ids.numel(), bins, dtype=torch.float64, device=device)
    step = max(1, (chunk_elems or default_chunk_elems(device)) // qu.shape[0])
    for start in range(0, row_ids.numel(), step):
        stop = min(start + step, row_ids.numel())
        kl = torch.addmm(self_term[start:stop], pu[start:stop], log_qt, alpha=-1)  # Σ p̂ log p̂ − p̂·log q̂
        # KL(p̂ ‖ p̂) is exactly 0, as in the elementwise reference (no host sync: rows without
        # their own distribution among the references rewrite their column-0 value unchanged).
        own = own_col[start:stop]
        rows, cols = torch.arange(stop - start, device=device), own.clamp(min=0)
        kl[rows, cols] = torch.where(own >= 0, 0.0, kl[rows, cols])
        hist[start:stop] = _row_histograms(kl, col_counts, bins).to(torch.float64) / n_ref
        del kl
    return hist[row_pos].to(torch.float32)


def candidate_features(
    region_vecs: torch.Tensor,
    labeled_dists: torch.Tensor | None,
    pool_shape: Sequence[int],
    mask: torch.Tensor | np.ndarray | None = None,
    bins: int = KL_BINS,
    chunk_elems: int | None = None,
) -> torch.Tensor:
    """Action features ``[K, N, Ds + 2 * bins]`` float32: ``[region vector | KL-labeled | KL-pool]``.

    ``region_vecs`` holds the region vectors of the candidates in pool order (row ``k * N + n`` is
    slot n of pool k), either all ``K * N`` rows or, with ``mask``, only the valid candidates in
    row-major mask order. ``labeled_dists`` ``[L, C + 1]`` are the GT class distributions of the
    regions labeled so far (:func:`class_distribution`); ``None`` or ``L == 0`` gives zero
    KL-labeled histograms. A candidate's own distribution p̂ is its predicted class histogram
    (the first ``Ds - 192`` columns) normalised. The KL-pool histogram compares each candidate with
    every valid candidate of the step, itself included (KL 0). Masked (empty) slots are left out of
    that reference set and their feature rows are zero.
    """
    k_pools, n_slots = (int(s) for s in pool_shape)
    total = k_pools * n_slots
    if region_vecs.dim() != 2 or region_vecs.shape[1] <= POOL_FEATURES:
        raise ValueError(
            f"region_vecs must be [rows, C + 1 + {POOL_FEATURES}], got {tuple(region_vecs.shape)}"
        )
    device = region_vecs.device
    dim = region_vecs.shape[1]
    n_hist = dim - POOL_FEATURES
    if mask is None:
        valid = torch.ones(total, dtype=torch.bool, device=device)
    else:
        valid = torch.as_tensor(mask, dtype=torch.bool, device=device)
        if tuple(valid.shape) != (k_pools, n_slots):
            raise ValueError(f"mask must be [{k_pools}, {n_slots}], got {tuple(valid.shape)}")
        valid = valid.reshape(-1)
    n_valid = int(valid.sum())
    if region_vecs.shape[0] == total:
        vecs = region_vecs[valid]
    elif mask is not None and region_vecs.shape[0] == n_valid:
        vecs = region_vecs
    else:
        raise ValueError(
            f"region_vecs has {region_vecs.shape[0]} rows; expected K*N = {total}"
            + (f" or the {n_valid} valid candidates" if mask is not None else "")
        )
    if labeled_dists is None:
        labeled_dists = torch.empty(0, n_hist, dtype=torch.float64, device=device)
    labeled_dists = torch.as_tensor(labeled_dists, device=device)
    if labeled_dists.dim() != 2 or labeled_dists.shape[1] != n_hist:
        raise ValueError(
            f"labeled_dists must be [L, {n_hist}] (C + 1 bins of the region vectors), "
            f"got {tuple(labeled_dists.shape)}"
        )
    hists = vecs[:, :n_hist]
    kl_lab = kl_histograms(hists, labeled_dists, bins, chunk_elems)
    kl_pool = kl_histograms(hists, hists, bins, chunk_elems)
    out = torch.zeros(total, dim + 2 * bins, dtype=torch.float32, device=device)
    out[valid] = torch.cat([vecs.to(torch.float32), kl_lab, kl_pool], dim=1)
    return out.view(k_pools, n_slots, -1)
