"""Relevance learning, grouping and the review order: known answers on small, hand-made feature sets."""

from __future__ import annotations

import numpy as np
import pytest

from gsafe_models.relevance import (MAX_GROUP, FeatureSpace, KnownGroups, RelevanceModel, group_candidates, grouping_space,
                                    plan_review,
                                    relevance_target)


def _blobs(seed: int = 0, n: int = 12, centres=((0, 0), (6, 0), (0, 6))) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = np.concatenate([rng.normal(c, 0.3, size=(n, 2)) for c in centres])
    return X, np.repeat(np.arange(len(centres)), n)


def test_relevance_target_follows_astronomaly_scale_and_refuses_nonsense():
    assert relevance_target("interesting") == 1.0
    assert relevance_target("not_interesting") == 0.0 and relevance_target("artefact") == 0.0
    assert relevance_target("interesting", 2) == pytest.approx(0.4)
    assert relevance_target("artefact", float("nan")) == 0.0   # NaN = not given
    with pytest.raises(ValueError, match="not one of"):
        relevance_target("boring")
    with pytest.raises(ValueError, match="0-5"):
        relevance_target("interesting", 7)


def test_feature_space_is_robust_to_units_and_round_trips():
    rng = np.random.default_rng(1)
    z, s = rng.normal(size=(80, 6)), rng.standard_t(2, size=(80, 3))
    fs = FeatureSpace.fit(z, s)
    X = fs.transform(z, s)
    # a latent in other units (x1000, shifted) gives the same features: robust standardisation
    z2 = z.copy()
    z2[:, 0] = 1000 * z2[:, 0] + 5
    np.testing.assert_allclose(np.abs(FeatureSpace.fit(z2, s).transform(z2, s)), np.abs(X), atol=1e-9)
    again = FeatureSpace.from_state(fs.state())
    np.testing.assert_array_equal(again.transform(z, s), X)
    assert X.shape[1] <= 16
    with pytest.raises(ValueError, match="refit"):
        fs.transform(z[:, :5], s)


def test_feature_space_half_whitens_the_latents_and_reads_older_states():
    from gsafe_models.relevance import _half_whitening

    rng = np.random.default_rng(3)
    # variances 10^4 : 1 along two directions -> 100 : 1 after half-whitening, summing to 1
    z = rng.normal(size=(4000, 2)) * [100.0, 1.0] @ np.array([[0.6, 0.8], [-0.8, 0.6]])
    mean, axes, spread = _half_whitening(z)
    v = (((z - mean) @ axes.T) / spread).var(axis=0)
    np.testing.assert_allclose(v.sum(), 1.0, rtol=1e-9)
    np.testing.assert_allclose(v[0] / v[1], 100.0, rtol=0.1)
    # a space saved before the half-whitening (no z_* entries) transforms as it did then
    s = rng.normal(size=(4000, 2))
    fs = FeatureSpace.fit(z, s)
    old = FeatureSpace.from_state({k: v for k, v in fs.state().items() if not k.startswith(("fs_z_mean", "fs_z_basis", "fs_z_spread"))})
    assert old.z_basis is None and old.transform(z[:5], s[:5]).shape == (5, fs.components.shape[0])
    np.testing.assert_array_equal(FeatureSpace.from_state(fs.state()).transform(z, s), fs.transform(z, s))


def test_feature_space_weighs_latents_and_statistics_alike():
    rng = np.random.default_rng(2)
    # 30 latents of noise, 1 statistic that separates two populations: the statistic must still show
    z = rng.normal(size=(200, 30))
    s = np.concatenate([rng.normal(0, 1, 100), rng.normal(8, 1, 100)])[:, None]
    X = FeatureSpace.fit(z, s).transform(z, s)
    first = X[:, 0]
    assert abs(first[:100].mean() - first[100:].mean()) > 3 * first[:100].std()


