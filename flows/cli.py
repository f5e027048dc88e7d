"""`gsafe`: the command line face of the flows.

Every command fills the one Settings object from its flags, sets up the environment (quiet Prefect
under $GSAFE_HOME, MLflow on SQLite unless MLFLOW_TRACKING_URI says otherwise) and runs a flow.
Flows are imported inside the commands, after the environment is set, so `gsafe --help` is instant.

Bad input fails at the edge, before a server or a cluster starts: options with fixed choices are
checked against the names the code itself knows (read at run time, never copied here), settings
are validated, a model that does not fit a store is refused in one line. Exit codes: 0 success,
1 failure at run time, 2 usage or bad input. ``--json`` prints one JSON object on stdout.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from infra.errors import EXIT_RUNTIME, EXIT_USAGE, GsafeError
from infra.settings import Settings, get_settings

app = typer.Typer(
    name="gsafe", no_args_is_help=True, add_completion=False, rich_markup_mode=None,
    help="Anomaly hunting in astronomical survey imaging with generative models: calibrated p-values, "
         "false-discovery-controlled candidate lists and explanations for every top anomaly.\n\n"
         "Quick start: `gsafe demo` simulates a survey with injected anomalies and runs the whole hunt.\n\n"
         "Exit codes: 0 success; 1 failure at run time (a server unreachable, a store lock held too long, "
         "a crash); 2 usage or bad input (an unknown option value, a missing store or model, a model that "
         "does not fit the store). Every command takes --json: one JSON object on stdout for scripts "
         "(on failure: {\"ok\": false, \"error\": ..., \"exit_code\": ...}).")

HOME = typer.Option(None, "--home", help="where gsafe keeps MLflow and Prefect state (env GSAFE_HOME; default ~/.gsafe)")
VERBOSE = typer.Option(False, "--verbose", "-v", help="show Prefect, Dask and MLflow logs (and tracebacks)")
DASK = typer.Option(None, "--dask-address", help="tcp://host:port of an existing Dask scheduler (default: a LocalCluster sized to this machine)")
WORKERS = typer.Option(None, "--workers", help="workers of the local Dask cluster (default: one per core, or per GPU)")
CONFIG = typer.Option(None, "--config", help="TOML settings file: the settings the GSAFE_* variables set, by name "
                                             "(home = \"/data/gsafe\", chunk_size = 2048...; env GSAFE_CONFIG); "
                                             "flags win over the environment, the environment over the file")
JSON = typer.Option(False, "--json", help="print one JSON object on stdout (for scripts) instead of text")
STORE = typer.Option(..., "--store", help="survey store (path or s3://-style URL)")
MODEL_REF = typer.Option(..., "--model", help="NAME, NAME@alias or NAME/version")
_STATE = {"json": False, "verbose": False}


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            v = version("gsafe")
        except PackageNotFoundError:
            v = "unknown (not installed: pip install -e .)"
        typer.echo(f"gsafe {v}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="print gsafe's version and exit")) -> None:
    pass


# ---- fixed choices, read from the code at run time (importing the science only when used) ----
def _combination(value: str) -> str:
    from gsafe_models.calibration import CombinedTest

    try:
        CombinedTest(value)
    except ValueError as e:
        raise typer.BadParameter(str(e).replace("CombinedTest: method=", "")) from None
    return value


def _config_choice(field: str, value: str) -> str:
    from gsafe_models.detector import DetectorConfig

    try:
        DetectorConfig(**{field: value})
    except ValueError as e:
        raise typer.BadParameter(str(e).replace(f"DetectorConfig: {field}=", "")) from None
    return value


def _representation(value: str) -> str:
    return _config_choice("representation", value)


def _optimizer(value: str) -> str:
    return _config_choice("optimizer", value)


def _statistics(value: str) -> tuple[str, ...]:
    from gsafe_models.detector import DetectorConfig   # its own check: whatever statistics it knows

    names = tuple(x.strip() for x in value.split(",") if x.strip())
    try:
        DetectorConfig(statistics=names)
    except ValueError as e:
        raise typer.BadParameter(str(e).replace("DetectorConfig: ", "")) from None
    return names


def _method(value: str) -> str:
    from gsafe_models.explain import METHODS

    if value not in METHODS:
        raise typer.BadParameter(f"{value!r} is not an attribution method; choose one of {', '.join(METHODS)}")
    return value


def _model_name(value: str) -> str:
    from infra.errors import ModelRefError
    from infra.tracking import check_model_name

    try:
        return check_model_name(value)
    except ModelRefError as e:
        raise typer.BadParameter(str(e)) from None


_FLAGS = {"chunk_size": "--chunk-size", "max_missing_frac": "--max-missing", "objid_key": "--objid-key",
          "n_workers": "--workers", "dask_address": "--dask-address", "home": "--home"}


def _fail(message: str, code: int) -> None:
    """End the command: the error on stderr (and as JSON on stdout with --json), exit `code`."""
    typer.echo(f"gsafe: error: {message}", err=True)
    if _STATE["json"]:
        typer.echo(json.dumps({"ok": False, "error": message, "exit_code": code}))
    raise typer.Exit(code)


def _setup(home: Optional[Path] = None, verbose: bool = False, as_json: bool = False, config: Optional[Path] = None,
           **overrides) -> Settings:
    """The settings from flags, environment and settings file, validated; the environment set up for flows."""
    from pydantic import ValidationError

    from infra.runtime import configure_environment

    _STATE.update(json=as_json, verbose=verbose)
    try:
        s = get_settings(config=config, home=home, verbose=verbose or None, **overrides)
    except GsafeError as e:       # the settings file: missing, not TOML, an unknown key
        _fail(str(e), e.exit_code)
    except ValidationError as e:
        from infra.settings import config_file

        also = f" (or the settings file {config_file()})" if config_file() else ""
        what = "; ".join(f"{_FLAGS.get(str(err['loc'][0]), 'GSAFE_' + str(err['loc'][0]).upper())}{also} "
                         f"{err.get('input')!r}: {err['msg'].lower()}" for err in e.errors())
        _fail(what, EXIT_USAGE)
    configure_environment(s)
    return s


def _guarded(fn, *args, **kwargs):
    """Call `fn`; gsafe's errors and any other failure end the command in one line, never a traceback."""
    try:
        return fn(*args, **kwargs)
    except (typer.Exit, typer.BadParameter, KeyboardInterrupt):
        raise
    except GsafeError as e:
        _fail(str(e), e.exit_code)
    except Exception as e:  # noqa: BLE001 - the user gets one line; --verbose shows the traceback
        if _STATE["verbose"]:
            import traceback

            traceback.print_exc()
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        _fail(f"{type(e).__name__}: {first} (an unexpected failure; rerun with --verbose for the traceback)",
              EXIT_RUNTIME)


