"""The scientist's labels between the store, the detector and the relevance model; hunts that remember.

Moves data only: the candidate pool and its features (store + detector), the labels (store), the
relevance state (MLflow); the maths (feature space, groups, relevance, review order, known groups)
is `gsafe_models.relevance`.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from gsafe_models import relevance as rel
from infra import labels as lab
from infra.safe_output import write_table
from infra.store import SurveyStore

__all__ = ["POOL", "Pool", "candidate_pool", "model_calibration_rows", "pool_features", "pool_grouping", "pool_groups", "label_state", "RelevanceState",
           "build_relevance", "relevance_for", "apply_labels_task"]

POOL = 500   # candidates reviewed, grouped and re-ranked: the most anomalous by p-value


@dataclass
class Pool:
    """The review's candidates: the `size` most anomalous objects of a campaign, most anomalous first.

    Attributes:
        rows: store rows ``(P,)``; ids ``(P,)`` str; score, p_value, q_value ``(P,)``;
        stats ``(P, S)`` raw statistics (``stat_*``) and p_stats ``(P, S)`` their p-values;
        catalog: ra, dec (and anomaly_class when the store has it) of the pool, ``(P,)`` each.
    """

    rows: np.ndarray
    ids: np.ndarray
    score: np.ndarray
    p_value: np.ndarray
    q_value: np.ndarray
    stats: np.ndarray
    p_stats: np.ndarray
    statistic_names: list[str]
    catalog: dict[str, np.ndarray]

    def columns(self) -> dict[str, np.ndarray]:
        """The pool's score columns as `tasks.explain.build_cards` reads them (indexed by pool position)."""
        out = {"score": self.score, "p_value": self.p_value, "q_value": self.q_value}
        for j, s in enumerate(self.statistic_names):
            out[f"stat_{s}"], out[f"p_{s}"] = self.stats[:, j], self.p_stats[:, j]
        return out


def candidate_pool(store: SurveyStore, name: str, version: int, size: int = POOL,
                   rows: np.ndarray | None = None, within: np.ndarray | None = None) -> Pool:
    """The `size` objects of campaign `name`/`version` with the smallest p-values (ties: larger score
    first), read chunk by chunk so memory stays one chunk plus the pool; or exactly `rows`. With
    `within` (store rows), the pool is chosen among those rows only (e.g. a model's calibration
    objects, `tasks.train.calibration_rows`)."""
    table = store.score_table(name, version)
    names = table.statistics
    want = ["score", "p_value", "q_value"] + [f"stat_{s}" for s in names] + [f"p_{s}" for s in names]
    if rows is None:
        w = None if within is None else np.unique(np.asarray(within, np.int64))   # sorted: each chunk's share by bisection
        # two columns read chunk by chunk to choose the pool, then the pool's rows of the others
        best = {"score": np.zeros(0), "p_value": np.zeros(0), "row": np.zeros(0, np.int64)}
        for start in range(0, table.n, store.chunk_size):
            stop = min(start + store.chunk_size, table.n)
            mine = None if w is None else w[np.searchsorted(w, start):np.searchsorted(w, stop)] - start
            if mine is not None and not len(mine):
                continue                      # no row of this chunk is wanted: not read
            part = table.read(["score", "p_value"], start, stop)
            part["row"] = np.arange(start, start + len(part["score"]))
            if mine is not None:
                part = {k: v[mine] for k, v in part.items()}
            merged = {k: np.concatenate([best[k], part[k]]) for k in best}
            keep = np.lexsort((-np.nan_to_num(merged["score"], nan=-np.inf), np.nan_to_num(merged["p_value"], nan=np.inf)))[:size]
            best = {k: v[keep] for k, v in merged.items()}
        rows = best["row"].astype(np.int64)
    rows = np.asarray(rows, np.int64)
    cols = {k: np.asarray(table.group[k].get_orthogonal_selection(rows)) if len(rows) else np.zeros(0) for k in want}
    cat = {}
    for c in ["object_id", "ra", "dec"] + (["anomaly_class"] if "anomaly_class" in store.columns else []):
        arr = store.group["catalog"][c]
        v = arr.get_orthogonal_selection(rows) if len(rows) else np.zeros(0)
        cat[c] = np.asarray(v, dtype=object) if arr.dtype.kind in "UOT" else np.asarray(v)
    stats = np.stack([cols[f"stat_{s}"] for s in names], axis=1) if names else np.zeros((len(rows), 0))
    p_stats = np.stack([cols[f"p_{s}"] for s in names], axis=1) if names else np.zeros((len(rows), 0))
    return Pool(rows, cat["object_id"].astype(str), cols["score"], cols["p_value"], cols["q_value"], stats, p_stats,
                list(names), cat)


