"""Probes and monitoring metrics (pure: arrays in, numbers out).

A probe is scikit-learn's logistic regression on standardised features, its inverse
regularisation C chosen by stratified cross-validation on the training draw alone (AUROC), so
nothing of the test data reaches it. Metrics: AUROC with a bootstrap interval over items;
recall at a fixed false-positive rate; and a threshold frozen on in-distribution validation data
at a target false-positive rate, with the false- and true-positive rates it gives elsewhere
(AUROC alone hides a threshold that drifts under shift).
"""

from __future__ import annotations

import numpy as np

CS = (0.01, 0.1, 1.0, 10.0)
"""Inverse regularisation strengths searched by cross-validation."""


def balanced_draw(y: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``n`` items of ``y``, half of each class (as near as the classes allow, at
    least 2 each); all items when ``n`` is 0 or at least ``len(y)``."""
    if n <= 0 or n >= len(y):
        return np.arange(len(y))
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    k = max(min(n // 2, len(pos)), n - len(neg))  # positives: half, or what the classes allow
    if k < 2 or n - k < 2:
        raise ValueError(f"a draw of {n} needs 2 of each class, have {len(pos)} / {len(neg)}")
    take = np.concatenate(
        [rng.choice(pos, k, replace=False), rng.choice(neg, n - k, replace=False)]
    )
    return np.sort(take)


def top_k_by_difference(x: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` feature columns whose class means differ most (in units of the pooled spread),
    from training data only; all columns when ``k`` is 0."""
    if k <= 0 or k >= x.shape[1]:
        return np.arange(x.shape[1])
    diff = np.abs(x[y == 1].mean(0) - x[y == 0].mean(0)) / (x.std(0) + 1e-6)
    return np.sort(np.argsort(-diff, kind="stable")[:k])


def fit_probe(x: np.ndarray, y: np.ndarray, seed: int = 0):
    """A fitted scikit-learn pipeline (standardise, logistic regression) whose C is chosen by
    stratified k-fold cross-validation (k = 5, or the smaller class's count when below; C = 1
    when a class has one item)."""
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    folds = int(min(5, np.bincount(y, minlength=2).min()))
    if folds >= 2:
        cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
        clf = LogisticRegressionCV(
            Cs=list(CS),
            cv=cv,
            scoring="roc_auc",
            max_iter=2000,
            l1_ratios=(0.0,),
            use_legacy_attributes=False,
        )
    else:
        return fixed_probe(x, y, 1.0)
    return make_pipeline(StandardScaler(), clf).fit(x, y)


def score(probe, x: np.ndarray) -> np.ndarray:
    """The probe's log-odds of unsafe."""
    return probe.decision_function(x)


def threshold_at_fpr(y: np.ndarray, s: np.ndarray, fpr: float) -> float:
    """The lowest threshold t (flag s > t) at which at most ``fpr`` of the negatives are
    flagged."""
    neg = np.sort(s[y == 0])[::-1]
    allowed = int(np.floor(fpr * len(neg)))
    return float(neg[allowed]) if allowed < len(neg) else float(neg[-1]) - 1.0


def rates_at(y: np.ndarray, s: np.ndarray, t: float) -> tuple[float, float]:
    """(false-positive rate, true-positive rate) of flagging s > t."""
    flagged = s > t
    return float(flagged[y == 0].mean()), float(flagged[y == 1].mean())


def recall_at_fpr(y: np.ndarray, s: np.ndarray, fpr: float = 0.01) -> float:
    """Recall with the threshold set on these same items at false-positive rate ``fpr``."""
    return rates_at(y, s, threshold_at_fpr(y, s, fpr))[1]


# --- combined monitors -----------------------------------------------------------------------------


def fixed_probe(x: np.ndarray, y: np.ndarray, c: float):
    """A fitted pipeline like ``fit_probe``'s, with its C given (no search)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000)).fit(x, y)


def chosen_c(probe) -> float:
    """The C a fitted probe uses (searched by ``fit_probe`` or given)."""
    clf = probe[-1]
    return float(np.ravel(clf.C_ if hasattr(clf, "C_") else clf.C)[0])


def out_of_fold(x: np.ndarray, y: np.ndarray, c: float, seed: int = 0) -> np.ndarray:
    """Each training item's score from the probe refitted without it (stratified k-fold, k as in
    ``fit_probe``, C fixed at ``c``: the one chosen on all the items, so every fold's log-odds
    have one scale), for a model stacked on the scores never to see a probe's fit to its own
    labels."""
    from sklearn.model_selection import StratifiedKFold

    folds = int(min(5, np.bincount(y, minlength=2).min()))
    if folds < 2:
        raise ValueError("out-of-fold scores need 2 items of each class")
    out = np.empty(len(y))
    for tr, te in StratifiedKFold(folds, shuffle=True, random_state=seed).split(x, y):
        out[te] = score(fixed_probe(x[tr], y[tr], c), x[te])
    return out


def fit_stack(parts: np.ndarray, y: np.ndarray):
    """A logistic regression on standardised monitor scores (items x monitors): the stacked
    monitor (C = 1: a handful of weights)."""
    return fixed_probe(parts, y, 1.0)


def cascade(first: np.ndarray, second: np.ndarray, budget: float) -> tuple[np.ndarray, np.ndarray]:
    """(scores, escalated) of a two-stage monitor: the ``budget`` share of items whose first-stage
    log-odds are nearest 0 (the most uncertain) get the second stage's log-odds, the others keep
    the first's. Both must be log-odds of the same event (calibrated on training data)."""
    k = int(np.ceil(budget * len(first)))
    escalated = np.zeros(len(first), dtype=bool)
    escalated[np.argsort(np.abs(first), kind="stable")[:k]] = True
    return np.where(escalated, second, first), escalated
