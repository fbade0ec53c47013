"""Statistics for benchmark claims (BENCHMARKS.md: "a curve over budgets with >= 5 seeds, mean ±
std, and a Welch t against random"). One place, used by every benchmark report."""

from __future__ import annotations

import numpy as np


def sample_std(a: np.ndarray) -> float:
    """Standard deviation with ``ddof=1`` (the one Welch's t uses); 0.0 for fewer than two values."""
    a = np.asarray(a, dtype=np.float64)
    return float(a.std(ddof=1)) if a.size > 1 else 0.0


def welch_t(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Difference of means ``mean(a) - mean(b)`` and Welch's t statistic (unequal variances,
    sample variances with ``ddof=1``); ``t`` is ``±inf`` when both samples are constant."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    diff = float(a.mean() - b.mean())
    se = float(np.sqrt(a.var(ddof=1) / a.size + b.var(ddof=1) / b.size))
    return diff, diff / se if se > 0 else float("inf") * np.sign(diff)
