"""Real pixels: the Hubble Deep Field as scikit-image ships it (an 8-bit, JPEG-compressed RGB product),
its sources cut out through gsafe's own tile + catalog ingest, anomalies planted beside them, hunted as
a user hunts a new tile: train on the tile itself (a small, dirty set), score it, compare with peers.

1. the image (872 × 1000 × 3, uint8) becomes a 3-band FITS tile (bands g, r, i = the blue, green and
   red channels); sources are detected on the band sum (background and noise from the median and
   MAD, Gaussian smoothing σ = 1.5 px, connected pixels above 4σ, at least 6 of them), and their
   centroids away from the edges make the catalog;
2. anomalies are planted into the tile at a random `--frac` of the sources, drawn from generic kinds
   at strengths in units of the tile's own noise, and the tile is re-quantised to 8 bits (the planted
   light suffers the product's quantisation as the real light did): `trail` (a straight line across
   the cutout, 1-3 bands), `hits` (sharp cosmic-ray-like hits in one band), `point` (a point source of
   another colour beside the galaxy), `arc` (a thin arc around the galaxy), `colour` (the galaxy's
   light changed in one band), `column` (a hot column segment in one band);
3. `gsafe ingest TILE --catalog CAT` (the library call), truth joined, a Detector fitted exactly as
   `gsafe train` fits it (defaults; the tile's own train / val / calib split), every object scored;
4. AUROC overall and per kind for gsafe's defaults, each of its statistics, and the peers (the
   detector's own asinh stretch, as in `bench/quality.py`), `bench/combiner.py`'s label-free combiner trained on
   the tile's own validation split against its generic perturbations, and what the statistics carry: a supervised
   combination of every statistic trained on the tile's own truth and scored out of fold (about what a
   label-free rule over them can hope for, `quality.supervised_ceiling`). The field is crowded (a 32-pixel cutout holds
   ~1.6 sources), so the cutouts of ~30 % of the normal sources hold light planted beside a neighbour (a
   pixel ≥ 1σ of the band noise): a scientist would flag those cutouts too, so they are left out of the
   figures (neither normal nor anomalous) and the defaults' AUROC with them counted as normal is printed.

    python bench/realpixels.py            # ~1 000 sources, 32 × 32, a few minutes on 2 cores
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np

from _common import Timer, bench_home, machine_line, print_table, set_threads

KINDS = ("trail", "hits", "point", "arc", "colour", "column")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=32, help="cutout side, pixels")
    p.add_argument("--frac", type=float, default=0.13, help="share of sources with a planted anomaly")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--config", nargs="*", default=[], metavar="FIELD=VALUE",
                   help="DetectorConfig fields to set for both fitted detectors, e.g. fit_trim=0.1 (to report a setting "
                        "on real pixels; defaults are never chosen here)")
    return p.parse_args()


def detect(tile: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, float]:
    """(y, x) centroids of the sources of a (B, H, W) tile, and the band-sum noise."""
    from scipy import ndimage

    s = tile.sum(0)
    bg = np.median(s)
    sigma = 1.4826 * np.median(np.abs(s - bg))
    sm = ndimage.gaussian_filter(s - bg, 1.5)
    sm_sigma = 1.4826 * np.median(np.abs(sm - np.median(sm)))
    lab, n = ndimage.label(sm > 4 * sm_sigma)
    idx = np.arange(1, n + 1)
    area = ndimage.sum(np.ones_like(lab), lab, idx)
    cy, cx = np.array(ndimage.center_of_mass(np.clip(s - bg, 0, None), lab, idx)).T
    h = size // 2 + 1
    keep = (area >= 6) & (cy > h) & (cx > h) & (cy < s.shape[0] - h) & (cx < s.shape[1] - h)
    return cy[keep], cx[keep], sigma


def plant(tile: np.ndarray, y: float, x: float, kind: str, rng: np.random.Generator, noise: np.ndarray, size: int) -> None:
    """Adds one anomaly of `kind` around (y, x) to the float (B, H, W) tile, in place."""
    B, H, W = tile.shape
    half = size // 2
    yy, xx = np.mgrid[int(y) - half:int(y) + half, int(x) - half:int(x) + half]
    sl = (slice(int(y) - half, int(y) + half), slice(int(x) - half, int(x) + half))
    if kind == "trail":
        a = rng.uniform(0, np.pi)
        off = rng.uniform(-0.4, 0.4) * size
        d = (xx - x) * np.sin(a) - (yy - y) * np.cos(a) - off
        prof = np.exp(-0.5 * (d / rng.uniform(0.7, 1.5)) ** 2)
        for b in rng.choice(B, size=int(rng.integers(1, B + 1)), replace=False):
            tile[b][sl] += rng.uniform(2, 8) * noise[b] * prof
    elif kind == "hits":
        b = int(rng.integers(B))
        for _ in range(int(rng.integers(1, 4))):
            py, px = rng.integers(0, size, 2)
            tile[b][sl][py, px] += rng.uniform(8, 40) * noise[b]
    elif kind == "point":
        r, phi = rng.uniform(2, 6), rng.uniform(0, 2 * np.pi)
        prof = np.exp(-0.5 * ((yy - y - r * np.sin(phi)) ** 2 + (xx - x - r * np.cos(phi)) ** 2) / 1.0 ** 2)
        sed = rng.dirichlet(np.ones(B))
        peak = rng.uniform(6, 30)
        for b in range(B):
            tile[b][sl] += peak * sed[b] * B * noise[b] * prof
    elif kind == "arc":
        r0, w = rng.uniform(4, 9), rng.uniform(0.6, 1.2)
        phi0, span = rng.uniform(0, 2 * np.pi), rng.uniform(1.0, 3.0)
        rr, pp = np.hypot(yy - y, xx - x), np.arctan2(yy - y, xx - x)
        dphi = np.angle(np.exp(1j * (pp - phi0)))
        prof = np.exp(-0.5 * ((rr - r0) / w) ** 2) * (np.abs(dphi) < span / 2)
        for b in range(B):
            tile[b][sl] += rng.uniform(2, 6) * noise[b] * prof * (1.3 if b == 0 else 0.8)
    elif kind == "colour":
        b = int(rng.integers(B))
        light = np.clip(tile[b][sl] - np.median(tile[b]), 0, None)
        mask = np.hypot(yy - y, xx - x) < 6
        tile[b][sl] += (np.exp(rng.choice([-1, 1]) * rng.uniform(0.5, 1.2)) - 1) * light * mask
    elif kind == "column":
        b = int(rng.integers(B))
        c = int(rng.integers(2, size - 2))
        y0 = int(rng.integers(0, size // 2))
        tile[b][sl][y0:y0 + int(rng.integers(size // 3, size - y0)), c] += rng.uniform(2, 6) * noise[b]
    else:
        raise ValueError(kind)


def make_tile(args, where):
    """Writes tile.fits, catalog.csv and truth.fits; returns their paths and the kinds planted."""
    import skimage.data
    from astropy.io import fits
    from infra.truth import write_truth

    rgb = skimage.data.hubble_deep_field().astype(np.float32)
    tile = rgb[..., ::-1].transpose(2, 0, 1).copy()  # blue, green, red -> g, r, i
    ys, xs, _ = detect(tile, args.size)
    noise = np.array([1.4826 * np.median(np.abs(b - np.median(b))) for b in tile])
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(ys))
    ys, xs = ys[order], xs[order]
    n_anom = int(round(args.frac * len(ys)))
    kinds = np.array([""] * len(ys), dtype=object)
    before = tile.copy()
    for i in range(n_anom):
        kinds[i] = KINDS[i % len(KINDS)]
        plant(tile, ys[i], xs[i], kinds[i], rng, noise, args.size)
    # the field is crowded: a source's cutout can hold light planted beside a neighbour (a trail, a point
    # source, a recoloured galaxy); such a source is neither normal nor its own anomaly
    planted = (np.abs(tile - before) / noise[:, None, None]).max(0)
    half = args.size // 2
    leak = np.array([planted[int(y) - half:int(y) + half, int(x) - half:int(x) + half].max() >= 1.0 for y, x in zip(ys, xs)])
    tile = np.clip(np.round(tile), 0, 255).astype(np.float32)  # back to the 8-bit product's values
    ids = np.array([f"hdf-{i:05d}" for i in range(len(ys))])
    fits.PrimaryHDU(tile).writeto(where / "tile.fits", overwrite=True)
    with open(where / "catalog.csv", "w") as f:
        f.write("object_id,x,y\n")
        for o, x, y in zip(ids, xs, ys):
            f.write(f"{o},{x:.2f},{y:.2f}\n")
    write_truth(where / "truth.fits", {"object_id": ids, "label": (kinds != "").astype(np.int16),
                                        "anomaly_class": kinds.astype(str)})
    shows_neighbours = {o for o, k, lk in zip(ids, kinds, leak) if lk and not k}
    return where / "tile.fits", where / "catalog.csv", where / "truth.fits", len(ys), n_anom, shows_neighbours


def combiner_scores(every, url: str, images: np.ndarray, every_stats: dict[str, np.ndarray]) -> np.ndarray:
    """`bench/combiner.py`'s monotone boosted trees over every statistic, trained on the tile's own validation
    split (every object of it, unlabelled: planted ones included, as a user's tile would be) against its copies
    perturbed by each generic kind of `gsafe_models.perturb`; no planted kind and no label is seen."""
    from combiner import fit_combiner
    from gsafe_models.perturb import KINDS as PERTURBATIONS, band_noise, perturb
    from tasks.train import store_splits

    ref = images[np.sort(store_splits(url)["val"])]
    noise = band_noise(ref)
    names = list(every.statistic_names)

    def matrix(x):
        raw = every.statistics(x)
        return np.stack([raw[n] for n in names], 1)
    S = {"ref": matrix(ref)} | {f"synth:{k}": matrix(perturb(ref, k, seed=j, noise=noise)) for j, k in enumerate(PERTURBATIONS)}
    return fit_combiner(S, list(PERTURBATIONS), "monotone-trees", "z", 0.1)(np.stack([every_stats[n] for n in names], 1))


def main() -> None:
    args = parse_args()
    threads = set_threads(args.threads)
    print(machine_line() + f"; torch threads {threads}")
    with bench_home("realpixels") as home:
        from gsafe_models.detector import STATISTICS, Detector, DetectorConfig
        from gsafe_models.metrics import per_class_report
        from infra.ingest import ingest
        from infra.settings import Settings
        from infra.store import SurveyStore
        from infra.truth import attach_truth, read_truth
        from tasks.train import fit_detector_task

        from quality import config_overrides, peer_methods, stretched, supervised_ceiling

        settings = Settings(home=home, progress=False, cutout_size=args.size, bands=("g", "r", "i"), chunk_size=256)
        tile, cat, truth, n, n_anom, shows_neighbours = make_tile(args, home)
        url = str(home / "hdf.zarr")
        with Timer() as t:
            summary = ingest(str(tile), url, settings=settings, catalog=str(cat), progress=False)
            store = SurveyStore.open(url, mode="r+")
            attach_truth(store, read_truth(truth))
        print(f"tile: {n} sources detected, {n_anom} with a planted anomaly ({args.frac:.0%}); {summary.line()} in {t.seconds:.0f} s")

        overrides = {"seed": args.seed} | ({"epochs": args.epochs} if args.epochs else {}) | config_overrides(args)
        with Timer() as t:
            det = Detector.from_bytes(fit_detector_task.fn(url, dataclasses.asdict(DetectorConfig(**overrides)), settings.model_dump(mode="json")))
        print(f"default detector ({det.config.combination}: {', '.join(det.statistic_names)}) trained on the tile in {t.seconds:.0f} s")
        images = store.read_images()
        c = store.read_catalog(["label", "anomaly_class", "object_id"])
        labels, classes = np.asarray(c["label"]).astype(int), np.asarray(c["anomaly_class"]).astype(str)
        # normal sources whose cutout holds a neighbour's planted light are left out of every figure below
        judged = ~np.isin(np.asarray(c["object_id"]).astype(str), sorted(shows_neighbours))
        out = det.score(images)
        scores = {f"gsafe defaults ({det.config.combination})": out["score"]}
        with Timer() as t:
            # each statistic's own ranking does not depend on its calibration (cross-fitting refuses the ones reading the representation)
            plain = overrides | {"calibration_folds": 0}
            every = Detector.from_bytes(fit_detector_task.fn(url, dataclasses.asdict(DetectorConfig(**plain, statistics=STATISTICS)),
                                                             settings.model_dump(mode="json")))
        every_stats = every.statistics(images)
        for name, v in every_stats.items():
            scores[f"  statistic {name}"] = v
        with Timer() as t:
            scores["gsafe outlier-exposure combiner (monotone trees)"] = combiner_scores(every, url, images, every_stats)
        print(f"outlier-exposure combiner (bench/combiner.py) trained on the tile's validation split in {t.seconds:.0f} s")
        X = stretched(det, images)
        scores.update(peer_methods(X, X, 32, args.seed))
        present = sorted(set(classes[labels == 1]))
        everyone = per_class_report(np.nan_to_num(out["score"], nan=-np.inf), labels, classes)["all"]["auroc"]
        rows = []
        for name, s in scores.items():
            rep = per_class_report(np.nan_to_num(s[judged], nan=-np.inf), labels[judged], classes[judged])
            rows.append([name, rep["all"]["auroc"]] + [rep[k]["auroc"] for k in present])
        print_table(rows, ["method (trained and scored on the tile)", "all"] + list(present),
                    f"AUROC on the real tile ({int((labels[judged] == 0).sum())} sources, {int(labels.sum())} planted anomalies; "
                    f"{int((~judged).sum())} sources whose cutout shows a neighbour's planted anomaly left out)")
        print(f"gsafe defaults with those {int((~judged).sum())} counted as normal: AUROC {everyone:.3f}")
        # what the statistics carry: a supervised combination trained on the tile's own truth, scored out of fold
        F = np.column_stack(list(every_stats.values()))[judged]
        for model in ("logistic", "trees"):
            ceil = supervised_ceiling(F, labels[judged], classes[judged], args.seed, model)
            print(f"supervised ceiling ({model} on every statistic, the tile's labels, 5-fold): all {ceil['all']:.3f}; "
                  + ", ".join(f"{k} {ceil[k]:.3f}" for k in present))
        q = np.where(judged, out["q_value"], np.inf)  # BH over every source; the left-out ones neither true nor false
        listed = q <= 0.1
        best_peer = max((r for r in rows if not r[0].startswith(("gsafe", "  "))), key=lambda r: r[1])
        print(f"realpixels: gsafe defaults AUROC {rows[0][1]:.3f} vs best peer {best_peer[1]:.3f} ({best_peer[0]}); "
              f"{int(listed.sum())} listed at q ≤ 0.1, {int((listed & (labels == 0)).sum())} of them not planted")


if __name__ == "__main__":
    main()