def _run(fn, *args, **kwargs):
    """Run a flow with one Prefect server for this process and its workers; errors without tracebacks."""
    from infra.runtime import ensure_prefect_server, flow_context

    def go():
        ensure_prefect_server(get_settings())
        with flow_context():
            return fn(*args, **kwargs)

    return _guarded(go)


def _resolve(s: Settings, model: str, *stores: str):
    """The model reference resolved once, and checked against each store, before any flow starts."""
    from infra import tracking
    from tasks.score import check_model_fits_store

    def go():
        tracking.configure(s)
        ref = tracking.resolve(model)
        for url in stores:
            check_model_fits_store(ref, url)
        return ref

    return _guarded(go)


def _emit(result: dict, *lines: str) -> None:
    """The command's result: `lines` for people, or one JSON object (``ok: true`` + `result`) with --json."""
    if _STATE["json"]:
        typer.echo(json.dumps({"ok": True, **result}, default=_jsonable))
    else:
        for line in lines:
            typer.echo(line)


def _jsonable(v):
    import numpy as np

    if isinstance(v, (np.integer, np.floating, np.bool_)):
        return v.item()
    if isinstance(v, Path):
        return str(v)
    if hasattr(v, "to_dict"):            # a DataFrame
        return v.to_dict(orient="records")
    return str(v)


def _settings_dict(s: Settings) -> dict:
    return s.model_dump(mode="json")


