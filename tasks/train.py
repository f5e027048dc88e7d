"""Train a Detector on a store, evaluate it, register it in MLflow."""

from __future__ import annotations

import dataclasses
import hashlib
import platform
import warnings

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff
from tqdm.auto import tqdm

from gsafe_models.detector import Detector, DetectorConfig
from gsafe_models.training import unpack_batch
from gsafe_models.metrics import per_class_report
from infra import tracking
from infra.batches import StoreBatches, split_rows
from infra.settings import Settings
from infra.store import SurveyStore

__all__ = ["store_splits", "reviewed_departures", "calibration_rows", "training_plan", "fit_detector_task", "evaluate_task", "register_task",
           "REVIEW_FOLDS", "SMALL_CALIBRATION"]

#: The cross-fitted calibration folds a detector gets when review labels leave objects out of its
#: calibration (`training_plan`): a label-trimmed calibration split of ~450 objects lists more than
#: its FDR allows, one cross-fitted over the training objects holds it (BENCHMARKS.md, "reviewed").
REVIEW_FOLDS = 3

#: Below this many calibration objects, `training_plan` cross-fits the calibration too (with
#: `REVIEW_FOLDS` folds): a split this small leaves most of a list's p-values (below 1/(n+1)) to a
#: tail model fitted on ~10 values. On 400-cutout surveys (~60 calibration objects, 16 seeds) normal
#: objects got p <= 1e-3 at 2.8x nominal and p <= 1e-4 at 11x, and the lists' mean FDP was 0.088 at
#: q = 0.1; cross-fitted, 0.6x, 0x and 0.063 (`bench/validity.py --train 400 --test 400`;
#: BENCHMARKS.md, "Small surveys"). 120 was pre-registered as the limit should splits of ~150 pass; they did.
SMALL_CALIBRATION = 120


def store_splits(store_url: str) -> dict[str, np.ndarray]:
    store = SurveyStore.open(store_url)
    return split_rows(store.read_catalog(["id_hash"])["id_hash"])


def reviewed_departures(store_url: str) -> np.ndarray:
    """Rows whose latest review label says they are not normal objects (`interesting` or `artefact`)."""
    from infra import labels as lab

    store = SurveyStore.open(store_url)
    if lab.TABLE not in store.tables():
        return np.zeros(0, np.int64)
    latest = lab.latest_labels(store)
    departed = set(latest["object_id"][latest["label"].isin(["interesting", "artefact"])])
    if not departed:
        return np.zeros(0, np.int64)
    return np.flatnonzero(np.isin(np.asarray(store.object_ids()).astype(str), sorted(departed)))


def calibration_rows(store_url: str, calibration_folds: int = 0) -> np.ndarray:
    """The store rows a detector trained on `store_url` was calibrated on, as far as the store says
    now: its calib split, and the train split too when the calibration was cross-fitted
    (`calibration_folds` ≥ 2, as ``Detector.config.calibration_folds``), less what review labels
    leave out (`reviewed_departures`). Objects ingested after training that fall in those splits are
    included: the next training calibrates on them.

    Why a scientist reviews these: every anomaly left in a calibration split raises the bar every
    test object must pass, so a few contaminants on its top can empty a list (BENCHMARKS.md,
    "`combination="exposure"`"); `gsafe review --calibration` shows them first."""
    split = store_splits(store_url)
    rows = np.union1d(split["calib"], split["train"]) if calibration_folds else split["calib"]
    return np.setdiff1d(rows, reviewed_departures(store_url))


def review_folds(config: dict) -> int:
    """The calibration folds `gsafe train` with `config` (the fields a user sets) plans once a review
    has labelled a departure (`training_plan`): the config's own where it sets them, else
    `REVIEW_FOLDS` where its statistics' models can be cross-fitted (no `fit_trim`, no statistic that
    reads the representation), else 0."""
    from gsafe_models.registry import reads_representation

    cfg = DetectorConfig(**config)
    if "calibration_folds" in config:
        return cfg.calibration_folds
    return REVIEW_FOLDS if cfg.fit_trim == 0 and not reads_representation(cfg.statistics) else 0


