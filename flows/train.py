"""Train: store → representation + densities + calibration → a registered Detector version (alias challenger)."""

from __future__ import annotations

from prefect import flow

from infra import tracking
from infra.settings import Settings
from tasks.train import config_params, evaluate_task, fit_detector_task, register_task

__all__ = ["train_flow"]


@flow(name="train", log_prints=False)
def train_flow(store_url: str, name: str, config: dict, settings: dict) -> dict:
    import mlflow

    s = Settings(**settings)
    tracking.check_model_name(name)          # before hours of training, not at registration
    tracking.configure(s)
    exp = tracking.experiment_for_store(store_url, s)
    with mlflow.start_run(experiment_id=exp, run_name=f"train-{name}") as run:
        mlflow.log_params(config_params(config) | {"store": store_url, "model": name})
        payload = fit_detector_task(store_url, config, settings, run_id=run.info.run_id)
        metrics = evaluate_task(store_url, payload)
        mlflow.log_metrics(metrics)
        version = register_task(payload, name, store_url, metrics)
    return {"name": name, "version": version, "run_id": run.info.run_id, "metrics": metrics}
