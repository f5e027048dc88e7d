"""Shared fixtures: small, generic, cheap."""

from __future__ import annotations

import uuid

import fsspec
import pytest

from infra.settings import Settings


@pytest.fixture
def tmp_store_url(tmp_path) -> str:
    """A path where no store exists yet, for `SurveyStore.create` or `ingest` to make one."""
    return str(tmp_path / "survey.zarr")


@pytest.fixture
def memory_store_url() -> str:
    """A fresh ``memory://`` URL (fsspec's in-memory filesystem is process-wide: removed afterwards)."""
    name = f"gsafe-test-{uuid.uuid4().hex}"
    yield f"memory://{name}"
    fs = fsspec.filesystem("memory")
    if fs.exists(f"/{name}"):
        fs.rm(f"/{name}", recursive=True)


@pytest.fixture
def tmp_settings(tmp_path) -> Settings:
    """Settings with their home under `tmp_path` and tiny chunks (4 cutouts), so tests cross chunk boundaries."""
    return Settings(home=tmp_path / "home", chunk_size=4, progress=False)


# ---- an S3-compatible object store on loopback (store, lock and flow tests on s3:// URLs) ----
@pytest.fixture(scope="session")
def s3():
    """An S3-compatible object store on loopback (moto's server mode), with a bucket; yields the
    environment variables that point botocore/s3fs (and child processes) at it."""
    pytest.importorskip("s3fs")
    import os

    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import fsspec

    fsspec.filesystem("s3", skip_instance_cache=True).mkdir("gsafe-test")
    yield env
    for k, v in saved.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    server.stop()