@app.command()
def simulate(n: int = typer.Option(2000, "--n", min=1, help="number of objects"),
             anomaly_frac: float = typer.Option(0.05, "--anomaly-frac", min=0.0, max=1.0, help="share of objects with an injected anomaly"),
             seed: int = typer.Option(0, "--seed", min=0, help="same seed, same survey"),
             fits: Optional[Path] = typer.Option(None, "--fits", help="write one FITS cube per object in this directory (truth table beside it: DIR_truth.fits)"),
             store: Optional[str] = typer.Option(None, "--store", help="write a survey store directly (labels in its catalog)"),
             classes: Optional[str] = typer.Option(None, "--classes", help="comma-separated anomaly classes to inject (default: all)"),
             home: Optional[Path] = HOME, config: Optional[Path] = CONFIG, verbose: bool = VERBOSE,
             as_json: bool = JSON):
    """Simulate a multi-band survey (GalSim: bulge+disk galaxies, PSF, sky noise) with injected anomalies
    (lenses, mergers, trails, cosmic rays, saturated stars, blends)."""
    s = _setup(home, verbose, as_json, config)
    from gsafe_models.simulate import ANOMALY_CLASSES
    from tasks.simulate import simulate_survey

    if (fits is None) == (store is None):
        _fail("simulate: give exactly one of --fits DIR or --store S.zarr", EXIT_USAGE)
    cls = tuple(c.strip() for c in classes.split(",")) if classes else ANOMALY_CLASSES
    bad = [c for c in cls if c not in ANOMALY_CLASSES]
    if bad:
        _fail(f"simulate: unknown classes {bad}; known: {', '.join(ANOMALY_CLASSES)}", EXIT_USAGE)
    t0 = time.perf_counter()
    r = _guarded(simulate_survey, n, settings=s, seed=seed, anomaly_frac=anomaly_frac, store=store,
                 fits_dir=str(fits) if fits else None, classes=cls)
    where = store or f"{fits}/ (truth: {r['truth']})"
    seconds = time.perf_counter() - t0
    _emit({"command": "simulate", "n": n, **r, "store": store, "fits": fits, "seconds": seconds},
          f"simulate: {n} objects ({r['anomalies']} anomalies) → {where} in {seconds:.1f} s")


@app.command()
def ingest(source: str = typer.Argument(..., help="a directory of FITS cutouts, a FITS tile (with --catalog), or a .npy/.npz file"),
           store: str = typer.Option(..., "--store", help="survey store (path or s3://-style URL); created if missing"),
           catalog: Optional[str] = typer.Option(None, "--catalog", help="CSV/FITS table with ra,dec or x,y: cut SOURCE (a tile) around each row"),
           labels: Optional[str] = typer.Option(None, "--labels", help="truth table (object_id, label, anomaly_class[, footprint]) to join"),
           chunk_size: Optional[int] = typer.Option(None, "--chunk-size", help="cutouts per store chunk (new stores)"),
           max_missing: Optional[float] = typer.Option(None, "--max-missing", help="quarantine cutouts with a larger share of non-finite pixels (default 0.25)"),
           objid_key: Optional[str] = typer.Option(None, "--objid-key", help="FITS header keyword of the object id (default OBJID)"),
           mask_bits: Optional[str] = typer.Option(None, "--mask-bits", help="comma-separated mask planes (MP_<NAME> of a MASK HDU) or bit numbers whose pixels become missing (default BAD,SAT,INTRP,CR,EDGE,NO_DATA; '' for none)"),
           workers: Optional[int] = typer.Option(None, "--workers", min=1, help="processes reading the input (default: cores - 1 on 3+ cores for 256+ inputs, else 1)"),
           home: Optional[Path] = HOME, config: Optional[Path] = CONFIG, verbose: bool = VERBOSE,
           as_json: bool = JSON):
    """Validate and add cutouts to a survey store. Bad input goes to the store's quarantine with its reason;
    objects already in the store are skipped, so re-running adds nothing twice. Safe to run while
    another ingest or a campaign uses the same store (one writer at a time)."""
    bits = None if mask_bits is None else tuple(x.strip() for x in mask_bits.split(",") if x.strip())
    s = _setup(home, verbose, as_json, config, chunk_size=chunk_size, max_missing_frac=max_missing, objid_key=objid_key,
               mask_bits=bits, ingest_workers=workers)
    from flows.ingest import ingest_flow

    r = _run(ingest_flow, source, store, _settings_dict(s), catalog=catalog, labels=labels)
    _emit({"command": "ingest", "store": store, **r},
          r["line"] + (f"; labels joined for {r['labelled']} objects from {r['truth']}" if "labelled" in r else ""))


