"""Calibration: uniform p-values under the null, known answers (scipy), power, FDR, tails, state."""

import pickle

import numpy as np
import pytest
import torch

from scipy import stats
from sklearn.metrics import roc_auc_score

from gsafe_models.calibration import (
    COMBINERS,
    CombinedTest,
    JointDensity,
    TailCalibrator,
    bh_qvalues,
    bonferroni,
    cauchy,
    conformal_pvalues,
    fisher,
    simes,
    stouffer,
)

METHODS = [*COMBINERS, "dose"]
NAMES = ["residual", "feature", "nll", "typicality"]


def dependent_statistics(rng: np.random.Generator, n: int, rho: float = 0.8) -> np.ndarray:
    """Null statistics (n, 4): correlated Gaussians, two of them exponentiated (skewed, positive)."""
    k = len(NAMES)
    C = np.full((k, k), rho)
    np.fill_diagonal(C, 1.0)
    X = rng.normal(size=(n, k)) @ np.linalg.cholesky(C).T
    X[:, :2] = np.exp(X[:, :2])
    return X


def pooled_null_pvalues(fit_and_test, reps: int, seed: int = 0) -> np.ndarray:
    """Pools p-values of fresh null objects over `reps` fresh calibrations.

    Conformal p-values are uniform marginally, over the calibration draw; given one fixed
    calibration set they are off by O(n^-1/2), which a large KS test would detect.
    """
    rng = np.random.default_rng(seed)
    return np.concatenate([fit_and_test(rng) for _ in range(reps)])


# Conformal and tail p-values


def test_conformal_pvalues_match_counting_definition_with_ties():
    calib = np.array([3.0, 1.0, 2.0, 2.0, 5.0])
    s = np.array([0.0, 1.0, 2.0, 2.5, 5.0, 6.0, np.nan])
    expected = [(1 + (calib >= x).sum()) / 6 for x in s[:-1]]
    p = conformal_pvalues(calib, s)
    np.testing.assert_array_equal(p[:-1], expected)
    assert np.isnan(p[-1])


def test_conformal_pvalues_are_uniform_under_null():
    def draw(rng):
        return conformal_pvalues(rng.normal(size=199), rng.normal(size=5))

    p = pooled_null_pvalues(draw, reps=400)
    assert stats.kstest(p, "uniform").pvalue > 0.01
    for alpha in (0.01, 0.05, 0.2):  # P(p <= j/(n+1)) = j/(n+1) exactly for continuous data
        assert abs((p <= alpha).mean() - alpha) < 3 * np.sqrt(alpha * (1 - alpha) / p.size) + 1 / 200


def test_tail_calibrator_pvalues_are_uniform_under_null():
    def draw(rng):
        return TailCalibrator().fit(rng.gamma(2.0, size=199)).pvalues(rng.gamma(2.0, size=20))

    assert stats.kstest(pooled_null_pvalues(draw, reps=100), "uniform").pvalue > 0.01


def test_tail_calibrator_stays_within_one_step_above_conformal():
    rng = np.random.default_rng(0)
    calib = rng.normal(size=500)
    s = np.concatenate([rng.normal(size=2000), calib])
    p = TailCalibrator().fit(calib).pvalues(s)
    conf = conformal_pvalues(calib, s)
    inside = s <= calib.max()
    assert np.all(p[inside] >= conf[inside] - 1e-15)
    assert np.all(p[inside] < conf[inside] + 1 / 501)


def test_tail_beyond_calibration_max_is_strictly_decreasing_below_one_over_n_plus_one():
    rng = np.random.default_rng(0)
    calib = rng.normal(size=999)
    cal = TailCalibrator().fit(calib)
    s = calib.max() + np.geomspace(1e-6, 1e4, 200)
    log_p = cal.log_pvalues(s)
    assert np.all(np.exp(log_p) < 1 / 1000)
    assert np.all(np.diff(log_p) < 0)
    assert np.all(np.isfinite(log_p))  # no underflow to p = 0, even 10^4 sigma out
    assert cal.pvalues(np.array([np.inf]))[0] == 0.0


def test_tail_model_extrapolates_known_exponential_tail():
    rng = np.random.default_rng(0)
    cal = TailCalibrator().fit(rng.exponential(size=5000))
    s = np.array([10.0, 12.0, 14.0])
    ratio = cal.pvalues(s) / np.exp(-s)
    assert np.all((ratio > 1 / 3) & (ratio < 3))


