"""Operations that overlap: two `gsafe ingest` processes on one store, a campaign alongside an ingest,
a hunt that crashes after scoring, truth joined twice, a registration retried."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from infra.store import SurveyStore


def _npy(path: Path, n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(0.0, 1.0, (n, 3, 32, 32)).astype(np.float32)
    np.save(path, x)
    return x


def _gsafe(*args: str, settings, **popen) -> subprocess.Popen:
    env = os.environ | {"GSAFE_HOME": str(settings.home), "GSAFE_PROGRESS": "false"}
    return subprocess.Popen([sys.executable, "-m", "flows.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)


@pytest.mark.slow
def test_two_gsafe_ingest_processes_on_one_store_keep_every_cutout(settings, tmp_path):
    """The issue's CLI case: two ingests started 1.5 s apart into one store both succeed and the store
    holds every cutout of both, once, each with its own pixels."""
    url = str(tmp_path / "both.zarr")
    seed_file, a_file, b_file = tmp_path / "seed.npy", tmp_path / "a.npy", tmp_path / "b.npy"
    arrays = {"seed": _npy(seed_file, 5, 0), "a": _npy(a_file, 1200, 1), "b": _npy(b_file, 800, 2)}
    first = _gsafe("ingest", str(seed_file), "--store", url, "--chunk-size", "32", settings=settings)
    assert first.wait(timeout=300) == 0, first.stderr.read()[-3000:]
    pa = _gsafe("ingest", str(a_file), "--store", url, settings=settings)
    time.sleep(1.5)
    pb = _gsafe("ingest", str(b_file), "--store", url, settings=settings)
    for p in (pa, pb):
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
        assert "ingested" in out
    s = SurveyStore.open(url)
    ids = s.object_ids().astype(str)
    assert s.n == 2005 and len(set(ids)) == 2005 and "" not in set(ids)
    images = s.read_images()
    assert np.isfinite(images).all()
    for i, oid in enumerate(ids):      # ids are "<file stem>-<index>": each row holds its own cutout
        stem, k = oid.rsplit("-", 1)
        np.testing.assert_array_equal(images[i], arrays[stem][int(k)], err_msg=oid)
