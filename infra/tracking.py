"""MLflow: tracking URI, one experiment per store, the Detector as a registered model version, aliases.

Model references accepted everywhere: ``NAME`` (latest version), ``NAME@alias`` and ``NAME/version``.
A reference is resolved to a version number once, when a command starts, so a run that names
``NAME@champion`` keeps using that version even if the alias moves while it runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

from infra.errors import ModelRefError, TrackingError
from infra.settings import Settings

__all__ = ["ModelRef", "configure", "experiment_for_store", "parse_ref", "resolve", "log_detector",
           "download_detector", "set_alias", "get_alias_version", "set_version_tags", "version_tags",
           "run", "log_metrics", "log_artifacts", "log_run", "same_store"]

log = logging.getLogger("gsafe.tracking")
DETECTOR_FILE = "detector.pt"
_REF = re.compile(r"^(?P<name>[A-Za-z0-9_.\-]+)(?:@(?P<alias>[A-Za-z0-9_\-]+)|/(?P<version>\d+))?$")


@dataclass(frozen=True)
class ModelRef:
    """A resolved model: registered name and version number (and the alias it was reached through)."""

    name: str
    version: int
    alias: str | None = None

    def __str__(self) -> str:
        return f"{self.name}/{self.version}" + (f" (@{self.alias})" if self.alias else "")


def configure(settings: Settings) -> str:
    """Point MLflow at the user's server or at SQLite under `settings.home`; returns the URI."""
    import mlflow

    uri = settings.tracking_uri
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    if uri.startswith("http"):
        _check_reachable(uri)
    return uri


def _check_reachable(uri: str) -> None:
    import urllib.request

    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5).read()
    except Exception as e:  # noqa: BLE001 - any failure means the same to the user
        raise TrackingError(
            f"MLflow tracking server {uri} is unreachable ({type(e).__name__}: {e}); "
            f"check MLFLOW_TRACKING_URI, or unset it to track locally under GSAFE_HOME") from e


def experiment_for_store(store_url: str, settings: Settings) -> str:
    """The experiment of a store (one per store), created on first use; returns its id."""
    import mlflow

    name = f"gsafe:{_store_key(store_url)}"
    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    kw = {} if (settings.mlflow_tracking_uri or "").startswith("http") else {"artifact_location": settings.artifact_root}
    try:
        return mlflow.create_experiment(name, tags={"gsafe.store": str(store_url)}, **kw)
    except Exception:  # created meanwhile by another process
        return mlflow.get_experiment_by_name(name).experiment_id


def _store_key(store_url: str) -> str:
    url = str(store_url)
    if "://" not in url:
        url = str(Path(url).resolve())
    stem = Path(url.rstrip("/")).name
    return f"{stem}-{hashlib.sha1(url.encode()).hexdigest()[:8]}"


def same_store(a: str, b: str) -> bool:
    """Whether two store URLs name the same store (local paths compared resolved)."""
    return _store_key(a) == _store_key(b)


def check_model_name(name: str) -> str:
    """`name` if references can name it (``NAME``, ``NAME@alias``, ``NAME/version``), else `ModelRefError`."""
    m = _REF.match(name)
    if not m or m.group("alias") or m.group("version"):
        raise ModelRefError(f"model name {name!r}: use letters, digits, '.', '_' and '-' only (it is named later as "
                            f"NAME, NAME@alias or NAME/version), e.g. {re.sub(r'[^A-Za-z0-9_.-]+', '_', name) or 'my_model'!r}")
    return name


def parse_ref(ref: str) -> tuple[str, str | None, int | None]:
    """``NAME[@alias|/version]`` -> (name, alias, version)."""
    m = _REF.match(ref.strip())
    if not m:
        raise ModelRefError(f"model reference {ref!r}: expected NAME, NAME@alias or NAME/version")
    v = m.group("version")
    return m.group("name"), m.group("alias"), int(v) if v else None


def resolve(ref: str) -> ModelRef:
    """Resolve a reference to a fixed version, once."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    name, alias, version = parse_ref(ref)
    client = MlflowClient()
    try:
        if alias:
            mv = client.get_model_version_by_alias(name, alias)
            return ModelRef(name, int(mv.version), alias)
        if version is not None:
            client.get_model_version(name, str(version))
            return ModelRef(name, version)
        versions = client.search_model_versions(f"name='{name}'")
    except MlflowException as e:
        raise ModelRefError(f"model {ref!r}: not found in the registry at {_uri()} "
                            f"({e.message.splitlines()[0]}); train one with `gsafe train --model {name}`") from e
    if not versions:
        raise ModelRefError(f"model {ref!r}: no registered versions at {_uri()}; train one with `gsafe train --model {name}`")
    return ModelRef(name, max(int(v.version) for v in versions))


def _uri() -> str:
    import mlflow

    return mlflow.get_tracking_uri()


def find_version(name: str, sha256: str) -> int | None:
    """The version of `name` registered with these exact Detector bytes (tag ``gsafe.sha256``), or None."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        versions = MlflowClient().search_model_versions(f"name='{name}'")
    except MlflowException:
        return None
    hits = [int(v.version) for v in versions if (v.tags or {}).get("gsafe.sha256") == sha256]
    return min(hits) if hits else None