def test_tail_calibrator_fits_heavy_tail_shape():
    rng = np.random.default_rng(0)
    cal = TailCalibrator().fit(stats.genpareto.rvs(0.5, size=5000, random_state=rng))
    assert cal.shape == pytest.approx(0.5, abs=0.2)


def test_tail_calibrator_handles_tied_and_tiny_calibration_sets():
    for calib in (np.ones(50), np.array([2.0]), np.array([0.0, 0.0, 1.0])):
        cal = TailCalibrator().fit(calib)
        p = cal.pvalues(np.array([calib.max() + 1, calib.max() + 2]))
        assert 0 < p[1] < p[0] < 1 / (calib.size + 1)


@pytest.mark.parametrize("shape", [0.25, 0.5])
def test_scale_at_fixed_shape_solves_the_gpd_likelihood_equation(shape):
    # d/d(sigma) of the GPD log-likelihood at fixed shape c vanishes where
    # n = (1 + 1/c) sum(c y / (sigma + c y))
    values = np.sort(np.random.default_rng(0).gamma(2.0, size=400))
    threshold = values[300]
    sigma = TailCalibrator._scale_given_shape(values, threshold, shape, default=1.0)
    y = values[values > threshold] - threshold
    assert (1 + 1 / shape) * (shape * y / (sigma + shape * y)).sum() == pytest.approx(y.size, rel=1e-7)
    assert TailCalibrator._scale_given_shape(values, values[-1], shape, default=7.0) == 7.0


def test_tail_calibrator_refuses_non_finite_calibration():
    with pytest.raises(ValueError, match="1 of 3 calibration statistics are NaN"):
        TailCalibrator().fit(np.array([1.0, np.nan, 2.0]))


def test_tail_calibrator_state_round_trip_gives_identical_pvalues():
    rng = np.random.default_rng(0)
    cal = TailCalibrator().fit(rng.normal(size=300))
    clone = TailCalibrator.from_state(pickle.loads(pickle.dumps(cal.state())))
    s = rng.normal(size=100) * 3
    np.testing.assert_array_equal(clone.log_pvalues(s), cal.log_pvalues(s))


# Combination rules


@pytest.mark.parametrize("name", ["fisher", "stouffer", "simes", "cauchy"])
def test_combiner_is_uniform_for_independent_uniform_pvalues(name):
    P = np.random.default_rng(0).uniform(size=(5000, 4))
    assert stats.kstest(COMBINERS[name](P), "uniform").pvalue > 0.01


def test_bonferroni_is_valid_but_conservative_for_independent_uniform_pvalues():
    # P(min(1, k min p) <= a) = 1 - (1 - a/k)^k: below a, and close to it for small a.
    p = bonferroni(np.random.default_rng(0).uniform(size=(20000, 4)))
    for a in (0.01, 0.05, 0.2, 0.5):
        exact = 1 - (1 - a / 4) ** 4
        assert abs((p <= a).mean() - exact) < 4 * np.sqrt(exact / p.size)
    assert (p == 1).mean() == pytest.approx((3 / 4) ** 4, abs=0.015)


@pytest.mark.parametrize("method", ["fisher", "stouffer"])
def test_combiner_matches_scipy_combine_pvalues(method):
    P = np.random.default_rng(1).uniform(size=(200, 3)) ** 2
    expected = [stats.combine_pvalues(row, method=method).pvalue for row in P]
    np.testing.assert_allclose(COMBINERS[method](P), expected, rtol=1e-9)


def test_simes_bonferroni_cauchy_known_answers():
    P = np.array([[0.01, 0.04, 0.03], [0.2, 0.9, 0.6], [0.5, 0.5, 0.5]])
    np.testing.assert_allclose(simes(P), [0.03, 0.6, 0.5])  # min(3*.01/1, 3*.03/2, 3*.04/3)
    np.testing.assert_allclose(bonferroni(P), [0.03, 0.6, 1.0])
    T = np.tan((0.5 - P) * np.pi).mean(1)
    np.testing.assert_allclose(cauchy(P), 0.5 - np.arctan(T) / np.pi, rtol=1e-10)


