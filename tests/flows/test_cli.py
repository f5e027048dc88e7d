"""The CLI as users drive it: help texts, the demo, hunts, serve."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from flows.cli import app

class _AnyString:
    def __eq__(self, other):
        return isinstance(other, str) and bool(other)


ANY_STRING = _AnyString()
COMMANDS = ["simulate", "ingest", "train", "score", "explain", "promote", "hunt", "serve", "demo", "info"]


def _words(text: str) -> str:
    return " ".join(text.split()).replace("- ", "-")    # help is wrapped to the terminal's width, also at hyphens


def test_help_explains_every_command():
    import typer

    r = CliRunner().invoke(app, ["--help"])
    assert r.exit_code == 0
    root = typer.main.get_command(app)
    for c in COMMANDS:
        assert c in r.output
        rc = CliRunner().invoke(app, [c, "--help"])
        assert rc.exit_code == 0, c
        cmd = root.commands[c]
        assert _words(cmd.help.split("\n\n")[0]) in _words(rc.output), c     # what the command does
        for o in _options(cmd):                                                # and each of its options
            assert o.opts[0] in rc.output and _words(o.help) in _words(rc.output), f"{c} {o.opts[0]}"


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
    written = {p: p.stat().st_mtime_ns for p in [tmp_path / "out" / "candidates.csv",
                                                 *(Path(url) / "scores" / "tiny").rglob("*") ] if p.is_file()}
    r2 = hunt_flow(url, "tiny@champion", sdict, source=str(new), out=str(tmp_path / "out"))
    assert r2["new"] == 0 and r2["ingested"] == 0 and "nothing new" in r2["message"]
    # nothing scored and nothing listed again: no score chunk, flag or candidate list rewritten
    assert {p: p.stat().st_mtime_ns for p in written} == written
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
    api, early = None, []
    try:
        while api is None:          # the first lines: where serve started its Prefect server
            line = proc.stdout.readline()
            assert line, "serve exited:\n" + "".join(early)
            early.append(line)
            m = re.search(r"Prefect server at (\S+)", line)
            api = m.group(1) if m else None
        deadline = time.time() + 200
        while time.time() < deadline and not (out / "candidates.csv").exists():
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(1)
        import httpx

        dep = httpx.get(f"{api}/deployments/name/hunt/gsafe-hunt", timeout=30).json()
        limit = dep.get("global_concurrency_limit") or {}
        assert dep.get("concurrency_limit") == 1 or limit.get("limit") == 1, dep     # hunts never overlap
        assert (dep.get("concurrency_options") or {}).get("collision_strategy") == "CANCEL_NEW", dep
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    log = proc.stdout.read()
    assert (out / "candidates.csv").exists(), "the scheduled hunt never ran:\n" + log[-5000:]
    assert "Completed" in log


# ---- validation at the edge -------------------------------------------------------------------
def _options(command) -> list:
    return [p for p in command.params if getattr(p, "param_type_name", "") == "option"]


def test_every_option_of_every_command_has_help_and_the_exit_codes_are_documented():
    import typer

    root = typer.main.get_command(app)
    missing = [f"{name} {o.opts[0]}" for name, cmd in root.commands.items() for o in _options(cmd)
               if not (o.help or "").strip()]
    assert missing == []
    r = CliRunner().invoke(app, ["--help"])
    assert "Exit codes" in r.output and "1 failure at run time" in r.output and "2 usage" in r.output
    for name, cmd in root.commands.items():
        if name != "review":      # the review app is a server for people, not for scripts
            assert "--json" in [o.opts[0] for o in _options(cmd)], name


def test_version_is_printed():
    from importlib.metadata import version

    r = CliRunner().invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output.strip() == f"gsafe {version('gsafe')}"


@pytest.mark.parametrize("args, flag", [
    (["train", "--model", "m", "--combination", "bogus"], "--combination"),
    (["train", "--model", "m", "--representation", "x"], "--representation"),
    (["train", "--model", "m", "--statistics", "G,bogus"], "--statistics"),
    (["train", "--model", "my model"], "--model"),
    (["explain", "--model", "m", "--method", "nope"], "--method"),
    (["hunt", "--model", "m", "--alpha", "0"], "--alpha"),
], ids=["combination", "representation", "statistics", "model name", "method", "alpha"])
def test_a_bad_choice_is_a_usage_error_before_anything_starts(args, flag, settings, train_store):
    r = CliRunner().invoke(app, [*args, "--store", train_store, "--home", str(settings.home)])
    assert r.exit_code == 2, r.output
    assert f"Invalid value for '{flag}'" in r.output


def test_a_setting_out_of_range_is_a_usage_error_and_writes_nothing(settings, tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((3, 3, 32, 32), np.float32))
    r = CliRunner().invoke(app, ["ingest", str(tmp_path / "x.npy"), "--store", str(tmp_path / "s.zarr"),
                                 "--chunk-size", "0", "--home", str(settings.home), "--json"])
    assert r.exit_code == 2
    assert "--chunk-size 0" in r.output and not (tmp_path / "s.zarr").exists()
    assert json.loads(r.stdout.strip().splitlines()[-1]) == {"ok": False, "error": ANY_STRING, "exit_code": 2}


def test_info_json_is_one_object(train_store, settings):
    r = CliRunner().invoke(app, ["info", train_store, "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["ok"] and info["n"] == 640 and info["bands"] == ["g", "r", "i"]


def test_a_failure_at_run_time_exits_1_in_one_line(train_store, settings):
    env = os.environ | {"GSAFE_HOME": str(settings.home), "MLFLOW_TRACKING_URI": "http://127.0.0.1:9/"}
    p = subprocess.run([sys.executable, "-m", "flows.cli", "score", "--store", train_store, "--model", "tiny"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 1, p.stderr
    assert "unreachable" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.slow
def test_a_model_that_does_not_fit_the_store_is_refused_before_scoring(trained, valid_store, settings, tmp_path):
    from infra.store import SurveyStore

    five = str(tmp_path / "five.zarr")
    s = SurveyStore.create(five, bands=("g", "r", "i", "z", "y"), height=32, width=32, chunk_size=64)
    s.append(np.zeros((3, 5, 32, 32), np.float32), {"object_id": np.array(["a", "b", "c"])})
    r = CliRunner().invoke(app, ["score", "--store", five, "--model", f"tiny/{trained['version']}",
                                 "--home", str(settings.home)])
    assert r.exit_code == 2
    line = r.output.strip().splitlines()[-1]
    assert "3 bands" in line and "5 bands" in line and len(r.output.strip().splitlines()) == 1
    assert SurveyStore.open(five).score_tables() == []         # no campaign was started
    # and the same command on a store that fits, for scripts
    shutil.copytree(valid_store, tmp_path / "v.zarr")
    r = CliRunner().invoke(app, ["score", "--store", str(tmp_path / "v.zarr"), "--model", f"tiny/{trained['version']}",
                                 "--home", str(settings.home), "--json", "--workers", "1"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["ok"] and out["n"] == 400 and out["version"] == trained["version"]


def test_every_flow_has_a_description():
    """Prefect shows a flow's docstring as its description in the UI."""
    import importlib
    import pkgutil

    import flows
    from prefect import Flow

    found = {}
    for m in pkgutil.iter_modules(flows.__path__):
        mod = importlib.import_module(f"flows.{m.name}")
        found |= {f.name: f for f in vars(mod).values() if isinstance(f, Flow)}
    assert {"ingest", "train", "score", "explain", "promote", "hunt"} <= set(found)
    assert [name for name, f in found.items() if not (f.description or "").strip()] == []


