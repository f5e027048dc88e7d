"""Ingest one source into a store; join a truth table."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from infra.errors import GsafeError
from infra.ingest import ingest
from infra.settings import Settings
from infra.store import SurveyStore
from infra.truth import attach_truth, read_truth

__all__ = ["ingest_task", "attach_truth_task"]


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
    """Validate and append `source` to `store_url`; returns the counts and the summary line."""
    s = Settings(**settings)
    summary = ingest(source, store_url, settings=s, catalog=catalog, progress=s.progress)
    return {"ingested": summary.ingested, "quarantined": summary.quarantined, "skipped": summary.skipped,
            "line": summary.line()}


@task(name="attach-truth", cache_policy=NO_CACHE)
def attach_truth_task(store_url: str, truth: str) -> int:
    """Merge the truth table at `truth` into the store's catalog; returns the rows labelled."""
    return attach_truth(SurveyStore.open(store_url, mode="r+"), read_truth(truth))
