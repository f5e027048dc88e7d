"""The CLI as users drive it: help texts, the demo, hunts, serve."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from flows.cli import app

COMMANDS = ["simulate", "ingest", "train", "score", "explain", "promote", "hunt", "serve", "demo", "info"]


def test_help_explains_every_command():
    r = CliRunner().invoke(app, ["--help"])
    assert r.exit_code == 0
    for c in COMMANDS:
        assert c in r.output
        rc = CliRunner().invoke(app, [c, "--help"])
        assert rc.exit_code == 0 and len(rc.output) > 200, c


def test_unknown_model_is_a_clear_error(valid_store, settings, tmp_path):
    r = CliRunner().invoke(app, ["score", "--store", valid_store, "--model", "nosuch@champion", "--home", str(settings.home)])
    assert r.exit_code == 2
    assert "nosuch" in r.output and "gsafe train" in r.output


def test_missing_store_is_a_clear_error(settings, tmp_path):
    r = CliRunner().invoke(app, ["info", str(tmp_path / "nope.zarr")])
    assert r.exit_code == 2 and "nope.zarr" in r.output


@pytest.mark.slow
def test_demo_runs_end_to_end_and_prints_auroc(settings, tmp_path):
    out = tmp_path / "demo"
    r = CliRunner().invoke(app, ["demo", "--out", str(out), "--n", "300", "--epochs", "2", "--top-k", "4",
                                 "--home", str(settings.home)])
    assert r.exit_code == 0, r.output
    assert "demo: AUROC" in r.output
    m = re.search(r"at q ≤ 0.1: (\d+) objects, (\d+) of them not injected", r.output)
    assert m, r.output
    listed, false = map(int, m.groups())
    scores = pd.read_csv(out / "scores.csv")
    assert listed == int((scores["q_value"] <= 0.1).sum()) and false <= listed
    assert (out / "scores.csv").exists() and (out / "report" / "index.html").exists()


@pytest.mark.slow
def test_hunt_scores_only_new_objects_then_has_nothing_to_do(trained, train_store, settings, sdict, flows_ctx, tmp_path):
    import numpy as np
    import shutil

    from flows.hunt import hunt_flow
    from infra.store import SurveyStore
    from infra import tracking
    from tasks.simulate import simulate_survey

    tracking.set_alias("tiny", "champion", trained["version"])
    url = str(tmp_path / "h.zarr")
    shutil.copytree(train_store, url)
    from flows.score import run_campaign

    run_campaign(url, "tiny", trained["version"], settings)     # last night's hunt
    new = tmp_path / "new"
    simulate_survey(100, settings=settings, seed=9, anomaly_frac=0.1, fits_dir=str(new), workers=1)
    r = hunt_flow(url, "tiny@champion", sdict, source=str(new), out=str(tmp_path / "out"), top_k=3)
    assert r["ingested"] == 100 and r["new"] == 100
    assert (tmp_path / "out" / "candidates.csv").exists()
    t0 = time.perf_counter()
    r2 = hunt_flow(url, "tiny@champion", sdict, source=str(new), out=str(tmp_path / "out"))
    assert r2["new"] == 0 and "nothing new" in r2["message"]
    assert time.perf_counter() - t0 < 30
    t = SurveyStore.open(url).score_table("tiny", trained["version"])
    assert not t.pending_chunks() and np.isfinite(t.read(["score"])["score"]).all()


@pytest.mark.slow
def test_serve_fires_the_scheduled_hunt(trained, train_store, settings, tmp_path):
    """A real Prefect server, a cron schedule every minute: the hunt runs and writes its output."""
    from infra import tracking

    tracking.set_alias("tiny", "champion", trained["version"])
    import shutil

    url = str(tmp_path / "served.zarr")
    shutil.copytree(train_store, url)
    out = tmp_path / "served_out"
    env = os.environ | {"GSAFE_HOME": str(settings.home), "GSAFE_PROGRESS": "false", "GSAFE_CHUNK_SIZE": "64",
                        "GSAFE_N_WORKERS": "1", "PREFECT_HOME": str(tmp_path / "prefect_serve")}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "--cron", "* * * * *", "--store", url,
                             "--model", "tiny@champion", "--out", str(out), "--top-k", "2", "--verbose"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True, text=True)
    try:
        deadline = time.time() + 200
        while time.time() < deadline and not (out / "candidates.csv").exists():
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(1)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    log = proc.stdout.read()
    assert (out / "candidates.csv").exists(), "the scheduled hunt never ran:\n" + log[-5000:]
    assert "Completed" in log
