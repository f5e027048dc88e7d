"""End to end: train → register → score by alias; campaigns that survive SIGKILL and lost workers; promotion."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from infra.store import SurveyStore

pytestmark = pytest.mark.slow


def _copy(url: str, tmp_path: Path, name: str) -> str:
    dst = tmp_path / name
    shutil.copytree(url, dst)
    return str(dst)


def test_train_registers_challenger_and_score_by_alias(trained, train_store, sdict, settings, flows_ctx, tmp_path):
    from flows.score import score_flow
    from infra import tracking
    from infra.runtime import task_runner
    from tasks.score import read_scores

    assert trained["version"] >= 1
    ref = tracking.resolve("tiny@challenger")
    assert (ref.name, ref.version) == ("tiny", trained["version"])
    assert 0.0 <= trained["metrics"]["val_auroc"] <= 1.0
    url = _copy(train_store, tmp_path, "s.zarr")
    r = score_flow.with_options(task_runner=task_runner(settings))(url, ref.name, ref.version, sdict)
    store = SurveyStore.open(url)
    assert r["n"] == store.n and r["chunks_scored"] == len(store.chunk_bounds())
    df = read_scores(store, store.score_table(ref.name, ref.version))
    assert list(df.columns[:4]) == ["object_id", "score", "p_value", "q_value"]
    assert len(df) == store.n and df["object_id"].is_unique
    assert df[["score", "p_value", "q_value"]].notna().all().all()
    assert ((df.p_value > 0) & (df.p_value <= 1) & (df.q_value >= df.p_value - 1e-12)).all()
    # the injected anomalies rank high
    lab = dict(zip(store.object_ids().astype(str), store.read_catalog(["label"])["label"]))
    y = df["object_id"].map(lab).to_numpy()
    from gsafe_models.metrics import auroc

    assert auroc(df["score"].to_numpy(), y) > 0.7
    # a second campaign finds nothing to do
    r2 = score_flow.with_options(task_runner=task_runner(settings))(url, ref.name, ref.version, sdict)
    assert r2["chunks_scored"] == 0


def _chunk_mtimes(url: str, name: str, version: int) -> dict[str, float]:
    root = Path(url) / "scores" / name / str(version) / "score" / "c"
    return {p.name: p.stat().st_mtime_ns for p in root.iterdir()} if root.exists() else {}


def test_sigkill_mid_campaign_then_restart_gives_identical_scores(trained, train_store, settings, tmp_path):
    """`gsafe score` killed with SIGKILL halfway, then run again: only unfinished chunks are redone and the
    table equals an undisturbed run's."""
    env = os.environ | {"GSAFE_HOME": str(settings.home), "GSAFE_CHUNK_SIZE": "64", "GSAFE_PROGRESS": "false"}
    env.pop("PREFECT_API_URL", None)   # the command starts its own server, as a user's would
    gsafe = [sys.executable, "-m", "flows.cli", "score", "--model", f"tiny/{trained['version']}", "--workers", "1"]
    calm = _copy(train_store, tmp_path, "calm.zarr")
    quiet = subprocess.run(gsafe + ["--store", calm], env=env, check=True, capture_output=True, text=True, timeout=300)
    # quiet by default: gsafe's one line, no Dask, Prefect or MLflow logs (--verbose shows them)
    assert quiet.stderr.strip() == "" and [ln[:6] for ln in quiet.stdout.strip().splitlines()] == ["score:"], quiet

    hurt = _copy(train_store, tmp_path, "hurt.zarr")
    proc = subprocess.Popen(gsafe + ["--store", hurt], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    v = trained["version"]
    deadline = time.time() + 240
    n_chunks = len(SurveyStore.open(hurt).chunk_bounds())
    done = np.zeros(0, bool)
    while time.time() < deadline:
        try:
            done = SurveyStore.open(hurt).score_table("tiny", v).done_chunks()
        except Exception:  # table not created yet
            done = np.zeros(0, bool)
        if 1 <= done.sum() < n_chunks - 1:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = SurveyStore.open(hurt).score_table("tiny", v).done_chunks()
    assert 0 < done.sum() < n_chunks, "kill landed before or after the campaign; make the survey larger"
    before = _chunk_mtimes(hurt, "tiny", v)
    subprocess.run(gsafe + ["--store", hurt], env=env, check=True, capture_output=True, timeout=300)
    after = _chunk_mtimes(hurt, "tiny", v)
    for c in np.nonzero(done)[0]:
        assert after[str(c)] == before[str(c)], f"chunk {c} was finished before the kill but written again"
    a = SurveyStore.open(calm).score_table("tiny", v).read()
    b = SurveyStore.open(hurt).score_table("tiny", v).read()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_worker_killed_mid_campaign_flow_finishes(trained, train_store, settings, sdict, flows_ctx, tmp_path):
    """A Dask worker SIGKILLed while chunks are still pending: the nanny restarts it, its chunks are
    redone elsewhere, and the campaign ends complete and finite."""
    from distributed import Client, LocalCluster
    from prefect_dask import DaskTaskRunner

    from flows.score import score_flow

    url = _copy(train_store, tmp_path, "w.zarr")
    v = trained["version"]
    n_chunks = len(SurveyStore.open(url).chunk_bounds())
    kill = {}
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        pids = list(client.run(os.getpid).values())

        def kill_one():
            deadline = time.time() + 120
            while time.time() < deadline:
                try:
                    done = int(SurveyStore.open(url).score_table("tiny", v).done_chunks().sum())
                except Exception:  # table not created yet
                    done = 0
                if 1 <= done < n_chunks - 1:
                    os.kill(pids[0], signal.SIGKILL)
                    kill["done_at_kill"] = done
                    return
                time.sleep(0.05)

        killer = threading.Thread(target=kill_one, daemon=True)
        killer.start()
        r = score_flow.with_options(task_runner=DaskTaskRunner(address=cluster.scheduler_address))(url, "tiny", v, sdict)
        killer.join(5)
        restarted = set(client.run(os.getpid).values())
    assert "done_at_kill" in kill, "the kill landed before or after the campaign; make the survey larger"
    assert 0 < kill["done_at_kill"] < n_chunks and pids[0] not in restarted   # it did die mid-campaign
    store = SurveyStore.open(url)
    t = store.score_table("tiny", v)
    assert r["n"] == store.n and not t.pending_chunks()
    cols = t.read(["score", "p_value", "q_value"])
    assert all(np.isfinite(c).all() and len(c) == store.n for c in cols.values())


def test_promotion_refuses_worse_challenger_and_promotes_better(train_store, valid_store, settings, sdict, flows_ctx,
                                                                tiny_model, tmp_path):
    TINY_MODEL = tiny_model
    from flows.promote import promote_flow
    from flows.train import train_flow
    from infra import tracking
    from tasks.simulate import simulate_survey

    name = "promo"
    valid = _copy(valid_store, tmp_path, "v.zarr")
    # a modest first champion: one epoch, and blind to all but sharp (cosmic-ray-like) residuals
    modest = TINY_MODEL | {"epochs": 1, "statistics": ("sharpness",)}
    v1 = train_flow(train_store, name, modest, sdict)["version"]
    r1 = promote_flow(name, valid, sdict)
    assert r1["decision"] == "promoted" and tracking.get_alias_version(name, "champion") == v1
    # a worse challenger: "normal" learnt from a survey of anomalies
    bad_store = str(tmp_path / "bad.zarr")
    simulate_survey(320, settings=settings, seed=5, anomaly_frac=1.0, store=bad_store, workers=2)
    v2 = train_flow(bad_store, name, modest, sdict)["version"]
    r2 = promote_flow(name, valid, sdict)
    assert r2["decision"] == "refused", r2
    assert tracking.get_alias_version(name, "champion") == v1
    assert tracking.version_tags(name, v2)["gsafe.promote.decision"] == "refused"
    # a better one
    v3 = train_flow(train_store, name, TINY_MODEL | {"epochs": 6}, sdict)["version"]
    r3 = promote_flow(name, valid, sdict)
    m = r3["metrics"]
    assert m[v3]["auroc"] >= m[v1]["auroc"], "the stronger model did not detect better: test premise broken"
    assert r3["decision"] == "promoted" and tracking.get_alias_version(name, "champion") == v3


def test_a_store_with_variance_planes_trains_and_scores_with_them(train_store, tiny_model, settings, sdict, flows_ctx,
                                                                  tmp_path):
    # a survey whose odd objects come from a shallower exposure (twice the sky noise), with the
    # variance plane its pipeline ships: train and score read it, and the scores are the
    # Detector's with those variances
    from flows.score import score_flow
    from flows.train import train_flow
    from infra import tracking
    from infra.runtime import task_runner
    from tasks.score import load_detector

    url = _copy(train_store, tmp_path, "deep.zarr")
    store = SurveyStore.open(url, mode="r+")
    images = store.read_images()
    rng = np.random.default_rng(0)
    border = np.concatenate([images[:, :, :4].reshape(len(images), len(store.bands), -1),
                             images[:, :, -4:].reshape(len(images), len(store.bands), -1)], axis=2)
    sky = np.nanmedian(1.4826 * np.nanmedian(np.abs(border - np.nanmedian(border, axis=2, keepdims=True)), axis=2), axis=0)
    shallow = np.arange(len(images)) % 2 == 1
    noisy = images.copy()
    noisy[shallow] += (rng.standard_normal(noisy[shallow].shape) * np.sqrt(3.0) * sky[None, :, None, None]).astype(np.float32)
    variance = (np.where(shallow, 4.0, 1.0)[:, None, None, None] * sky[None, :, None, None] ** 2
                + np.clip(images, 0, None)).astype(np.float32)
    store.images[:] = noisy
    store.set_column("variance", variance, parent="aux")

    version = train_flow(url, "tiny_var", tiny_model, sdict)["version"]
    det = load_detector(tracking.download_detector(tracking.ModelRef("tiny_var", version)))
    assert bool(det._bundle.parts["chi_scanner_pca"].noise.known)
    score_flow.with_options(task_runner=task_runner(settings))(url, "tiny_var", version, sdict)
    stats = [f"stat_{n}" for n in det.statistic_names]
    table = SurveyStore.open(url).score_table("tiny_var", version).read(["score", *stats])
    want = det.score(noisy, q_values=False, variance=variance)
    without = det.score(noisy, q_values=False)
    # the campaign's statistics (chunks of 64 on Dask workers) are the Detector's up to float32
    # summation order, which depends on the batch and on the CPU's kernels; a Gaussian mixture's
    # log-density deep inside a narrow component amplifies that on a few very normal objects
    for k in stats:
        agree = np.isclose(table[k], want[k], rtol=1e-4, atol=1e-5)
        assert agree.mean() >= 0.98, f"{k}: {(~agree).sum()} of {len(agree)} differ"
    assert any(not np.allclose(want[k], without[k], rtol=1e-3) for k in stats)
    # the score steps where a statistic equals a calibration value (the calibration objects are in this
    # store), so that noise may move a few objects by one calibration rank; every other score agrees
    close = np.isclose(table["score"], want["score"], rtol=1e-4)
    assert close.mean() >= 0.95, f"{(~close).sum()} of {len(close)} scores differ"
    assert not np.allclose(table["score"], without["score"], rtol=1e-3)


def test_a_small_store_gets_a_cross_fitted_calibration_or_a_warning(train_store, tiny_model, tmp_path):
    # 640 objects hold ~100 calibration objects: a list's p-values would rest on a tail model fitted
    # to ~10 values (on 400-object surveys normal objects reached p <= 1e-3 at 2.8x nominal), so
    # the calibration is cross-fitted over the training objects, or the user is told why it is not
    import warnings

    from tasks.train import REVIEW_FOLDS, SMALL_CALIBRATION, store_splits, training_plan

    url = _copy(train_store, tmp_path, "small.zarr")  # no review labels: the size alone decides
    n = len(store_splits(url)["calib"])
    assert 0 < n < SMALL_CALIBRATION
    config, leave_out = training_plan(url, tiny_model)
    assert config["calibration_folds"] == REVIEW_FOLDS and len(leave_out) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a split of n counts as large under a limit of n: unchanged, silent
        assert "calibration_folds" not in training_plan(url, tiny_model, small_calibration=n)[0]
    with pytest.warns(UserWarning, match=f"has {n} calibration objects.*and G reads the representation"):
        assert "calibration_folds" not in training_plan(url, tiny_model | {"statistics": ("chi_density_pca", "G")})[0]
    with pytest.warns(UserWarning, match="calibration_folds=0 was asked"):
        assert training_plan(url, tiny_model | {"calibration_folds": 0})[0]["calibration_folds"] == 0


def test_review_labels_leave_every_split_and_cross_fit_the_calibration(train_store, tiny_model, settings, sdict, flows_ctx,
                                                                       tmp_path):
    # the scientist labelled the survey's anomalies interesting or artefact and one normal object
    # not_interesting: the next training leaves the first out of every split, keeps the last, and
    # cross-fits its calibration over the training objects so the cleaner split keeps FDR <= q
    import mlflow

    from flows.train import train_flow
    from infra import labels as lab
    from infra import tracking
    from tasks.score import load_detector
    from tasks.train import REVIEW_FOLDS, store_splits, training_plan

    url = _copy(train_store, tmp_path, "reviewed.zarr")
    store = SurveyStore.open(url, mode="r+")
    cat = store.read_catalog(["object_id", "label"])
    ids, truth = np.asarray(cat["object_id"]).astype(str), np.asarray(cat["label"]).astype(int)
    anomalies = np.flatnonzero(truth == 1)
    assert len(anomalies) >= 4
    half = len(anomalies) // 2
    lab.append_labels(store, lab.make_rows(list(ids[anomalies[:half]]), "interesting", model="tiny/1"))
    lab.append_labels(store, lab.make_rows(list(ids[anomalies[half:]]), "artefact", model="tiny/1"))
    normal = int(np.flatnonzero(truth == 0)[0])
    lab.append_labels(store, lab.make_rows([ids[normal]], "not_interesting", model="tiny/1"))

    config, leave_out = training_plan(url, tiny_model, small_calibration=0)  # the labels alone, whatever the store's size
    assert sorted(leave_out) == sorted(anomalies) and config["calibration_folds"] == REVIEW_FOLDS
    assert training_plan(url, tiny_model | {"calibration_folds": 0}, small_calibration=0)[0]["calibration_folds"] == 0  # the user's word stands
    assert "calibration_folds" not in training_plan(url, tiny_model | {"statistics": ("chi_density_pca", "G")}, small_calibration=0)[0]

    r = train_flow(url, "tiny_reviewed", tiny_model, sdict)
    det = load_detector(tracking.download_detector(tracking.ModelRef("tiny_reviewed", r["version"])))
    split = store_splits(url)
    kept = {k: np.setdiff1d(v, anomalies) for k, v in split.items()}
    assert det.config.calibration_folds == REVIEW_FOLDS and det.diagnostics["reviewed_left_out"] == len(anomalies)
    assert det.diagnostics["calibration_crossfit_n"] == len(kept["train"])
    assert det.diagnostics["calibration_n"] == len(kept["calib"]) + len(kept["train"])
    # the rows `gsafe review --calibration` offers: the same objects, and without cross-fitting the calib split alone
    from tasks.train import calibration_rows

    assert calibration_rows(url, det.config.calibration_folds).tolist() == np.union1d(kept["calib"], kept["train"]).tolist()
    assert calibration_rows(url).tolist() == kept["calib"].tolist()
    assert r["review_pool"] == det.diagnostics["calibration_n"]  # what `gsafe train` tells a reviewer to look among
    # what `gsafe review --calibration` offers: the objects the next training calibrates on once a departure is
    # labelled, so for a model not cross-fitted whose successor will be (the defaults) the train split too
    from gsafe_models.detector import DetectorConfig
    from tasks.train import review_calibration_rows, review_folds

    assert review_folds({}) == REVIEW_FOLDS and review_folds({"calibration_folds": 0}) == 0
    assert review_folds({"calibration_folds": 5}) == 5 and review_folds({"fit_trim": 0.05}) == 0
    assert review_folds({"statistics": ("chi_density_pca", "G")}) == 0  # G reads the representation: no cross-fit
    both = np.union1d(kept["calib"], kept["train"]).tolist()
    assert review_calibration_rows(url, det.config).tolist() == both
    assert review_calibration_rows(url, DetectorConfig()).tolist() == both
    assert review_calibration_rows(url, DetectorConfig(statistics=("chi_density_pca", "G"))).tolist() == kept["calib"].tolist()
    assert review_calibration_rows(url, DetectorConfig(fit_trim=0.05)).tolist() == kept["calib"].tolist()
    params = mlflow.get_run(r["run_id"]).data.params
    assert params["calibration_folds"] == str(REVIEW_FOLDS) and params["reviewed_left_out"] == str(len(anomalies))