@app.command()
def train(store: str = typer.Option(..., "--store", help="survey store to learn 'normal' from"),
          model: str = typer.Option(..., "--model", parser=_model_name, help="registered model name (letters, digits, . _ -); a new version gets alias 'challenger'"),
          seed: int = typer.Option(0, "--seed", min=0, help="seeds weights, data order, densities and calibration folds: same seed, same model"),
          epochs: Optional[int] = typer.Option(None, "--epochs", min=1, help="maximum epochs (early stopping on a validation split)"),
          representation: Optional[str] = typer.Option(None, "--representation", parser=_representation, help="the representation network: ae (autoencoder, default), vae, or gan (WGAN-GP with an encoder; C and AS then use the critic's features)"),
          optimizer: Optional[str] = typer.Option(None, "--optimizer", parser=_optimizer, help="how the representation is trained: adam (default) or langevin (constrained Langevin dynamics; see bench/robustness.py)"),
          latent_dim: Optional[int] = typer.Option(None, "--latent-dim", min=1, help="size of the latent space (default 32)"),
          beta: Optional[float] = typer.Option(None, "--beta", min=0.0, help="VAE β: weight of the KL term (default 1)"),
          contrastive: Optional[float] = typer.Option(None, "--contrastive", min=0.0, help="weight of a SimCLR term on the autoencoder's latents (rotations, flips, shifts, noise redraws of each cutout; default 0: a plain autoencoder; see BENCHMARKS.md)"),
          statistics: Optional[str] = typer.Option(None, "--statistics", parser=_statistics, help="comma-separated score statistics, among the Detector's (an unknown one lists them), or all; default: departure_density_pca, chi_chromatic_pca, chosen on synthetic perturbations of normal objects, see BENCHMARKS.md"),
          combination: Optional[str] = typer.Option(None, "--combination", parser=_combination, help="rule combining the statistics' p-values: simes (default), bonferroni, fisher, stouffer, cauchy, dose, or exposure (monotone trees trained on the validation split against perturbed copies of it; use it with --statistics all, see BENCHMARKS.md)"),
          calibration_trim: Optional[float] = typer.Option(None, "--calibration-trim", min=0.0, max=0.5, help="largest share of calibration values that may be dropped as outliers (the anomalies a 'normal' set holds; default 0 keeps all: with 0.05 a heavy normal tail was taken for outliers, see BENCHMARKS.md)"),
          calibration_folds: Optional[int] = typer.Option(None, "--calibration-folds", min=0, max=20, help="cross-fit the calibration over the training objects in K folds (2-20; 0 = off, the default unless review labels leave objects out or the calibration split holds fewer than 120 objects, then 3; see BENCHMARKS.md)"),
          home: Optional[Path] = HOME, config: Optional[Path] = CONFIG, verbose: bool = VERBOSE,
          as_json: bool = JSON):
    """Train a Detector (representation + latent densities + calibrated combined test) on a store,
    log the run to MLflow and register the Detector as a new model version."""
    s = _setup(home, verbose, as_json, config)
    from flows.train import train_flow
    from infra.store import SurveyStore

    cfg = {"seed": seed, "epochs": epochs, "representation": representation, "optimizer": optimizer, "latent_dim": latent_dim,
           "beta": beta, "contrastive": contrastive, "combination": combination, "calibration_trim": calibration_trim, "statistics": statistics, "calibration_folds": calibration_folds}
    cfg = {k: v for k, v in cfg.items() if v is not None}
    _guarded(SurveyStore.open, store)              # a missing store fails here, not after the server started
    r = _run(train_flow, store, model, cfg, _settings_dict(s))
    m = " ".join(f"{k}={v:.4f}" for k, v in r["metrics"].items() if k in ("val_auroc", "calibration_ks"))
    if r["metrics"].get("val_seen_by_combination") and "val_auroc" in r["metrics"]:
        m += " (val_auroc is optimistic: the exposure trees learned from the val split; judge it with gsafe promote --validation)"
    n_cal = int(r["metrics"].get("calibration_n", 0))
    pool = int(r.get("review_pool", n_cal))
    look = calibration_review_size(pool)
    line = f"train: registered {model} version {r['version']} (alias challenger) {m}".rstrip()
    hint = ()
    if look:  # what limits the next list, and the few looks that lift it
        objects = (f"{n_cal} calibration objects" if pool == n_cal else
                   f"{n_cal} calibration objects now, {pool} once a review has labelled a departure (the next training "
                   f"cross-fits its calibration over the training objects)")
        hint = (f"train: {objects}; anomalies among their top shorten every list. Review them "
                f"(~{look} looks): gsafe score --store {store} --model {model}/{r['version']}, then gsafe review --store "
                f"{store} --model {model}/{r['version']} --calibration --pool {look}, then train again",)
    _emit({"command": "train", **r, "calibration_review": look}, line, *hint)


