"""Throughput of the `gsafe score` campaign beside the bound for the same model on the same machine.

What it does, all under a temporary GSAFE_HOME:

1. simulates a small survey with GalSim (`simulate_survey`, 2 processes) and grows it into a store of
   `--n` cutouts (5×64×64) by appending transformed copies chunk by chunk (rotation/flip and a fresh
   noise draw each, new object ids; memory: the small survey plus one chunk);
2. trains a small Detector on the small survey (`flows.train.train_flow`: DetectorConfig defaults
   but few epochs; scoring costs the same after 2 epochs as after 20) and registers it in MLflow;
3. the bound: a tight loop, no Prefect and no Dask, that reads each Zarr chunk (raw bytes, then
   Blosc decompression), runs `Detector.score(x, q_values=False)` and writes the chunk's score
   columns, in 1 process (torch threads = cores) and in 2 processes (threads = cores / 2): the best
   the machine does without orchestration, in steady state (each process's first chunk is its
   warm-up, left out as the campaign's is). The Detector's internals are timed as it runs (its
   normaliser, encoder, decoder, densities... are wrapped with timers) for the per-stage breakdown;
4. the campaign: `flows.score.run_campaign` on a DaskTaskRunner from `infra.runtime.task_runner`,
   with the Prefect server, MLflow and settings set up as `gsafe score` does, with 1 and with 2
   Dask workers (torch threads per worker from `infra.runtime.worker_threads`). A thread watches the
   score table's per-chunk done flags, which splits the wall time into steady-state cutouts/s and
   fixed start-up (cluster, model broadcast, first-task costs, final q-values).

The store's chunk files are dropped from the page cache before each measured pass, so reads come
from disk as they would in a campaign over a survey larger than memory (`--warm` to skip that).

Last line: ``throughput ratio: X`` with X = best campaign steady-state cutouts/s ÷ best bound
cutouts/s (both over the worker counts measured; goal >= 0.8).

    python bench/throughput.py                 # 50 000 cutouts, ~5 min on 2 idle cores
    python bench/throughput.py --quick         # 8 192 cutouts, ~3 min
    python bench/throughput.py --n 100000 --workers 1 2 4
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import threading
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from _common import (Timer, augmented_chunks, bench_home, evict_from_page_cache, machine_line, print_table,
                     setup_runtime)

MODEL = "bench-throughput"
# statistics.py functions that Detector's base() calls on residuals, each timed apart when present
OUTER = ("read (raw chunk bytes from disk)", "decompress (Blosc lz4)", "Detector.score",
         "write (score columns + done flag)")
OTHER = "other Detector.score work (masks, copies, glue)"
BOUND_TABLE = "bench-bound"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=50_000, help="cutouts in the campaign store (>= 50 000 for the record)")
    p.add_argument("--simulate", type=int, default=2000, help="cutouts simulated with GalSim, grown to --n")
    p.add_argument("--epochs", type=int, default=2, help="training epochs of the small Detector")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="Dask worker counts (and bound processes)")
    p.add_argument("--bound-chunks", type=int, default=16, help="store chunks the bound loop reads (each process's first is warm-up)")
    p.add_argument("--chunk-size", type=int, default=1024, help="cutouts per store chunk and per Dask task")
    p.add_argument("--warm", action="store_true", help="leave the store in the page cache between passes")
    p.add_argument("--quick", action="store_true", help="a smaller run: 8 192 cutouts, 512 simulated, 1 epoch")
    p.add_argument("--keep", action="store_true", help="keep the temporary GSAFE_HOME (store, MLflow) afterwards")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    if a.quick:
        a.n, a.simulate, a.epochs, a.bound_chunks = min(a.n, 8192), min(a.simulate, 512), 1, min(a.bound_chunks, 4)
    return a


# ---- the stores and the model ------------------------------------------------------------------
def build_stores(home: Path, settings, args) -> tuple[str, str, dict]:
    """The small simulated survey and the big store grown from it; returns their URLs and timings."""
    from infra.store import SurveyStore
    from tasks.simulate import simulate_survey

    small, big = str(home / "small.zarr"), str(home / "big.zarr")
    timings = {}
    with Timer() as t:
        simulate_survey(args.simulate, settings=settings, seed=args.seed, anomaly_frac=0.05, store=small, workers=2)
    timings[f"simulate {args.simulate} cutouts (GalSim, 2 processes)"] = t.seconds
    src = SurveyStore.open(small)
    base = src.read_images()
    extras = src.read_catalog(["label", "anomaly_class"])
    with Timer() as t:
        out = SurveyStore.create(big, bands=src.bands, height=src.image_shape[1], width=src.image_shape[2],
                                 chunk_size=args.chunk_size, provenance={"bench": "throughput"})
        for _, _, images, cols in augmented_chunks(base, args.n, args.chunk_size, seed=args.seed, extras=extras):
            out.append(images, cols)
    timings[f"grow the store to {args.n} cutouts (copies, appended chunk by chunk)"] = t.seconds
    return small, big, timings


def train_model(small: str, settings, args) -> tuple[int, float]:
    """Train and register the Detector through `train_flow`; returns (version, seconds)."""
    from flows.train import train_flow

    with Timer() as t:
        r = train_flow(small, MODEL, {"epochs": args.epochs, "seed": args.seed}, settings.model_dump(mode="json"))
    return int(r["version"]), t.seconds


# ---- the bound ---------------------------------------------------------------------------------
def chunk_file(store_url: str, chunk: int) -> Path:
    """The file of image chunk `chunk` in a local Zarr v3 store (default chunk key encoding)."""
    return Path(store_url) / "images" / "c" / str(chunk) / "0" / "0" / "0"


def decode_chunk(raw: bytes, shape: tuple[int, ...], rows: int) -> np.ndarray:
    """Blosc-decompress one image chunk's bytes (codecs: bytes little-endian, then Blosc)."""
    from numcodecs import blosc

    out = np.empty(shape, dtype="<f4")
    blosc.decompress(raw, out)
    return out[:rows]


