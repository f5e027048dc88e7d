"""Explain the top anomalies of a campaign: reconstruction, residual, attribution, neighbours, latent map."""

from __future__ import annotations

import numpy as np
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from gsafe_models import explain as ex
from infra.batches import split_rows
from infra.gallery import Card, write_gallery
from infra.store import SurveyStore
from tasks.score import load_detector

__all__ = ["top_rows", "build_cards", "normal_bank", "explain_rows_task"]

BANK = 2000          # normal objects encoded for neighbours and the latent map
N_NEIGHBOURS = 3
LEX_FILE, LEX_TRAIN, LEX_EPOCHS = "lex_selector.pt", 256, 3


def top_rows(store: SurveyStore, name: str, version: int, k: int) -> np.ndarray:
    score = store.score_table(name, version).read(["score"])["score"]
    order = np.argsort(-np.nan_to_num(score, nan=-np.inf), kind="stable")
    return order[:k]


def normal_bank(p_value: np.ndarray, exclude: np.ndarray, size: int = BANK, seed: int = 0) -> np.ndarray:
    """A sample of normal-looking objects (p > 0.2) to find neighbours among and to draw the latent map:
    sorted row indices into `p_value` (pass a prefix of the table to draw from its first rows only)."""
    ok = np.nonzero(np.nan_to_num(p_value, nan=0) > 0.2)[0]
    ok = np.setdiff1d(ok, exclude)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(ok, min(size, len(ok)), replace=False)) if len(ok) else ok


def _bank_rows(store: SurveyStore, p_value: np.ndarray, exclude: np.ndarray, seed: int = 0) -> np.ndarray:
    return normal_bank(p_value, exclude, BANK, seed)


def lex_selector(det, store_url: str, name: str, version: int) -> ex.LexSelector:
    """The model's LEX selector: trained once per model version, then kept beside it in MLflow."""
    import io

    from infra import tracking
    from infra.batches import StoreBatches

    ref = tracking.ModelRef(name, version)
    selector = ex.LexSelector(bands=det.image_shape[0])
    cached = tracking.read_version_artifact(ref, LEX_FILE)
    if cached is not None:
        selector.load_state_dict(torch.load(io.BytesIO(cached), map_location="cpu"))
        return selector.eval()
    # trained on the survey stream itself (no labels): a clean training split would show it no anomaly to keep
    store = SurveyStore.open(store_url)
    batches = StoreBatches(store_url, np.arange(store.n), 32, shuffle=True, limit=LEX_TRAIN)
    selector.fit(det.score_function(), det.impute_function(), lambda: (torch.as_tensor(b) for b in batches()),
                 epochs=LEX_EPOCHS)
    buf = io.BytesIO()
    torch.save(selector.state_dict(), buf)
    tracking.write_version_artifact(ref, LEX_FILE, buf.getvalue())
    return selector