def test_combiners_stay_finite_and_ordered_for_extreme_pvalues():
    """Objects far beyond calibration: p ~ 1e-200..1e-300 must not tie at 0 or turn NaN."""
    P = np.array([[1e-200, 0.5], [1e-250, 0.5], [1e-300, 0.5]])
    for name, combine in COMBINERS.items():
        p = combine(P)
        assert np.all(np.diff(p) < 0) and np.all(p > 0), name
    np.testing.assert_allclose(cauchy(P), 2 * P[:, 0], rtol=1e-6)  # ACAT ~ k min p in the tail
    np.testing.assert_allclose(bonferroni(P), 2 * P[:, 0])


# The combined test


def fit_test(method: str, rng: np.random.Generator, n_fit: int = 800, n_calib: int = 600) -> CombinedTest:
    S_fit = dependent_statistics(rng, n_fit)
    return CombinedTest(method).fit(S_fit, dependent_statistics(rng, n_calib), NAMES)


def fit_two_stage(method: str, rng: np.random.Generator) -> CombinedTest:
    return CombinedTest(method, two_stage=True).fit(dependent_statistics(rng, 800), dependent_statistics(rng, 600), NAMES)


@pytest.mark.parametrize("method", METHODS)
def test_two_stage_combined_pvalue_is_uniform_under_null_with_dependent_statistics(method):
    def draw(rng):
        return fit_two_stage(method, rng).pvalues(dependent_statistics(rng, 100))["p_value"]

    p = pooled_null_pvalues(draw, reps=6 if method == "dose" else 15)
    assert stats.kstest(p, "uniform").pvalue > 0.01


@pytest.mark.parametrize("method", ["simes", "bonferroni"])
def test_single_stage_simes_and_bonferroni_are_valid_under_positive_dependence(method):
    # By default they skip the second fold: their p-value is super-uniform as it stands,
    # P(p <= a) <= a, never anti-conservative (one-sided KS), and uses all calibration objects.
    def draw(rng):
        return fit_test(method, rng).pvalues(dependent_statistics(rng, 100))["p_value"]

    assert CombinedTest(method).two_stage is False
    p = pooled_null_pvalues(draw, reps=15)
    assert stats.kstest(p, "uniform", alternative="greater").pvalue > 0.01
    for a in (0.01, 0.05, 0.2):
        assert (p <= a).mean() <= a + 3 * np.sqrt(a * (1 - a) / p.size)


@pytest.mark.parametrize("method", ["fisher", "dose"])  # the two ways fold A is chosen
def test_per_statistic_pvalues_are_uniform_under_null(method):
    def draw(rng):
        out = fit_test(method, rng).pvalues(dependent_statistics(rng, 100))
        return np.stack([out[f"p_{n}"] for n in NAMES], axis=1)

    P = pooled_null_pvalues(draw, reps=4 if method == "dose" else 10)
    for j, name in enumerate(NAMES):
        assert stats.kstest(P[:, j], "uniform").pvalue > 0.01, name


@pytest.mark.parametrize("method", METHODS)
def test_one_informative_statistic_is_detected(method):
    rng = np.random.default_rng(3)
    k = len(NAMES)
    C = np.full((k, k), 0.2)
    np.fill_diagonal(C, 1.0)
    draw = lambda n: rng.normal(size=(n, k)) @ np.linalg.cholesky(C).T  # noqa: E731
    test = CombinedTest(method).fit(draw(1000), draw(1000), NAMES)
    shifted = draw(500)
    shifted[:, 2] += 6.0  # Stouffer, the weakest here, needs ~6 sigma to reach AUROC 0.9
    scores = np.r_[test.pvalues(draw(500))["score"], test.pvalues(shifted)["score"]]
    assert roc_auc_score(np.r_[np.zeros(500), np.ones(500)], scores) > 0.9


def test_dose_detects_atypically_low_statistic_that_one_sided_tests_miss():
    """Too-typical objects (Nalisnick et al. 2019) are why a joint density joins the combiners."""
    rng = np.random.default_rng(4)
    S_fit, S_calib = dependent_statistics(rng, 1000), dependent_statistics(rng, 1000)
    low = dependent_statistics(rng, 300)
    low[:, 2] -= 4.0
    null = dependent_statistics(rng, 300)
    y = np.r_[np.zeros(300), np.ones(300)]
    auc = {}
    for method in ("dose", "fisher"):
        test = CombinedTest(method).fit(S_fit, S_calib, NAMES)
        auc[method] = roc_auc_score(y, np.r_[test.pvalues(null)["score"], test.pvalues(low)["score"]])
    assert auc["dose"] > 0.9 > 0.6 > auc["fisher"]


