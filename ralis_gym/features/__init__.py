"""State and action features of the query network (the reference code's): region vectors and KL histograms.

:func:`observation` builds the query network's observation from the segmentation network (the one
feature pipeline, used by the environment and by ``agents.suggest``). Beneath it, pure, vectorized
torch functions that run on the device of their inputs:

* :func:`region_tables_from_maps`: ``[hist C+1 | min 64 | avg 64 | max 64]`` of every region of
  some images from their arg-max and entropy maps (``Ds = C + 1 + 192``); :func:`region_tables`,
  the same from full-resolution softmax maps (the reference the tests hold the pipeline to);
  :func:`tables_in_id_order`, the state's row order.
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
from ralis_gym.features.observation import observation, segmenter_region_tables, state_vectors
from ralis_gym.features.regions import (
    HIST_FLOOR,
    POOL_CELLS,
    POOL_FEATURES,
    entropy_map,
    pool_kernel,
    region_tables,
    region_tables_from_maps,
    region_vector_dim,
    tables_in_id_order,
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
    "observation",
    "segmenter_region_tables",
    "state_vectors",
    "tables_in_id_order",
    "entropy_map",
    "pool_kernel",
    "region_tables",
    "region_tables_from_maps",
    "region_vector_dim",
]
