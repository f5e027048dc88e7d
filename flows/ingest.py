"""Ingest: FITS cutouts / FITS tile + catalog / .npy → validated, deduplicated rows of a survey store."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from infra.errors import GsafeError
from infra.ingest import ingest
from infra.settings import Settings
from infra.store import SurveyStore
from infra.truth import attach_truth, read_truth, truth_path_for

__all__ = ["ingest_flow"]


def _worth_retrying(task, task_run, state) -> bool:
    """Retry what a retry can fix (a network or file-system hiccup), never a gsafe error: a missing
    source or an unusable catalog fails the same way every time (bad inputs never raise: quarantined)."""
    try:
        state.result()
    except GsafeError:
        return False
    except Exception:
        return True
    return False


@task(name="ingest-source", retries=2, retry_delay_seconds=exponential_backoff(backoff_factor=2),
      retry_condition_fn=_worth_retrying, cache_policy=NO_CACHE)
def ingest_task(source: str, store_url: str, settings: dict, catalog: str | None) -> dict:
    s = Settings(**settings)
    summary = ingest(source, store_url, settings=s, catalog=catalog, progress=s.progress)
    return {"ingested": summary.ingested, "quarantined": summary.quarantined, "skipped": summary.skipped,
            "line": summary.line()}


@task(name="attach-truth", cache_policy=NO_CACHE)
def attach_truth_task(store_url: str, truth: str) -> int:
    return attach_truth(SurveyStore.open(store_url, mode="r+"), read_truth(truth))


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
