"""`gsafe review --store S --model REF [--calibration]`: the review app on 127.0.0.1, its URL printed.

Import-light on purpose (typer only): `gsafe --help` must stay instant; the app, the detector and
the store are loaded inside the command.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Optional

import typer

__all__ = ["review"]


def review(store: str = typer.Option(..., "--store", help="survey store whose candidates to review"),
           model: str = typer.Option(..., "--model", help="NAME, NAME@alias or NAME/version whose campaign (`gsafe score`) to review"),
           port: int = typer.Option(8765, "--port", help="port on 127.0.0.1 (0: any free port)"),
           pool: int = typer.Option(500, "--pool", help="candidates reviewed: the most anomalous by p-value"),
           calibration: bool = typer.Option(False, "--calibration", help="review the objects the next gsafe train calibrates on (the model's calibration objects, and the training objects where the next training cross-fits; on the store it was trained on), most anomalous first: anomalies left there shorten every list, and once labelled the next gsafe train leaves them out"),
           who: Optional[str] = typer.Option(None, "--who", help="your name in the labels (default: your login)"),
           out: Path = typer.Option(Path("review_out"), "--out", help="where label exports (CSV, Parquet) go"),
           method: str = typer.Option("integrated_gradients", "--method", help="attribution of the cards: integrated_gradients, occlusion or residual"),
           home: Optional[Path] = typer.Option(None, "--home", help="where gsafe keeps MLflow and Prefect state (env GSAFE_HOME; default ~/.gsafe)"),
           verbose: bool = typer.Option(False, "--verbose", "-v", help="show server and MLflow logs")):
    """Triage and label a campaign's candidates in the browser: cards, grid and one-at-a-time views,
    keyboard shortcuts; labels go to the store's `labels` table and re-rank what comes next."""
    from infra.errors import GsafeError
    from infra.runtime import configure_environment
    from infra.settings import get_settings

    s = get_settings(home=home, verbose=verbose or None)
    configure_environment(s)
    try:
        import uvicorn

        from infra import labels as lab
        from infra import tracking
        from review.app import create_app
        from review.session import ReviewSession
        from tasks.score import load_detector

        tracking.configure(s)
        ref = tracking.resolve(model)
        det = load_detector(tracking.download_detector(ref))
        within = None
        if calibration:
            from tasks.review import model_calibration_rows

            within = model_calibration_rows(store, ref.name, ref.version, det)
        session = ReviewSession(store, ref.name, ref.version, det, s, who or lab.default_who(), out, pool_size=pool,
                                method=method, within=within)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as e:
            raise GsafeError(f"review: port {port} on 127.0.0.1 is taken ({e}); pick another with --port, or --port 0") from e
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/"
        typer.echo(f"review: {len(session.pool.ids)} candidates of {ref} on {store}"
                   + (f", among the {len(within)} calibration objects of its next training (label the anomalies among them, then "
                      f"`gsafe train --store {store}` leaves them out)" if within is not None else ""))
        typer.echo(f"review: open {url}  (Ctrl-C to stop)", err=False)
        config = uvicorn.Config(create_app(session), log_level="info" if verbose else "warning", access_log=verbose)
        uvicorn.Server(config).run(sockets=[sock])
    except GsafeError as e:
        typer.echo(f"gsafe: error: {e}", err=True)
        raise typer.Exit(2)