def log_detector(payload: bytes, *, name: str, python_model: Any, signature: Any,
                 pip_requirements: list[str], tags: Mapping[str, str] | None = None) -> int:
    """Log the Detector (its bytes as an artifact of a pyfunc model) in the active run and
    register it as a new version of `name` with alias ``challenger``; returns the version.

    Idempotent: the version is created with its tags (``gsafe.sha256`` of the bytes) in one call,
    and a version already registered with the same bytes is reused, so a retried registration
    (a lost connection after the server created the version) never makes a duplicate.
    """
    import io
    import warnings

    import mlflow
    from mlflow import MlflowClient

    tags = {"gsafe.sha256": hashlib.sha256(payload).hexdigest(), **(tags or {})}
    existing = find_version(name, tags["gsafe.sha256"])
    if existing is not None:
        log.info("model %s: these bytes are version %d already; not registered again", name, existing)
        MlflowClient().set_registered_model_alias(name, "challenger", str(existing))
        return existing
    quiet = not logging.getLogger("mlflow").isEnabledFor(logging.INFO)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(), \
            contextlib.redirect_stderr(io.StringIO()) if quiet else contextlib.nullcontext():
        warnings.simplefilter("ignore")   # mlflow's advice on type hints / cloudpickle / input examples
        path = Path(tmp) / DETECTOR_FILE
        path.write_bytes(payload)
        info = mlflow.pyfunc.log_model(name="detector", python_model=python_model,
                                       artifacts={"detector": str(path)}, signature=signature,
                                       pip_requirements=pip_requirements)
        mv = mlflow.register_model(info.model_uri, name, await_registration_for=60,
                                   tags={k: str(v) for k, v in tags.items()})
    version = int(mv.version)
    MlflowClient().set_registered_model_alias(name, "challenger", str(version))
    return version


@contextlib.contextmanager
def run(store_url: str, settings: Settings, run_name: str, *, tags: Mapping[str, Any] | None = None,
        params: Mapping[str, Any] | None = None) -> Iterator[str]:
    """A run in the store's experiment, active inside the block (models logged there belong to it),
    with these tags and params; yields its id."""
    import mlflow

    exp = experiment_for_store(store_url, settings)
    with mlflow.start_run(experiment_id=exp, run_name=run_name,
                          tags={k: str(v)[:5000] for k, v in (tags or {}).items()}) as active:
        if params:
            mlflow.log_params(dict(params))
        yield active.info.run_id


def log_metrics(metrics: Mapping[str, float], *, run_id: str | None = None, step: int | None = None,
                finite_only: bool = False) -> None:
    """Log numeric `metrics` (other values are left out) to the active run, or to run `run_id`
    from anywhere (a task's progress callback); `finite_only` leaves out NaN and infinities."""
    import mlflow

    values = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if finite_only:
        values = {k: v for k, v in values.items() if math.isfinite(v)}
    if not values:
        return
    if run_id is None:
        mlflow.log_metrics(values, step=step)
        return
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    MlflowClient().log_batch(run_id, metrics=[Metric(k, v, now, step or 0) for k, v in values.items()])


def log_artifacts(local_dir: str | Path, artifact_path: str | None = None) -> None:
    """Log the files under `local_dir` to the active run (under `artifact_path`)."""
    import mlflow

    mlflow.log_artifacts(str(local_dir), artifact_path=artifact_path)


def log_run(store_url: str, settings: Settings, run_name: str, *, tags: Mapping[str, Any],
            metrics: Mapping[str, float]) -> str:
    """One run in the store's experiment with these tags and (finite) metrics (e.g. a hunt); returns its id."""
    with run(store_url, settings, run_name, tags=tags) as run_id:
        log_metrics(metrics, finite_only=True)
        return run_id


def download_detector(ref: ModelRef) -> bytes:
    """The Detector bytes of a registered version."""
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{ref.name}/{ref.version}", dst_path=tmp)
        found = list(Path(local).rglob(DETECTOR_FILE))
        if not found:
            raise ModelRefError(f"model {ref}: no {DETECTOR_FILE} among its artifacts; was it logged by gsafe?")
        return found[0].read_bytes()


def set_alias(name: str, alias: str, version: int) -> None:
    from mlflow import MlflowClient

    MlflowClient().set_registered_model_alias(name, alias, str(version))


