"""Real parts for the flow tests: one Prefect server (SQLite) for the session, MLflow on SQLite,
Zarr stores on disk, Dask LocalClusters with worker processes. Nothing of our stack is mocked."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

_HOME = Path(tempfile.mkdtemp(prefix="gsafe-flows-"))
os.environ["GSAFE_HOME"] = str(_HOME)
os.environ["PREFECT_HOME"] = str(_HOME / "prefect")
os.environ.pop("PREFECT_API_URL", None)
os.environ.pop("MLFLOW_TRACKING_URI", None)

from infra.settings import Settings  # noqa: E402

# Tiny surveys: 3 bands, 32×32 cutouts, chunks of 64 so campaigns have several chunks.
TINY = dict(home=_HOME, bands=("g", "r", "i"), cutout_size=32, chunk_size=64, progress=False, n_workers=2)
TINY_MODEL = dict(epochs=3, latent_dim=8, batch_size=64, seed=0)


@pytest.fixture(scope="session")
def tiny_model() -> dict:
    return dict(TINY_MODEL)


@pytest.fixture(scope="session")
def settings() -> Settings:
    from infra.runtime import configure_environment, ensure_prefect_server, stop_prefect_server

    s = Settings(**TINY)
    configure_environment(s)
    ensure_prefect_server(s)
    from infra import tracking

    tracking.configure(s)
    yield s
    stop_prefect_server()


@pytest.fixture(scope="session")
def sdict(settings) -> dict:
    return settings.model_dump(mode="json")


@pytest.fixture(scope="session")
def flows_ctx(settings):
    from infra.runtime import flow_context

    with flow_context():
        yield


@pytest.fixture(scope="session")
def train_store(settings, tmp_path_factory) -> str:
    """A labelled training survey (1 % anomalies, as real training sets are never clean)."""
    from tasks.simulate import simulate_survey

    url = str(tmp_path_factory.mktemp("train") / "train.zarr")
    simulate_survey(640, settings=settings, seed=1, anomaly_frac=0.02, store=url, workers=2)
    return url


@pytest.fixture(scope="session")
def valid_store(settings, tmp_path_factory) -> str:
    """A labelled validation survey (20 % anomalies)."""
    from tasks.simulate import simulate_survey

    url = str(tmp_path_factory.mktemp("valid") / "valid.zarr")
    simulate_survey(400, settings=settings, seed=2, anomaly_frac=0.2, store=url, workers=2)
    return url


@pytest.fixture(scope="session")
def trained(train_store, sdict, flows_ctx) -> dict:
    """Model 'tiny' trained once on the training survey: version 1, alias challenger."""
    from flows.train import train_flow

    return train_flow(train_store, "tiny", TINY_MODEL, sdict)
