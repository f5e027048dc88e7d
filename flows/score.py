"""The scoring campaign: every chunk of a store through one Detector version, fanned out over Dask."""

from __future__ import annotations

import contextlib
import time

from prefect import flow, unmapped
from prefect.context import FlowRunContext
from prefect.futures import as_completed
from tqdm.auto import tqdm

from infra import tracking
from infra.runtime import gpu_count, worker_threads
from infra.errors import GsafeError, StoreError, UsageError
from infra.settings import Settings
from infra.store import SurveyStore
from tasks.score import finalize_campaign_task, fit_problem, load_detector, load_payload_task, prepare_campaign_task, score_chunk_task

__all__ = ["score_flow"]


@flow(name="score", log_prints=False)
def score_flow(store_url: str, name: str, version: int, settings: dict) -> dict:
    """Score every not-yet-done chunk of `store_url` with model `name`/`version`, then q-values."""
    s = Settings(**settings)
    t0 = time.perf_counter()
    payload = load_payload_task(name, version)
    det = load_detector(payload)
    problem = fit_problem(det.bands, det.image_shape, SurveyStore.open(store_url), f"{name}/{version}")
    if problem:   # here, not inside a Dask task that would retry it
        raise UsageError(problem)
    model, scored = None, 0
    # An ingest running alongside may grow a chunk while it is scored: that chunk stays pending
    # (ScoreTable.write_chunk) and the next round scores it whole, up to the rows committed then.
    for _ in range(_ROUNDS):
        pending = prepare_campaign_task(store_url, name, version, det.statistic_names)
        if not pending:
            break
        store = SurveyStore.open(store_url)
        model = model if model is not None else _broadcast(payload)
        with _gpu_annotation():
            futures = score_chunk_task.map(unmapped(store_url), unmapped(name), unmapped(version), pending,
                                           payload=unmapped(model), threads=unmapped(worker_threads(s)))
        with tqdm(total=sum(min(store.chunk_size, store.n - c * store.chunk_size) for c in pending),
                  desc=f"score {name}/{version}", unit="cutout", disable=not s.progress) as bar:
            for f in as_completed(futures):
                bar.update(f.result())
        scored += len(pending)
    else:
        raise GsafeError(f"score: {store_url} kept growing during {_ROUNDS} rounds of scoring {name}/{version}; "
                         f"what is scored is kept: run `gsafe score` again once the ingest is done")
    finalize_campaign_task(store_url, name, version)
    return {"n": store_rows(store_url, name, version), "chunks_scored": scored, "seconds": time.perf_counter() - t0}


_ROUNDS = 5


def store_rows(store_url: str, name: str, version: int) -> int:
    """Rows of the campaign's table (the store's committed rows when the campaign looked last)."""
    return SurveyStore.open(store_url).score_table(name, version).n


def _broadcast(payload: bytes):
    """Send the model to every Dask worker once; tasks get a reference, not 'once per task' bytes.
    On a cluster started elsewhere (--dask-address), warn about workers whose logs would be lost."""
    import os

    from prefect import get_run_logger

    from infra.runtime import worker_api_problems

    ctx = FlowRunContext.get()
    client = getattr(ctx.task_runner, "client", None) if ctx else None
    if client is None:
        return payload
    if getattr(ctx.task_runner, "address", None):
        for line in worker_api_problems(client, os.environ.get("PREFECT_API_URL")):
            get_run_logger().warning("score: %s", line)
    return client.scatter(payload, broadcast=True, hash=False)


def _gpu_annotation():
    if gpu_count():
        import dask

        return dask.annotate(resources={"GPU": 1})
    return contextlib.nullcontext()


def campaign_pending(store_url: str, name: str, version: int) -> bool:
    """Whether `score_flow` has anything to do (new rows, or chunks without their done flag)."""
    from infra.errors import StoreError

    store = SurveyStore.open(store_url)
    try:
        t = store.score_table(name, version)
    except StoreError:
        return store.n > 0
    return t.n < store.n or bool(t.pending_chunks())


def run_campaign(store_url: str, name: str, version: int, settings: Settings, in_process: bool = False) -> dict:
    """`score_flow` on a Dask cluster when there is work, on the plain runner (no cluster start-up) when
    not, or with `in_process`: chunks in threads of this process, for a survey of a few chunks, which
    is scored before a local cluster has started its workers (~10-15 s on 2 cores)."""
    from infra.runtime import task_runner

    pending = campaign_pending(store_url, name, version)
    f = score_flow.with_options(task_runner=task_runner(settings)) if pending and not in_process else score_flow
    return f(store_url, name, version, settings.model_dump(mode="json"))
