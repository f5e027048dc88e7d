"""Helpers the benchmark scripts share: a temporary gsafe home, the run-time set up as the CLI does,
simulated surveys grown by transformed copies, tables, and the machine line.

Not a benchmark itself: `python bench/_common.py` prints nothing and exits.
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

__all__ = ["Timer", "bench_home", "setup_runtime", "machine_line", "print_table", "band_noise", "augment",
           "augmented_chunks", "set_threads", "evict_from_page_cache", "fmt"]

MAD_TO_SIGMA = 1.4826


class Timer:
    """Wall-clock seconds of a block: ``with Timer() as t: ...; t.seconds``."""

    def __enter__(self) -> "Timer":
        self.start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start


@contextlib.contextmanager
def bench_home(prefix: str, keep: bool = False, where: str | None = None) -> Iterator[Path]:
    """A fresh GSAFE_HOME (and PREFECT_HOME under it) for one benchmark run, removed afterwards.

    Set before Prefect is imported, as the CLI does, so nothing touches the user's ~/.gsafe.
    """
    home = Path(tempfile.mkdtemp(prefix=f"gsafe-bench-{prefix}-", dir=where))
    os.environ["GSAFE_HOME"] = str(home)
    os.environ["PREFECT_HOME"] = str(home / "prefect")
    os.environ.pop("PREFECT_API_URL", None)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    # Prefect gives its server 20 s to start; on a busy machine it has taken longer (timeout error).
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    try:
        yield home
    finally:
        if keep:
            print(f"(kept {home})")
        else:
            shutil.rmtree(home, ignore_errors=True)


def setup_runtime(settings) -> float:
    """What `gsafe` does before a flow: quiet environment, one Prefect server, MLflow on SQLite.

    Returns the seconds the Prefect server took to start (paid once per command).
    """
    from infra import tracking
    from infra.runtime import configure_environment, ensure_prefect_server

    configure_environment(settings)
    with Timer() as t:
        ensure_prefect_server(settings)
    tracking.configure(settings)
    return t.seconds


def set_threads(threads: int | None) -> int:
    """Torch intra-op threads (None: torch's default, one per core); returns the number in use."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def machine_line() -> str:
    """Cores, load average, Python and torch versions: the context every figure needs."""
    import torch

    load = "/".join(f"{x:.1f}" for x in os.getloadavg())
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"machine: {os.cpu_count()} cores, {gpu}, load average {load} (1/5/15 min); "
            f"Python {platform.python_version()}, torch {torch.__version__}")


def fmt(v, spec: str = ".3f") -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "-"
    return format(v, spec) if isinstance(v, (float, np.floating)) else str(v)


def print_table(rows: Sequence[Sequence], header: Sequence[str], title: str | None = None) -> None:
    """A plain fixed-width table: first column left-aligned, the others right-aligned."""
    cells = [[str(h) for h in header]] + [[c if isinstance(c, str) else fmt(c) for c in r] for r in rows]
    widths = [max(len(r[j]) for r in cells) for j in range(len(header))]
    if title:
        print(f"\n{title}")

    def line(r):
        return "  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths)))

    print(line(cells[0]))
    print("  ".join("-" * w for w in widths))
    for r in cells[1:]:
        print(line(r))


def band_noise(images: np.ndarray, border: int = 4) -> np.ndarray:
    """Per-band sky noise (1.4826 × MAD of the cutout borders), (B,) float32."""
    from gsafe_models.perturb import band_noise as noise

    return noise(images, border)


def augment(images: np.ndarray, rng: np.random.Generator, noise: np.ndarray, extra_noise: float = 0.25) -> np.ndarray:
    """New cutouts from old ones: a random rotation/flip each (the sky has no up) and a fresh noise
    realisation of `extra_noise` × the band noise added (total noise grows by ~3 % at 0.25)."""
    out = np.empty_like(images)
    k = rng.integers(0, 8, len(images))
    for j in range(8):
        sel = np.nonzero(k == j)[0]
        if sel.size:
            x = images[sel]
            x = x[..., ::-1] if j >= 4 else x
            out[sel] = np.rot90(x, j % 4, axes=(-2, -1))
    eps = rng.standard_normal(out.shape, dtype=np.float32)
    eps *= (extra_noise * noise).astype(np.float32)[None, :, None, None]
    out += eps
    return out


def augmented_chunks(base_images: np.ndarray, n: int, chunk: int, seed: int = 0,
                     extras: dict[str, np.ndarray] | None = None) -> Iterator[tuple[int, int, np.ndarray, dict]]:
    """(start, stop, images, columns) for `n` cutouts made from `base_images` by `augment`, one chunk
    at a time (memory: the base plus one chunk). Row i is a copy of base row i mod len(base); the
    columns hold ``object_id`` (new, unique) and every array of `extras` (e.g. labels) carried over."""
    noise = band_noise(base_images[: min(len(base_images), 512)])
    m = len(base_images)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        idx = np.arange(start, stop) % m
        rng = np.random.default_rng([seed, start])
        cols = {"object_id": np.array([f"aug-{i:09d}" for i in range(start, stop)], dtype=object)}
        for k, v in (extras or {}).items():
            cols[k] = np.asarray(v)[idx]
        yield start, stop, augment(base_images[idx], rng, noise), cols


def evict_from_page_cache(root: str | Path) -> int:
    """Drop the clean pages of every file below `root` from the page cache, so the next read comes
    from disk (posix_fadvise DONTNEED: no root needed). Returns the number of files."""
    os.sync()
    n = 0
    for dirpath, _, files in os.walk(root):
        for f in files:
            try:
                fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            except OSError:
                continue
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                n += 1
            finally:
                os.close(fd)
    return n


if __name__ == "__main__":
    pass
