"""Peak memory of ingest and of the scoring campaign at growing survey sizes: it should stay flat in N.

What it does, all under a temporary GSAFE_HOME:

1. simulates a small survey with GalSim and registers a Detector trained on it (`gsafe train`,
   DetectorConfig defaults but few epochs);
2. for each N (default 10 000, 50 000, 200 000): writes an .npy source of N cutouts with
   `np.lib.format.open_memmap`, chunk by chunk (transformed copies of the small survey, new noise
   draws), so the source is never in RAM; then, each in its own child process,
   - ingest: `infra.ingest.ingest(source.npy, store)`;
   - scoring: `gsafe score --store S --model M`, the CLI's campaign on a local Dask cluster;
   while a sampler reads the memory of the child's whole process tree (the command, its Dask
   workers, its Prefect server) every `--interval` seconds with psutil.

Cutouts are 5×32×32 by default (`--size`), not the survey's 64×64, to keep 200 000 of them within
the 10 minutes: what is measured is whether memory grows with N, which the cutout size does not
change (one chunk of 1 024 cutouts is 20 MiB at 32×32, 80 MiB at 64×64).

Two figures per process: RSS, and anonymous RSS (RSS less file-backed pages: shared libraries,
and the pages of a memory-mapped source, which the kernel can drop at will and which count in RSS
only while resident). Peaks are of the sum over the process tree at one instant.

Last line: ``memory: ingest peak X–Y MiB (X–Y anonymous), score peak X–Y MiB (X–Y anonymous) over
N = 10k–200k (flat)``, or ``(grows: ...)`` naming each figure whose peak at the largest N is more than
25 % above its peak at the smallest.

    python bench/memory.py                      # N = 10k, 50k, 200k at 5×32×32, ~8 min on 2 cores
    python bench/memory.py --quick              # N = 5k, 20k
    python bench/memory.py --sizes 10000 100000 --size 64
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from _common import Timer, augmented_chunks, bench_home, machine_line, print_table

MODEL = "bench-memory"
MiB = 2**20
FLAT = 1.25   # largest-N peak within 25 % of the smallest-N peak: flat


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 50_000, 200_000], help="survey sizes N")
    p.add_argument("--size", type=int, default=32, help="cutout side H = W, pixels (5 bands)")
    p.add_argument("--base", type=int, default=1024, help="cutouts simulated with GalSim, copied up to N")
    p.add_argument("--epochs", type=int, default=2, help="training epochs of the Detector")
    p.add_argument("--workers", type=int, default=None, help="Dask workers of the campaign (default: one per core)")
    p.add_argument("--interval", type=float, default=0.1, help="seconds between memory samples")
    p.add_argument("--quick", action="store_true", help="a smaller run: N = 5 000 and 20 000")
    p.add_argument("--keep", action="store_true", help="keep the temporary GSAFE_HOME afterwards")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ingest-child", nargs=2, metavar=("SOURCE", "STORE"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.quick:
        a.sizes = [5_000, 20_000]
    return a


# ---- measuring a child process tree ------------------------------------------------------------
def _role(proc, root_pid: int) -> str:
    if proc.pid == root_pid:
        return "main"
    try:
        cmd = " ".join(proc.cmdline())
    except Exception:  # noqa: BLE001 - the process may be gone
        return "other"
    if "uvicorn" in cmd or ("prefect" in cmd and "server" in cmd):
        return "prefect server"
    if "spawn_main" in cmd or "forkserver" in cmd or "distributed" in cmd:
        return "dask worker" if "resource_tracker" not in cmd else "other"
    return "other"


class TreeSampler(threading.Thread):
    """Samples RSS and anonymous RSS of a process and all its descendants until stopped."""

    def __init__(self, pid: int, interval: float):
        super().__init__(daemon=True)
        import psutil

        self.root = psutil.Process(pid)
        self.interval = interval
        self.halt = threading.Event()
        self.peak = {"rss": 0, "anon": 0}
        self.peak_role: dict[str, int] = {}        # max over time of the role's summed RSS
        self.peak_one_worker = 0
        self.samples = 0

    def run(self) -> None:
        while not self.halt.is_set():
            self.sample()
            self.halt.wait(self.interval)

    def sample(self) -> None:
        import psutil

        try:
            procs = [self.root] + self.root.children(recursive=True)
        except psutil.Error:
            return
        rss = anon = 0
        roles: dict[str, int] = {}
        for p in procs:
            try:
                m = p.memory_info()
            except psutil.Error:
                continue
            role = _role(p, self.root.pid)
            rss += m.rss
            anon += m.rss - m.shared
            roles[role] = roles.get(role, 0) + m.rss
            if role == "dask worker":
                self.peak_one_worker = max(self.peak_one_worker, m.rss)
        self.samples += 1
        self.peak["rss"] = max(self.peak["rss"], rss)
        self.peak["anon"] = max(self.peak["anon"], anon)
        for k, v in roles.items():
            self.peak_role[k] = max(self.peak_role.get(k, 0), v)

    def stop(self) -> None:
        self.halt.set()
        self.join()


def run_measured(cmd: list[str], interval: float, what: str) -> dict:
    """Run `cmd`, sampling its process tree; returns seconds, peaks and the child's last output line."""
    with Timer() as t:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        sampler = TreeSampler(proc.pid, interval)
        sampler.start()
        out, err = proc.communicate()
        sampler.stop()
    if proc.returncode != 0:
        sys.stderr.write(err[-4000:])
        raise SystemExit(f"bench: {what} failed (exit code {proc.returncode}): {' '.join(cmd)}")
    lines = [ln for ln in out.splitlines() if ln.strip()]
    return {"seconds": t.seconds, "peak": sampler.peak, "roles": sampler.peak_role,
            "one_worker": sampler.peak_one_worker, "samples": sampler.samples, "last": lines[-1] if lines else ""}


