"""Ingest: FITS cutouts / FITS tile + catalog / .npy → validated, deduplicated rows of a survey store."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from infra.store import SurveyStore
from infra.truth import truth_path_for
from tasks.ingest import attach_truth_task, ingest_task

__all__ = ["ingest_flow"]


@flow(name="ingest", log_prints=False)
def ingest_flow(source: str, store_url: str, settings: dict, catalog: str | None = None,
                labels: str | None = None) -> dict:
    """Ingest `source` into `store_url`; join a truth table (labels, classes, footprints) if one is given
    or lies beside a simulated cutout directory (`DIR_truth.fits`)."""
    summary = ingest_task(source, store_url, settings, catalog)
    truth = labels or (str(truth_path_for(source)) if Path(source).is_dir() and truth_path_for(source).exists() else None)
    if truth and SurveyStore.exists(store_url):
        summary["labelled"] = attach_truth_task(store_url, truth)
        summary["truth"] = truth
    return summary
