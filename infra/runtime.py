"""The run-time environment: quiet Prefect under $GSAFE_HOME, one Prefect server, the Dask cluster.

Facts behind the choices (measured on Prefect 3.9, prefect-dask 0.3.7, distributed 2026.8): every Dask
worker process starts its own temporary Prefect server unless ``PREFECT_API_URL`` points at one, so
gsafe starts a single server first; a flow's heartbeat thread costs >= 1 s per sync run unless
disabled in code; a LocalCluster logs ~40 INFO lines per command from ``distributed.*`` unless its
loggers are raised (done here, undone by ``--verbose``).
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator

import dask

from infra.settings import Settings

__all__ = ["configure_environment", "ensure_prefect_server", "flow_context", "task_runner",
           "gpu_count", "worker_threads"]

log = logging.getLogger("gsafe.runtime")
_server = None


def configure_environment(settings: Settings) -> None:
    """Set Prefect's and Dask's environment before they are imported (workers inherit it)."""
    settings.home.mkdir(parents=True, exist_ok=True)
    env = {
        "PREFECT_HOME": str(settings.prefect_home.resolve()),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "INFO" if settings.verbose else "WARNING",
        "PREFECT_SERVER_LOGGING_LEVEL": "WARNING" if settings.verbose else "CRITICAL",
        "PREFECT_LOGGING_LOG_PRINTS": "false",
        "DASK_LOGGING__DISTRIBUTED": "info" if settings.verbose else "error",
        "DASK_DISTRIBUTED__WORKER__DAEMON": "False",   # let task code start process pools (simulator)
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        "MLFLOW_LOGGING_LEVEL": "INFO" if settings.verbose else "ERROR",
        "GIT_PYTHON_REFRESH": "quiet",
        "TQDM_DISABLE": "" if settings.progress else "1",
    }
    for k, v in env.items():
        if k in ("PREFECT_HOME",):
            os.environ.setdefault(k, v)
        else:
            os.environ[k] = v
    if settings.prefect_api_url:
        os.environ["PREFECT_API_URL"] = settings.prefect_api_url
    logging.basicConfig(level=logging.INFO if settings.verbose else logging.WARNING,
                        format="%(name)s: %(message)s")
    logging.getLogger("gsafe").setLevel(logging.INFO if settings.verbose else logging.WARNING)
    # distributed sets its loggers' levels from dask's config when it is first imported, and dask
    # read its config (DASK_* variables) when infra.runtime imported it, before the line above set
    # DASK_LOGGING__DISTRIBUTED: give the level to dask's config too, or the scheduler's and
    # nannies' INFO lines (~40 per command) reach the terminal.
    dask.config.set({"logging": {"distributed": env["DASK_LOGGING__DISTRIBUTED"]}})
    for noisy in ("mlflow", "alembic", "distributed", "prefect", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.INFO if settings.verbose else logging.ERROR)


def ensure_prefect_server(settings: Settings) -> str:
    """Start one Prefect API server for this process and its Dask workers, unless one is set."""
    global _server
    url = os.environ.get("PREFECT_API_URL")
    if url:
        return url
    from prefect.server.api.server import SubprocessASGIServer

    _server = SubprocessASGIServer()
    _server.start(timeout=120)  # Prefect's 20 s default is too short on a busy 2-core machine
    os.environ["PREFECT_API_URL"] = _server.api_url
    return _server.api_url


def stop_prefect_server() -> None:
    global _server
    if _server is not None:
        _server.stop()
        os.environ.pop("PREFECT_API_URL", None)
        _server = None


@contextlib.contextmanager
def flow_context() -> Iterator[None]:
    """Run flows against our one server (Prefect read its settings at import, before we set the URL)
    and without the per-run heartbeat wait (>= 1 s each)."""
    from prefect.settings import PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    updates = {PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}
    if os.environ.get("PREFECT_API_URL"):
        updates[PREFECT_API_URL] = os.environ["PREFECT_API_URL"]
    with temporary_settings(updates=updates):
        yield


def worker_api_problems(client, api_url: str | None) -> list[str]:
    """Workers of an existing Dask cluster whose task logs will not reach `api_url` (their
    ``PREFECT_API_URL`` is unset or another), one line each; empty when all is well."""
    if not api_url or client is None:
        return []
    try:
        seen = client.run(lambda: os.environ.get("PREFECT_API_URL"))
    except Exception as e:  # noqa: BLE001 - a check, never a failure
        return [f"could not ask the workers for their PREFECT_API_URL ({type(e).__name__}: {e})"]
    return [f"worker {w}: PREFECT_API_URL={v or 'unset'}, this flow's is {api_url}: its task logs will not reach "
            f"this Prefect server; start the workers with PREFECT_API_URL={api_url}"
            for w, v in sorted(seen.items()) if v != api_url]


def gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001
        return 0


def worker_threads(settings: Settings) -> int:
    """Torch threads per Dask worker: the cores shared out, at least one."""
    n = settings.n_workers or _default_workers()
    return max(1, (os.cpu_count() or 1) // n)


def _default_workers() -> int:
    return gpu_count() or (os.cpu_count() or 1)


def task_runner(settings: Settings):
    """A DaskTaskRunner: on `settings.dask_address`, else a LocalCluster sized to the machine.

    Workers that own a GPU advertise a ``GPU`` resource (one per worker); GPU tasks ask for it.
    """
    from prefect_dask import DaskTaskRunner

    if settings.dask_address:
        return DaskTaskRunner(address=settings.dask_address)
    # Dask's Nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536, which switches off glibc's
    # adaptive mmap threshold: every ~20 MiB batch tensor is then mmap'd, faulted in and unmapped
    # again, and scoring ran ~1/3 slower (bench/throughput.py). glibc's default keeps memory flat
    # here (bench/memory.py), so the variable is left unset unless the user's environment sets it.
    dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None})
    n = settings.n_workers or _default_workers()
    kwargs = {"n_workers": n, "threads_per_worker": 1, "processes": True, "dashboard_address": None,
              "silence_logs": logging.INFO if settings.verbose else logging.ERROR}
    if gpu_count():
        kwargs["resources"] = {"GPU": 1}
    return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs=kwargs)
