"""Metrics: scikit-learn's AUROC and AP against their definitions (Mann-Whitney U, precision at each
anomaly), precision@k and the realised FDR by counting."""

import numpy as np
import pytest

from scipy.stats import mannwhitneyu

from gsafe_models.metrics import auroc, average_precision, per_class_report, precision_at_k, realised_fdr


def _tied_scores(seed: int, n: int = 2000) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.uniform(size=n) < 0.1
    s = np.round(rng.normal(size=n) + 1.5 * y, 1)      # rounded: hundreds of ties, across classes too
    return s, y.astype(int)


def _auroc_by_ranks(s: np.ndarray, y: np.ndarray) -> float:
    """The Mann-Whitney U with mid-ranks, over n1 n0 (gsafe's hand-written AUROC until scikit-learn's)."""
    from scipy.stats import rankdata

    y = y.astype(bool)
    n1, n0 = int(y.sum()), int((~y).sum())
    return float((rankdata(s)[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


@pytest.mark.parametrize("seed", range(5))
def test_auroc_is_the_mann_whitney_u_with_ties(seed):
    s, y = _tied_scores(seed)
    a = auroc(s, y)
    assert abs(a - _auroc_by_ranks(s, y)) < 1e-12
    u = mannwhitneyu(s[y == 1], s[y == 0]).statistic
    assert abs(a - u / ((y == 1).sum() * (y == 0).sum())) < 1e-12


def test_average_precision_is_the_mean_precision_at_each_anomaly():
    for seed in range(3):
        s, y = _tied_scores(seed)
        # with ties, the list down to a score holds every object of that score
        expected = np.mean([((s >= t) & (y == 1)).sum() / (s >= t).sum() for t in s[y == 1]])
        assert average_precision(s, y) == pytest.approx(expected, rel=1e-12)
        # without ties it is the step-wise sum over the ranked list
        u = s + np.random.default_rng(seed).uniform(0, 1e-3, size=s.size)
        hits = y[np.argsort(-u)].astype(bool)
        prec = np.cumsum(hits) / np.arange(1, hits.size + 1)
        assert average_precision(u, y) == pytest.approx(prec[hits].mean(), rel=1e-12)


def test_metrics_are_nan_where_undefined():
    s = np.array([0.1, 0.5, 0.9])
    assert np.isnan(auroc(s, [0, 0, 0])) and np.isnan(auroc(s, [1, 1, 1]))
    assert np.isnan(average_precision(s, [0, 0, 0]))
    assert np.isnan(auroc(np.array([0.1, np.nan, 0.9]), [0, 1, 1]))
    assert np.isnan(precision_at_k(np.array([]), np.array([]), 5))
    with pytest.raises(ValueError, match="3 scores but 2 labels"):
        auroc(s, [0, 1])


def test_perfect_and_reversed_rankings():
    s, y = np.arange(10.0), (np.arange(10) >= 7).astype(int)
    assert auroc(s, y) == 1.0 and auroc(-s, y) == 0.0
    assert average_precision(s, y) == 1.0
    assert precision_at_k(s, y, 3) == 1.0 and precision_at_k(s, y, 5) == 0.6


def test_realised_fdr_counts_the_listed_normal_objects():
    rng = np.random.default_rng(0)
    q, y = rng.uniform(size=500), rng.integers(0, 2, size=500)
    fdp, n = realised_fdr(q, y, 0.1)
    listed = q <= 0.1
    assert n == listed.sum() and fdp * n == pytest.approx((listed & (y == 0)).sum())
    assert realised_fdr(np.ones(3), np.ones(3), 0.1) == (0.0, 0)


def test_per_class_report_scores_each_class_against_all_normal_objects():
    s, y = _tied_scores(0)
    classes = np.where(y == 1, np.where(np.arange(y.size) % 2, "lens", "trail"), "")
    rep = per_class_report(s, y, classes)
    assert set(rep) == {"all", "lens", "trail"}
    assert rep["lens"]["n"] + rep["trail"]["n"] == rep["all"]["n"] == y.sum()
    keep = (y == 0) | (classes == "lens")
    assert rep["lens"]["auroc"] == auroc(s[keep], y[keep])