def _json_cli(settings):
    """Runs one gsafe command in-process with `--json` under the test home; returns its last JSON line."""
    def run(*args):
        r = CliRunner().invoke(app, [*args, "--home", str(settings.home), "--json"])
        assert r.exit_code == 0, r.output
        return json.loads(r.stdout.strip().splitlines()[-1])
    return run


@pytest.mark.slow
def test_the_references_methods_run_from_the_cli(train_store, settings, tmp_path):
    """A WGAN-GP with an encoder, a latent EBM statistic, constrained-Langevin training and DupLEX
    explanations, each as a user asks for them (one epoch each: this checks the wiring, the methods'
    maths is tested in tests/models)."""
    url = str(tmp_path / "s.zarr")
    shutil.copytree(train_store, url)
    run = _json_cli(settings)

    gan = run("train", "--store", url, "--model", "gan", "--representation", "gan", "--epochs", "1",
              "--latent-dim", "8", "--statistics", "AS,energy_ebm,chi_peak")
    lang = run("train", "--store", url, "--model", "lang", "--optimizer", "langevin", "--epochs", "1",
               "--latent-dim", "8", "--statistics", "G,chi_core")
    assert gan["version"] >= 1 and lang["version"] >= 1
    run("score", "--store", url, "--model", f"gan/{gan['version']}", "--workers", "1")
    out = tmp_path / "report"
    run("explain", "--store", url, "--model", f"gan/{gan['version']}", "--top-k", "2", "--method", "duplex",
        "--out", str(out))
    with np.load(out / "attributions.npz") as maps:
        assert len(maps.files) == 2 and all(np.isfinite(maps[k]).all() and maps[k].any() for k in maps.files)
    assert "counterfactual" in (out / "index.html").read_text().lower()