def instrument(det) -> dict[str, float]:
    """Wrap the Detector's stages with timers; returns the dict of seconds per stage they fill.

    The stages are the normaliser, the encoder and decoder, every registered feature (the
    statistics' per-pixel work: chi maps, patch density, photometry...) and statistic, and the
    calibration. Times are exclusive: a stage that runs inside another (the reconstruction a
    feature asks for first) counts for itself, not for the outer one.
    """
    import dataclasses

    from gsafe_models import registry

    totals: dict[str, float] = defaultdict(float)
    stack: list[list[float]] = []  # per active stage: [time spent in nested stages]
    b = det._bundle

    def timed_fn(fn, stage: str):
        def timed(*a, **k):
            stack.append([0.0])
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                elapsed = time.perf_counter() - t
                nested = stack.pop()[0]
                totals[stage] += elapsed - nested
                if stack:
                    stack[-1][0] += elapsed
        return timed

    def wrap(obj, attr: str, stage: str) -> None:
        setattr(obj, attr, timed_fn(getattr(obj, attr), stage))

    wrap(b.normaliser, "forward", "normalise (asinh stretch, mask)")
    wrap(b.net, "encode", "encode")
    wrap(b.net, "decode", "decode (reconstruction)")
    for name, f in list(registry.FEATURES.items()):
        registry.FEATURES[name] = dataclasses.replace(f, compute=timed_fn(f.compute, f"feature {name}"))
    for name, st in list(registry.STATISTICS.items()):
        registry.STATISTICS[name] = dataclasses.replace(st, compute=timed_fn(st.compute, "statistics from features"))
    wrap(det._test, "pvalues", "calibration + combination (p-values)")
    return totals