def test_groups_find_the_blobs_and_leave_strays_alone():
    X, truth = _blobs()
    strays = np.array([[20.0, 20.0], [-20.0, 20.0]])
    g = group_candidates(np.concatenate([X, strays]))
    for k in range(3):
        assert len(set(g[:36][truth == k])) == 1
    assert len(set(g[:36])) == 3
    assert len(set(g[36:])) == 2 and not set(g[36:]) & set(g[:36])
    assert sorted(set(g)) == list(range(5))


def test_gp_learns_relevance_with_honest_uncertainty_and_round_trips():
    X, truth = _blobs()
    t = (truth == 1).astype(float)
    labelled = np.r_[0:4, 12:16, 24:28]
    m = RelevanceModel().fit(X[labelled], t[labelled])
    mu, sd = m.predict(X)
    rest = np.setdiff1d(np.arange(len(X)), labelled)
    assert mu[rest][truth[rest] == 1].min() > 0.7 and mu[rest][truth[rest] != 1].max() < 0.3
    far_mu, far_sd = m.predict(np.array([[30.0, -30.0]]))
    assert far_sd[0] > 3 * sd[rest].max() and abs(far_mu[0]) < 0.1   # prior: unknown, presumed not interesting
    again = RelevanceModel.from_state(m.state())
    np.testing.assert_allclose(again.predict(X)[0], mu, atol=1e-10)


def test_cold_start_is_the_anomaly_order_one_representative_per_group_first():
    p = np.array([0.01, 0.02, 0.03, 0.04, 0.05, 0.06])
    groups = np.array([0, 0, 1, 1, 2, 0])
    plan = plan_review(p, groups, np.zeros(6, bool))
    assert plan.order.tolist() == [0, 2, 4, 1, 3, 5]
    assert plan.first_pass.tolist() == [True, True, True, False, False, False]
    assert plan.more_like_this[[0, 2, 4]].tolist() == [2, 1, 0]


def test_labels_re_rank_suppress_and_leave_the_q_values_alone():
    X, truth = _blobs(n=10)
    n = len(X)
    rng = np.random.default_rng(3)
    q = np.sort(rng.uniform(0, 0.05, n))[rng.permutation(n)]
    q_before = q.copy()
    groups = truth.copy()
    labelled = np.zeros(n, bool)
    targets = np.zeros(n)
    lens, artefact = np.nonzero(truth == 2)[0][0], np.nonzero(truth == 0)[0][0]
    labelled[[lens, artefact]] = True
    targets[lens] = 1.0
    plan = plan_review(q, groups, labelled, features=X, targets=targets, suppressed_groups=np.array([0]))
    assert set(plan.suppressed) == set(np.nonzero(truth == 0)[0]) - {artefact}
    assert not set(plan.order) & set(np.nonzero(truth == 0)[0])
    assert lens not in plan.order
    # the labelled-interesting group comes first, the unexplored one mostly after it (the evidence
    # weight lets the unexplored group's most anomalous members in early; the p-value order alone
    # would mix the two groups evenly)
    liked = set(np.nonzero(truth == 2)[0]) - {lens}
    assert sum(int(i) in liked for i in plan.order[:9]) >= 7
    np.testing.assert_array_equal(q, q_before)


def test_artefact_labels_do_not_bring_the_least_anomalous_forward():
    # 40 candidates along a line, the most anomalous (smallest p) at one end; three artefacts labelled
    # among the most anomalous: without the evidence weight the GP's uncertainty (largest far from the
    # labels) would put the least anomalous candidates first
    X = np.linspace(0, 10, 40)[:, None]
    p = np.linspace(1e-4, 0.5, 40)
    labelled = np.zeros(40, bool)
    labelled[[0, 2, 4]] = True
    plan = plan_review(p, np.arange(40), labelled, features=X, targets=np.zeros(40))
    assert np.all(plan.order[:10] < 20)
    # with no label at all the order is the p-value order
    assert plan_review(p[::-1], np.arange(40), np.zeros(40, bool)).order.tolist() == list(range(40))[::-1]