def get_alias_version(name: str, alias: str) -> int | None:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        return int(MlflowClient().get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def set_version_tags(name: str, version: int, tags: Mapping[str, Any]) -> None:
    from mlflow import MlflowClient

    client = MlflowClient()
    for k, v in tags.items():
        client.set_model_version_tag(name, str(version), k, str(v))


def version_tags(name: str, version: int) -> dict[str, str]:
    from mlflow import MlflowClient

    return dict(MlflowClient().get_model_version(name, str(version)).tags)


def run_id_of(name: str, version: int) -> str | None:
    from mlflow import MlflowClient

    return MlflowClient().get_model_version(name, str(version)).run_id


PIP_REQUIREMENTS = ["torch==2.13.0", "numpy==2.4.6", "scipy==1.17.1", "zuko==1.6.0", "pandas==3.1.1"]


def detector_signature(example, output: Mapping[str, Any]):
    """The model signature: (n, B, H, W) float32 images in, one row of score columns out."""
    import pandas as pd
    from mlflow.models import infer_signature

    return infer_signature(example, pd.DataFrame({k: v for k, v in output.items()}))


import mlflow.pyfunc as _pyfunc  # noqa: E402


class DetectorPyfunc(_pyfunc.PythonModel):
    """MLflow pyfunc face of a Detector: `predict(images)` -> the score table of those images.

    The Detector class is named by its import path so that infra/ does not import the science layer.
    """

    loader = "gsafe_models.detector:Detector"
    # `predict` takes (n, B, H, W) arrays, which mlflow's type-hint schemas cannot express (it warns at
    # class creation otherwise); the model signature is logged explicitly instead.
    _skip_type_hint_validation = True

    def load_context(self, context):
        import importlib

        mod, cls = self.loader.split(":")
        payload = Path(context.artifacts["detector"]).read_bytes()
        self.detector = getattr(importlib.import_module(mod), cls).from_bytes(payload)

    def predict(self, context, model_input, params=None):
        import numpy as np
        import pandas as pd

        return pd.DataFrame(self.detector.score(np.asarray(model_input, np.float32)))


def read_version_artifact(ref: ModelRef, filename: str) -> bytes | None:
    """An extra artifact stored beside a model version (in its training run), or None."""
    import mlflow
    from mlflow.exceptions import MlflowException

    run_id = run_id_of(ref.name, ref.version)
    if run_id is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=f"extras/{filename}", dst_path=tmp)
        except (MlflowException, OSError):
            return None
        return Path(path).read_bytes()


def write_version_artifact(ref: ModelRef, filename: str, payload: bytes) -> None:
    """Store an artifact beside a model version (e.g. its LEX selector, trained once per model)."""
    from mlflow import MlflowClient

    run_id = run_id_of(ref.name, ref.version)
    if run_id is None:
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / filename
        path.write_bytes(payload)
        MlflowClient().log_artifact(run_id, str(path), artifact_path="extras")


# ---- the scientist's labels and the relevance model (gsafe review, hunts that remember) ------------
RELEVANCE_FILE = "relevance.npz"


def log_labels(store_url: str, settings: Settings, name: str, version: int, digest: str, latest,
               relevance_state: bytes | None = None, files: Mapping[str, str] | None = None) -> str:
    """Log a labelling state to the store's experiment as one run tagged with the detector version it
    was made against (``gsafe.kind=labels``, ``gsafe.model``, ``gsafe.version``, ``gsafe.labels_digest``):
    counts per label as metrics, the latest labels as ``labels/labels.parquet``, the relevance state
    (feature space, GP, known groups; plain arrays) as ``labels/relevance.npz``, and any `files`
    (name -> local path, e.g. the CSV/Parquet exports). Returns the run id."""
    import mlflow

    exp = experiment_for_store(store_url, settings)
    counts = latest["label"].value_counts().to_dict() if len(latest) else {}
    with mlflow.start_run(experiment_id=exp, run_name=f"labels-{name}-{version}",
                          tags={"gsafe.kind": "labels", "gsafe.model": name, "gsafe.version": str(version),
                                "gsafe.labels_digest": digest, "gsafe.store": str(store_url)}) as run, \
            tempfile.TemporaryDirectory() as tmp:
        mlflow.log_metrics({"labels": float(len(latest))} | {f"labels_{k}": float(v) for k, v in counts.items()})
        path = Path(tmp) / "labels.parquet"
        latest.to_parquet(path, index=False)
        mlflow.log_artifact(str(path), artifact_path="labels")
        if relevance_state is not None:
            path = Path(tmp) / RELEVANCE_FILE
            path.write_bytes(relevance_state)
            mlflow.log_artifact(str(path), artifact_path="labels")
        for local in (files or {}).values():
            mlflow.log_artifact(str(local), artifact_path="labels")
        return run.info.run_id


def find_relevance(store_url: str, settings: Settings, name: str, version: int, digest: str | None = None) -> bytes | None:
    """The relevance state logged for detector `name`/`version` on this store (the latest one, or the
    one of labels `digest`), or None."""
    import mlflow
    from mlflow.exceptions import MlflowException

    exp = experiment_for_store(store_url, settings)
    query = f"tags.`gsafe.kind` = 'labels' and tags.`gsafe.model` = '{name}' and tags.`gsafe.version` = '{version}'"
    if digest:
        query += f" and tags.`gsafe.labels_digest` = '{digest}'"
    runs = mlflow.search_runs([exp], filter_string=query, order_by=["attributes.start_time DESC"], max_results=5,
                              output_format="list")
    for run in runs:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                path = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path=f"labels/{RELEVANCE_FILE}",
                                                           dst_path=tmp)
            except (MlflowException, OSError):
                continue
            return Path(path).read_bytes()
    return None