def bound_worker(store_url: str, payload: bytes, chunks: list[int], threads: int, table: str,
                 barrier, results) -> None:
    """One process of the bound: read, decompress, score and write `chunks`, timing every stage."""
    import torch

    from gsafe_models.detector import Detector
    from infra.store import SurveyStore

    torch.set_num_threads(threads)
    det = Detector.from_bytes(payload)
    stages = instrument(det)
    store = SurveyStore.open(store_url, mode="r+")
    out_table = store.score_table(BOUND_TABLE, table)
    cs, shape = store.chunk_size, (store.chunk_size, *store.image_shape)
    det.score(store.read_images(0, 16), q_values=False)  # first-call costs out of the loop
    stages.clear()
    barrier.wait()
    n, start = 0, time.perf_counter()
    first = None  # (time, rows) when the first chunk is written: the steady state starts there
    for c in chunks:
        rows = min(cs, store.n - c * cs)
        t = time.perf_counter()
        raw = chunk_file(store_url, c).read_bytes()
        t1 = time.perf_counter()
        x = decode_chunk(raw, shape, rows)
        t2 = time.perf_counter()
        out = det.score(x, q_values=False)
        t3 = time.perf_counter()
        out_table.write_chunk(c, {k: v for k, v in out.items() if k in out_table.group})
        t4 = time.perf_counter()
        stages["read (raw chunk bytes from disk)"] += t1 - t
        stages["decompress (Blosc lz4)"] += t2 - t1
        stages["Detector.score"] += t3 - t2
        stages["write (score columns + done flag)"] += t4 - t3
        n += rows
        first = first or (t4, n)
    end = time.perf_counter()
    steady = (n - first[1]) / (end - first[0]) if len(chunks) > 1 else n / (end - start)
    results.put({"n": n, "seconds": end - start, "steady": steady, "stages": dict(stages)})


def check_decoder(store_url: str) -> None:
    """The bound's own read path must give exactly what `SurveyStore.read_images` gives."""
    from infra.store import SurveyStore

    store = SurveyStore.open(store_url)
    rows = min(store.chunk_size, store.n)
    mine = decode_chunk(chunk_file(store_url, 0).read_bytes(), (store.chunk_size, *store.image_shape), rows)
    if not np.array_equal(mine, store.read_images(0, rows), equal_nan=True):
        raise SystemExit("bench: decoding chunk files by hand disagrees with SurveyStore.read_images")


def collect(procs: list, results) -> list[dict]:
    """Every process's result; stops with the reason if one of them dies first."""
    import queue

    parts: list[dict] = []
    while len(parts) < len(procs):
        try:
            parts.append(results.get(timeout=1.0))
        except queue.Empty:
            dead = [p for p in procs if p.exitcode not in (None, 0)]
            if dead:
                for p in procs:
                    p.kill()
                raise SystemExit(f"bench: a bound process died (exit code {dead[0].exitcode}); its traceback is above")
    for p in procs:
        p.join()
    return parts


