"""State and action features of the query network (spec §4): region vectors and KL histograms.

Pure, vectorized torch functions that run on the device of their inputs:

* :func:`region_vectors` / :func:`state_features`: ``[hist C+1 | min 64 | avg 64 | max 64]`` per
  region from full-resolution softmax maps (``Ds = C + 1 + 192``).
* :func:`class_distribution`: GT class distributions of labeled regions (fractions, absent = 1e-7).
* :func:`kl_histograms`: per-row normalised ``np.histogram(KL(p̂ ‖ q̂_j), bins=32)``.
* :func:`candidate_features`: ``[K, N, Ds + 64]`` action features of the candidate pools.
"""

from ralis_gym.features.kl import (
    DEFAULT_CHUNK_ELEMS,
    DEFAULT_CUDA_CHUNK_ELEMS,
    KL_BINS,
    candidate_features,
    class_distribution,
    default_chunk_elems,
    kl_histograms,
)
from ralis_gym.features.regions import (
    HIST_FLOOR,
    POOL_CELLS,
    POOL_FEATURES,
    entropy_map,
    pool_kernel,
    region_tables,
    region_tables_from_maps,
    region_vector_dim,
    region_vectors,
    state_features,
)

__all__ = [
    "DEFAULT_CHUNK_ELEMS",
    "DEFAULT_CUDA_CHUNK_ELEMS",
    "HIST_FLOOR",
    "KL_BINS",
    "POOL_CELLS",
    "POOL_FEATURES",
    "candidate_features",
    "class_distribution",
    "default_chunk_elems",
    "kl_histograms",
    "entropy_map",
    "pool_kernel",
    "region_tables",
    "region_tables_from_maps",
    "region_vector_dim",
    "region_vectors",
    "state_features",
]