@pytest.mark.parametrize("method", METHODS)
def test_extreme_objects_get_distinct_ordered_scores(method):
    rng = np.random.default_rng(5)
    test = fit_test(method, rng)
    S = np.tile(np.median(dependent_statistics(rng, 1000), axis=0), (6, 1))
    S[:, 2] = [10.0, 20.0, 40.0, 80.0, 160.0, 1e4]  # far beyond every calibration value
    out = test.pvalues(S)
    assert np.all(np.diff(out["score"]) > 0)
    assert np.all(np.isfinite(out["score"]))
    assert np.all(out["p_value"][2:] < 1 / 300)  # Stouffer dilutes one statistic by sqrt(k)


@pytest.mark.parametrize("method", METHODS)
def test_combined_state_round_trip_gives_identical_pvalues(method):
    rng = np.random.default_rng(6)
    test = fit_test(method, rng)
    state = pickle.loads(pickle.dumps(test.state()))
    clone = CombinedTest.from_state(state)
    S = dependent_statistics(rng, 200) * 2
    expected, got = test.pvalues(S), clone.pvalues(S)
    assert got.keys() == expected.keys() == {*(f"p_{n}" for n in NAMES), "p_value", "score"}
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key])


@pytest.mark.parametrize("method", ["dose", "exposure"])  # the two rules whose state holds a fitted model
def test_state_holds_no_torch_objects(method):
    rng = np.random.default_rng(7)
    if method == "exposure":
        S_fit = dependent_statistics(rng, 300)
        state = CombinedTest(method).fit(S_fit, dependent_statistics(rng, 300), NAMES, S_fit + rng.exponential(2.0, S_fit.shape)).state()
    else:
        state = fit_test(method, rng).state()

    def walk(x):
        if isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)
        else:
            assert isinstance(x, (np.ndarray, float, int, str, bool, type(None), np.generic)), type(x)

    walk(state)


def test_fit_is_deterministic_with_seed():
    S = dependent_statistics(np.random.default_rng(8), 600)
    S_new = dependent_statistics(np.random.default_rng(9), 50)
    a = CombinedTest("simes", seed=1).fit(None, S, NAMES).pvalues(S_new)["p_value"]
    b = CombinedTest("simes", seed=1).fit(None, S, NAMES).pvalues(S_new)["p_value"]
    np.testing.assert_array_equal(a, b)


def test_combined_test_refuses_bad_input():
    S = dependent_statistics(np.random.default_rng(0), 100)
    with pytest.raises(ValueError, match="method='max'"):
        CombinedTest("max")
    with pytest.raises(ValueError, match=r"expected \(n, 3\)"):
        CombinedTest().fit(None, S, NAMES[:3])
    with pytest.raises(ValueError, match="needs S_fit"):
        CombinedTest("dose").fit(None, S, NAMES)
    with pytest.raises(ValueError, match=r"expected \(m, 4\)"):
        CombinedTest().fit(None, S, NAMES).pvalues(S[:, :2])


def test_joint_density_statistic_grows_away_from_normal_data():
    rng = np.random.default_rng(0)
    S = dependent_statistics(rng, 1000)
    dose = JointDensity().fit(S)
    centre = np.median(S, axis=0)
    far = np.tile(centre, (3, 1))
    far[:, 3] += [2.0, 4.0, 8.0]
    t = dose.statistic(np.vstack([centre, far]))
    assert np.all(np.diff(t) > 0)


# Benjamini-Hochberg


def test_bh_qvalues_hand_computed_example():
    p = np.array([0.01, 0.04, 0.03, 0.005, 0.9, np.nan])
    # sorted 0.005 0.01 0.03 0.04 0.9, m = 5: raw 0.025 0.025 0.05 0.05 0.9 -> running min from the top
    np.testing.assert_allclose(bh_qvalues(p), [0.025, 0.05, 0.05, 0.025, 0.9, np.nan])


def _bh_by_definition(p: np.ndarray) -> np.ndarray:
    """q_i = min over the p-values p_j >= p_i of min(1, m p_j / rank_j), written out (O(m^2)); NaN left out of m."""
    q = np.full(p.shape, np.nan)
    ok = ~np.isnan(p)
    v = p[ok]
    rank = np.array([(v <= x).sum() for x in v])   # ties share the highest rank
    q[ok] = [min(1.0, min(v.size * v[j] / rank[j] for j in range(v.size) if v[j] >= x)) for x in v]
    return q


