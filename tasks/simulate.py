"""Simulate a survey into a store or a directory of FITS cutouts, blocks generated in parallel processes."""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Iterator

import numpy as np
from prefect import task
from tqdm.auto import tqdm

from gsafe_models.simulate import ANOMALY_CLASSES, SimulatedBatch, simulate_batch
from infra.settings import Settings
from infra.store import SurveyStore
from infra.truth import truth_path_for, write_fits_cutouts, write_truth

__all__ = ["simulate_survey", "simulate_task"]

BLOCK = 256


def _blocks(n: int, seed: int, frac: float, classes: tuple[str, ...], bands: tuple[str, ...], size: int,
            scale: float, workers: int) -> Iterator[SimulatedBatch]:
    """Blocks of the survey in index order; at most 2×workers blocks in flight (flat memory)."""
    starts = list(range(0, n, BLOCK))
    kw = dict(seed=seed, anomaly_frac=frac, classes=classes, bands=bands, size=size, pixel_scale=scale)
    if workers <= 1 or len(starts) == 1:
        for s in starts:
            yield simulate_batch(s, min(BLOCK, n - s), **kw)
        return
    with ProcessPoolExecutor(workers) as ex:
        pending = []
        for s in starts:
            pending.append(ex.submit(simulate_batch, s, min(BLOCK, n - s), **kw))
            if len(pending) >= 2 * workers:
                yield pending.pop(0).result()
        for f in pending:
            yield f.result()


def simulate_survey(n: int, *, settings: Settings, seed: int = 0, anomaly_frac: float = 0.05,
                    store: str | None = None, fits_dir: str | None = None,
                    classes: tuple[str, ...] = ANOMALY_CLASSES, workers: int | None = None) -> dict:
    """Write `n` simulated objects to `store` (labels in the catalog, footprints in aux) or to
    `fits_dir` (one FITS cube each, truth table beside the directory). Same seed, same survey."""
    if (store is None) == (fits_dir is None):
        raise ValueError("simulate: give exactly one of store= or fits_dir=")
    bands, size, scale = tuple(settings.bands), settings.cutout_size, settings.pixel_scale
    workers = workers or os.cpu_count() or 1
    out = None
    if store is not None:
        out = SurveyStore.create(store, bands=bands, height=size, width=size, pixel_scale=scale,
                                 chunk_size=settings.chunk_size,
                                 provenance={"simulate": {"n": n, "seed": seed, "anomaly_frac": anomaly_frac,
                                                          "classes": list(classes)}})
    truth = truth_path_for(fits_dir) if fits_dir else None
    truth_blocks: list[dict] = []
    n_anom = 0
    buf: list[SimulatedBatch] = []
    bar = tqdm(total=n, desc="simulate", unit="cutout", disable=not settings.progress)
    for b in _blocks(n, seed, anomaly_frac, classes, bands, size, scale, workers):
        n_anom += int(b.label.sum())
        if out is not None:
            buf.append(b)
            if sum(len(x.label) for x in buf) >= settings.chunk_size:
                _flush(out, buf)
                buf = []
        else:
            write_fits_cutouts(fits_dir, b.images, b.object_id, b.ra, b.dec, bands, scale, settings.objid_key)
            truth_blocks.append({"object_id": b.object_id.astype(str), "label": b.label.astype(np.int16),
                                 "anomaly_class": b.anomaly_class.astype(str), "ra": b.ra, "dec": b.dec,
                                 "footprint": b.footprint})
        bar.update(len(b.label))
    bar.close()
    if out is not None and buf:
        _flush(out, buf)
    if truth is not None:   # written once, last: its presence means the cutout directory is complete
        write_truth(truth, {k: np.concatenate([t[k] for t in truth_blocks]) for k in truth_blocks[0]})
    return {"n": n, "anomalies": n_anom, "store": store, "fits_dir": fits_dir,
            "truth": str(truth) if truth else None}


def _flush(store: SurveyStore, blocks: list[SimulatedBatch]) -> None:
    cat = lambda f: np.concatenate([getattr(b, f) for b in blocks])  # noqa: E731
    store.append(cat("images"),
                 {"object_id": cat("object_id"), "ra": cat("ra"), "dec": cat("dec"),
                  "source": np.full(sum(len(b.label) for b in blocks), "simulate", dtype=object),
                  "label": cat("label").astype(np.int8), "anomaly_class": cat("anomaly_class").astype(object)},
                 aux={"footprint": cat("footprint").astype(np.uint8)})


@task(name="simulate", retries=1)
def simulate_task(n: int, settings: dict, seed: int, anomaly_frac: float, store: str | None = None,
                  fits_dir: str | None = None) -> dict:
    return simulate_survey(n, settings=Settings(**settings), seed=seed, anomaly_frac=anomaly_frac,
                           store=store, fits_dir=fits_dir)
