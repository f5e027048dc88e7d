"""The scheduled hunt: ingest new files → score only what is new with the champion → candidate list → gallery."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from flows.explain import explain_flow
from flows.ingest import ingest_flow
from flows.score import run_campaign
from infra import tracking
from infra.settings import Settings
from infra.errors import StoreError
from infra.store import SurveyStore
from tasks.score import read_scores

__all__ = ["hunt_flow"]


@flow(name="hunt", log_prints=False)
def hunt_flow(store_url: str, model: str, settings: dict, source: str | None = None, out: str = "hunt_out",
              alpha: float = 0.1, top_k: int = 50) -> dict:
    s = Settings(**settings)
    tracking.configure(s)
    ref = tracking.resolve(model)            # fixed once: the alias may move while we run
    ingested = ingest_flow(source, store_url, settings)["ingested"] if source else 0
    store = SurveyStore.open(store_url)
    try:
        table = store.score_table(ref.name, ref.version)
        new_rows = store.n - table.n
        nothing_new = new_rows == 0 and not table.pending_chunks()
        first_new = table.n
    except StoreError:
        nothing_new, first_new = store.n == 0, 0
    if nothing_new:
        return {"model": str(ref), "ingested": ingested, "new": 0, "candidates": 0,
                "message": f"hunt: nothing new in {store_url} ({store.n} objects, all scored with {ref})"}
    run_campaign(store_url, ref.name, ref.version, s)
    df = read_scores(store, store.score_table(ref.name, ref.version))
    idx = {o: i for i, o in enumerate(store.object_ids().astype(str))}
    new = df[[idx[o] >= first_new for o in df["object_id"]]]
    cand = new[new["q_value"] <= alpha]
    outdir = Path(out)
    outdir.mkdir(parents=True, exist_ok=True)
    cand.to_csv(outdir / "candidates.csv", index=False)
    report = None
    if len(new):
        report = explain_flow(store_url, ref.name, ref.version, min(top_k, len(new)), str(outdir / "report"),
                              settings, rows=[idx[o] for o in new["object_id"][:top_k]])
    return {"model": str(ref), "ingested": ingested, "new": int(len(new)), "candidates": int(len(cand)),
            "candidates_csv": str(outdir / "candidates.csv"), "report": report,
            "message": f"hunt: {len(new)} new objects scored with {ref}, {len(cand)} candidates at q ≤ {alpha}"}