def build_cards(store: SurveyStore, det, cols: dict[str, np.ndarray], rows: np.ndarray, bank: np.ndarray,
                method: str = "integrated_gradients", selector: ex.LexSelector | None = None,
                catalog: dict[str, np.ndarray] | None = None, *, at: np.ndarray | None = None,
                z_bank: np.ndarray | None = None, bank_ids: np.ndarray | None = None,
                ) -> tuple[list[Card], np.ndarray, np.ndarray]:
    """The explained cards of store `rows` (reconstruction, residual, attribution, statistics, nearest
    normal neighbours among `bank` rows); also returns the latents of the bank and of the rows.

    `cols` is the campaign's score table (``ScoreTable.read()``) and `catalog` the store's catalog
    columns (object_id, ra, dec, optionally anomaly_class; read whole if not given), both indexed by
    store row, or by `at` (one position per row) when they hold only some rows. `z_bank` and
    `bank_ids` (latents and object ids of the bank) spare encoding and reading them again.
    """
    rows = np.asarray(rows, dtype=np.int64)
    at = rows if at is None else np.asarray(at, dtype=np.int64)
    images = store.read_rows(rows)
    recon = det.reconstruct(images)
    if method == "duplex":  # the card's "reconstruction" is then the counterfactual normal version
        attribution, cf = ex.duplex(det.score_function(), ex.counterfactual_function(det), torch.as_tensor(images))
        attribution, recon = attribution.detach().cpu().numpy(), cf.detach().cpu().numpy().astype(np.float32)
    else:
        attribution = ex.explain(method, det.score_function(), det.impute_function(), torch.as_tensor(images),
                                 selector=selector).detach().cpu().numpy()
    cat = catalog if catalog is not None else store.read_catalog(None)
    if z_bank is None:
        z_bank = det.encode(store.read_rows(bank)) if len(bank) else np.zeros((0, 1))
    z_top = det.encode(images)
    neigh_idx = None
    if len(bank) >= N_NEIGHBOURS:
        # in partly whitened latents, as the latent map: raw latents can be ordered by one direction alone
        w = ex.whiten(np.concatenate([z_bank, z_top]).astype(np.float64))
        w_bank, w_top = w[: len(z_bank)], w[len(z_bank):]
        neigh_idx, _ = ex.nearest_neighbours(torch.as_tensor(w_top), torch.as_tensor(w_bank), N_NEIGHBOURS)
        neigh_idx = neigh_idx.numpy()
    neigh_images = store.read_rows(bank[np.unique(neigh_idx)]) if neigh_idx is not None else None
    uniq = {int(j): i for i, j in enumerate(np.unique(neigh_idx))} if neigh_idx is not None else {}
    ids = cat["object_id"].astype(str)
    nb_ids = ids[bank] if bank_ids is None else np.asarray(bank_ids).astype(str)
    stats = det.statistic_names
    cards = []
    for i, r in enumerate(at):
        cards.append(Card(
            object_id=ids[r], ra=float(cat["ra"][r]), dec=float(cat["dec"][r]), score=float(cols["score"][r]),
            p_value=float(cols["p_value"][r]), q_value=float(cols["q_value"][r]),
            statistics={s: float(cols[f"stat_{s}"][r]) for s in stats} | {f"p_{s}": float(cols[f"p_{s}"][r]) for s in stats},
            image=images[i], reconstruction=recon[i], residual=images[i] - recon[i], attribution=attribution[i],
            bands=store.bands, method=method,
            anomaly_class=(str(cat["anomaly_class"][r]) or "normal") if "anomaly_class" in cat else None,
            neighbours=[(nb_ids[j], neigh_images[uniq[int(j)]]) for j in neigh_idx[i]] if neigh_idx is not None else None,
        ))
    return cards, z_bank, z_top


@task(name="explain-top", cache_policy=NO_CACHE)
def explain_rows_task(store_url: str, name: str, version: int, rows: list[int], payload: bytes, out: str,
                      method: str = "integrated_gradients", notices: list[str] | None = None,
                      more_like_this: list[int] | None = None) -> dict:
    store = SurveyStore.open(store_url)
    table = store.score_table(name, version)
    cols = table.read()
    rows = np.asarray(rows, dtype=np.int64)
    det = load_detector(payload)
    selector = None  # LEX runs per instance (gsafe_models.explain.lex): the amortized selector ranked worse (BENCHMARKS.md)
    cat = store.read_catalog(None)
    bank = _bank_rows(store, cols["p_value"], rows)
    cards, z_bank, z_top = build_cards(store, det, cols, rows, bank, method, selector, cat)
    for card, more in zip(cards, more_like_this or []):
        card.more_like_this = int(more)
    latent_xy = latent_labels = None
    if len(bank) + len(rows) >= 5:
        xy = ex.latent_map(torch.as_tensor(np.concatenate([z_bank, z_top]))).numpy()
        latent_xy = xy
        latent_labels = np.array(["normal"] * len(bank) + ["top anomaly"] * len(rows))
    calib = split_rows(cat["id_hash"])["calib"]
    files = write_gallery(out, cards, latent_xy=latent_xy, latent_labels=latent_labels,
                          score_hist={"scores": cols["score"], "calibration": cols["score"][calib]},
                          title=f"gsafe: top {len(rows)} anomalies of {store_url} — {name}/{version} ({method})",
                          notices=notices)
    return {"cards": len(cards), "files": {k: str(v) for k, v in files.items()}}