def calibration_review_size(n_calibration: int, share: float = 0.02, least: int = 10) -> int:
    """The calibration objects worth a look after training: the top `share` (2 %), at least `least`
    (all of them under that). On fourteen simulated seeds, labelling the anomalies among the top 2 %
    gave the lists most of what a complete review of the split gives (BENCHMARKS.md, "`combination=
    "exposure"`"); 0 when there is no calibration split."""
    if n_calibration <= 0:
        return 0
    import math

    return int(min(n_calibration, max(least, math.ceil(share * n_calibration))))


@app.command()
def score(store: str = STORE,
          model: str = MODEL_REF,
          out: Optional[Path] = typer.Option(None, "--out", help="CSV (or .parquet) of object_id, score, p_value, q_value and one column per statistic"),
          dask_address: Optional[str] = DASK, workers: Optional[int] = WORKERS,
          home: Optional[Path] = HOME, config: Optional[Path] = CONFIG, verbose: bool = VERBOSE,
          as_json: bool = JSON):
    """A reprocessing campaign: score every object of a store, chunk-parallel on Dask. Killed and
    restarted, it redoes only unfinished chunks; run alongside an ingest, it scores what is committed."""
    s = _setup(home, verbose, as_json, config, dask_address=dask_address, n_workers=workers)
    from flows.score import run_campaign
    from infra.safe_output import write_table
    from infra.store import SurveyStore
    from tasks.score import read_scores

    ref = _resolve(s, model, store)
    r = _run(run_campaign, store, ref.name, ref.version, s)

    def report():
        st = SurveyStore.open(store)
        table = st.score_table(ref.name, ref.version)
        if out:  # the whole table in memory only when asked for it; ids are strangers' text
            write_table(read_scores(st, table), out)
        return sum(int((table.read(["q_value"], i, i + st.chunk_size)["q_value"] <= 0.1).sum())
                   for i in range(0, table.n, st.chunk_size))

    n_sig = _guarded(report)
    _emit({"command": "score", "model": ref.name, "version": ref.version, **r, "candidates_q_0.1": n_sig,
           "out": str(out) if out else None},
          f"score: {r['n']} objects with {ref} ({r['chunks_scored']} chunks scored now) in {r['seconds']:.1f} s; "
          f"{n_sig} candidates at q ≤ 0.1" + (f"; table → {out}" if out else ""))


@app.command()
def explain(store: str = STORE,
            model: str = MODEL_REF,
            top_k: int = typer.Option(50, "--top-k", min=1, help="explain the k most anomalous objects"),
            out: Path = typer.Option(Path("report"), "--out", help="output directory of the gallery"),
            method: str = typer.Option("integrated_gradients", "--method", parser=_method, help="attribution: integrated_gradients, occlusion, lex, residual or duplex (counterfactual from the generative model; an unknown one lists them)"),
            home: Optional[Path] = HOME, config: Optional[Path] = CONFIG, verbose: bool = VERBOSE,
            as_json: bool = JSON):
    """Write the anomaly gallery of the top-k objects: colour composite, reconstruction, residual,
    attribution map, statistics, p/q-values, neighbours, latent map (HTML + PNG + CSV/Parquet)."""
    s = _setup(home, verbose, as_json, config)
    from flows.explain import explain_flow

    ref = _resolve(s, model, store)
    r = _run(explain_flow, store, ref.name, ref.version, top_k, str(out), _settings_dict(s), method=method)
    _emit({"command": "explain", "model": ref.name, "version": ref.version, **r},
          f"explain: {r['cards']} cards → {r['index']}")