def test_bh_qvalues_match_the_definition_with_ties_and_nans():
    rng = np.random.default_rng(0)
    p = rng.uniform(size=300) ** 3
    p[::7] = np.round(p[::7], 2)           # ties
    p[[3, 50, 299]] = np.nan                # objects not scored
    p[[10, 11]] = [0.0, 1.0]
    q, expected = bh_qvalues(p), _bh_by_definition(p)
    np.testing.assert_allclose(q, expected, rtol=1e-15, atol=0)
    np.testing.assert_array_equal(np.isnan(q), np.isnan(p))
    for alpha in (0.01, 0.05, 0.1, 0.2):    # the same discoveries
        np.testing.assert_array_equal(q <= alpha, expected <= alpha)
    np.testing.assert_array_equal(bh_qvalues(p.reshape(20, 15)), q.reshape(20, 15))


def test_bh_qvalues_of_nothing_and_of_nans_only():
    assert bh_qvalues(np.array([])).shape == (0,)
    assert np.isnan(bh_qvalues(np.array([np.nan, np.nan]))).all()
    assert bh_qvalues(np.array([0.3]))[0] == 0.3


def test_bh_qvalues_refuse_values_that_are_not_pvalues():
    with pytest.raises(ValueError, match="1 of 3 p-values lie outside"):
        bh_qvalues(np.array([0.1, 1.5, np.nan]))


def test_bh_qvalues_are_monotone_in_p_and_at_most_one():
    p = np.random.default_rng(1).uniform(size=1000)
    q = bh_qvalues(p)
    order = np.argsort(p)
    assert np.all(np.diff(q[order]) >= 0) and q.max() <= 1 and np.all(q >= p)


def test_bh_controls_fdr_on_simulated_mixtures():
    rng = np.random.default_rng(0)
    alpha, m, m1 = 0.1, 1000, 100
    fdp = []
    for _ in range(200):
        p = np.concatenate([rng.uniform(size=m - m1), stats.norm.sf(rng.normal(3.0, 1.0, size=m1))])
        reject = bh_qvalues(p) <= alpha
        fdp.append(reject[: m - m1].sum() / max(reject.sum(), 1))
    # E[FDP] = alpha * m0 / m = 0.09 for independent p-values; 0.005 is ~3 standard errors.
    assert np.mean(fdp) <= alpha * (m - m1) / m + 0.005


@pytest.mark.parametrize("draw", [lambda r, n: r.normal(size=n), lambda r, n: r.gamma(2.0, size=n),
                                  lambda r, n: r.exponential(size=n)], ids=["normal", "gamma", "exponential"])
def test_trimming_rarely_touches_clean_calibration_sets(draw):
    rng = np.random.default_rng(1)
    trimmed = [TailCalibrator().fit(draw(rng, 226)).trimmed for _ in range(100)]
    assert np.mean(np.array(trimmed) > 0) <= 0.1
    assert max(trimmed) <= 3


def test_trimming_removes_contaminants_so_anomalies_get_small_pvalues():
    rng = np.random.default_rng(2)
    normal = rng.normal(size=500)
    calib = np.concatenate([normal, rng.uniform(20, 30, size=5)])  # 1 % anomalies among the "normals"
    cal = TailCalibrator().fit(calib)
    assert cal.trimmed >= 5 and cal.values.max() <= normal.max()
    assert cal.pvalues(np.array([6.0]))[0] < 1 / 501  # with them left in, p >= 5/506
    untrimmed = TailCalibrator(trim=0.0).fit(calib)
    assert untrimmed.pvalues(np.array([6.0]))[0] >= 5 / 506
    # and fresh normal objects keep valid p-values
    p = cal.pvalues(rng.normal(size=20000))
    assert (p <= 0.01).mean() < 0.015


def test_contaminated_calibration_still_yields_a_false_discovery_controlled_list():
    # Real "normal" sets hold ~1 % anomalies. Without trimming, those in the calibration folds
    # set the top of every calibrator and no anomaly can reach BH's threshold.
    rng = np.random.default_rng(5)
    k = 4

    def normals(n):
        shared = rng.normal(size=(n, 1))
        return np.exp(0.5 * shared + rng.normal(size=(n, k)))  # dependent, skewed statistics

    def anomalies(n, shift):
        s = normals(n)
        s[np.arange(n), rng.integers(0, k, n)] *= shift  # each anomaly strong in one statistic
        return s

    calib = np.concatenate([normals(495), anomalies(5, 1e3)])
    test = np.concatenate([normals(2700), anomalies(300, 60.0)])
    truth = np.r_[np.zeros(2700), np.ones(300)].astype(bool)
    found = {}
    for trim in (0.0, 0.05):
        p = CombinedTest("simes", trim=trim).fit(None, calib, list("abcd")).pvalues(test)["p_value"]
        hits = bh_qvalues(p) <= 0.1
        found[trim] = hits.sum()
        if hits.any():
            assert (hits & ~truth).sum() / hits.sum() <= 0.15  # realised FDR near or below 0.1
    assert found[0.0] < 60 and found[0.05] > 120


