"""Score one store chunk with one Detector version; finish a campaign with survey-wide q-values."""

from __future__ import annotations

import hashlib
import logging
import os
import socket

import numpy as np
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from gsafe_models.calibration import bh_qvalues
from gsafe_models.detector import Detector
from gsafe_models.uniformity import drift_check
from infra import tracking
from infra.errors import UsageError
from infra.store import ScoreTable, SurveyStore

__all__ = ["load_detector", "load_payload_task", "prepare_campaign_task", "score_chunk_task", "finalize_campaign_task",
           "drift_task", "null_calibration_size", "batch_keys", "fit_problem", "check_model_fits_store"]

log = logging.getLogger("gsafe.score")
_DETECTORS: dict[str, Detector] = {}   # per worker process: a model is deserialised once, not once per chunk


def load_detector(payload: bytes, device: str | None = None) -> Detector:
    key = hashlib.sha256(payload).hexdigest()
    if key not in _DETECTORS:
        _DETECTORS.clear()
        det = Detector.from_bytes(payload)
        _DETECTORS[key] = det.to(device) if device else det
    return _DETECTORS[key]


@task(name="load-model", retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=2), cache_policy=NO_CACHE)
def load_payload_task(name: str, version: int) -> bytes:
    return tracking.download_detector(tracking.ModelRef(name, version))


@task(name="prepare-campaign", cache_policy=NO_CACHE)
def prepare_campaign_task(store_url: str, name: str, version: int, statistics: list[str]) -> list[int]:
    """Create or grow `scores/<name>/<version>` to the store's rows; returns the chunks still to do."""
    store = SurveyStore.open(store_url, mode="r+")
    table = store.score_table(name, version, statistics, create=True)
    table.ensure_rows()     # to the rows committed now, read under the store's lock
    return table.pending_chunks()


@task(name="score-chunk", retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=2), cache_policy=NO_CACHE)
def score_chunk_task(store_url: str, name: str, version: int, chunk: int, payload: bytes, threads: int = 1) -> int:
    """Read chunk `chunk`, score it, write its region of the table and mark it done. Idempotent.

    A chunk that gained rows while it was scored (an ingest and another campaign alongside) is
    written but left pending: the next campaign scores it whole."""
    import torch

    torch.set_num_threads(threads)
    store = SurveyStore.open(store_url, mode="r+")
    table = store.score_table(name, version)
    start, stop = chunk * store.chunk_size, min((chunk + 1) * store.chunk_size, table.n)
    det = load_detector(payload, "cuda" if torch.cuda.is_available() else None)
    out = det.score(store.read_images(start, stop), q_values=False, variance=store.read_variance(start, stop))
    done = table.write_chunk(chunk, {k: v for k, v in out.items() if k in table.group})
    get_run_logger().info("chunk %d: %d cutouts scored on %s pid %d%s", chunk, stop - start, socket.gethostname(),
                          os.getpid(), "" if done else " (the chunk grew meanwhile: left for the next round)")
    return stop - start


@task(name="finalize-campaign", retries=2, cache_policy=NO_CACHE)
def finalize_campaign_task(store_url: str, name: str, version: int) -> dict:
    """Benjamini–Hochberg q-values over every scored object of the store."""
    store = SurveyStore.open(store_url, mode="r+")
    table = store.score_table(name, version)
    if table.pending_chunks():
        raise RuntimeError(f"campaign {name}/{version} on {store_url}: chunks {table.pending_chunks()[:5]} not done")
    p = table.read(["p_value"])["p_value"]
    table.write_column("q_value", bh_qvalues(p))
    table.group.attrs["q_rows"] = table.n
    return {"n": table.n}


def _generic(bands) -> bool:
    """Band names a store gets when its source does not name them (b0, b1... / band0, band1...)."""
    import re

    return all(re.fullmatch(r"b(and)?\d+", b) for b in bands)


def fit_problem(bands, image_shape, store: SurveyStore, model: str) -> str | None:
    """Why a detector of `bands` and `image_shape` (B, H, W) cannot score `store`, in one line, or None."""
    bands, shape = tuple(bands), tuple(int(x) for x in image_shape)
    same_names = bands == store.bands or _generic(bands) or _generic(store.bands)
    if shape == store.image_shape and same_names:
        return None
    def says(b, sh):
        return f"{len(b)} bands ({','.join(b)}), {sh[1]}×{sh[2]} px"
    return (f"model {model} was trained on {says(bands, shape)}; store {store.url} holds {says(store.bands, store.image_shape)}: "
            f"score stores of the survey it was trained on, or train a model on this one (`gsafe train --store {store.url}`)")


def check_model_fits_store(ref: tracking.ModelRef, store_url: str) -> None:
    """Raise `UsageError` before any work if model `ref` cannot score the store (bands, cutout size)."""
    tags = tracking.version_tags(ref.name, ref.version)
    if "gsafe.bands" in tags and "gsafe.image_shape" in tags:
        bands, shape = tags["gsafe.bands"].split(","), tags["gsafe.image_shape"].split(",")
    else:   # registered before these tags: the detector itself says
        det = load_detector(tracking.download_detector(ref))
        bands, shape = det.bands, det.image_shape
    problem = fit_problem(bands, shape, SurveyStore.open(store_url), str(ref))
    if problem:
        raise UsageError(problem)


def null_calibration_size(name: str, version: int) -> float | None:
    """The calibration size behind a version's combined p-values (for the KS yardstick), or None."""
    n_calib = float(tracking.version_tags(name, version).get("metric.calibration_n", "nan"))
    # a two-stage combined p-value is conformalised on half of the calibration split (see
    # CombinedTest); taking half for every rule errs on the lenient side for the others
    return n_calib / 2 if n_calib == n_calib else None


def batch_keys(sources: np.ndarray, n_min: int = 50) -> np.ndarray:
    """The batch of each object for the drift alarm: its source (a tile, an .npy) when that source
    holds at least `n_min` of the objects, else the source's directory (a night's cutouts)."""
    import os

    src = np.asarray(sources, dtype=object).astype(str)
    names, inverse, counts = np.unique(src, return_inverse=True, return_counts=True)
    keys = np.array([n if c >= n_min else (os.path.dirname(n) or n) for n, c in zip(names, counts)], dtype=object)
    return keys[inverse]


@task(name="drift-check", cache_policy=NO_CACHE)
def drift_task(store_url: str, name: str, version: int, start: int, stop: int) -> dict:
    """The drift alarm over rows [start, stop) of campaign `name`/`version` (the hunt's new objects):
    combined and per-statistic p-values against the uniform, overall and per input batch."""
    store = SurveyStore.open(store_url)
    table = store.score_table(name, version)
    stats = table.statistics
    cols = table.read(["p_value"] + [f"p_{s}" for s in stats], start, stop)
    sources = store.read_catalog(["source"], start, stop)["source"]
    return drift_check(cols["p_value"], batch_keys(sources), null_calibration_size(name, version),
                       statistics={s: cols[f"p_{s}"] for s in stats})


def read_scores(store: SurveyStore, table: ScoreTable) -> "pandas.DataFrame":  # noqa: F821
    """The campaign's score table with object ids, most anomalous first."""
    import pandas as pd

    cols = table.read()
    stats = table.statistics
    df = pd.DataFrame({"object_id": store.object_ids().astype(str)[: table.n],
                       "score": cols["score"], "p_value": cols["p_value"], "q_value": cols["q_value"]}
                      | {s: cols[f"stat_{s}"] for s in stats} | {f"p_{s}": cols[f"p_{s}"] for s in stats})
    return df.sort_values("score", ascending=False, kind="stable").reset_index(drop=True)