# ---- the steps ---------------------------------------------------------------------------------
def ingest_child(source: str, store: str) -> None:
    """Runs in the child process: ingest, then print the summary and the kernel's RSS high-water mark."""
    from infra.ingest import ingest
    from infra.settings import Settings

    summary = ingest(source, store, settings=Settings(progress=False), progress=False)
    hwm = next((ln.split()[1] for ln in Path("/proc/self/status").read_text().splitlines()
                if ln.startswith("VmHWM")), "0")
    print(f"{summary.line()}; VmHWM {int(hwm) / 1024:.0f} MiB")


def prepare_model(home: Path, settings, args) -> tuple[np.ndarray, dict]:
    """Simulate the small survey and register a Detector on it (`gsafe train`); returns the base cutouts."""
    from infra.store import SurveyStore
    from tasks.simulate import simulate_survey

    base = str(home / "base.zarr")
    timings = {}
    with Timer() as t:
        simulate_survey(args.base, settings=settings, seed=args.seed, anomaly_frac=0.05, store=base, workers=2)
    timings[f"simulate {args.base} cutouts (GalSim)"] = t.seconds
    train = run_measured([*gsafe_command(), "train", "--store", base, "--model", MODEL, "--epochs", str(args.epochs),
                          "--seed", str(args.seed)], args.interval, "gsafe train")
    timings[f"gsafe train ({args.epochs} epochs; peak RSS {train['peak']['rss'] / MiB:.0f} MiB)"] = train["seconds"]
    return SurveyStore.open(base).read_images(), timings


def gsafe_command() -> list[str]:
    """The `gsafe` CLI run by this very interpreter (a console script's shebang may name another)."""
    return [sys.executable, "-m", "flows.cli"]


