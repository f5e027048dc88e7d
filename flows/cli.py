"""`gsafe`: the command line face of the flows.

Every command fills the one Settings object from its flags, sets up the environment (quiet Prefect
under $GSAFE_HOME, MLflow on SQLite unless MLFLOW_TRACKING_URI says otherwise) and runs a flow.
Flows are imported inside the commands, after the environment is set, so `gsafe --help` is instant.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from infra.errors import GsafeError
from infra.settings import Settings, get_settings

app = typer.Typer(
    name="gsafe", no_args_is_help=True, add_completion=False, rich_markup_mode=None,
    help="Anomaly hunting in astronomical survey imaging with generative models: calibrated p-values, "
         "false-discovery-controlled candidate lists and explanations for every top anomaly.\n\n"
         "Quick start: `gsafe demo` simulates a survey with injected anomalies and runs the whole hunt.")

HOME = typer.Option(None, "--home", help="where gsafe keeps MLflow and Prefect state (env GSAFE_HOME; default ~/.gsafe)")
VERBOSE = typer.Option(False, "--verbose", "-v", help="show Prefect, Dask and MLflow logs")
DASK = typer.Option(None, "--dask-address", help="tcp://host:port of an existing Dask scheduler (default: a LocalCluster sized to this machine)")
WORKERS = typer.Option(None, "--workers", help="workers of the local Dask cluster (default: one per core, or per GPU)")


def _setup(home: Optional[Path] = None, verbose: bool = False, **overrides) -> Settings:
    from infra.runtime import configure_environment

    s = get_settings(home=home, verbose=verbose or None, **overrides)
    configure_environment(s)
    return s


def _run(fn, *args, **kwargs):
    """Run a flow with one Prefect server for this process and its workers; errors without tracebacks."""
    from infra.runtime import ensure_prefect_server, flow_context

    try:
        ensure_prefect_server(get_settings())
        with flow_context():
            return fn(*args, **kwargs)
    except GsafeError as e:
        typer.echo(f"gsafe: error: {e}", err=True)
        raise typer.Exit(2)


def _settings_dict(s: Settings) -> dict:
    return s.model_dump(mode="json")


@app.command()
def simulate(n: int = typer.Option(2000, "--n", help="number of objects"),
             anomaly_frac: float = typer.Option(0.05, "--anomaly-frac", help="share of objects with an injected anomaly"),
             seed: int = typer.Option(0, "--seed", help="same seed, same survey"),
             fits: Optional[Path] = typer.Option(None, "--fits", help="write one FITS cube per object in this directory (truth table beside it: DIR_truth.fits)"),
             store: Optional[str] = typer.Option(None, "--store", help="write a survey store directly (labels in its catalog)"),
             classes: Optional[str] = typer.Option(None, "--classes", help="comma-separated anomaly classes to inject (default: all)"),
             home: Optional[Path] = HOME, verbose: bool = VERBOSE):
    """Simulate a multi-band survey (GalSim: bulge+disk galaxies, PSF, sky noise) with injected anomalies
    (lenses, mergers, trails, cosmic rays, saturated stars, blends)."""
    s = _setup(home, verbose)
    from gsafe_models.simulate import ANOMALY_CLASSES
    from tasks.simulate import simulate_survey

    if (fits is None) == (store is None):
        typer.echo("gsafe simulate: give exactly one of --fits DIR or --store S.zarr", err=True)
        raise typer.Exit(2)
    cls = tuple(c.strip() for c in classes.split(",")) if classes else ANOMALY_CLASSES
    bad = [c for c in cls if c not in ANOMALY_CLASSES]
    if bad:
        typer.echo(f"gsafe simulate: unknown classes {bad}; known: {', '.join(ANOMALY_CLASSES)}", err=True)
        raise typer.Exit(2)
    t0 = time.perf_counter()
    try:
        r = simulate_survey(n, settings=s, seed=seed, anomaly_frac=anomaly_frac, store=store,
                            fits_dir=str(fits) if fits else None, classes=cls)
    except GsafeError as e:
        typer.echo(f"gsafe: error: {e}", err=True)
        raise typer.Exit(2)
    where = store or f"{fits}/ (truth: {r['truth']})"
    typer.echo(f"simulate: {n} objects ({r['anomalies']} anomalies) → {where} in {time.perf_counter() - t0:.1f} s")


@app.command()
def ingest(source: str = typer.Argument(..., help="a directory of FITS cutouts, a FITS tile (with --catalog), or a .npy/.npz file"),
           store: str = typer.Option(..., "--store", help="survey store (path or s3://-style URL); created if missing"),
           catalog: Optional[str] = typer.Option(None, "--catalog", help="CSV/FITS table with ra,dec or x,y: cut SOURCE (a tile) around each row"),
           labels: Optional[str] = typer.Option(None, "--labels", help="truth table (object_id, label, anomaly_class[, footprint]) to join"),
           chunk_size: Optional[int] = typer.Option(None, "--chunk-size", help="cutouts per store chunk (new stores)"),
           max_missing: Optional[float] = typer.Option(None, "--max-missing", help="quarantine cutouts with a larger share of non-finite pixels (default 0.25)"),
           objid_key: Optional[str] = typer.Option(None, "--objid-key", help="FITS header keyword of the object id (default OBJID)"),
           home: Optional[Path] = HOME, verbose: bool = VERBOSE):
    """Validate and add cutouts to a survey store. Bad input goes to the store's quarantine with its reason;
    objects already in the store are skipped, so re-running adds nothing twice."""
    s = _setup(home, verbose, chunk_size=chunk_size, max_missing_frac=max_missing, objid_key=objid_key)
    from flows.ingest import ingest_flow

    r = _run(ingest_flow, source, store, _settings_dict(s), catalog=catalog, labels=labels)
    typer.echo(r["line"] + (f"; labels joined for {r['labelled']} objects from {r['truth']}" if "labelled" in r else ""))


@app.command()
def train(store: str = typer.Option(..., "--store", help="survey store to learn 'normal' from"),
          model: str = typer.Option(..., "--model", help="registered model name; a new version gets alias 'challenger'"),
          seed: int = typer.Option(0, "--seed"),
          epochs: Optional[int] = typer.Option(None, "--epochs", help="maximum epochs (early stopping on a validation split)"),
          representation: Optional[str] = typer.Option(None, "--representation", help="ae or vae"),
          latent_dim: Optional[int] = typer.Option(None, "--latent-dim"),
          beta: Optional[float] = typer.Option(None, "--beta", help="VAE β"),
          statistics: Optional[str] = typer.Option(None, "--statistics", help="comma-separated score statistics (default: the benchmark's best set)"),
          combination: Optional[str] = typer.Option(None, "--combination", help="fisher, stouffer, simes, bonferroni, cauchy or dose"),
          calibration_trim: Optional[float] = typer.Option(None, "--calibration-trim", help="largest share of calibration values that may be dropped as outliers (the anomalies a 'normal' set holds; default 0.05, 0 keeps all)"),
          home: Optional[Path] = HOME, verbose: bool = VERBOSE):
    """Train a Detector (representation + latent densities + calibrated combined test) on a store,
    log the run to MLflow and register the Detector as a new model version."""
    s = _setup(home, verbose)
    from flows.train import train_flow

    cfg = {"seed": seed, "epochs": epochs, "representation": representation, "latent_dim": latent_dim,
           "beta": beta, "combination": combination, "calibration_trim": calibration_trim,
           "statistics": tuple(x.strip() for x in statistics.split(",")) if statistics else None}
    r = _run(train_flow, store, model, {k: v for k, v in cfg.items() if v is not None}, _settings_dict(s))
    m = " ".join(f"{k}={v:.4f}" for k, v in r["metrics"].items() if k in ("val_auroc", "calibration_ks"))
    typer.echo(f"train: registered {model} version {r['version']} (alias challenger) {m}".rstrip())


@app.command()
def score(store: str = typer.Option(..., "--store"),
          model: str = typer.Option(..., "--model", help="NAME, NAME@alias or NAME/version"),
          out: Optional[Path] = typer.Option(None, "--out", help="CSV (or .parquet) of object_id, score, p_value, q_value and one column per statistic"),
          dask_address: Optional[str] = DASK, workers: Optional[int] = WORKERS,
          home: Optional[Path] = HOME, verbose: bool = VERBOSE):
    """A reprocessing campaign: score every object of a store, chunk-parallel on Dask. Killed and
    restarted, it redoes only unfinished chunks."""
    s = _setup(home, verbose, dask_address=dask_address, n_workers=workers)
    from flows.score import run_campaign
    from infra import tracking
    from infra.store import SurveyStore
    from tasks.score import read_scores

    def go():
        tracking.configure(s)
        ref = tracking.resolve(model)
        r = run_campaign(store, ref.name, ref.version, s)
        return ref, r

    ref, r = _run(go)
    st = SurveyStore.open(store)
    table = st.score_table(ref.name, ref.version)
    if out:  # the whole table in memory only when asked for it
        df = read_scores(st, table)
        out.parent.mkdir(parents=True, exist_ok=True)
        df.to_parquet(out, index=False) if out.suffix == ".parquet" else df.to_csv(out, index=False)
    n_sig = sum(int((table.read(["q_value"], i, i + st.chunk_size)["q_value"] <= 0.1).sum())
                for i in range(0, table.n, st.chunk_size))
    typer.echo(f"score: {r['n']} objects with {ref} ({r['chunks_scored']} chunks scored now) in {r['seconds']:.1f} s; "
               f"{n_sig} candidates at q ≤ 0.1" + (f"; table → {out}" if out else ""))


@app.command()
def explain(store: str = typer.Option(..., "--store"),
            model: str = typer.Option(..., "--model", help="NAME, NAME@alias or NAME/version"),
            top_k: int = typer.Option(50, "--top-k", help="explain the k most anomalous objects"),
            out: Path = typer.Option(Path("report"), "--out", help="output directory of the gallery"),
            method: str = typer.Option("integrated_gradients", "--method", help="attribution: integrated_gradients, occlusion, lex or residual"),
            home: Optional[Path] = HOME, verbose: bool = VERBOSE):
    """Write the anomaly gallery of the top-k objects: colour composite, reconstruction, residual,
    attribution map, statistics, p/q-values, neighbours, latent map (HTML + PNG + CSV/Parquet)."""
    s = _setup(home, verbose)
    from flows.explain import explain_flow
    from infra import tracking

    def go():
        tracking.configure(s)
        ref = tracking.resolve(model)
        return explain_flow(store, ref.name, ref.version, top_k, str(out), _settings_dict(s), method=method)

    r = _run(go)
    typer.echo(f"explain: {r['cards']} cards → {r['index']}")


@app.command()
def promote(model: str = typer.Option(..., "--model", help="registered model name"),
            validation: str = typer.Option(..., "--validation", help="labelled validation store"),
            tolerance: float = typer.Option(0.0, "--tolerance", help="AUROC the challenger may lose and still be promoted"),
            dask_address: Optional[str] = DASK, workers: Optional[int] = WORKERS,
            home: Optional[Path] = HOME, verbose: bool = VERBOSE):
    """Score challenger and champion on the same validation store; move alias 'champion' to the
    challenger only if it detects at least as well and stays calibrated. Decision recorded as tags."""
    s = _setup(home, verbose, dask_address=dask_address, n_workers=workers)
    from flows.promote import promote_flow

    r = _run(promote_flow, model, validation, _settings_dict(s), tolerance=tolerance)
    typer.echo(f"promote: {r['decision']} version {r['challenger']}: {r['reason']} "
               f"(champion now {r['champion_after']})")


@app.command()
def hunt(store: str = typer.Option(..., "--store"),
         model: str = typer.Option(..., "--model", help="usually NAME@champion"),
         source: Optional[str] = typer.Option(None, "--source", help="new cutouts to ingest first (dir of FITS, .npy...)"),
         out: Path = typer.Option(Path("hunt_out"), "--out"),
         alpha: float = typer.Option(0.1, "--alpha", help="false discovery rate of the candidate list"),
         top_k: int = typer.Option(50, "--top-k"),
         dask_address: Optional[str] = DASK, workers: Optional[int] = WORKERS,
         home: Optional[Path] = HOME, verbose: bool = VERBOSE):
    """Ingest new files, score only what is new, write the FDR-controlled candidate list and the gallery."""
    s = _setup(home, verbose, dask_address=dask_address, n_workers=workers)
    from flows.hunt import hunt_flow

    r = _run(hunt_flow, store, model, _settings_dict(s), source=source, out=str(out), alpha=alpha, top_k=top_k)
    typer.echo(r["message"])


@app.command()
def serve(cron: str = typer.Option("0 3 * * *", "--cron", help="schedule of the hunt (cron syntax, UTC)"),
          store: str = typer.Option(..., "--store"),
          model: str = typer.Option(..., "--model"),
          source: Optional[str] = typer.Option(None, "--source", help="directory watched for new cutouts"),
          out: Path = typer.Option(Path("hunt_out"), "--out"),
          alpha: float = typer.Option(0.1, "--alpha", help="false discovery rate of the candidate list"),
          top_k: int = typer.Option(50, "--top-k", help="objects explained in each hunt's gallery"),
          home: Optional[Path] = HOME, verbose: bool = VERBOSE):
    """Serve the hunt as a scheduled Prefect deployment. Starts a Prefect server unless PREFECT_API_URL
    is set (a temporary server never fires schedules). Stop with Ctrl-C or SIGTERM."""
    s = _setup(home, verbose)
    from flows.serve import serve_hunt

    try:
        serve_hunt(s, cron=cron, store_url=store, model=model, source=source, out=str(out), alpha=alpha, top_k=top_k)
    except GsafeError as e:
        typer.echo(f"gsafe: error: {e}", err=True)
        raise typer.Exit(2)


@app.command()
def demo(out: Path = typer.Option(Path("demo_out"), "--out", help="where the survey, scores and report go"),
         n: int = typer.Option(4000, "--n", help="objects in the simulated survey"),
         anomaly_frac: float = typer.Option(0.05, "--anomaly-frac"),
         epochs: Optional[int] = typer.Option(None, "--epochs"),
         seed: int = typer.Option(0, "--seed"),
         top_k: int = typer.Option(24, "--top-k"),
         home: Optional[Path] = HOME, verbose: bool = VERBOSE):
    """The whole hunt on a simulated survey: simulate → ingest → train → score → AUROC → gallery."""
    s = _setup(home or out / ".gsafe", verbose)
    from flows.demo import demo_flow

    t0 = time.perf_counter()
    cfg = {"seed": seed} | ({"epochs": epochs} if epochs else {})
    r = _run(demo_flow, str(out), _settings_dict(s), n=n, anomaly_frac=anomaly_frac, seed=seed, config=cfg, top_k=top_k)
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
def info(store: str = typer.Argument(..., help="survey store"), home: Optional[Path] = HOME):
    """Summarise a store: size, bands, catalog columns, quarantine reasons, scoring campaigns."""
    _setup(home, False)
    from collections import Counter

    from infra.store import SurveyStore

    try:
        st = SurveyStore.open(store)
    except GsafeError as e:
        typer.echo(f"gsafe: error: {e}", err=True)
        raise typer.Exit(2)
    q = st.read_quarantine()
    typer.echo(f"{store}: {st.n} objects, bands {','.join(st.bands)}, cutouts {st.image_shape[1]}×{st.image_shape[2]}, "
               f"chunk {st.chunk_size}")
    typer.echo(f"catalog: {', '.join(st.columns)}")
    typer.echo(f"quarantine: {len(q['source'])} inputs")
    for reason, k in Counter(r.split(':')[0] for r in q["reason"]).most_common(10):
        typer.echo(f"  {k:6d}  {reason}")
    for m, v in st.score_tables():
        t = st.score_table(m, v)
        typer.echo(f"scores {m}/{v}: {t.n} rows, {len(t.pending_chunks())} chunks pending")


from review.cli import review as _review  # noqa: E402  (import-light: typer only)

app.command(name="review")(_review)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
