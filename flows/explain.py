"""Explain: the top-k of a campaign → gallery (HTML + PNG + CSV/Parquet + attributions.npz), logged to MLflow."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from infra import tracking
from infra.settings import Settings
from infra.store import SurveyStore
from tasks.explain import explain_rows_task, top_rows
from tasks.review import diverse_rows_task
from tasks.score import load_payload_task

__all__ = ["explain_flow"]


@flow(name="explain", log_prints=False)
def explain_flow(store_url: str, name: str, version: int, top_k: int, out: str, settings: dict,
                 method: str = "integrated_gradients", rows: list[int] | None = None,
                 notices: list[str] | None = None, diverse: bool = True) -> dict:
    """The gallery of the top-k objects of campaign `name`/`version` (or of `rows`), with `notices`
    (plain-text lines, e.g. a drift alarm) in a banner above it; logged to the store's experiment.

    With `diverse` (and no `rows`), the k are chosen as `gsafe review` orders them: one representative
    of each group of look-alike candidates first (each card says how many more are like it), known
    artefact groups left out, then the rest; without it, the k highest scores."""
    s = Settings(**settings)
    tracking.configure(s)
    store = SurveyStore.open(store_url)
    store.score_table(name, version)       # clear error if the campaign has not run
    payload = load_payload_task(name, version)
    more = None
    if rows is None and diverse:
        rows, more = diverse_rows_task(store_url, name, version, top_k, payload)
    rows = list(rows) if rows is not None else [int(r) for r in top_rows(store, name, version, top_k)]
    r = explain_rows_task(store_url, name, version, rows, payload, out, method, notices=notices, more_like_this=more)
    with tracking.run(store_url, s, f"explain-{name}-{version}",
                      tags={"gsafe.model": name, "gsafe.version": version, "gsafe.method": method}):
        tracking.log_artifacts(out, artifact_path="report")
    return {"cards": r["cards"], "index": str(Path(out) / "index.html"), "files": r["files"]}
