"""Train: store → representation + densities + calibration → a registered Detector version (alias challenger)."""

from __future__ import annotations

from prefect import flow

from infra import tracking
from infra.settings import Settings
from tasks.train import (calibration_rows, config_params, evaluate_task, fit_detector_task, register_task, review_folds,
                         training_plan)

__all__ = ["train_flow"]


@flow(name="train", log_prints=False)
def train_flow(store_url: str, name: str, config: dict, settings: dict) -> dict:
    """Train a Detector on the train split of `store_url` (early stopping on the val split, calibration
    on the calib split), evaluate it on the val split, and register it as a new version of model `name`
    with alias `challenger`; the MLflow run holds the config, per-epoch losses and metrics. Objects the
    review labelled `interesting` or `artefact` are left out of every split (`training_plan`).
    `review_pool`: how many objects the next training calibrates on once a review has labelled a
    departure, those `gsafe review --calibration` offers."""
    s = Settings(**settings)
    tracking.check_model_name(name)          # before hours of training, not at registration
    tracking.configure(s)
    asked = config
    config, leave_out = training_plan(store_url, config)
    params = config_params(config) | {"store": store_url, "model": name, "reviewed_left_out": int(len(leave_out))}
    with tracking.run(store_url, s, f"train-{name}", params=params) as run_id:
        payload = fit_detector_task(store_url, config, settings, run_id=run_id, leave_out=leave_out)
        metrics = evaluate_task(store_url, payload)
        tracking.log_metrics(metrics)
        version = register_task(payload, name, store_url, metrics)
    pool = calibration_rows(store_url, config.get("calibration_folds") or review_folds(asked))
    return {"name": name, "version": version, "run_id": run_id, "metrics": metrics, "review_pool": int(len(pool))}
