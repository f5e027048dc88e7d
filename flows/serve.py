"""`gsafe serve`: the hunt as a Prefect deployment on a cron schedule, against a real Prefect server.

The deployment has a concurrency limit of one run (Prefect's deployment concurrency limit,
collision strategy CANCEL_NEW), so a hunt that outlasts its period never overlaps the next.

A temporary (ephemeral) server registers schedules but never fires them (Prefect logs "Cannot
schedule flows on an ephemeral server"), so unless PREFECT_API_URL is set we start `prefect server
start` ourselves and stop it on exit.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from typing import Callable

from infra.errors import GsafeError
from infra.settings import Settings

__all__ = ["serve_hunt", "start_prefect_server"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_prefect_server(timeout: float = 60.0) -> tuple[subprocess.Popen, str]:
    """Start a Prefect server on a free loopback port; returns (process, api_url) once healthy."""
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    prefect = os.path.join(os.path.dirname(sys.executable), "prefect")
    # same process group as gsafe: a signal to the group (Ctrl-C, a service manager's stop) reaches it too
    proc = subprocess.Popen([prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    atexit.register(_stop, proc)
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise GsafeError(f"serve: `prefect server start` exited with code {proc.returncode}; run it by hand to see why")
        try:
            urllib.request.urlopen(api + "/health", timeout=2).read()
            return proc, api
        except OSError:
            time.sleep(0.5)
    proc.terminate()
    raise GsafeError(f"serve: Prefect server on port {port} not healthy after {timeout:.0f} s")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def serve_hunt(settings: Settings, *, cron: str, store_url: str, model: str, source: str | None, out: str,
               alpha: float = 0.1, top_k: int = 50, announce: Callable[[dict], None] | None = None) -> None:
    """Serve the hunt until stopped. Progress lines go to stdout, or, with `announce`, to stderr while
    `announce` gets one dict (api_url, deployment, cron...) once serving (the CLI's --json)."""
    say = (lambda m: print(m, file=sys.stderr, flush=True)) if announce else (lambda m: print(m, flush=True))
    proc = None
    if not os.environ.get("PREFECT_API_URL"):
        proc, api = start_prefect_server()
        os.environ["PREFECT_API_URL"] = api
        say(f"serve: started a Prefect server at {api} (set PREFECT_API_URL to use your own)")
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        from flows.hunt import hunt_flow

        say(f"serve: hunt of {store_url} with {model} on schedule '{cron}' (UTC); Ctrl-C to stop")
        if announce:
            announce({"api_url": os.environ["PREFECT_API_URL"], "deployment": "hunt/gsafe-hunt", "cron": cron,
                      "store": store_url, "model": model, "concurrency_limit": 1})
        from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

        # one hunt at a time: a scheduled run that finds the previous one still going is cancelled,
        # not queued (the next hunt lists whatever it would have: new objects stay new until listed)
        one_at_a_time = ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW)
        from prefect.settings import PREFECT_API_URL, temporary_settings

        # Prefect may have read its settings before the URL was set (at import): give it explicitly,
        # or the runner falls back to a temporary server, where schedules never fire
        with temporary_settings(updates={PREFECT_API_URL: os.environ["PREFECT_API_URL"]}):
            hunt_flow.serve(name="gsafe-hunt", cron=cron, global_limit=one_at_a_time, print_starting_message=not announce,
                            parameters={"store_url": store_url, "model": model, "settings": settings.model_dump(mode="json"),
                                        "source": source, "out": out, "alpha": alpha, "top_k": top_k})
    except KeyboardInterrupt:
        pass
    finally:
        if proc is not None:
            _stop(proc)