@app.command()
def promote(model: str = typer.Option(..., "--model", parser=_model_name, help="registered model name (its @challenger is judged)"),
            validation: str = typer.Option(..., "--validation", help="labelled validation store"),
            tolerance: float = typer.Option(0.0, "--tolerance", min=0.0, max=1.0, help="AUROC the challenger may lose and still be promoted"),
            dask_address: Optional[str] = DASK, workers: Optional[int] = WORKERS,
            home: Optional[Path] = HOME, config: Optional[Path] = CONFIG, verbose: bool = VERBOSE,
            as_json: bool = JSON):
    """Score challenger and champion on the same validation store; move alias 'champion' to the
    challenger only if it detects at least as well and stays calibrated. Decision recorded as tags."""
    s = _setup(home, verbose, as_json, config, dask_address=dask_address, n_workers=workers)
    from flows.promote import promote_flow

    _resolve(s, f"{model}@challenger", validation)
    r = _run(promote_flow, model, validation, _settings_dict(s), tolerance=tolerance)
    _emit({"command": "promote", **r}, f"promote: {r['decision']} version {r['challenger']}: {r['reason']} "
                                       f"(champion now {r['champion_after']})")


@app.command()
def hunt(store: str = STORE,
         model: str = typer.Option(..., "--model", help="NAME, NAME@alias or NAME/version; usually NAME@champion"),
         source: Optional[str] = typer.Option(None, "--source", help="new cutouts to ingest first (dir of FITS, .npy...)"),
         out: Path = typer.Option(Path("hunt_out"), "--out", help="where candidates.csv and the gallery (report/) go"),
         alpha: float = typer.Option(0.1, "--alpha", min=1e-6, max=1.0, help="false discovery rate of the candidate list"),
         top_k: int = typer.Option(50, "--top-k", min=1, help="new objects explained in the gallery (most anomalous first)"),
         dask_address: Optional[str] = DASK, workers: Optional[int] = WORKERS,
         home: Optional[Path] = HOME, config: Optional[Path] = CONFIG, verbose: bool = VERBOSE,
         as_json: bool = JSON):
    """Ingest new files, score only what is new, write the FDR-controlled candidate list and the gallery;
    test the new objects for drift (an alarm when they are unlike the calibration data)."""
    s = _setup(home, verbose, as_json, config, dask_address=dask_address, n_workers=workers)
    from flows.hunt import hunt_flow
    from infra.store import SurveyStore

    if _guarded(SurveyStore.exists, store):
        _resolve(s, model, store)
    r = _run(hunt_flow, store, model, _settings_dict(s), source=source, out=str(out), alpha=alpha, top_k=top_k)
    _emit({"command": "hunt", **r}, r["message"])


@app.command()
def serve(cron: str = typer.Option("0 3 * * *", "--cron", help="schedule of the hunt (cron syntax, UTC)"),
          store: str = STORE,
          model: str = typer.Option(..., "--model", help="NAME, NAME@alias or NAME/version; usually NAME@champion (resolved at each hunt)"),
          source: Optional[str] = typer.Option(None, "--source", help="directory watched for new cutouts"),
          out: Path = typer.Option(Path("hunt_out"), "--out", help="where each hunt writes candidates.csv and the gallery"),
          alpha: float = typer.Option(0.1, "--alpha", min=1e-6, max=1.0, help="false discovery rate of the candidate list"),
          top_k: int = typer.Option(50, "--top-k", min=1, help="objects explained in each hunt's gallery"),
          home: Optional[Path] = HOME, config: Optional[Path] = CONFIG, verbose: bool = VERBOSE,
          as_json: bool = JSON):
    """Serve the hunt as a scheduled Prefect deployment, one run at a time (a run that finds the last
    one still going is cancelled). Starts a Prefect server unless PREFECT_API_URL is set (a temporary
    server never fires schedules). Stop with Ctrl-C or SIGTERM. With --json, one JSON object once serving."""
    s = _setup(home, verbose, as_json, config)
    from prefect.client.schemas.schedules import CronSchedule   # Prefect's own check of the schedule
    from pydantic import ValidationError

    try:
        CronSchedule(cron=cron)
    except ValidationError:
        _fail(f"serve: --cron {cron!r} is not a cron schedule (minute hour day month weekday, e.g. '0 3 * * *')", EXIT_USAGE)
    from flows.serve import serve_hunt

    _guarded(serve_hunt, s, cron=cron, store_url=store, model=model, source=source, out=str(out), alpha=alpha,
             top_k=top_k, announce=(lambda info: _emit({"command": "serve", **info})) if as_json else None)