def review_calibration_rows(store_url: str, config: DetectorConfig) -> np.ndarray:
    """The rows `gsafe review --calibration` offers for a model fitted with `config`: the objects the
    next `gsafe train` calibrates on once the review has labelled a departure (`calibration_rows`).
    A model that is not cross-fitted but can be (`review_folds`) is calibrated on its calib split, yet
    its successor on the calib and train splits: a review of the calib split alone leaves the train
    split's anomalies in the next calibration (on a simulated tile, one round of 50 such looks left
    every next-tile list empty; BENCHMARKS.md, "Reviewed models on the next tile"). A model does not
    record which fields its user set, so one trained with `calibration_folds=0` asked is offered the
    train split too: harmless looks if the next training asks for 0 again."""
    folds = config.calibration_folds or review_folds({"statistics": tuple(config.statistics), "fit_trim": config.fit_trim})
    return calibration_rows(store_url, folds)


def training_plan(store_url: str, config: dict, small_calibration: int | None = None) -> tuple[dict, np.ndarray]:
    """The config a Detector is fitted with on this store, and the rows it leaves out.

    A small store (a calibration split under `small_calibration` objects, default
    `SMALL_CALIBRATION`) gets a cross-fitted calibration (`REVIEW_FOLDS` folds) unless the config
    sets `calibration_folds`; where it cannot have one, a warning says that its smallest p-values
    rest on a tail model fitted to few values.

    What a scientist labelled `interesting` or `artefact` is not a normal object: it leaves every
    split, so the representation, the statistics' models and the calibration learn "normal" without
    it and the next hunt's p-values are no longer diluted by it (label-trimming, Bashari, Sesia &
    Romano, ICML 2025, arXiv:2502.04807). Where that happens, the calibration is cross-fitted over
    the training objects (`calibration_folds` = `REVIEW_FOLDS`, unless the config sets it, asks for
    `fit_trim`, which cross-fitting refuses, or its statistics read the representation), which keeps the realised FDR at or below q once the split
    is cleaner (BENCHMARKS.md)."""
    from gsafe_models.registry import reads_representation

    leave_out = reviewed_departures(store_url)
    config = dict(config)
    cfg = DetectorConfig(**config)
    n_calib = len(np.setdiff1d(store_splits(store_url)["calib"], leave_out))
    limit = SMALL_CALIBRATION if small_calibration is None else small_calibration
    small = n_calib < limit
    if (len(leave_out) or small) and "calibration_folds" not in config and review_folds(config):
        config["calibration_folds"] = REVIEW_FOLDS
    if small and not config.get("calibration_folds"):
        rep = reads_representation(cfg.statistics)
        why = ("calibration_folds=0 was asked" if "calibration_folds" in config else
               f"fit_trim={cfg.fit_trim} rules out cross-fitting (set it to 0)" if cfg.fit_trim else
               f"{', '.join(rep)} read{'s' if len(rep) == 1 else ''} the representation, which cannot be cross-fitted "
               f"(train without {'it' if len(rep) == 1 else 'them'})")
        warnings.warn(f"gsafe train: {store_url} has {n_calib} calibration objects, fewer than "
                      f"{limit}, and {why}: p-values "
                      f"below 1/{n_calib + 1} rest on a tail model fitted to a few values, so a list may hold more "
                      f"normal objects than its FDR says; ingest more objects, or let the calibration be cross-fitted",
                      stacklevel=2)
    return config, leave_out