def measure_bound(store_url: str, payload: bytes, statistics: list[str], chunks: list[int], processes: int,
                  warm: bool) -> dict:
    """The tight loop in `processes` processes (threads = cores / processes), started together."""
    from infra.store import SurveyStore

    store = SurveyStore.open(store_url, mode="r+")
    table = f"p{processes}"
    store.score_table(BOUND_TABLE, table, statistics, create=True).ensure_rows(store.n)
    if not warm:
        evict_from_page_cache(Path(store_url) / "images")
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(processes), ctx.Queue()
    threads = max(1, (os.cpu_count() or 1) // processes)
    procs = [ctx.Process(target=bound_worker, args=(store_url, payload, chunks[i::processes], threads, table,
                                                    barrier, results)) for i in range(processes)]
    for p in procs:
        p.start()
    parts = collect(procs, results)
    shutil.rmtree(Path(store_url) / "scores" / BOUND_TABLE / table, ignore_errors=True)
    n = sum(r["n"] for r in parts)
    stages: dict[str, float] = defaultdict(float)
    for r in parts:
        for k, v in r["stages"].items():
            stages[k] += v
    # like the campaign's steady rate: each process's first chunk (warm-up) left out, rates summed
    return {"processes": processes, "threads": threads, "n": n, "rate": sum(r["steady"] for r in parts),
            "end_to_end": n / max(r["seconds"] for r in parts), "stages": dict(stages)}


# ---- the campaign ------------------------------------------------------------------------------
class DoneWatcher(threading.Thread):
    """Polls the score table's done flags (one file per finished chunk) and records when each appears."""

    def __init__(self, done_dir: Path, chunk_rows: list[int], every: float = 0.1):
        super().__init__(daemon=True)
        self.done_dir, self.chunk_rows, self.every = done_dir, chunk_rows, every
        self.timeline: list[tuple[float, int]] = []   # (time, cutouts done), on every change
        self._halt = threading.Event()

    def run(self) -> None:
        last = -1
        while not self._halt.is_set():
            self._poll(last)
            last = self.timeline[-1][1] if self.timeline else -1
            self._halt.wait(self.every)
        self._poll(last)

    def _poll(self, last: int) -> None:
        try:
            names = os.listdir(self.done_dir)
        except FileNotFoundError:
            return
        done = sum(self.chunk_rows[int(s)] for s in names if s.isdigit() and int(s) < len(self.chunk_rows))
        if done != last:
            self.timeline.append((time.perf_counter(), done))

    def stop(self) -> None:
        self._halt.set()
        self.join()


def measure_campaign(store_url: str, version: int, settings, workers: int, warm: bool) -> dict:
    """One fresh `run_campaign` with `workers` Dask workers: wall time, steady-state rate, start-up."""
    from flows.score import run_campaign
    from infra.runtime import worker_threads
    from infra.store import SurveyStore

    s = settings.model_copy(update={"n_workers": workers})
    store = SurveyStore.open(store_url)
    table_dir = Path(store_url) / "scores" / MODEL / str(version)
    shutil.rmtree(table_dir, ignore_errors=True)   # a fresh campaign: every chunk to do
    if not warm:
        evict_from_page_cache(Path(store_url) / "images")
    rows = [e - s_ for s_, e in store.chunk_bounds()]
    watcher = DoneWatcher(table_dir / "done" / "c", rows)
    watcher.start()
    t0 = time.perf_counter()
    r = run_campaign(store_url, MODEL, version, s)
    wall = time.perf_counter() - t0
    watcher.stop()
    n = store.n
    (t_first, n_first), (t_last, n_last) = watcher.timeline[0], watcher.timeline[-1]
    if n_last != n:
        raise SystemExit(f"bench: the campaign finished with {n_last} of {n} cutouts flagged done")
    # Steady state: from the first finished chunk(s) to the last; before that, the cluster starts,
    # the model reaches the workers and the first tasks pay their one-off costs.
    rate = (n_last - n_first) / (t_last - t_first) if t_last > t_first else n / (t_last - t0)
    return {"workers": workers, "threads": worker_threads(s), "n": n, "wall": wall, "rate": rate,
            "first_chunk": t_first - t0, "fixed": wall - n / rate, "flow_seconds": r["seconds"]}


# ---- report ------------------------------------------------------------------------------------
def print_breakdown(bounds: list[dict]) -> None:
    """ms per 1 000 cutouts (process time) of every stage, for each bound configuration."""
    seen = [k for b in bounds for k in b["stages"] if k not in OUTER]
    inner = list(dict.fromkeys(seen))   # in the order the Detector first ran them
    order = [*OUTER[:2], *inner, OTHER, OUTER[3]]
    cols = []
    for b in bounds:
        st = dict(b["stages"])
        st[OTHER] = st.pop("Detector.score", 0.0) - sum(st.get(k, 0.0) for k in inner)
        cols.append((st, sum(st.values()), b["n"]))
    rows = []
    for k in order:
        row = [k]
        for st, total, n in cols:
            row += [f"{1000 * 1000 * st.get(k, 0.0) / n:.0f}", f"{100 * st.get(k, 0.0) / total:.1f}%"]
        rows.append(row)
    rows.append(["total"] + sum(([f"{1000 * 1000 * total / n:.0f}", "100%"] for _, total, n in cols), []))
    header = ["stage"] + sum(([f"ms/1k ({b['processes']}p×{b['threads']}t)", "share"] for b in bounds), [])
    print_table(rows, header, "Per-stage breakdown of the bound (process-ms per 1 000 cutouts; "
                              "p = processes, t = torch threads each)")


def main() -> None:
    args = parse_args()
    print(machine_line())
    with bench_home("throughput", keep=args.keep) as home:
        from infra.runtime import flow_context
        from infra.settings import Settings

        settings = Settings(home=home, progress=False, chunk_size=args.chunk_size)
        setup = {"Prefect server start (once per command)": setup_runtime(settings)}
        small, big, t = build_stores(home, settings, args)
        setup.update(t)
        check_decoder(big)
        with flow_context():
            version, setup["train + register the Detector (train_flow)"] = train_model(small, settings, args)
            from infra import tracking
            from infra.store import SurveyStore

            payload = tracking.download_detector(tracking.ModelRef(MODEL, version))
            from gsafe_models.detector import Detector

            det = Detector.from_bytes(payload)
            print(f"store: {args.n} cutouts {SurveyStore.open(big).image_shape}, chunks of {args.chunk_size}; "
                  f"detector {MODEL}/{version}: {det.config.representation}, latent {det.config.latent_dim}, "
                  f"channels {det.config.channels}, statistics {','.join(det.statistic_names)}, "
                  f"{len(payload) / 2**20:.1f} MiB")
            print_table([[k, f"{v:.1f}"] for k, v in setup.items()], ["setup", "seconds"])

            n_chunks = len(SurveyStore.open(big).chunk_bounds())
            chunks = list(range(min(args.bound_chunks, n_chunks)))
            bounds, campaigns = [], []
            for w in args.workers:
                bounds.append(measure_bound(big, payload, det.statistic_names, chunks, w, args.warm))
                print(f"bound, {w} process(es): {bounds[-1]['rate']:.0f} cutouts/s steady "
                      f"({bounds[-1]['end_to_end']:.0f} end to end) over {bounds[-1]['n']} cutouts",
                      flush=True)
            for w in args.workers:
                campaigns.append(measure_campaign(big, version, settings, w, args.warm))
                c = campaigns[-1]
                print(f"campaign, {w} worker(s): {c['rate']:.0f} cutouts/s steady, {c['wall']:.1f} s wall", flush=True)

        rows = []
        for b, c in zip(bounds, campaigns):
            rows.append([f"{c['workers']} worker(s) × {c['threads']} torch thread(s)", f"{b['rate']:.0f}",
                         f"{c['rate']:.0f}", f"{c['n'] / c['wall']:.0f}", f"{c['wall']:.1f}", f"{c['fixed']:.1f}",
                         f"{c['first_chunk']:.1f}", f"{c['rate'] / b['rate']:.2f}"])
        print_table(rows, ["configuration", "bound /s", "campaign steady /s", "campaign end-to-end /s", "wall s",
                           "fixed start-up s", "first chunk s", "steady ÷ bound"],
                    f"Campaign (flows.score.run_campaign on Dask) vs bound, {args.n} cutouts "
                    f"(bound over {len(chunks)} chunks; cutouts/s)")
        print_breakdown(bounds)
        best_b = max(bounds, key=lambda b: b["rate"])
        best_c = max(campaigns, key=lambda c: c["rate"])
        print(f"\nbest bound: {best_b['rate']:.0f} cutouts/s ({best_b['processes']} process(es)); best campaign: "
              f"{best_c['rate']:.0f} cutouts/s steady ({best_c['workers']} worker(s)), "
              f"{best_c['fixed']:.1f} s fixed start-up + {setup['Prefect server start (once per command)']:.1f} s "
              f"Prefect server")
        print(f"throughput ratio: {best_c['rate'] / best_b['rate']:.2f}")


if __name__ == "__main__":
    main()