@app.command()
def demo(out: Path = typer.Option(Path("demo_out"), "--out", help="where the survey, scores and report go"),
         n: int = typer.Option(2000, "--n", min=100, help="objects in the simulated survey (2 000 and 10 epochs: the "
                                                            "AUROC of 4 000 and 20 in about half the time; BENCHMARKS.md)"),
         anomaly_frac: float = typer.Option(0.05, "--anomaly-frac", min=0.0, max=1.0, help="share of objects with an injected anomaly"),
         epochs: int = typer.Option(10, "--epochs", min=1, help="maximum training epochs (early stopping; gsafe train's default is 20)"),
         seed: int = typer.Option(0, "--seed", min=0, help="same seed, same survey and model"),
         top_k: int = typer.Option(12, "--top-k", min=1, help="objects explained in the gallery"),
         home: Optional[Path] = HOME, config: Optional[Path] = CONFIG, verbose: bool = VERBOSE,
         as_json: bool = JSON):
    """The whole hunt on a simulated survey: simulate → ingest → train → score → AUROC → gallery."""
    s = _setup(home or out / ".gsafe", verbose, as_json, config)
    from flows.demo import demo_flow

    t0 = time.perf_counter()
    cfg = {"seed": seed, "epochs": epochs}
    r = _run(demo_flow, str(out), _settings_dict(s), n=n, anomaly_frac=anomaly_frac, seed=seed, config=cfg, top_k=top_k)
    if as_json:
        _emit({"command": "demo", "auroc": r["per_class"]["all"]["auroc"], "seconds": time.perf_counter() - t0, **r})
        return
    typer.echo(r["ingest"]["line"])
    typer.echo(f"model {r['model']} registered (alias challenger) in {s.tracking_uri}")
    typer.echo("\ntop candidates:")
    typer.echo(r["top"][["object_id", "score", "p_value", "q_value"]].to_string(index=False))
    typer.echo("\ndetection of the injected anomalies (all objects):")
    for c, m in r["per_class"].items():
        typer.echo(f"  {c:16s} n={m['n']:5d}  AUROC {m['auroc']:.3f}  AP {m['ap']:.3f}")
    f = r["fdr"]
    typer.echo(f"\nfalse-discovery list at q ≤ 0.1: {f['listed']} objects, {f['false']} of them not injected anomalies")
    typer.echo(f"scores → {r['scores_csv']}; gallery → {r['report']['index']}")
    typer.echo(f"demo: AUROC {r['per_class']['all']['auroc']:.3f} in {time.perf_counter() - t0:.0f} s")


@app.command()
def info(store: str = typer.Argument(..., help="survey store"), home: Optional[Path] = HOME,
         config: Optional[Path] = CONFIG,
         as_json: bool = JSON):
    """Summarise a store: size, bands, catalog columns, quarantine reasons, scoring campaigns."""
    _setup(home, False, as_json, config)
    from collections import Counter

    from infra.store import SurveyStore

    st = _guarded(SurveyStore.open, store)
    q = st.read_quarantine()
    reasons = Counter(r.split(':')[0] for r in q["reason"]).most_common(10)
    tables = [(m, v, st.score_table(m, v)) for m, v in st.score_tables()]
    result = {"command": "info", "store": store, "n": st.n, "bands": list(st.bands), "height": st.image_shape[1],
              "width": st.image_shape[2], "chunk_size": st.chunk_size, "columns": st.columns,
              "quarantined": len(q["source"]), "quarantine_reasons": dict(reasons),
              "campaigns": [{"model": m, "version": v, "rows": t.n, "pending_chunks": len(t.pending_chunks())}
                            for m, v, t in tables]}
    _emit(result,
          f"{store}: {st.n} objects, bands {','.join(st.bands)}, cutouts {st.image_shape[1]}×{st.image_shape[2]}, "
          f"chunk {st.chunk_size}",
          f"catalog: {', '.join(st.columns)}",
          f"quarantine: {len(q['source'])} inputs",
          *(f"  {k:6d}  {reason}" for reason, k in reasons),
          *(f"scores {m}/{v}: {t.n} rows, {len(t.pending_chunks())} chunks pending" for m, v, t in tables))


from review.cli import review as _review  # noqa: E402  (import-light: typer only)

app.command(name="review")(_review)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
