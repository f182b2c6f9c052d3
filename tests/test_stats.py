"""emergent.stats, one implementation of each statistic, against scipy / scikit-learn or a naive
loop over the same random draws, at 1e-12 (fast, no Ray)."""

import math

import numpy as np
import pytest
from scipy import stats as sp
from sklearn.metrics import roc_auc_score
from statsmodels.stats.proportion import proportion_confint

from emergent import stats

Z = 1.959964  # stats.wilson's z


def naive_quantiles(samples, level=0.95):
    tail = (1 - level) / 2
    return float(np.quantile(samples, tail)), float(np.quantile(samples, 1 - tail))


@pytest.mark.parametrize("k,n", [(0, 10), (3, 10), (10, 10), (1, 1), (57, 200), (0, 1)])
def test_wilson_is_statsmodels_wilson_interval(k, n):
    alpha = 2 * (1 - sp.norm.cdf(Z))  # the alpha whose two-sided z is stats.wilson's
    want = proportion_confint(k, n, alpha=alpha, method="wilson")
    got = stats.wilson(k, n)
    assert got == pytest.approx(want, rel=1e-12, abs=1e-12)
    assert got[0] <= k / n <= got[1]  # the ends stay on the right side of the rate
    assert stats.Rate(k, n).interval == got
    assert all(math.isnan(v) for v in stats.wilson(0, 0))


def test_auroc_is_sklearns_with_ties_and_nan_for_one_class():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    s = np.round(rng.normal(y * 0.7, 1.0), 1)  # rounded: many ties
    assert stats.auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert stats.auroc(y, -s) == pytest.approx(1 - stats.auroc(y, s), abs=1e-12)
    assert math.isnan(stats.auroc([1, 1, 1], [0.1, 0.2, 0.3]))
    # the same figure from the Mann-Whitney U statistic (a second, independent reference)
    u = sp.mannwhitneyu(s[y == 1], s[y == 0]).statistic
    assert stats.auroc(y, s) == pytest.approx(u / ((y == 1).sum() * (y == 0).sum()), abs=1e-12)


def test_auroc_rows_is_auroc_row_by_row():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, (50, 40))
    y[:, 0], y[:, 1] = 0, 1  # both classes in every row
    s = np.round(rng.normal(y, 1.0), 1)
    want = [roc_auc_score(yr, sr) for yr, sr in zip(y, s)]
    np.testing.assert_allclose(stats.auroc_rows(y, s), want, rtol=0, atol=1e-12)


def test_bootstrap_mean_is_the_percentiles_of_resampled_means():
    v = np.random.default_rng(2).normal(0.3, 1.0, 37)
    rng = np.random.default_rng(5)
    idx = rng.integers(0, len(v), size=(500, len(v)))
    means = [sum(v[i] for i in row) / len(row) for row in idx]  # a loop, not numpy's mean
    assert stats.bootstrap_mean(v, iters=500, seed=5) == pytest.approx(
        naive_quantiles(means), abs=1e-12
    )
    assert all(math.isnan(x) for x in stats.bootstrap_mean([1.0]))


def test_cluster_bootstrap_resamples_whole_clusters():
    k, n = [3, 0, 5, 2, 0, 7], [4, 3, 5, 6, 0, 9]  # the empty cluster is left out
    kk, nn = [3, 0, 5, 2, 7], [4, 3, 5, 6, 9]
    idx = np.random.default_rng(4).integers(0, 5, size=(300, 5))
    rates = [sum(kk[i] for i in row) / sum(nn[i] for i in row) for row in idx]
    assert stats.cluster_bootstrap(k, n, iters=300, seed=4) == pytest.approx(
        naive_quantiles(rates), abs=1e-12
    )
    assert all(math.isnan(x) for x in stats.cluster_bootstrap([], []))


def test_auroc_interval_resamples_items_and_redraws_one_class_samples():
    y = np.array([0, 0, 0, 1, 0, 1, 1, 0])
    s = np.array([0.1, 0.4, 0.35, 0.8, 0.2, 0.7, 0.3, 0.9])
    rng = np.random.default_rng(3)
    got, want = [], []
    while len(want) < 400:  # the same draws, one row at a time
        for row in rng.integers(0, len(y), (400 - len(want), len(y))):
            if 0 < y[row].sum() < len(y):
                want.append(roc_auc_score(y[row], s[row]))
    got = stats.auroc_interval(y, s, iters=400, seed=3)
    assert got == pytest.approx(naive_quantiles(want[:400]), abs=1e-12)


@pytest.mark.parametrize("values", [[0.2, 0.5, 0.4], [1.0, 3.0], [0.1, 0.12, 0.09, 0.3, 0.2]])
def test_t_interval_is_scipys(values):
    mean, lo, hi = stats.t_interval(values)
    want = sp.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=sp.sem(values))
    assert (lo, hi) == pytest.approx(want, rel=1e-12)
    assert mean == pytest.approx(np.mean(values), rel=1e-12)
    m, lo1, hi1 = stats.t_interval([0.7])
    assert m == 0.7 and math.isnan(lo1) and math.isnan(hi1)
