"""The review's data moves: candidate pool from a score table, label state, artefact groups, the
relevance state as plain bytes."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from gsafe_models import relevance as rel
from infra import labels as lab
from infra.store import SurveyStore
from tasks import review as rv


@pytest.fixture
def scored_store(tmp_store_url) -> SurveyStore:
    """13 objects in chunks of 4, with a complete score table written by hand."""
    s = SurveyStore.create(tmp_store_url, bands=("g",), height=4, width=4, chunk_size=4)
    n = 13
    s.append(np.zeros((n, 1, 4, 4), np.float32), {"object_id": np.array([f"o{i}" for i in range(n)], dtype=object),
                                                   "ra": np.arange(n, dtype=float), "dec": np.zeros(n)})
    t = s.score_table("m", 1, ["a", "b"], create=True)
    t.ensure_rows(n)
    rng = np.random.default_rng(0)
    p = rng.permutation(np.linspace(0.001, 0.9, n))
    for c in range(4):
        sl = slice(4 * c, min(4 * c + 4, n))
        k = sl.stop - sl.start
        t.write_chunk(c, {"score": -np.log(p[sl]), "p_value": p[sl], "q_value": np.minimum(1, 2 * p[sl]),
                          "stat_a": rng.normal(size=k), "stat_b": rng.normal(size=k),
                          "p_a": rng.uniform(size=k), "p_b": rng.uniform(size=k)})
    s.p = p  # the truth, for the test
    return s


def test_pool_is_the_smallest_p_values_across_chunks(scored_store):
    pool = rv.candidate_pool(scored_store, "m", 1, size=5)
    want = np.argsort(scored_store.p)[:5]
    assert pool.rows.tolist() == want.tolist()
    assert pool.ids.tolist() == [f"o{i}" for i in want]
    np.testing.assert_allclose(pool.p_value, scored_store.p[want])
    assert pool.stats.shape == (5, 2) and pool.statistic_names == ["a", "b"]
    np.testing.assert_allclose(pool.catalog["ra"], want.astype(float))
    again = rv.candidate_pool(scored_store, "m", 1, rows=pool.rows[::-1])
    assert again.ids.tolist() == pool.ids[::-1].tolist()


def test_pool_within_rows_is_the_smallest_p_values_among_them_only(scored_store):
    within = np.array([12, 0, 3, 5, 6, 9, 11, 40])          # across chunks, unordered, one row beyond the table
    pool = rv.candidate_pool(scored_store, "m", 1, size=3, within=within)
    inside = within[within < 13]
    want = inside[np.argsort(scored_store.p[inside])[:3]]
    assert pool.rows.tolist() == want.tolist()
    assert set(pool.rows) <= set(inside)
    everywhere = rv.candidate_pool(scored_store, "m", 1, size=3)
    assert pool.rows.tolist() != everywhere.rows.tolist()    # the restriction changed the pool on this table
    assert len(rv.candidate_pool(scored_store, "m", 1, size=20, within=within).rows) == len(inside)
    assert len(rv.candidate_pool(scored_store, "m", 1, size=3, within=np.zeros(0, np.int64)).rows) == 0
    sparse = np.array([12, 1, 9])                              # chunk 1 (rows 4-7) holds none of them
    assert sorted(rv.candidate_pool(scored_store, "m", 1, size=5, within=sparse).rows) == [1, 9, 12]


def test_label_state_takes_the_latest_label_and_groups_follow_their_representative(scored_store):
    s = scored_store
    lab.append_labels(s, lab.make_rows(["o1"], "interesting", model="m/1", relevance=2))
    lab.append_labels(s, lab.make_rows(["o2"], "artefact", model="m/1"))
    lab.append_labels(s, lab.make_rows(["o3", "o4"], "artefact", model="m/1", scope="group", via="o2"))
    lab.append_labels(s, lab.make_rows(["o4"], "interesting", model="m/1"))     # changed mind
    ids = np.array([f"o{i}" for i in range(6)])
    st = rv.label_state(lab.latest_labels(s), ids)
    assert st["labelled"].tolist() == [False, True, True, True, True, False]
    assert st["target"].tolist() == pytest.approx([0, 0.4, 0, 0, 1, 0])
    assert rv.artefact_groups(st, ids).tolist() == [-1, -1, 0, 0, -1, -1]


def test_relevance_state_round_trips_as_plain_arrays():
    rng = np.random.default_rng(1)
    z, s = rng.normal(size=(40, 5)), rng.normal(size=(40, 2))
    space = rel.FeatureSpace.fit(z, s)
    X = space.transform(z, s)
    model = rel.RelevanceModel().fit(X[:10], (np.arange(10) % 2).astype(float))
    groups = rel.KnownGroups.fit(X[:10], np.array([0, 0, 0, -1, -1, 1, 1, -1, -1, -1]))
    state = rv.RelevanceState(space, model, groups, "abc", "m/1")
    back = rv.RelevanceState.from_bytes(state.to_bytes())
    assert (back.digest, back.detector) == ("abc", "m/1")
    np.testing.assert_array_equal(back.features(z, s), X)
    np.testing.assert_allclose(back.model.predict(X)[0], model.predict(X)[0], atol=1e-10)
    assert back.groups.assign(X).tolist() == groups.assign(X).tolist()
    empty = rv.RelevanceState(space, None, rel.KnownGroups(np.zeros((0, X.shape[1])), np.zeros(0, int), np.zeros(0)), "", "m/1")
    assert rv.RelevanceState.from_bytes(empty.to_bytes()).model is None
    # with a grouping space (statistics and descriptors) the known groups live there, and travel with it
    d = rng.normal(size=(40, 4))
    grouping = rel.grouping_fit(s, d)
    G = rel.grouping_transform(grouping, s, d)
    kg = rel.KnownGroups.fit(G[:10], np.array([0, 0, 0, -1, -1, 1, 1, -1, -1, -1]))
    back = rv.RelevanceState.from_bytes(rv.RelevanceState(space, model, kg, "abc", "m/1", grouping).to_bytes())
    assert back.grouping is not None and back.grouping.components.shape == grouping.components.shape
    assert back.known_group(z, s, d).tolist() == kg.assign(G).tolist()
    # a state saved before the grouping space assigns in the relevance space, as it did
    assert rv.RelevanceState.from_bytes(state.to_bytes()).known_group(z, s, d).tolist() == groups.assign(X).tolist()
    # a relevance space with the descriptors beside the statistics travels with them
    space_d = rel.FeatureSpace.fit(z, s, d)
    Xd = space_d.transform(z, s, d)
    back = rv.RelevanceState.from_bytes(rv.RelevanceState(space_d, model, kg, "abc", "m/1", grouping).to_bytes())
    np.testing.assert_allclose(back.features(z, s, d), Xd)


def test_labels_digest_changes_with_any_label(scored_store):
    s = scored_store
    d0 = lab.labels_digest(lab.latest_labels(s))
    lab.append_labels(s, lab.make_rows(["o1"], "interesting", model="m/1", when="2026-01-01T00:00:00+00:00"))
    d1 = lab.labels_digest(lab.latest_labels(s))
    lab.append_labels(s, lab.make_rows(["o1"], "artefact", model="m/1", when="2026-01-01T00:00:00+00:00"))
    assert len({d0, d1, lab.labels_digest(lab.latest_labels(s))}) == 3
    assert isinstance(lab.read_labels(s), pd.DataFrame)
