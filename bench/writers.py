"""Concurrent writers on one store: gsafe's lock + append protocol against Icechunk's transactions.

Two ways to let several processes append to one Zarr store without losing a row:

- **lock** (what gsafe does, `infra.store.SurveyStore.append`): an exclusive lock on the store
  (`infra.locks`), ``n_rows`` re-read under it, the arrays grown and written beyond the committed
  rows, then ``n_rows`` moved: one write commits them;
- **icechunk** (``icechunk==1.1.21``, a transactional store for Zarr 3; `../shared/STACK.md` notes
  what was verified of it): each append opens a writable session on the branch, grows and writes the
  same arrays, and commits; a writer that loses the race gets ``ConflictError`` and redoes its append
  on the new snapshot. Its local-filesystem storage is *not* safe for concurrent commits (its own
  warning; object stores are), so on a local path the commit itself also runs under a file lock.

Each writer appends `--appends` batches of `--batch` cutouts (5×64×64 float32, Blosc-zstd as the
store) with their object ids; 1 writer, then `--writers` writers at once (separate processes, all
started together). Reported: cutouts/s over all writers, seconds per append, rows at the end
against rows written (every row exactly once), and for Icechunk the conflicts retried.

    python bench/writers.py                    # 1 and 2 writers, 8 appends of 1 024 each: ~1 min
    python bench/writers.py --appends 4 --batch 256 --writers 4

Icechunk is not a gsafe dependency: without it installed (``pip install icechunk==1.1.21``) only
the lock is measured.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import machine_line, print_table

BANDS, SIZE = ("u", "g", "r", "i", "z"), 64
# Icechunk's local storage warns on every open that it is not safe for concurrent commits: the
# commits here run under a file lock, so keep its log to errors (children inherit the variable)
os.environ.setdefault("ICECHUNK_LOG", "error")


def _batch(writer: int, i: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([writer, i])
    images = rng.normal(100.0, 5.0, (n, len(BANDS), SIZE, SIZE)).astype(np.float32)
    ids = np.array([f"w{writer}-{i}-{j}" for j in range(n)], dtype=object)
    return images, ids


# -- gsafe's lock ---------------------------------------------------------------------------------

def _lock_setup(root: Path, batch: int) -> str:
    from infra.store import SurveyStore

    url = str(root / "lock.zarr")
    SurveyStore.create(url, bands=BANDS, height=SIZE, width=SIZE, chunk_size=batch)
    return url


def _lock_writer(url: str, writer: int, appends: int, batch: int, start_at: float, out) -> None:
    from infra.store import SurveyStore

    store = SurveyStore.open(url, mode="r+")
    data = [_batch(writer, i, batch) for i in range(appends)]
    while time.time() < start_at:
        time.sleep(0.001)
    times = []
    for images, ids in data:
        t = time.perf_counter()
        store.append(images, {"object_id": ids})
        times.append(time.perf_counter() - t)
    out.put((writer, times, 0))


def _lock_rows(url: str) -> tuple[int, int]:
    from infra.store import SurveyStore

    ids = SurveyStore.open(url).object_ids()
    return len(ids), len(set(ids))


# -- Icechunk -------------------------------------------------------------------------------------

def _ice_setup(root: Path, batch: int) -> str:
    import icechunk
    import zarr

    path = str(root / "ice")
    repo = icechunk.Repository.create(icechunk.local_filesystem_storage(path))
    session = repo.writable_session("main")
    g = zarr.group(store=session.store)
    g.create_array("images", shape=(0, len(BANDS), SIZE, SIZE), chunks=(batch, 1, SIZE, SIZE), dtype="float32",
                   compressors=zarr.codecs.BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle"))
    g.create_array("object_id", shape=(0,), chunks=(batch,), dtype=str)
    session.commit("create")
    return path


def _ice_writer(path: str, writer: int, appends: int, batch: int, start_at: float, out) -> None:
    import warnings

    import icechunk
    import zarr

    from infra.locks import store_lock

    warnings.simplefilter("ignore")  # the local storage's "not safe for concurrent commits": locked below
    repo = icechunk.Repository.open(icechunk.local_filesystem_storage(path))
    data = [_batch(writer, i, batch) for i in range(appends)]
    while time.time() < start_at:
        time.sleep(0.001)
    times, conflicts = [], 0
    for images, ids in data:
        t = time.perf_counter()
        while True:
            session = repo.writable_session("main")
            g = zarr.open_group(store=session.store, mode="r+")
            img, oid = g["images"], g["object_id"]
            n = img.shape[0]
            img.resize((n + len(images), *img.shape[1:]))
            oid.resize((n + len(ids),))
            img[n:] = images
            oid[n:] = ids.astype(str)
            try:
                with store_lock(path):
                    session.commit(f"append {writer}")
                break
            except icechunk.ConflictError:
                conflicts += 1  # another writer committed first: redo on its snapshot
        times.append(time.perf_counter() - t)
    out.put((writer, times, conflicts))


def _ice_rows(path: str) -> tuple[int, int]:
    import icechunk
    import zarr

    repo = icechunk.Repository.open(icechunk.local_filesystem_storage(path))
    g = zarr.open_group(store=repo.readonly_session("main").store, mode="r")
    ids = np.asarray(g["object_id"][:])
    assert len(ids) == g["images"].shape[0]
    return len(ids), len(set(ids.tolist()))


# -- the measurement ------------------------------------------------------------------------------

METHODS = {"lock": (_lock_setup, _lock_writer, _lock_rows), "icechunk": (_ice_setup, _ice_writer, _ice_rows)}


def measure(method: str, writers: int, appends: int, batch: int) -> dict:
    setup, writer, rows = METHODS[method]
    root = Path(tempfile.mkdtemp(prefix=f"gsafe-bench-writers-{method}-"))
    try:
        target = setup(root, batch)
        ctx = mp.get_context("spawn")
        out = ctx.Queue()
        start_at = time.time() + 8.0  # every writer has imported and made its data by then
        procs = [ctx.Process(target=writer, args=(target, w, appends, batch, start_at, out)) for w in range(writers)]
        for p in procs:
            p.start()
        results = [out.get(timeout=900) for _ in procs]
        for p in procs:
            p.join()
        wall = max(sum(t) for _, t, _ in results)
        n_rows, unique = rows(target)
        per_append = np.concatenate([t for _, t, _ in results])
        return {"method": method, "writers": writers, "written": writers * appends * batch, "rows": n_rows, "unique": unique,
                "cutouts/s": writers * appends * batch / wall, "s/append median": float(np.median(per_append)),
                "s/append max": float(per_append.max()), "conflicts": sum(c for _, _, c in results)}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--appends", type=int, default=8, help="appends per writer")
    p.add_argument("--batch", type=int, default=1024, help="cutouts per append (and the chunk length)")
    p.add_argument("--writers", type=int, default=2, help="concurrent writers of the second pass")
    args = p.parse_args()
    print(machine_line())
    methods = ["lock"]
    try:
        import icechunk

        methods.append("icechunk")
        print(f"icechunk {icechunk.__version__}")
    except ImportError:
        print("icechunk is not installed: measuring the lock only (pip install icechunk==1.1.21)")
    rows = []
    for method in methods:
        for w in sorted({1, args.writers}):
            r = measure(method, w, args.appends, args.batch)
            rows.append([r["method"], r["writers"], r["written"], r["rows"], r["unique"], f"{r['cutouts/s']:.0f}",
                         f"{r['s/append median']:.2f}", f"{r['s/append max']:.2f}", r["conflicts"]])
    print_table(rows, ["method", "writers", "rows written", "rows in store", "unique ids", "cutouts/s",
                       "s/append (median)", "s/append (max)", "conflicts retried"],
                title=f"{args.appends} appends of {args.batch} cutouts (5x{SIZE}x{SIZE}) per writer")
    best = {m: max(float(r[5]) for r in rows if r[0] == m and r[1] == args.writers) for m in methods}
    lost = sum(int(r[2]) - int(r[4]) for r in rows)
    print("writers: " + ", ".join(f"{m} {v:.0f} cutouts/s with {args.writers} writers" for m, v in best.items())
          + f"; rows lost or doubled {lost}")


if __name__ == "__main__":
    main()
