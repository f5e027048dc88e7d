"""ExposureScore (outlier exposure with monotone trees) and the "exposure" combination: the trees as
arrays against scikit-learn's own prediction, monotonicity, validity under the null, state."""

import pickle
import warnings

import numpy as np
import pytest

from scipy import stats
from sklearn.metrics import roc_auc_score

from gsafe_models.calibration import CombinedTest, ExposureScore
from gsafe_models.robust import robust_scale

NAMES = ["residual", "colour", "peak", "chance"]


def normals(rng: np.random.Generator, n: int) -> np.ndarray:
    """Null statistics (n, 4): correlated, two of them skewed; the last one carries nothing."""
    C = np.array([[1.0, 0.5, 0.5, 0.0], [0.5, 1.0, 0.5, 0.0], [0.5, 0.5, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    X = rng.normal(size=(n, 4)) @ np.linalg.cholesky(C).T
    X[:, :2] = np.exp(X[:, :2])
    return X


def perturbed(rng: np.random.Generator, S: np.ndarray) -> np.ndarray:
    """Copies of normal objects, each pushed up along one of the first three statistics by a random
    strength (as the generic perturbations push one kind of departure); the chance statistic is redrawn."""
    out = np.tile(S, (3, 1))
    for j in range(3):
        rows = slice(j * len(S), (j + 1) * len(S))
        out[rows, j] += rng.uniform(0.0, 6.0, len(S)) * np.std(S[:, j])
    out[:, 3] = rng.normal(size=len(out))
    return out


def test_trees_evaluated_from_arrays_match_scikit_learns_prediction():
    from sklearn.ensemble import HistGradientBoostingClassifier

    rng = np.random.default_rng(0)
    S0 = normals(rng, 500)
    S1 = perturbed(rng, S0)
    score = ExposureScore(seed=3).fit(S0, S1)
    loc, scale = robust_scale(S0, axis=0)
    X = (np.r_[S0, S1] - loc) / scale
    y = np.r_[np.zeros(len(S0)), np.ones(len(S1))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = HistGradientBoostingClassifier(max_iter=100, max_depth=3, learning_rate=0.1, class_weight="balanced",
                                               monotonic_cst=[1] * 4, early_stopping=False, random_state=3).fit(X, y)
    S_new = np.r_[normals(rng, 300), perturbed(rng, normals(rng, 100)), 50 * normals(rng, 20)]
    np.testing.assert_allclose(score.log_odds(S_new), model.decision_function((S_new - loc) / scale), rtol=1e-12, atol=1e-12)


def test_statistic_never_falls_as_a_statistic_grows():
    rng = np.random.default_rng(1)
    S0 = normals(rng, 400)
    score = ExposureScore().fit(S0, perturbed(rng, S0))
    S = normals(rng, 2000)
    for j in range(4):
        up = S.copy()
        up[:, j] += rng.exponential(1.0, len(S))
        assert np.all(score.statistic(up) >= score.statistic(S)), NAMES[j]


def test_objects_beyond_every_split_keep_distinct_ordered_values():
    """The trees give one largest log-odds to everything beyond their splits; there the statistic
    continues with the largest robust z, so 30, 60 and 120 MADs stay apart and in order, and it stays
    monotone. Without `saturation` (a state saved before it) the statistic is the log-odds."""
    rng = np.random.default_rng(7)
    S0 = normals(rng, 400)
    score = ExposureScore().fit(S0, perturbed(rng, S0))
    loc, scale = robust_scale(S0, axis=0)
    far = loc + scale * np.array([[30.0], [60.0], [120.0]])
    far[1, 2] = loc[2] + 90 * scale[2]  # the largest z of the second row is 90
    F = score.log_odds(far)
    np.testing.assert_allclose(F, score.log_odds_max, rtol=0, atol=1e-9)
    np.testing.assert_allclose(score.statistic(far), score.log_odds_max + np.array([30.0, 90.0, 120.0]), rtol=1e-9)
    S = normals(rng, 2000)
    assert np.all(score.log_odds(S) < score.log_odds_max)  # normal objects do not reach it
    np.testing.assert_array_equal(score.statistic(S), score.log_odds(S))
    up = np.r_[S, far]
    for j in range(4):
        more = up.copy()
        more[:, j] += rng.exponential(50.0, len(up)) * scale[j]
        assert np.all(score.statistic(more) >= score.statistic(up)), NAMES[j]
    plain = ExposureScore.from_state({k: v for k, v in score.state().items() if k != "saturation"})
    np.testing.assert_array_equal(plain.statistic(far), F)


def test_nan_statistics_give_nan_and_non_finite_training_rows_are_left_out():
    rng = np.random.default_rng(2)
    S0 = normals(rng, 300)
    S1 = perturbed(rng, S0)
    S1[:5, 0] = np.nan
    S0[:3, 1] = np.inf
    score = ExposureScore().fit(S0, S1)
    assert (score.n_normal, score.n_perturbed) == (297, len(S1) - 5)
    S = normals(rng, 4)
    S[1, 2] = np.nan
    t = score.statistic(S)
    assert np.isnan(t[1]) and np.isfinite(t[[0, 2, 3]]).all()


def test_exposure_pvalue_is_valid_under_the_null():
    """Conformal on calibration objects the trees never saw: valid whatever they learned. The trees'
    statistic is piecewise constant, so normal objects tie and the p-values are super-uniform
    (conservative): P(p <= a) <= a, never more (one-sided KS)."""

    def draw(rng):
        S_fit = normals(rng, 300)
        test = CombinedTest("exposure").fit(S_fit, normals(rng, 400), NAMES, perturbed(rng, S_fit))
        return test.pvalues(normals(rng, 100))["p_value"]

    rng = np.random.default_rng(3)
    p = np.concatenate([draw(rng) for _ in range(10)])
    assert stats.kstest(p, "uniform", alternative="greater").pvalue > 0.01
    for a in (0.01, 0.05, 0.2):
        assert (p <= a).mean() <= a + 3 * np.sqrt(a * (1 - a) / p.size)


def test_a_statistic_at_chance_does_not_dilute_the_learned_combination():
    """Adding a statistic that carries nothing lowers Fisher's AUROC (its p-value is one more term);
    the trees learn from the perturbations that it never moves, and keep theirs."""
    rng = np.random.default_rng(4)
    S_fit, S_calib, null, anomalies = normals(rng, 600), normals(rng, 600), normals(rng, 500), normals(rng, 500)
    anomalies[:, 2] += 2.5 * np.std(S_fit[:, 2])
    S_perturbed = perturbed(rng, S_fit)
    y = np.r_[np.zeros(500), np.ones(500)]
    auc = {}
    for method in ("exposure", "fisher"):
        for k in (3, 4):  # without and with the chance statistic
            test = CombinedTest(method).fit(S_fit[:, :k], S_calib[:, :k], NAMES[:k], S_perturbed[:, :k] if method == "exposure" else None)
            auc[method, k] = roc_auc_score(y, np.r_[test.pvalues(null[:, :k])["score"], test.pvalues(anomalies[:, :k])["score"]])
    assert auc["fisher", 4] < auc["fisher", 3] - 0.005, auc
    assert auc["exposure", 4] >= auc["exposure", 3] - 0.01, auc
    assert auc["exposure", 4] > auc["fisher", 4], auc


def test_exposure_state_round_trip_gives_identical_pvalues():
    rng = np.random.default_rng(5)
    S_fit = normals(rng, 300)
    test = CombinedTest("exposure").fit(S_fit, normals(rng, 300), NAMES, perturbed(rng, S_fit))
    clone = CombinedTest.from_state(pickle.loads(pickle.dumps(test.state())))  # plain values: test_calibration checks
    S = 2 * normals(rng, 200)
    expected, got = test.pvalues(S), clone.pvalues(S)
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key])


def test_exposure_refuses_what_it_cannot_learn_from():
    S = normals(np.random.default_rng(6), 100)
    with pytest.raises(ValueError, match="needs S_perturbed"):
        CombinedTest("exposure").fit(S, S, NAMES)
    with pytest.raises(ValueError, match="needs S_fit"):
        CombinedTest("exposure").fit(None, S, NAMES, S)
    with pytest.raises(ValueError, match=r"expected \(n, k\) and \(m, k\)"):
        ExposureScore().fit(S, S[:, :3])
    with pytest.raises(ValueError, match="at least 2 of each"):
        ExposureScore().fit(S, np.full((10, 4), np.nan))
