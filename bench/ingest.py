"""Ingest throughput: cutouts/s per core for a directory of FITS cutouts and for a tile + catalog,
against a raw read of the same files (astropy open + read: no validation, no store).

What it does, under a temporary GSAFE_HOME:

1. writes `--n` FITS cutouts (5×64×64 float32: noise and a galaxy-like blob, OBJID/RA/DEC in the
   header) into one directory per format (`--formats`: plain ``.fits``, gzip ``.fits.gz``, and
   `--n-fz` Rice tile-compressed ``.fits.fz``: astropy writes those slowly), and one 5-band tile (`--tile` px square, with a TAN WCS) and a
   CSV catalog of `--n-tile` ra, dec positions on it;
2. raw read, in this process: every file opened with astropy and its image read (`fits.open` +
   ``.data``), every catalog position placed with the WCS and cut from the memory-mapped tile
   (`Cutout2D`): the floor of what reading costs;
3. ingest: `infra.ingest.ingest` (the Python API: no Prefect server) into a fresh store with 1, 2,
   ... reader processes (`--workers`), each in its own child process whose whole tree (with its
   reader processes) is sampled for peak RSS (`memory.run_measured`). The time is the ingest call
   alone, measured inside the child (reader processes' start-up included, imports not).

The page cache is dropped before each pass, so every pass reads from disk (`--warm` to skip).
Per core = cutouts/s ÷ processes reading (1 for the raw read and for 1 worker).

Last line: ``ingest: FITS dir X cutouts/s per core (raw read Y, ratio R), tile + catalog X (raw Y,
ratio R); peak RSS X MiB``, with the plain-FITS figures at the worker count that reads fastest per core.

    python bench/ingest.py                # 6 000 cutouts (.fits, .fits.gz), 1 000 .fits.fz, a 2048² tile with 2 000 objects: ~6 min on 2 cores
    python bench/ingest.py --quick        # 1 000 cutouts, plain FITS only, 1 000 objects on the tile
    python bench/ingest.py --n 20000 --workers 1 2 4 --formats fits
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

from _common import Timer, bench_home, evict_from_page_cache, machine_line, print_table
from memory import MiB, run_measured

BANDS = ("g", "r", "i", "z", "y")
SUFFIX = {"fits": ".fits", "fits.gz": ".fits.gz", "fits.fz": ".fits.fz"}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=6000, help="FITS cutouts in the .fits and .fits.gz directories")
    p.add_argument("--n-fz", type=int, default=1000, help="FITS cutouts in the .fits.fz directory")
    p.add_argument("--size", type=int, default=64, help="cutout side H = W, pixels (5 bands)")
    p.add_argument("--formats", nargs="+", default=["fits", "fits.gz", "fits.fz"], choices=list(SUFFIX),
                   help="file formats of the cutout directories")
    p.add_argument("--tile", type=int, default=2048, help="side of the 5-band tile, pixels")
    p.add_argument("--n-tile", type=int, default=2000, help="catalog rows (objects) on the tile")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="reader processes of the ingest")
    p.add_argument("--warm", action="store_true", help="leave the files in the page cache between passes")
    p.add_argument("--interval", type=float, default=0.1, help="seconds between memory samples")
    p.add_argument("--quick", action="store_true", help="a smaller run: 1 000 cutouts, plain FITS, 1 000 on the tile")
    p.add_argument("--keep", action="store_true", help="keep the temporary GSAFE_HOME afterwards")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--child", nargs=4, metavar=("SOURCE", "CATALOG", "STORE", "WORKERS"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.quick:
        a.n, a.n_fz, a.formats, a.n_tile = min(a.n, 1000), min(a.n_fz, 1000), ["fits"], min(a.n_tile, 1000)
    return a


# ---- the inputs --------------------------------------------------------------------------------
def _wcs(side: int):
    from astropy.wcs import WCS

    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [150.0, 2.0]
    w.wcs.crpix = [side / 2, side / 2]
    w.wcs.cdelt = [-0.2 / 3600, 0.2 / 3600]
    return w


def _cutouts(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """(n, 5, size, size) float32: unit sky noise and a Gaussian blob of random size and flux."""
    y, x = np.mgrid[:size, :size] - (size - 1) / 2
    r2 = (x * x + y * y)[None, None]
    sigma = rng.uniform(1.5, 6.0, (n, 1, 1, 1))
    flux = rng.uniform(5, 50, (n, 5, 1, 1))
    return (rng.standard_normal((n, 5, size, size)) + flux * np.exp(-r2 / (2 * sigma**2))).astype(np.float32)


def write_cutouts(d: Path, fmt: str, n: int, size: int, seed: int) -> float:
    """`n` one-object FITS files of format `fmt` in `d`; returns seconds."""
    from astropy.io import fits

    d.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    with Timer() as t:
        for start in range(0, n, 500):
            images = _cutouts(rng, min(500, n - start), size)
            for j, img in enumerate(images):
                oid = f"bench-{start + j:07d}"
                hdr = fits.Header({"OBJID": oid, "RA": 150.0 + 1e-4 * (start + j), "DEC": 2.0})
                if fmt == "fits.fz":
                    hdul = fits.HDUList([fits.PrimaryHDU(header=hdr),
                                         fits.CompImageHDU(img, compression_type="RICE_1", quantize_level=16)])
                else:
                    hdul = fits.HDUList([fits.PrimaryHDU(img, header=hdr)])
                hdul.writeto(d / f"{oid}{SUFFIX[fmt]}")
    return t.seconds


def write_tile(home: Path, side: int, n: int, size: int, seed: int) -> tuple[Path, Path, float]:
    """A (5, side, side) float32 tile with a TAN WCS and a CSV of `n` ra, dec positions on it."""
    from astropy.io import fits

    rng = np.random.default_rng(seed + 1)
    with Timer() as t:
        tile = rng.standard_normal((5, side, side), dtype=np.float32)
        w = _wcs(side)
        m = size // 2 + 1
        xs, ys = rng.uniform(m, side - m, n), rng.uniform(m, side - m, n)
        for x, y, blob in zip(xs, ys, _cutouts(rng, n, size)):
            x0, y0 = int(round(x)) - size // 2, int(round(y)) - size // 2
            tile[:, y0:y0 + size, x0:x0 + size] += blob - blob.mean(axis=(1, 2), keepdims=True)
        fits.PrimaryHDU(tile, header=w.to_header()).writeto(home / "tile.fits")
        ra, dec = w.pixel_to_world_values(xs, ys)
        lines = ["id,ra,dec"] + [f"tile-{i:06d},{r!r},{d!r}" for i, (r, d) in enumerate(zip(ra.tolist(), dec.tolist()))]
        (home / "tile.csv").write_text("\n".join(lines) + "\n")
    return home / "tile.fits", home / "tile.csv", t.seconds


# ---- the raw read: astropy alone ---------------------------------------------------------------
def raw_read_dir(d: Path) -> tuple[float, int]:
    from astropy.io import fits

    files = sorted(d.iterdir())
    with Timer() as t:
        for f in files:
            with fits.open(f, memmap=False) as hdul:
                data = next(h.data for h in hdul if h.data is not None)
                np.asarray(data, dtype=np.float32)
    return t.seconds, len(files)


def raw_read_tile(tile: Path, catalog: Path, size: int) -> tuple[float, int]:
    import csv

    from astropy.io import fits
    from astropy.nddata import Cutout2D
    from astropy.wcs import WCS

    with Timer() as t:
        with fits.open(tile, memmap=True) as hdul, open(catalog, newline="") as f:
            data = hdul[0].data
            w = WCS(hdul[0].header).celestial
            n = 0
            for row in csv.DictReader(f):
                x, y = w.world_to_pixel_values(float(row["ra"]), float(row["dec"]))
                sy, sx = Cutout2D(data[0], (float(x), float(y)), size, mode="strict", copy=False).slices_original
                np.array(data[:, sy, sx], dtype=np.float32)
                n += 1
    return t.seconds, n


# ---- the ingest, in a child process ------------------------------------------------------------
def child(source: str, catalog: str, store: str, workers: str) -> None:
    """Runs in the child process: one ingest, then one JSON line with its seconds and counts."""
    from infra.ingest import ingest
    from infra.settings import Settings

    settings = Settings(progress=False, bands=BANDS, ingest_workers=int(workers))
    with Timer() as t:
        s = ingest(source, store, settings=settings, catalog=None if catalog == "-" else catalog, progress=False)
    print(json.dumps({"seconds": t.seconds, "ingested": s.ingested, "quarantined": s.quarantined}))


def measure_ingest(home: Path, source: Path, catalog: Path | None, workers: int, args, what: str) -> dict:
    store = home / "bench.zarr"
    if not args.warm:
        evict_from_page_cache(source if source.is_dir() else source.parent)
    r = run_measured([sys.executable, str(Path(__file__).resolve()), "--child", str(source),
                      str(catalog) if catalog else "-", str(store), str(workers)], args.interval, what)
    shutil.rmtree(store, ignore_errors=True)
    out = json.loads(r["last"])
    if out["quarantined"]:
        raise SystemExit(f"bench: {what} quarantined {out['quarantined']} good inputs")
    return {**out, "peak": r["peak"]["rss"]}


def measure(home: Path, name: str, source: Path, catalog: Path | None, raw: tuple[float, int], args) -> list[dict]:
    rows = [{"what": name, "how": "raw read (astropy)", "procs": 1, "seconds": raw[0], "n": raw[1], "peak": None}]
    for w in args.workers:
        r = measure_ingest(home, source, catalog, w, args, f"ingest of {name} with {w} reader(s)")
        rows.append({"what": name, "how": f"gsafe ingest, {w} reader{'s' if w > 1 else ''}", "procs": w,
                     "seconds": r["seconds"], "n": r["ingested"], "peak": r["peak"]})
        print(f"{name}: {w} reader(s): {r['ingested']} cutouts in {r['seconds']:.1f} s", flush=True)
    return rows


def main() -> None:
    args = parse_args()
    if args.child:
        child(*args.child)
        return
    print(machine_line())
    with bench_home("ingest", keep=args.keep) as home:
        setup, results = [], []
        tile, catalog, s = write_tile(home, args.tile, args.n_tile, args.size, args.seed)
        setup.append([f"write a 5x{args.tile}x{args.tile} tile and a catalog of {args.n_tile}", f"{s:.1f}"])
        dirs = {}
        for fmt in args.formats:
            dirs[fmt] = home / f"cutouts-{fmt.replace('.', '-')}"
            n = args.n_fz if fmt == "fits.fz" else args.n
            s = write_cutouts(dirs[fmt], fmt, n, args.size, args.seed)
            size = sum(f.stat().st_size for f in dirs[fmt].iterdir()) / n / 1024
            setup.append([f"write {n} cutouts as .{fmt} ({size:.0f} KiB each)", f"{s:.1f}"])
        print_table(setup, ["setup", "seconds"])
        for fmt, d in dirs.items():
            if not args.warm:
                evict_from_page_cache(d)
            results += measure(home, f"dir of .{fmt}", d, None, raw_read_dir(d), args)
        if not args.warm:
            evict_from_page_cache(home)
        results += measure(home, "tile + catalog", tile, catalog, raw_read_tile(tile, catalog, args.size), args)
        print(f"\n{summarize(results, args)}")


def summarize(results: list[dict], args) -> str:
    rows = []
    for r in results:
        rate = r["n"] / r["seconds"]
        raw = next(x for x in results if x["what"] == r["what"] and x["procs"] == 1 and x["peak"] is None)
        per_core = rate / r["procs"]
        r["per_core"] = per_core
        ratio = per_core / (raw["n"] / raw["seconds"])
        rows.append([r["what"], r["how"], f"{r['n']:,}", f"{r['seconds']:.1f}", f"{rate:,.0f}", f"{per_core:,.0f}",
                     f"{ratio:.2f}", "-" if r["peak"] is None else f"{r['peak'] / MiB:.0f}"])
    print_table(rows, ["source", "reading", "cutouts", "seconds", "cutouts/s", "per core", "vs raw", "peak RSS MiB"],
                f"Ingest throughput ({args.size}x{args.size} px, 5 bands; store chunks of 1024; "
                f"{'warm' if args.warm else 'cold'} page cache)")

    def best(what: str) -> tuple[dict, float]:
        ing = [r for r in results if r["what"] == what and r["peak"] is not None]
        raw = next(r for r in results if r["what"] == what and r["peak"] is None)
        top = max(ing, key=lambda r: r["per_core"])
        return top, raw["n"] / raw["seconds"]

    parts = []
    for what, label in (("dir of .fits", "FITS dir"), ("tile + catalog", "tile + catalog")):
        if any(r["what"] == what for r in results):
            top, raw = best(what)
            parts.append(f"{label} {top['per_core']:,.0f} cutouts/s per core with {top['procs']} reader(s) "
                         f"(raw read {raw:,.0f}, ratio {top['per_core'] / raw:.2f})")
    peak = max(r["peak"] for r in results if r["peak"] is not None)
    return f"ingest: {', '.join(parts)}; peak RSS {peak / MiB:.0f} MiB"


if __name__ == "__main__":
    main()