def test_trimmed_outliers_can_leave_the_calibration_set_and_fresh_normals_stay_valid():
    # 3 % anomalies among 400 "normal" calibration objects, as a single dirty tile holds.
    rng = np.random.default_rng(7)
    normal = rng.normal(size=400)
    calib = np.concatenate([normal, rng.uniform(8, 12, size=12)])
    kept_normal = TailCalibrator(trim=0.05).fit(calib)
    left = TailCalibrator(trim=0.05, trimmed_are_normal=False).fit(calib)
    assert kept_normal.trimmed == left.trimmed >= 6
    r, n = left.trimmed, calib.size
    top = np.array([left.values.max()])
    # conservative: the removed count above every kept value; otherwise they are gone
    assert kept_normal.pvalues(top)[0] == pytest.approx((2 + r) / (n + 1))
    assert left.pvalues(top)[0] == pytest.approx(2 / (n - r + 1))
    # inside the kept range the two differ by the r removed values only
    x = np.linspace(-2, 2, 9)
    np.testing.assert_allclose(kept_normal.pvalues(x) * (n + 1) - r, left.pvalues(x) * (n - r + 1), atol=1e-9)
    # fresh normal objects, over many dirty calibration sets (conformal validity is marginal):
    # P(p <= t) <= t, with binomial slack of ~3 standard errors
    p = np.concatenate([
        TailCalibrator(trim=0.05, trimmed_are_normal=False).fit(
            np.concatenate([rng.normal(size=400), rng.uniform(8, 12, size=12)])).pvalues(rng.normal(size=250))
        for _ in range(200)])
    for t in (0.002, 0.01, 0.05, 0.2):
        assert (p <= t).mean() <= t + 3 * np.sqrt(t / p.size)
    # and a state round trip keeps the reading
    np.testing.assert_array_equal(TailCalibrator.from_state(left.state()).pvalues(x), left.pvalues(x))


def test_trimmed_outliers_leaving_the_set_keep_a_false_discovery_controlled_list_on_a_dirty_tile():
    # Four positively dependent statistics with exponential tails (as maxima and -log p have);
    # 3 % of the calibration objects are anomalies, strong in one statistic each.
    rng = np.random.default_rng(11)
    k = 4

    def normals(n):
        z = (0.5 * rng.normal(size=(n, 1)) + rng.normal(size=(n, k))) / np.sqrt(1.25)
        return -stats.norm.logsf(z)

    def anomalies(n, shift):
        s = normals(n)
        s[np.arange(n), rng.integers(0, k, n)] += shift
        return s

    truth = np.r_[np.zeros(1900), np.ones(100)].astype(bool)
    found, fdp = {}, {}
    for case in ("clean", "trimmed are normal", "trimmed leave"):
        hits_all, false_all = [], []
        for _ in range(20):
            calib = normals(300) if case == "clean" else np.concatenate([normals(291), anomalies(9, 15.0)])
            test = np.concatenate([normals(1900), anomalies(100, 7.0)])
            ct = CombinedTest("simes", trimmed_are_normal=case != "trimmed leave").fit(None, calib, list("abcd"))
            hits = bh_qvalues(ct.pvalues(test)["p_value"]) <= 0.1
            hits_all.append(hits.sum())
            false_all.append((hits & ~truth).sum() / max(hits.sum(), 1))
        found[case], fdp[case] = np.mean(hits_all), np.mean(false_all)
    # BH at q = 0.1 with 95 % nulls: E[FDP] <= 0.095; 0.03 is ~3 standard errors of a 20-draw mean
    assert all(f <= 0.095 + 0.03 for f in fdp.values()), fdp
    # the conservative reading lists almost nothing on the dirty tile; believing the test recovers most of the clean list
    assert found["trimmed are normal"] < 0.2 * found["clean"]
    assert found["trimmed leave"] > 0.6 * found["clean"], found