def test_known_groups_claim_only_what_lies_within_their_scale():
    X, truth = _blobs(n=10)
    group = np.where(truth == 0, 0, -1)      # blob 0 labelled artefact as a group; the others labelled otherwise
    kg = KnownGroups.fit(X, group)
    new = np.array([[0.1, -0.1], [3.0, 0.0], [6.1, 0.1]])
    assert kg.assign(new).tolist() == [0, -1, -1]
    again = KnownGroups.from_state(kg.state())
    assert again.assign(new).tolist() == [0, -1, -1]


def test_groups_never_swallow_the_pool():
    # a pool that is mostly one continuum (300 objects) beside a tight group of 12: HDBSCAN's most
    # persistent cluster would be the continuum; no group may hold more than MAX_GROUP, and the
    # tight group stays one group
    rng = np.random.default_rng(5)
    bulk = rng.normal(0, 1, (300, 3))
    tight = rng.normal(0, 0.05, (12, 3)) + np.array([9.0, 0.0, 0.0])
    g = group_candidates(np.concatenate([bulk, tight]))
    assert np.bincount(g).max() <= MAX_GROUP
    assert len(set(g[300:])) == 1 and not set(g[300:]) & set(g[:300])
    unbounded = group_candidates(np.concatenate([bulk, tight]), max_group=None)
    assert np.bincount(unbounded).max() > MAX_GROUP      # the bound is what keeps the bulk apart


def test_grouping_space_groups_by_departure_not_by_galaxy():
    # two kinds of departure (descriptor columns 0-1 high, or 2-3 high) on galaxies of every kind:
    # the grouping space sees the departure only, so each kind is one group
    rng = np.random.default_rng(7)
    n = 20
    descriptors = rng.normal(0, 0.2, (2 * n, 4))
    descriptors[:n, :2] += 8.0
    descriptors[n:, 2:] += 8.0
    statistics = descriptors.max(1, keepdims=True) + rng.normal(0, 0.1, (2 * n, 1))
    G = grouping_space(statistics, descriptors)
    g = group_candidates(G)
    assert len(set(g[:n])) == 1 and len(set(g[n:])) == 1 and g[0] != g[n]
    # without descriptors it falls back to the statistics, and copes with nothing at all
    assert grouping_space(statistics).shape[0] == 2 * n
    assert grouping_space(np.zeros((3, 0))).shape == (3, 1)


def test_descriptors_let_the_gp_tell_a_kind_of_departure_the_latents_and_statistics_hide():
    # galaxies of every kind (latents), one anomaly statistic alike for both kinds of departure;
    # only the residual's descriptors say which kind ("artefact": columns 0-1, else columns 2-3)
    rng = np.random.default_rng(3)
    n = 120
    latents = rng.normal(size=(n, 8)) * np.r_[20.0, np.ones(7)]
    kind = rng.integers(0, 2, n)
    descriptors = rng.normal(0, 0.3, (n, 4))
    descriptors[kind == 1, :2] += 5.0
    descriptors[kind == 0, 2:] += 5.0
    statistics = rng.normal(6.0, 1.0, (n, 2))
    fit, rest = np.arange(40), np.arange(40, n)

    def auroc(X):
        mu, _ = RelevanceModel().fit(X[fit], kind[fit].astype(float)).predict(X[rest])
        pos, neg = mu[kind[rest] == 1], mu[kind[rest] == 0]
        return float((pos[:, None] > neg[None, :]).mean())

    without = FeatureSpace.fit(latents, statistics)
    with_d = FeatureSpace.fit(latents, statistics, descriptors)
    assert auroc(without.transform(latents, statistics)) < 0.7
    assert auroc(with_d.transform(latents, statistics, descriptors)) > 0.95
    # a space fitted without descriptors ignores them; one fitted with them needs them
    np.testing.assert_array_equal(without.transform(latents, statistics, descriptors), without.transform(latents, statistics))
    with pytest.raises(ValueError, match="descriptors"):
        with_d.transform(latents, statistics)
    back = FeatureSpace.from_state(with_d.state())
    np.testing.assert_allclose(back.transform(latents, statistics, descriptors), with_d.transform(latents, statistics, descriptors))
