"""The demo: simulate a survey with injected anomalies → ingest → train → score → AUROC → gallery."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from prefect import flow

from flows.explain import explain_flow
from flows.ingest import ingest_flow
from flows.score import run_campaign
from flows.train import train_flow
from gsafe_models.metrics import per_class_report, realised_fdr
from infra.safe_output import write_table
from infra.settings import Settings
from infra.store import SurveyStore
from infra.truth import truth_path_for
from tasks.score import read_scores
from tasks.simulate import simulate_task

__all__ = ["demo_flow"]


@flow(name="demo", log_prints=False)
def demo_flow(out: str, settings: dict, n: int = 2000, anomaly_frac: float = 0.05, seed: int = 0,
              config: dict | None = None, top_k: int = 12, model: str = "demo") -> dict:
    """The whole hunt on a simulated survey with injected anomalies: simulate `n` cutouts as FITS files
    (truth beside them), ingest, train and register a Detector, score every object, measure AUROC per
    injected class and the false-discovery list at q <= 0.1, and write the gallery of the top `top_k`."""
    s = Settings(**settings)
    outdir = Path(out)
    fits_dir, store_url = outdir / "cutouts", str(outdir / "survey.zarr")
    if not truth_path_for(fits_dir).exists():
        simulate_task(n, settings, seed, anomaly_frac, fits_dir=str(fits_dir))
    ingest = ingest_flow(str(fits_dir), store_url, settings)
    trained = train_flow(store_url, model, config or {}, settings)
    version = trained["version"]
    # a demo-sized survey (two chunks) is scored before a Dask cluster would have started
    run_campaign(store_url, model, version, s, in_process=SurveyStore.open(store_url).n <= 4 * s.chunk_size)
    store = SurveyStore.open(store_url)
    table = store.score_table(model, version)
    df = read_scores(store, table)
    write_table(df, outdir / "scores.csv")
    cat = store.read_catalog(["label", "anomaly_class"])
    cols = table.read(["score", "q_value"])
    rep = per_class_report(cols["score"], cat["label"], cat["anomaly_class"])
    fdp, listed = realised_fdr(cols["q_value"], np.asarray(cat["label"]), 0.1)
    fdr = {"listed": listed, "false": int(round(fdp * listed))}
    report = explain_flow(store_url, model, version, top_k, str(outdir / "report"), settings)
    return {"ingest": ingest, "model": f"{model}/{version}", "metrics": trained["metrics"], "per_class": rep, "fdr": fdr,
            "top": df.head(10), "scores_csv": str(outdir / "scores.csv"), "report": report}
