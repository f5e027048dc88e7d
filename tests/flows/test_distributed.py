"""gsafe on infrastructure it did not start: a `dask scheduler` and `dask worker` processes joined
through --dask-address (their task logs reaching the same Prefect API), and a store on an
S3-compatible object store (moto's server on loopback) through the same s3:// URLs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from infra.store import SurveyStore

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(settings, s3, tmp_path_factory):
    """A scheduler and two single-threaded worker processes, started as a user would start them, with
    this session's Prefect API and object store in their environment. Yields (address, worker pids)."""
    from distributed import Client

    d = tmp_path_factory.mktemp("dask")
    env = os.environ | s3 | {"PREFECT_API_URL": os.environ["PREFECT_API_URL"], "PREFECT_LOGGING_LEVEL": "INFO",
                             "DASK_DISTRIBUTED__WORKER__DAEMON": "False"}
    bin_dir = Path(sys.executable).parent
    procs = [subprocess.Popen([str(bin_dir / "dask"), "scheduler", "--scheduler-file", str(d / "s.json"), "--host",
                               "127.0.0.1", "--port", "0", "--no-dashboard"], env=env, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    deadline = time.time() + 120
    while not (d / "s.json").exists():
        assert time.time() < deadline and procs[0].poll() is None, "dask scheduler did not start"
        time.sleep(0.2)
    procs.append(subprocess.Popen([str(bin_dir / "dask"), "worker", "--scheduler-file", str(d / "s.json"),
                                   "--nworkers", "2", "--nthreads", "1", "--no-dashboard", "--host", "127.0.0.1"],
                                  env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    try:
        with Client(scheduler_file=str(d / "s.json"), timeout=60) as client:
            client.wait_for_workers(2, timeout=180)
            pids = set(client.run(os.getpid).values())
            address = client.scheduler.address
        yield address, pids
    finally:
        for p in reversed(procs):
            os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


def _gsafe(args: list[str], settings, s3: dict, timeout: int = 400) -> dict:
    env = os.environ | s3 | {"GSAFE_HOME": str(settings.home), "GSAFE_PROGRESS": "false"}
    p = subprocess.run([sys.executable, "-m", "flows.cli", *args, "--json"], env=env, capture_output=True,
                       text=True, timeout=timeout)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def _worker_log_lines(api: str, pids: set[int], since: float, want: int, wait: float = 90.0) -> list[str]:
    """The workers' "cutouts scored on" lines logged since `since`. Prefect ships a process's logs
    to the API from a background thread in batches, so the lines of the last chunks can arrive after
    the flow returned: poll until `want` arrived or `wait` seconds passed."""
    from datetime import datetime, timezone

    import httpx

    after = datetime.fromtimestamp(since, timezone.utc).isoformat()
    deadline = time.time() + wait
    while True:
        logs = httpx.post(f"{api}/logs/filter", json={"limit": 200, "sort": "TIMESTAMP_DESC",
                                                      "logs": {"timestamp": {"after_": after}}}, timeout=30).json()
        lines = [x["message"] for x in logs if "cutouts scored on" in x["message"]
                 and int(x["message"].rsplit("pid ", 1)[1].split()[0]) in pids]
        if len(lines) >= want or time.time() > deadline:
            return lines
        time.sleep(1.0)


def test_score_through_an_existing_scheduler_with_worker_logs_in_prefect(cluster, trained, train_store, settings, s3,
                                                                        tmp_path):
    address, pids = cluster
    url = str(tmp_path / "s.zarr")
    shutil.copytree(train_store, url)
    since = time.time() - 1.0
    r = _gsafe(["score", "--store", url, "--model", f"tiny/{trained['version']}", "--dask-address", address],
               settings, s3)
    store = SurveyStore.open(url)
    t = store.score_table("tiny", trained["version"])
    assert r["ok"] and r["n"] == store.n and not t.pending_chunks()
    assert np.isfinite(t.read(["score", "p_value", "q_value"])["q_value"]).all()
    lines = _worker_log_lines(os.environ["PREFECT_API_URL"], pids, since, len(store.chunk_bounds()))
    assert len(lines) >= len(store.chunk_bounds()), "the workers' task logs did not reach the Prefect API"


def test_a_store_on_an_object_store_is_ingested_and_scored_through_its_url(cluster, trained, settings, s3, tmp_path):
    from gsafe_models.simulate import simulate_batch

    address, _ = cluster
    x = simulate_batch(0, 150, seed=21, bands=settings.bands, size=settings.cutout_size, anomaly_frac=0.05).images
    np.save(tmp_path / "night.npy", x)
    url = "s3://gsafe-test/survey.zarr"
    r = _gsafe(["ingest", str(tmp_path / "night.npy"), "--store", url, "--chunk-size", "64"], settings, s3)
    assert r["ingested"] == 150
    r = _gsafe(["score", "--store", url, "--model", f"tiny/{trained['version']}", "--dask-address", address],
               settings, s3)
    assert r["n"] == 150 and r["chunks_scored"] == 3
    info = _gsafe(["info", url], settings, s3)
    assert info["n"] == 150 and info["campaigns"] == [
        {"model": "tiny", "version": str(trained["version"]), "rows": 150, "pending_chunks": 0}]
    np.testing.assert_array_equal(SurveyStore.open(url).read_images(), x)
    import fsspec

    assert not fsspec.filesystem("s3", skip_instance_cache=True).exists(f"{url}.lock")   # every lease released