def model_calibration_rows(store_url: str, name: str, version: int, det) -> np.ndarray:
    """The rows of `store_url` that the successor of model `name`/`version` (loaded as `det`) is
    calibrated on once a review has labelled a departure (`tasks.train.review_calibration_rows`: its
    own calibration objects, and the train split too where the next training cross-fits), for a
    review of them (`gsafe review --calibration`).

    Raises `UsageError` when `store_url` is not the store the version was trained on: another
    store's rows were never in its calibration."""
    from infra import tracking
    from infra.errors import UsageError
    from tasks.train import review_calibration_rows

    trained_on = tracking.version_tags(name, version).get("gsafe.store")
    if trained_on is None or not tracking.same_store(trained_on, store_url):
        raise UsageError(f"review --calibration: {name}/{version} was trained on {trained_on or 'an unrecorded store'}, "
                         f"not on {store_url}; its calibration objects are in the store it was trained on "
                         f"(review that one, after `gsafe score --store {trained_on or 'STORE'} --model {name}/{version}`), "
                         f"or leave out --calibration to review this store's candidates")
    return review_calibration_rows(store_url, det.config)


def pool_features(store: SurveyStore, det, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Latents ``(n, D)`` (``Detector.encode``) and residual descriptors ``(n, K)``
    (``Detector.describe``) of store `rows`, from one read of their cutouts."""
    rows = np.asarray(rows, np.int64)
    if not len(rows):
        return np.zeros((0, 1), np.float32), np.zeros((0, 0))
    images = store.read_rows(rows)
    return det.encode(images), det.describe(images)


def pool_grouping(store: SurveyStore, det, pool: "Pool", described: np.ndarray | None = None
                  ) -> tuple[rel.FeatureSpace | None, np.ndarray]:
    """The grouping space fitted on a pool (None under 2 candidates) and the pool in it ``(n, k)``:
    what kind of departure each candidate shows (its statistics and ``Detector.describe``, read
    here unless given; see ``gsafe_models.relevance.grouping_space``)."""
    rows = np.asarray(pool.rows, np.int64)
    if len(rows) < 2:
        return None, np.zeros((len(rows), 1))
    if described is None:
        described = det.describe(store.read_rows(rows))
    space = rel.grouping_fit(pool.stats, described)
    return space, rel.grouping_transform(space, pool.stats, described)


def pool_groups(store: SurveyStore, det, pool: "Pool", described: np.ndarray | None = None) -> np.ndarray:
    """Groups of look-alike candidates ``(n,)`` of a pool: HDBSCAN in its grouping space."""
    return rel.group_candidates(pool_grouping(store, det, pool, described)[1])


def label_state(latest: pd.DataFrame, ids: np.ndarray) -> dict[str, np.ndarray]:
    """The latest labels of objects `ids` ``(n,)``: ``labelled`` (bool), ``target`` (relevance 0..1),
    ``label`` (str, "" if none), ``group_scope`` (bool: labelled as part of a suppressed group),
    ``via`` (str: that group's representative)."""
    ids = np.asarray(ids).astype(str)
    by_id = latest.set_index("object_id") if len(latest) else None
    n = len(ids)
    out = {"labelled": np.zeros(n, bool), "target": np.zeros(n), "label": np.full(n, "", dtype=object),
           "group_scope": np.zeros(n, bool), "via": np.full(n, "", dtype=object)}
    if by_id is None:
        return out
    for i, o in enumerate(ids):
        if o in by_id.index:
            r = by_id.loc[o]
            out["labelled"][i] = True
            out["label"][i] = r["label"]
            rv = float(r["relevance"])
            out["target"][i] = rel.relevance_target(r["label"], None if np.isnan(rv) else rv)
            out["group_scope"][i] = r["scope"] == "group"
            out["via"][i] = r["via"]
    return out


def artefact_groups(state: dict[str, np.ndarray], ids: np.ndarray) -> np.ndarray:
    """``(n,)`` known artefact group of each object (-1 none): one group per representative whose
    artefact label suppressed a group (the representative and every member labelled through it)."""
    ids = np.asarray(ids).astype(str)
    reps = sorted({v for v, g, lbl in zip(state["via"], state["group_scope"], state["label"]) if g and lbl == "artefact"})
    index = {r: k for k, r in enumerate(reps)}
    out = np.full(len(ids), -1, np.int64)
    for i, o in enumerate(ids):
        if state["label"][i] != "artefact":
            continue
        if state["group_scope"][i] and state["via"][i] in index:
            out[i] = index[state["via"][i]]
        elif o in index:
            out[i] = index[o]
    return out


@dataclass
class RelevanceState:
    """What a hunt applies: the feature space, the relevance model and the known artefact groups,
    with the labels digest and the detector version they were built for."""

    space: rel.FeatureSpace
    model: rel.RelevanceModel | None
    groups: rel.KnownGroups
    digest: str
    detector: str
    # where the known groups live: the candidates' grouping space (statistics and residual
    # descriptors, see pool_groups); None in a state saved before it (groups in `space`)
    grouping: rel.FeatureSpace | None = None

    def to_bytes(self) -> bytes:
        arrays = self.space.state() | self.groups.state() | (self.model.state() if self.model else {})
        if self.grouping is not None:
            arrays |= self.grouping.state("gs_")
        arrays["meta"] = np.asarray([self.digest, self.detector])
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "RelevanceState":
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        model = rel.RelevanceModel.from_state(arrays) if "rm_X" in arrays else None
        digest, detector = (str(v) for v in arrays["meta"])
        grouping = rel.FeatureSpace.from_state(arrays, "gs_") if any(k.startswith("gs_") for k in arrays) else None
        return cls(rel.FeatureSpace.from_state(arrays), model, rel.KnownGroups.from_state(arrays), digest, detector, grouping)

    def features(self, latents: np.ndarray, stats: np.ndarray, described: np.ndarray | None = None) -> np.ndarray:
        """The relevance features of objects (a space saved before descriptors joined it ignores them)."""
        return self.space.transform(latents, stats, described)

    def known_group(self, latents: np.ndarray, stats: np.ndarray, described: np.ndarray) -> np.ndarray:
        """``(N,)`` the known artefact group each object falls in (-1 none)."""
        if self.grouping is None:
            return self.groups.assign(self.features(latents, stats, described))
        return self.groups.assign(rel.grouping_transform(self.grouping, stats, described))


def build_relevance(store: SurveyStore, det, name: str, version: int, latest: pd.DataFrame,
                    pool: Pool | None = None) -> RelevanceState:
    """Fit the relevance state on the store's latest labels: the feature space on the candidate pool,
    the GP on the labelled objects (wherever they are in the store), the known artefact groups."""
    pool = pool if pool is not None else candidate_pool(store, name, version)
    latents, described = pool_features(store, det, pool.rows)
    space = rel.FeatureSpace.fit(latents, pool.stats, described)
    grouping = pool_grouping(store, det, pool, described)[0]
    ids = latest["object_id"].astype(str).to_numpy()
    model, groups = None, rel.KnownGroups(np.zeros((0, grouping.components.shape[0])), np.zeros(0, np.int64), np.zeros(0))
    if len(ids):
        where = _rows_of(store, ids)
        found = where >= 0
        lab_pool = candidate_pool(store, name, version, rows=where[found])
        lab_latents, lab_described = pool_features(store, det, lab_pool.rows)
        X = space.transform(lab_latents, lab_pool.stats, lab_described)
        state = label_state(latest, lab_pool.ids)
        model = rel.RelevanceModel().fit(X, state["target"])
        Xg = rel.grouping_transform(grouping, lab_pool.stats, lab_described)
        groups = rel.KnownGroups.fit(Xg, artefact_groups(state, lab_pool.ids))
    return RelevanceState(space, model, groups, lab.labels_digest(latest), f"{name}/{version}", grouping)


def _rows_of(store: SurveyStore, ids: np.ndarray) -> np.ndarray:
    """Store rows of object ids, -1 where absent (reads the id column chunk by chunk)."""
    want = {o: k for k, o in enumerate(map(str, ids))}
    out = np.full(len(ids), -1, np.int64)
    for start, stop in store.chunk_bounds():
        chunk = store.read_catalog(["object_id"], start, stop)["object_id"]
        for j, o in enumerate(chunk):
            k = want.get(str(o))
            if k is not None:
                out[k] = start + j
    return out


def relevance_for(store_url: str, settings, name: str, version: int, det, latest: pd.DataFrame) -> RelevanceState:
    """The relevance state of these labels and this detector version: the one logged to MLflow when
    the labels have not changed since, else built now and logged (versioned with the detector)."""
    from infra import tracking

    digest = lab.labels_digest(latest)
    cached = tracking.find_relevance(store_url, settings, name, version, digest)
    if cached is not None:
        return RelevanceState.from_bytes(cached)
    store = SurveyStore.open(store_url)
    state = build_relevance(store, det, name, version, latest)
    tracking.log_labels(store_url, settings, name, version, digest, latest, state.to_bytes())
    return state


@task(name="apply-labels", cache_policy=NO_CACHE)
def apply_labels_task(store_url: str, settings: dict, name: str, version: int, rows: list[int], payload: bytes,
                      similar_at: float = 0.5) -> dict:
    """A hunt remembers: among new store `rows`, the objects that fall in a known artefact group and
    the ones the relevance model expects the scientist to find interesting (expected relevance >=
    `similar_at`). Returns ``{"known_artefact": [ids], "artefact_group": [rep index per id],
    "like_interesting": [ids], "relevance": {id: mu}, "labels": n, "digest": str}``; empty lists
    when the store holds no labels."""
    from infra.settings import Settings
    from tasks.score import load_detector

    store = SurveyStore.open(store_url)
    latest = lab.latest_labels(store)
    empty = {"known_artefact": [], "artefact_group": [], "like_interesting": [], "relevance": {}, "labels": 0, "digest": ""}
    if len(latest) == 0 or not rows:
        return empty
    det = load_detector(payload)
    state = relevance_for(store_url, Settings(**settings), name, version, det, latest)
    pool = candidate_pool(store, name, version, rows=np.asarray(rows, np.int64))
    latents, described = pool_features(store, det, pool.rows)
    X = state.features(latents, pool.stats, described)
    group = state.known_group(latents, pool.stats, described)
    labelled = np.isin(pool.ids, latest["object_id"].astype(str).to_numpy())
    mu = state.model.predict(X)[0] if state.model is not None else np.zeros(len(X))
    artefact = (group >= 0) & ~labelled
    like = (mu >= similar_at) & ~artefact & ~labelled
    return {"known_artefact": pool.ids[artefact].tolist(), "artefact_group": group[artefact].tolist(),
            "like_interesting": pool.ids[like].tolist(), "relevance": dict(zip(pool.ids.tolist(), mu.round(4).tolist())),
            "labels": int(len(latest)), "digest": state.digest}


def remember_labels(store_url: str, settings, name: str, version: int, new: pd.DataFrame, cand: pd.DataFrame,
                    top_k: int, outdir) -> tuple[pd.DataFrame, dict]:
    """What a hunt does with the scientist's labels: of the new objects it examines (the candidates
    and the `top_k` most anomalous), those in known artefact groups go to ``known_artefacts.csv``, apart
    from the candidates; the candidates gain ``like_interesting`` (the relevance model expects the
    scientist to find them interesting) and ``relevance`` (its expected relevance, 0..1). The union
    of the two files is the unchanged q <= alpha list plus the examined top objects.

    Returns the candidates without the known artefacts, and ``{"known_artefacts": n,
    "like_interesting": n, "labels": n}``.
    """
    from pathlib import Path

    from infra.store import SurveyStore as _Store
    from tasks.score import load_payload_task

    outdir = Path(outdir)
    examined = pd.concat([cand, new.head(top_k)]).drop_duplicates("object_id")
    store = _Store.open(store_url)
    if len(examined) == 0 or lab.TABLE not in store.tables():
        cand = cand.assign(like_interesting=False, relevance=np.nan)
        return cand, {"known_artefacts": 0, "like_interesting": 0, "labels": 0}
    index = {o: i for i, o in enumerate(store.object_ids().astype(str))}
    rows = [index[o] for o in examined["object_id"]]
    memory = apply_labels_task(store_url, settings.model_dump(mode="json"), name, version, rows,
                               load_payload_task(name, version))
    artefact = set(memory["known_artefact"])
    apart = examined[examined["object_id"].isin(artefact)].assign(
        artefact_group=[memory["artefact_group"][memory["known_artefact"].index(o)]
                        for o in examined["object_id"] if o in artefact])
    write_table(apart, outdir / "known_artefacts.csv")
    cand = cand[~cand["object_id"].isin(artefact)].assign(
        like_interesting=lambda d: d["object_id"].isin(set(memory["like_interesting"])),
        relevance=lambda d: d["object_id"].map(memory["relevance"]))
    return cand, {"known_artefacts": int(len(apart)), "like_interesting": int(cand["like_interesting"].sum()),
                  "labels": memory["labels"]}


@task(name="diverse-top", cache_policy=NO_CACHE)
def diverse_rows_task(store_url: str, name: str, version: int, k: int, payload: bytes,
                      pool_size: int = POOL) -> tuple[list[int], list[int]]:
    """The k store rows a gallery shows, in the review's order before any new label: one representative
    per group of look-alike candidates first, then the rest; objects in groups the scientist
    suppressed are left out, and labelled objects too. Returns (rows, "n more like this" per row)."""
    from tasks.score import load_detector

    store = SurveyStore.open(store_url)
    det = load_detector(payload)
    pool = candidate_pool(store, name, version, max(pool_size, k))
    if len(pool.rows) < 2:
        return pool.rows.tolist()[:k], [0] * min(k, len(pool.rows))
    latents, described = pool_features(store, det, pool.rows)
    X = rel.FeatureSpace.fit(latents, pool.stats, described).transform(latents, pool.stats, described)
    groups = pool_groups(store, det, pool, described)
    latest = lab.latest_labels(store) if lab.TABLE in store.tables() else lab.read_labels(store)
    state = label_state(latest, pool.ids)
    suppressed = np.unique(groups[state["group_scope"] & (state["label"] == "artefact")])
    plan = rel.plan_review(pool.p_value, groups, state["labelled"], features=X,
                           targets=state["target"], suppressed_groups=suppressed)
    order = plan.order[:k]
    return pool.rows[order].astype(int).tolist(), [int(plan.more_like_this[i]) if f else 0
                                                   for i, f in zip(order, plan.first_pass[:k])]
