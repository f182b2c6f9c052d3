"""The project's statistics, one implementation each (pure functions of numbers and arrays):
rates with Wilson intervals, percentile bootstraps (of a mean, of a pooled rate over clusters, of
an AUROC), the AUROC itself, and the Student-t interval over seeds. tests/test_stats.py checks
each against scipy / scikit-learn or a naive loop at 1e-12."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


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


def percentile_interval(samples, level: float = 0.95) -> tuple[float, float]:
    """The central ``level`` interval of bootstrap ``samples`` (their percentiles)."""
    tail = (1 - level) / 2
    return float(np.quantile(samples, tail)), float(np.quantile(samples, 1 - tail))


def bootstrap_mean(
    values, iters: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of a mean, resampling values (deterministic for a seed);
    (nan, nan) with fewer than two values."""
    v = np.asarray(values, float)
    if len(v) < 2:
        return float("nan"), float("nan")
    idx = np.random.default_rng(seed).integers(0, len(v), size=(iters, len(v)))
    return percentile_interval(v[idx].mean(1), level)


def cluster_bootstrap(
    k: list[int], n: list[int], iters: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of the pooled rate sum(k)/sum(n), resampling whole clusters
    (questions: samples of one question are not independent). (nan, nan) without data."""
    k_arr, n_arr = np.asarray(k, float), np.asarray(n, float)
    keep = n_arr > 0
    k_arr, n_arr = k_arr[keep], n_arr[keep]
    if not len(n_arr):
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(n_arr), size=(iters, len(n_arr)))
    return percentile_interval(k_arr[idx].sum(1) / n_arr[idx].sum(1), level)


def auroc(y, s) -> float:
    """Area under the ROC curve of scores ``s`` for binary labels ``y`` (ties count half; nan
    when ``y`` has one class)."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y).astype(bool)
    if y.all() or not y.any():
        return float("nan")
    return float(roc_auc_score(y, s))


def auroc_rows(y: np.ndarray, s: np.ndarray) -> np.ndarray:
    """The AUROC of every row of ``(y, s)`` (rows x items, each row with both classes), by
    midranks (ties count half): what :func:`auroc` gives row by row, in one vectorised pass."""
    from scipy.stats import rankdata

    r = rankdata(s, axis=1)
    pos = y.sum(1)
    neg = y.shape[1] - pos
    return ((r * y).sum(1) - pos * (pos + 1) / 2) / (pos * neg)


def auroc_interval(
    y: np.ndarray, s: np.ndarray, iters: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of the AUROC, resampling items (resamples with one class
    only are drawn again)."""
    y, s = np.asarray(y), np.asarray(s, dtype=np.float64)
    rng = np.random.default_rng(seed)
    got: list[np.ndarray] = []
    have = 0
    while have < iters:
        idx = rng.integers(0, len(y), (iters - have, len(y)))
        yy = y[idx]
        both = (yy.sum(1) > 0) & (yy.sum(1) < len(y))
        if both.any():
            got.append(auroc_rows(yy[both], s[idx[both]]))
            have += int(both.sum())
    return percentile_interval(np.concatenate(got)[:iters], level)


def t_interval(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, lo, hi): the mean of ``values`` with its Student-t interval (the values as a
    sample, e.g. one figure per seed); one value gives an interval of nan."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan, math.nan
    from scipy.stats import t

    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t.ppf(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half
