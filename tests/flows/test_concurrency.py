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


@pytest.mark.slow
def test_a_hunt_that_crashed_after_scoring_leaves_its_objects_new_and_drift_raises_the_alarm(
        trained, train_store, settings, sdict, flows_ctx, tmp_path):
    import mlflow

    from flows.hunt import hunt_flow
    from flows.score import run_campaign
    from gsafe_models.simulate import simulate_batch
    from infra import tracking
    from tasks.simulate import simulate_survey

    v = trained["version"]
    tracking.set_alias("tiny", "champion", v)
    url = str(tmp_path / "h.zarr")
    shutil.copytree(train_store, url)
    run_campaign(url, "tiny", v, settings)                     # last night's campaign
    new = tmp_path / "new"
    simulate_survey(100, settings=settings, seed=9, anomaly_frac=0.05, fits_dir=str(new), workers=1)
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("the hunt's output directory cannot be made here")
    with pytest.raises(Exception):
        hunt_flow(url, "tiny@champion", sdict, source=str(new), out=str(blocker))   # crashes after scoring
    t = SurveyStore.open(url).score_table("tiny", v)
    assert t.n == 740 and not t.pending_chunks()                # the crashed hunt did score them
    r = hunt_flow(url, "tiny@champion", sdict, source=str(new), out=str(tmp_path / "out"))
    assert r["new"] == 100, r["message"]                         # ... and they are still new
    assert not r["drift"]["alarm"], r["drift"]["alarms"]

    # tomorrow's batch came through three times the sky noise (a camera problem): the alarm goes up
    x = simulate_batch(0, 100, seed=11, bands=settings.bands, size=settings.cutout_size, anomaly_frac=0.0).images
    x = x + np.random.default_rng(0).normal(0.0, 25.0, x.shape).astype(np.float32)
    np.save(tmp_path / "noisy.npy", x)
    r = hunt_flow(url, "tiny@champion", sdict, source=str(tmp_path / "noisy.npy"), out=str(tmp_path / "out3"), top_k=2)
    assert r["new"] == 100 and r["drift"]["alarm"] and "DRIFT ALARM" in r["message"]
    assert any(str(tmp_path / "noisy.npy") in a for a in r["drift"]["alarms"])     # the batch is named
    assert "drift alarm" in (tmp_path / "out3" / "report" / "index.html").read_text()
    runs = mlflow.search_runs(experiment_ids=[tracking.experiment_for_store(url, settings)],
                              filter_string="tags.`gsafe.kind` = 'hunt'", order_by=["attributes.start_time DESC"],
                              output_format="list")
    assert [x.data.tags["gsafe.drift.alarm"] for x in runs[:2]] == ["true", "false"]
    assert runs[0].data.metrics["drift_d_plus"] > runs[0].data.metrics["drift_critical"]


@pytest.mark.slow
def test_a_retried_registration_makes_no_second_version(trained, train_store, settings, flows_ctx):
    import mlflow
    from mlflow import MlflowClient

    from infra import tracking
    from tasks.train import register_task

    payload = tracking.download_detector(tracking.ModelRef("tiny", trained["version"]))
    with mlflow.start_run(experiment_id=tracking.experiment_for_store(train_store, settings)):
        first = register_task.fn(payload, "retried", train_store, {})
        again = register_task.fn(payload, "retried", train_store, {})   # the retry after a lost reply
    assert first == again
    assert len(MlflowClient().search_model_versions("name='retried'")) == 1
    assert tracking.resolve("retried@challenger").version == first


@pytest.mark.slow
def test_a_campaign_alongside_an_ingest_marks_no_chunk_done_with_rows_missing(trained, train_store, settings, tmp_path):
    """`gsafe score` and `gsafe ingest` on one store at once (the store's last chunk part-filled, so the
    ingest grows a chunk the campaign is scoring): every chunk marked done has every row scored, and
    the next campaign completes the table."""
    v = trained["version"]
    url = str(tmp_path / "busy.zarr")
    shutil.copytree(train_store, url)
    _npy(tmp_path / "part.npy", 30, 3)
    first = _gsafe("ingest", str(tmp_path / "part.npy"), "--store", url, settings=settings)
    assert first.wait(timeout=300) == 0, first.stderr.read()[-3000:]      # 670 rows: chunk 10 part-filled
    _npy(tmp_path / "more.npy", 600, 4)
    score = _gsafe("score", "--store", url, "--model", f"tiny/{v}", "--workers", "1", settings=settings)
    time.sleep(8)
    ingest = _gsafe("ingest", str(tmp_path / "more.npy"), "--store", url, settings=settings)
    for p in (score, ingest):
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    store = SurveyStore.open(url)
    t = store.score_table("tiny", v)
    assert t.n <= store.n == 1270
    score_col, done, cs = t.read(["score"])["score"], t.done_chunks(), store.chunk_size
    for c in np.nonzero(done)[0]:
        assert np.isfinite(score_col[c * cs:min((c + 1) * cs, t.n)]).all(), f"chunk {c} marked done with rows unscored"
    again = _gsafe("score", "--store", url, "--model", f"tiny/{v}", "--workers", "1", settings=settings)
    assert again.wait(timeout=600) == 0, again.stderr.read()[-3000:]
    t = SurveyStore.open(url).score_table("tiny", v)
    assert t.n == 1270 and not t.pending_chunks() and np.isfinite(t.read(["score"])["score"]).all()
