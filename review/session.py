"""One review session: a campaign's candidate pool, its features and groups, the store's labels,
and the cards' images drawn on demand."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gsafe_models import relevance as rel
from infra import labels as lab
from infra.gallery import Card, card_view, composite, panels, png
from infra.store import SurveyStore
from tasks import review as rv

__all__ = ["ReviewSession", "Plan"]

N_BANK = 500        # normal objects for the nearest-neighbour strip, drawn from the store's first chunks
BANK_CHUNKS = 4
CACHE_CARDS = 64    # explained cards kept in memory
CACHE_PNGS = 2048   # drawn panels kept in memory


@dataclass
class Plan:
    """The current review order and what the page shows of it (indices into the pool)."""

    order: np.ndarray
    first_pass: np.ndarray
    more_like_this: np.ndarray
    known_artefacts: np.ndarray
    labelled: np.ndarray
    label: np.ndarray
    mu: np.ndarray
    sigma: np.ndarray


class ReviewSession:
    """Everything `gsafe review` serves, computed once at start except what is drawn lazily.

    Arguments:
        store_url: the survey store.
        name, version: the detector whose campaign is reviewed (its scores must exist).
        det: the loaded Detector.
        settings: gsafe Settings (MLflow, home).
        who: the person labelling.
        out: where exports go.
        pool_size: candidates reviewed (the most anomalous by p-value).
        method: attribution method of the cards.
        within: store rows the candidates are chosen among (None: every row), e.g. the model's own
            calibration objects (`tasks.review.model_calibration_rows`, `gsafe review --calibration`).
    """

    def __init__(self, store_url: str, name: str, version: int, det, settings, who: str, out: str | Path,
                 pool_size: int = rv.POOL, method: str = "integrated_gradients", within: np.ndarray | None = None) -> None:
        self.store_url, self.name, self.version = store_url, name, int(version)
        self.det, self.settings, self.who, self.out, self.method = det, settings, who, Path(out), method
        self.store = SurveyStore.open(store_url, mode="r+")   # appends labels
        self.pool = rv.candidate_pool(self.store, name, version, pool_size, within=within)
        self.restricted = within is not None     # the page says the pool is a subset (the calibration objects)
        latents, described = rv.pool_features(self.store, det, self.pool.rows)
        self.space = rel.FeatureSpace.fit(latents, self.pool.stats, described) if len(latents) >= 2 else None
        self.X = self.space.transform(latents, self.pool.stats, described) if self.space else np.zeros((len(latents), 1))
        # groups of look-alikes: on the kind of departure (statistics, residual descriptors)
        self.grouping, self.G = rv.pool_grouping(self.store, det, self.pool, described)
        self.groups = rel.group_candidates(self.G)
        self.index = {o: i for i, o in enumerate(self.pool.ids)}
        self.known_ids = set(self.index)
        self._compute = threading.Lock()          # one card drawn at a time (torch, memory)
        self._cards: OrderedDict[int, Card] = OrderedDict()
        self._pngs: OrderedDict[tuple[int, str], bytes] = OrderedDict()
        self._bank: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    @property
    def model(self) -> str:
        return f"{self.name}/{self.version}"

    # ---- labels and order -------------------------------------------------------------------
    def latest(self):
        """The store's latest label per object, read afresh (another tab or a hunt may have written)."""
        return lab.latest_labels(self.store)

    def plan(self) -> Plan:
        latest = self.latest()
        state = rv.label_state(latest, self.pool.ids)
        suppressed = np.unique(self.groups[state["group_scope"] & (state["label"] == "artefact")])
        # a representative labelled artefact *with* its group: its own group is suppressed too
        reps = {v for v in state["via"][state["group_scope"]]}
        rep_groups = [self.groups[self.index[r]] for r in reps if r in self.index]
        suppressed = np.unique(np.concatenate([suppressed, np.asarray(rep_groups, dtype=self.groups.dtype)]))
        p = rel.plan_review(self.pool.p_value, self.groups, state["labelled"], features=self.X,
                            targets=state["target"], suppressed_groups=suppressed)
        known = np.nonzero(state["group_scope"] & (state["label"] == "artefact"))[0]
        return Plan(p.order, p.first_pass, p.more_like_this, np.concatenate([known, p.suppressed]).astype(int),
                    state["labelled"], state["label"], p.mu, p.sigma)

    def label(self, i: int, label: str, *, tag: str = "", relevance: float | None = None,
              group: bool = False) -> dict:
        """Record one label for pool candidate `i`; with `group` (artefact only) the other unlabelled
        members of its group are labelled artefact through it, in the same atomic append."""
        if not 0 <= i < len(self.pool.ids):
            raise ValueError(f"review: candidate {i} is not in this review (0..{len(self.pool.ids) - 1})")
        if group and label != "artefact":
            raise ValueError("review: only an artefact label can suppress a group")
        object_id = str(self.pool.ids[i])
        rows = lab.make_rows([object_id], label, model=self.model, tag=tag, relevance=relevance, who=self.who)
        members: list[str] = []
        if group:
            state = rv.label_state(self.latest(), self.pool.ids)
            same = np.nonzero((self.groups == self.groups[i]) & ~state["labelled"])[0]
            members = [str(self.pool.ids[j]) for j in same if j != i]
            if members:
                more = lab.make_rows(members, "artefact", model=self.model, tag=tag, who=self.who, scope="group",
                                     via=object_id, when=str(rows["when"][0]))
                rows = {k: np.concatenate([rows[k], more[k]]) for k in rows}
        lab.append_labels(self.store, rows, known_ids=self.known_ids)
        return {"object_id": object_id, "label": label, "suppressed": len(members)}

    def export(self) -> dict:
        """Write the labels (all rows and the latest per object) as CSV and Parquet under `out`, and log
        them with the relevance state to MLflow against this detector version."""
        from infra import tracking

        self.out.mkdir(parents=True, exist_ok=True)
        files = {}
        for kind, latest in (("labels", False), ("labels_latest", True)):
            for suffix in (".csv", ".parquet"):
                files[kind + suffix] = str(lab.export_labels(self.store, self.out / f"{kind}{suffix}", latest=latest))
        latest = self.latest()
        state = self.relevance_state(latest)
        tracking.configure(self.settings)
        run = tracking.log_labels(self.store_url, self.settings, self.name, self.version, lab.labels_digest(latest),
                                  latest, state.to_bytes() if state else None, files)
        return {"files": files, "run_id": run, "labels": int(len(latest))}

    def relevance_state(self, latest) -> rv.RelevanceState | None:
        if self.space is None:
            return None
        state = rv.label_state(latest, self.pool.ids)
        model = rel.RelevanceModel().fit(self.X[state["labelled"]], state["target"][state["labelled"]]) \
            if state["labelled"].any() else None
        at = state["labelled"]
        groups = rel.KnownGroups.fit(self.G[at], rv.artefact_groups({k: v[at] for k, v in state.items()}, self.pool.ids[at]))
        return rv.RelevanceState(self.space, model, groups, lab.labels_digest(latest), self.model, self.grouping)

    # ---- cards ------------------------------------------------------------------------------
    def card_stub(self, i: int, rank: int, more: int = 0, label: str = "") -> dict:
        """The card of pool candidate `i` as the page shows it before any image is drawn: text from the
        pool, images as same-origin URLs drawn on request."""
        p = self.pool
        names = p.statistic_names
        b = len(self.store.bands)
        empty = np.empty((b, 0, 0), np.float32)
        stub = Card(object_id=str(p.ids[i]), ra=float(p.catalog["ra"][i]), dec=float(p.catalog["dec"][i]),
                    score=float(p.score[i]), p_value=float(p.p_value[i]), q_value=float(p.q_value[i]),
                    statistics={s: float(p.stats[i, j]) for j, s in enumerate(names)}
                    | {f"p_{s}": float(p.p_stats[i, j]) for j, s in enumerate(names)},
                    image=empty, reconstruction=empty, residual=empty, attribution=empty, bands=self.store.bands,
                    anomaly_class=(str(p.catalog["anomaly_class"][i]) or "normal") if "anomaly_class" in p.catalog else None,
                    label=label or None, neighbours=[("nearest normals", empty)], method=self.method)
        view = card_view(stub, rank, [f"/img/{i}/{k}.png" for k in range(4)], [f"/img/{i}/nb.png"],
                         dom_id=f"c{i}", lazy=True)
        view["more"] = int(more)
        view["i"] = int(i)
        view["label"] = label
        return view

    def _bank_state(self):
        if self._bank is None:
            table = self.store.score_table(self.name, self.version)
            stop = min(table.n, BANK_CHUNKS * self.store.chunk_size)
            from tasks.explain import normal_bank

            rows = normal_bank(table.read(["p_value"], 0, stop)["p_value"], self.pool.rows, N_BANK)
            ids = self.store.read_catalog(["object_id"], 0, stop)["object_id"][rows] if len(rows) else np.zeros(0, object)
            self._bank = (rows, self.det.encode(self.store.read_rows(rows)) if len(rows) else np.zeros((0, 1)), ids)
        return self._bank

    def card(self, i: int) -> Card:
        """The explained card of pool candidate `i` (cached)."""
        from tasks.explain import build_cards

        with self._compute:
            if i in self._cards:
                self._cards.move_to_end(i)
                return self._cards[i]
            rows, z_bank, bank_ids = self._bank_state()
            cards, _, _ = build_cards(self.store, self.det, self.pool.columns(), self.pool.rows[[i]], rows, self.method,
                                      catalog=self.pool.catalog, at=np.asarray([i]), z_bank=z_bank, bank_ids=bank_ids)
            self._cards[i] = cards[0]
            if len(self._cards) > CACHE_CARDS:
                self._cards.popitem(last=False)
            return cards[0]

    def image(self, i: int, panel: str) -> bytes:
        """PNG of one panel of candidate `i`: "0".."3" (colour, reconstruction, residual, attribution)
        or "nb" (the nearest normal neighbours side by side)."""
        key = (i, panel)
        if key in self._pngs:
            self._pngs.move_to_end(key)
            return self._pngs[key]
        if not 0 <= i < len(self.pool.ids) or panel not in ("0", "1", "2", "3", "nb"):
            raise KeyError(f"review: no image {panel} of candidate {i}")
        card = self.card(i)
        if panel == "nb":
            strips = [composite(img, tuple(card.bands)) for _, img in card.neighbours or []]
            gap = np.full((strips[0].shape[0], 2, 3), 255, np.uint8) if strips else None
            rgb = np.concatenate(sum(([s, gap] for s in strips), [])[:-1], axis=1) if strips else np.zeros((1, 1, 3), np.uint8)
        else:
            rgb = list(panels(card).values())[int(panel)]
        data = png(rgb)
        self._pngs[key] = data
        if len(self._pngs) > CACHE_PNGS:
            self._pngs.popitem(last=False)
        return data