def write_source(path: Path, base: np.ndarray, n: int, seed: int) -> float:
    """An .npy of `n` cutouts written through a memory map one chunk at a time; returns seconds."""
    with Timer() as t:
        src = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, *base.shape[1:]))
        for start, stop, images, _ in augmented_chunks(base, n, 1024, seed=seed):
            src[start:stop] = images
            src.flush()
        del src
    return t.seconds


def measure_size(home: Path, base: np.ndarray, n: int, args) -> dict:
    source, store = home / f"source-{n}.npy", str(home / f"survey-{n}.zarr")
    write_s = write_source(source, base, n, args.seed)
    ing = run_measured([sys.executable, str(Path(__file__).resolve()), "--ingest-child", str(source), store],
                       args.interval, f"ingest of {n}")
    source.unlink()
    cmd = [*gsafe_command(), "score", "--store", store, "--model", MODEL]
    if args.workers:
        cmd += ["--workers", str(args.workers)]
    sc = run_measured(cmd, args.interval, f"gsafe score of {n}")
    shutil.rmtree(store, ignore_errors=True)
    print(f"N = {n}: {ing['last']} | {sc['last']}", flush=True)
    return {"n": n, "write": write_s, "ingest": ing, "score": sc}


def mib(v: float) -> str:
    return f"{v / MiB:.0f}"


def report(results: list[dict]) -> str:
    rows = []
    for r in results:
        i, s = r["ingest"], r["score"]
        hwm = i["last"].rsplit("VmHWM ", 1)[-1] if "VmHWM" in i["last"] else "-"
        rows.append([f"{r['n']:,}", f"{i['seconds']:.1f}", mib(i["peak"]["rss"]), mib(i["peak"]["anon"]), hwm,
                     f"{s['seconds']:.1f}", mib(s["peak"]["rss"]), mib(s["peak"]["anon"]),
                     mib(s["roles"].get("main", 0)), mib(s["one_worker"]), mib(s["roles"].get("prefect server", 0))])
    print_table(rows, ["N", "ingest s", "ingest RSS", "ingest anon", "ingest VmHWM", "score s", "score RSS",
                       "score anon", "  main", "one worker", "Prefect server"],
                "Peak memory (MiB; sums over the process tree at one instant; main / one worker / server: "
                "each one's own peak RSS)")
    ns = f"{results[0]['n'] // 1000}k–{results[-1]['n'] // 1000}k"
    parts, grows = [], []
    for step in ("ingest", "score"):
        rss = [r[step]["peak"]["rss"] for r in results]
        anon = [r[step]["peak"]["anon"] for r in results]
        parts.append(f"{step} peak {mib(min(rss))}–{mib(max(rss))} MiB ({mib(min(anon))}–{mib(max(anon))} anonymous)")
        grows += [f"{step} RSS"] if rss[-1] > FLAT * rss[0] else []
        grows += [f"{step} anonymous"] if anon[-1] > FLAT * anon[0] else []
    verdict = "flat" if not grows else f"grows: {', '.join(grows)}"
    return f"memory: {', '.join(parts)} over N = {ns} ({verdict})"


def main() -> None:
    args = parse_args()
    if args.ingest_child:
        ingest_child(*args.ingest_child)
        return
    print(machine_line())
    with bench_home("memory", keep=args.keep) as home:
        from infra.settings import Settings

        os.environ["GSAFE_CUTOUT_SIZE"] = str(args.size)
        os.environ["GSAFE_PROGRESS"] = "false"
        settings = Settings(home=home, cutout_size=args.size, progress=False)
        base, timings = prepare_model(home, settings, args)
        print_table([[k, f"{v:.1f}"] for k, v in timings.items()], ["setup", "seconds"])
        print(f"cutouts {base.shape[1:]} ({base[0].nbytes / 1024:.0f} KiB each); store chunks of "
              f"{settings.chunk_size}; sampling every {args.interval} s", flush=True)
        results = [measure_size(home, base, n, args) for n in sorted(args.sizes)]
        summary = report(results)
        print(f"\n{summary}")


if __name__ == "__main__":
    main()