@pytest.mark.slow
def test_a_combination_learned_from_perturbations_trains_and_scores_from_the_cli(train_store, settings, tmp_path):
    """`--combination exposure`: trees trained on the validation split against perturbed copies of it,
    registered, loaded back and scored over the store. (`--statistics all`, its natural partner, is
    parsed below; fitting all 33 statistics here would cost minutes and test nothing more.)"""
    from flows.cli import _statistics
    from gsafe_models.detector import STATISTICS, DetectorConfig
    from infra.store import SurveyStore

    assert DetectorConfig(statistics=_statistics("all")).statistics == STATISTICS
    url = str(tmp_path / "s.zarr")
    shutil.copytree(train_store, url)
    run = _json_cli(settings)

    names = ("departure_density_pca", "chi_chromatic_pca", "colour", "patch_peak")
    r = run("train", "--store", url, "--model", "exp", "--epochs", "1", "--latent-dim", "8",
            "--combination", "exposure", "--statistics", ",".join(names))
    assert r["metrics"]["val_seen_by_combination"] == 1.0 and "calibration_exposure_n" in r["metrics"]
    run("score", "--store", url, "--model", f"exp/{r['version']}", "--workers", "1", "--out", str(tmp_path / "s.csv"))
    scores = pd.read_csv(tmp_path / "s.csv")
    assert len(scores) == SurveyStore.open(url).n and scores["p_value"].between(0, 1).all()
    assert set(names) | {f"p_{n}" for n in names} <= set(scores.columns)

    # its calibration objects, the ones `gsafe train` asks a reviewer to look at: the calib and train splits here
    # (a small store: cross-fitted), the pool the smallest p-values among them, and only on the store it was trained on
    from flows.cli import calibration_review_size
    from infra import tracking
    from tasks import review as rv
    from tasks.score import load_detector
    from tasks.train import REVIEW_FOLDS, store_splits

    n_cal = int(r["metrics"]["calibration_n"])
    assert r["calibration_review"] == calibration_review_size(n_cal) == max(10, int(np.ceil(0.02 * n_cal)))
    assert r["review_pool"] == n_cal  # cross-fitted already: the next training calibrates on the same objects
    det = load_detector(tracking.download_detector(tracking.ModelRef("exp", r["version"])))
    calib = rv.model_calibration_rows(url, "exp", r["version"], det)
    split = store_splits(url)
    assert det.config.calibration_folds == REVIEW_FOLDS
    assert calib.tolist() == np.union1d(split["calib"], split["train"]).tolist() and len(calib) == n_cal
    pool = rv.candidate_pool(SurveyStore.open(url), "exp", r["version"], r["calibration_review"], within=calib)
    p = scores.set_index("object_id")["p_value"]
    ids = np.asarray(SurveyStore.open(url).object_ids()).astype(str)
    assert set(pool.rows) <= set(calib)
    assert p.loc[pool.ids].max() <= p.loc[ids[np.setdiff1d(calib, pool.rows)]].min()
    wrong = CliRunner().invoke(app, ["review", "--store", train_store, "--model", f"exp/{r['version']}", "--calibration",
                                     "--port", "0", "--home", str(settings.home)])
    assert wrong.exit_code == 2 and "was trained on" in wrong.output and "s.zarr" in wrong.output


def test_the_statistics_help_names_the_default_statistics():
    """The CLI stays import-light (no torch for --help), so it writes the defaults out: they must not drift."""
    from gsafe_models.detector import DetectorConfig

    r = CliRunner().invoke(app, ["train", "--help"])
    assert _words(", ".join(DetectorConfig().statistics)) in _words(r.output)
