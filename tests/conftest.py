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
