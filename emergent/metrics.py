"""Rates with confidence intervals (pure functions)."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Rate:
    """k successes out of n, with a 95% Wilson score interval."""

    k: int
    n: int

    @property
    def value(self) -> float:
        return self.k / self.n if self.n else float("nan")

    @property
    def interval(self) -> tuple[float, float]:
        return wilson(self.k, self.n)

    def __str__(self) -> str:
        lo, hi = self.interval
        return f"{self.value:.2f} [{lo:.2f}, {hi:.2f}]" if self.n else "n/a"

    def as_dict(self) -> dict:
        lo, hi = self.interval
        return {"rate": self.value, "lo": lo, "hi": hi, "k": self.k, "n": self.n}


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion (well-behaved at 0 and 1)."""
    if n == 0:
        return float("nan"), float("nan")
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # exact at the ends: rounding can leave the bound a hair inside the rate (1 - 1e-16 at k = n)
    lo = 0.0 if k == 0 else max(0.0, min(p, centre - half))
    hi = 1.0 if k == n else min(1.0, max(p, centre + half))
    return lo, hi


def cluster_bootstrap(
    k: list[int], n: list[int], iters: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of the pooled rate sum(k)/sum(n), resampling whole clusters
    (questions: samples of one question are not independent). (nan, nan) without data."""
    import numpy as np

    k_arr, n_arr = np.asarray(k, float), np.asarray(n, float)
    keep = n_arr > 0
    k_arr, n_arr = k_arr[keep], n_arr[keep]
    if not len(n_arr):
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(n_arr), size=(iters, len(n_arr)))
    rates = k_arr[idx].sum(1) / n_arr[idx].sum(1)
    tail = (1 - level) / 2
    lo, hi = np.quantile(rates, [tail, 1 - tail])
    return float(lo), float(hi)
