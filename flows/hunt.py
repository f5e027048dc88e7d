"""The scheduled hunt: ingest new files → score only what is new with the champion → candidate list → gallery.

"New" means: not yet listed by a hunt with this model. The store keeps, per model, the row up to
which hunts have listed candidates (`SurveyStore.reported_rows`), moved only after the candidate
list and the gallery are written: a hunt that crashes after scoring leaves its objects new for
the next one. Each hunt also tests its new objects for drift (`gsafe_models.uniformity`): an
alarm goes into its result, the gallery's banner and the hunt's MLflow run.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from flows.explain import explain_flow
from flows.ingest import ingest_flow
from flows.score import run_campaign
from infra import tracking
from infra.settings import Settings
from infra.errors import StoreError
from infra.safe_output import write_table
from infra.store import SurveyStore
from tasks.review import remember_labels
from tasks.score import drift_task, read_scores

__all__ = ["hunt_flow"]


@flow(name="hunt", log_prints=False)
def hunt_flow(store_url: str, model: str, settings: dict, source: str | None = None, out: str = "hunt_out",
              alpha: float = 0.1, top_k: int = 50) -> dict:
    """Ingest `source` (if given) into `store_url`, score what no hunt with `model` has listed yet, write
    the candidates at q ≤ `alpha` (candidates.csv) and a gallery of the `top_k` most anomalous new objects
    to `out`, test the new objects for drift; known-artefact groups from the scientist's labels are listed
    apart."""
    s = Settings(**settings)
    tracking.configure(s)
    ref = tracking.resolve(model)            # fixed once: the alias may move while we run
    ingested = ingest_flow(source, store_url, settings)["ingested"] if source else 0
    store = SurveyStore.open(store_url, mode="r+")
    first_new = _first_new(store, ref)
    try:
        pending = bool(store.score_table(ref.name, ref.version).pending_chunks())
    except StoreError:
        pending = store.n > 0
    if store.n == first_new and not pending:
        return {"model": str(ref), "ingested": ingested, "new": 0, "candidates": 0, "drift": None,
                "message": f"hunt: nothing new in {store_url} ({store.n} objects, all scored with {ref})"}
    run_campaign(store_url, ref.name, ref.version, s)
    store = SurveyStore.open(store_url, mode="r+")
    table = store.score_table(ref.name, ref.version)
    stop = table.n                            # rows scored now; an ingest alongside may add more later
    df = read_scores(store, table)
    idx = {o: i for i, o in enumerate(store.object_ids().astype(str)[:stop])}
    new = df[[first_new <= idx[o] < stop for o in df["object_id"]]]
    drift = drift_task(store_url, ref.name, ref.version, first_new, stop)
    cand = new[new["q_value"] <= alpha]
    outdir = Path(out)
    outdir.mkdir(parents=True, exist_ok=True)
    # hunts remember the scientist's labels: known-artefact groups listed apart (tasks/review.py)
    cand, memory = remember_labels(store_url, s, ref.name, ref.version, new, cand, top_k, outdir)
    write_table(cand, outdir / "candidates.csv")   # spreadsheet-safe: ids come from FITS headers
    report = None
    if len(new):
        report = explain_flow(store_url, ref.name, ref.version, min(top_k, len(new)), str(outdir / "report"),
                              settings, rows=[idx[o] for o in new["object_id"][:top_k]],
                              notices=[f"drift alarm: new objects unlike the calibration data: {a}" for a in drift["alarms"]])
    store.set_reported_rows(ref.name, stop)   # only now: a crash above leaves these objects new
    o = drift["overall"]
    tracking.log_run(store_url, s, f"hunt-{ref.name}-{ref.version}",
                     tags={"gsafe.kind": "hunt", "gsafe.model": ref.name, "gsafe.version": ref.version,
                           "gsafe.rows": f"{first_new}-{stop}", "gsafe.drift.alarm": str(drift["alarm"]).lower(),
                           "gsafe.drift.alarms": "\n".join(drift["alarms"]) or "none"},
                     metrics={"new": len(new), "candidates": len(cand), "ingested": ingested,
                              "drift_d_plus": o["d_plus"], "drift_critical": o["critical"],
                              "drift_alarms": len(drift["alarms"])})
    alarm = f"; DRIFT ALARM ({len(drift['alarms'])}): {drift['alarms'][0]}" if drift["alarm"] else ""
    return {"model": str(ref), "ingested": ingested, "new": int(len(new)), "candidates": int(len(cand)),
            "candidates_csv": str(outdir / "candidates.csv"), "report": report, **memory, "drift": drift,
            "message": f"hunt: {len(new)} new objects scored with {ref}, {len(cand)} candidates at q ≤ {alpha}"
                       + (f", {memory['known_artefacts']} in known artefact groups listed apart" if memory["labels"] else "")
                       + alarm}


def _first_new(store: SurveyStore, ref: tracking.ModelRef) -> int:
    """The first row no hunt with this model has listed. A store no hunt has marked yet (scored by
    `gsafe score` only, or by an earlier gsafe) counts the rows its table holds as listed; that
    baseline is recorded before anything is scored, so a crash after scoring keeps them new."""
    reported = store.reported_rows(ref.name)
    if reported is not None:
        return reported
    try:
        baseline = store.score_table(ref.name, ref.version).n
    except StoreError:
        baseline = 0
    store.set_reported_rows(ref.name, baseline)
    return baseline