@task(name="fit-detector", cache_policy=NO_CACHE)
def fit_detector_task(store_url: str, config: dict, settings: dict, run_id: str | None = None,
                      leave_out: np.ndarray | None = None) -> bytes:
    """Stream the store's train split through Detector.fit; returns the Detector's bytes.

    `leave_out`: rows that enter no split; None reads `training_plan` (the review's labels), which
    may also set the config's `calibration_folds`."""
    s = Settings(**settings)
    if leave_out is None:
        config, leave_out = training_plan(store_url, config)
    cfg = DetectorConfig(**config)
    store = SurveyStore.open(store_url)
    split = {k: np.setdiff1d(v, leave_out) for k, v in store_splits(store_url).items()}
    # with the store's pixel variances, where it has them: the noise model uses them
    train = StoreBatches(store_url, split["train"], cfg.batch_size, shuffle=True, seed=cfg.seed, variance=True)
    # combination="exposure" computes the statistics on the val split: with the variances the calibration has
    val = StoreBatches(store_url, split["val"], cfg.batch_size, variance=cfg.combination == "exposure")
    calib = StoreBatches(store_url, split["calib"], cfg.batch_size, variance=True)
    bar = tqdm(total=cfg.epochs, desc="train", unit="epoch", disable=not s.progress)

    def progress(event: dict) -> None:
        if "epoch" in event:
            bar.update(1)
            bar.set_postfix({k: f"{v:.4g}" for k, v in event.items() if isinstance(v, float)})
            if run_id:
                tracking.log_metrics({k: v for k, v in event.items() if k != "epoch"}, run_id=run_id,
                                     step=int(event["epoch"]))
        elif event.get("stage"):
            bar.set_description(f"train: {event['stage']}")

    det = Detector.fit(train, calib, config=cfg, val=val, bands=store.bands, progress=progress)
    det.diagnostics["reviewed_left_out"] = int(len(leave_out))
    bar.close()
    return det.to_bytes()


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_task(store_url: str, payload: bytes, rows: np.ndarray | None = None) -> dict[str, float]:
    """Detection metrics on labelled rows (the val split by default) and the calibration diagnostics.

    With `combination="exposure"` the trees learned "normal" from the val split's objects, so val metrics
    on it are in-sample for the combination (optimistic): `val_seen_by_combination` is then 1."""
    det = Detector.from_bytes(payload)
    metrics = {f"calibration_{k}" if not k.startswith("calibration") else k: float(v)
               for k, v in det.diagnostics.items() if isinstance(v, (int, float))}
    if rows is None and det.config.combination == "exposure":
        metrics["val_seen_by_combination"] = 1.0
    store = SurveyStore.open(store_url)
    if "label" not in store.columns:
        return metrics
    rows = store_splits(store_url)["val"] if rows is None else rows
    cat = store.read_catalog(["label", "anomaly_class"])
    lab = cat["label"][rows]
    keep = lab >= 0
    if keep.sum() == 0 or len(set(lab[keep])) < 2:
        return metrics
    rows = rows[keep]
    scores = np.concatenate([det.score(x, q_values=False, variance=v)["score"]
                             for x, v in map(unpack_batch, StoreBatches(store_url, rows, 1024, variance=True)())])
    rep = per_class_report(scores, cat["label"][rows], cat["anomaly_class"][rows])
    metrics["val_auroc"] = rep["all"]["auroc"]
    metrics["val_ap"] = rep["all"]["ap"]
    for c, r in rep.items():
        if c != "all":
            metrics[f"val_auroc_{c}"] = r["auroc"]
    return metrics


@task(name="register", retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=2), cache_policy=NO_CACHE)
def register_task(payload: bytes, name: str, store_url: str, metrics: dict) -> int:
    """Log the Detector as a pyfunc model version of `name` (alias challenger)."""
    det = Detector.from_bytes(payload)
    example = np.zeros((2, *det.image_shape), np.float32)
    sig = tracking.detector_signature(example, det.score(example, q_values=True))
    tags = {"gsafe.store": store_url, "gsafe.sha256": hashlib.sha256(payload).hexdigest(),
            "gsafe.statistics": ",".join(det.statistic_names), "gsafe.bands": ",".join(det.bands),
            "gsafe.image_shape": ",".join(str(x) for x in det.image_shape),
            **{f"metric.{k}": f"{v:.5g}" for k, v in metrics.items()}}
    return tracking.log_detector(payload, name=name, python_model=tracking.DetectorPyfunc(),
                                 signature=sig, pip_requirements=tracking.PIP_REQUIREMENTS, tags=tags)


def config_params(config: dict) -> dict:
    """DetectorConfig as flat MLflow params."""
    cfg = dataclasses.asdict(DetectorConfig(**config))
    return {k: (",".join(map(str, v)) if isinstance(v, (list, tuple)) else v) for k, v in cfg.items()} | {
        "python": platform.python_version()}
