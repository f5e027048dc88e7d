"""The review loop on one tile: does labelling a hunt's top candidates make the next hunt list anomalies?

A one-tile hunt (train on the tile, score it in-sample) lists almost nothing at q ≤ 0.1: the
calibration split holds the tile's own anomalies, and a label-free p-value cannot fall far below
their share there (BENCHMARKS.md, "Tile surveys"). The product's answer is the review: what a
scientist labels `interesting` or `artefact` leaves every split of the next `gsafe train`, whose
calibration is then cross-fitted over the training objects (`tasks.train.training_plan`). This
measures that loop as a scientist runs it, through the product's own code:

1. a tile: `--tile hdf` the real Hubble Deep Field tile of `bench/realpixels.py` (its planted
   anomalies; normal sources whose cutout shows a neighbour's planted light are left out of the
   figures, as there), or `--tile SEED` a simulated tile of `bench/quality.py --tiles` (2 000 objects,
   5 % generic perturbations, 10 epochs: the demo's regime);
2. the default Detector fitted on it (`tasks.train.fit_detector_task`, with only the fields a user
   set, as `gsafe train` passes them) and every object scored;
3. `--rounds` rounds: a reviewer (the truth) looks at the `--size` highest-scoring objects not
   labelled yet (`--look calibration`: among the objects the next model calibrates on only, as `gsafe
   review --calibration` offers them) and labels them through the store's labels table (`infra.labels`): an anomaly, or a
   cutout showing planted light, `interesting`; the rest `not_interesting`; the detector is fitted
   again (the labelled departures leave every split, the calibration is cross-fitted) and the tile
   scored again.

Reported per round, on the judged objects not yet reviewed: AUROC, what the BH list at q ≤ 0.1 holds
(anomalies, normal objects, its false-discovery proportion), and the anomalies found so far (reviewed
or listed). With `--next`, the next tile's AUROC, its list and the list's FDP, and a validity reading:
the share of its normal objects at p ≤ 10⁻² and ≤ 10⁻³ over nominal (1 is exact; ~1 900 normal
objects, so 10⁻³ rests on about two). `--size` and `--rounds` describe a scenario; no default is chosen here.

    python bench/review_loop.py --tile hdf               # ~1 min on 2 cores
    python bench/review_loop.py --tile 7 --cache DIR     # 10-12 min (the tile is simulated once into DIR)
    python bench/review_loop.py --tile 7 --cache DIR --config combination=exposure statistics=all
    python bench/review_loop.py --tile 7 --next 8 --cache DIR --look calibration --size 20 --config combination=exposure statistics=all
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from _common import Timer, bench_home, machine_line, print_table, set_threads


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tile", default="hdf", help="'hdf' (the real tile of bench/realpixels.py) or a simulated tile's seed")
    p.add_argument("--rounds", type=int, default=3, help="review rounds, each followed by a refit and a new hunt")
    p.add_argument("--size", type=int, default=50, help="objects a reviewer looks at per round")
    p.add_argument("--seed", type=int, default=0, help="the detector's seed (and the HDF plants')")
    p.add_argument("--next", type=int, default=None, metavar="SEED",
                   help="a simulated tile the model also hunts after each round, out of sample (the next tile of a survey)")
    p.add_argument("--cache", default=None, help="folder for the simulated tile (kept between runs)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--look", choices=("top", "calibration"), default="top",
                   help="what the reviewer looks at each round: the tile's top ('top'), or the top of the model's own "
                        "calibration objects ('calibration', as `gsafe review --calibration` offers them)")
    p.add_argument("--config", nargs="*", default=[], metavar="FIELD=VALUE",
                   help="DetectorConfig fields set as a user sets them with gsafe train, e.g. combination=exposure statistics=all")
    args = p.parse_args()
    if args.next is not None and args.tile == "hdf":
        p.error("--next needs a simulated --tile (there is one real tile)")
    return args


def hdf_tile(home: Path, seed: int, settings) -> tuple[str, np.ndarray, None]:
    """The real tile of `bench/realpixels.py`, ingested with its truth: (store url, judged mask, epochs: the default)."""
    from infra.ingest import ingest
    from infra.store import SurveyStore
    from infra.truth import attach_truth, read_truth
    from realpixels import make_tile

    tile, cat, truth, *_, shows_neighbours = make_tile(argparse.Namespace(size=settings.cutout_size, frac=0.13, seed=seed), home)
    url = str(home / "hdf.zarr")
    ingest(str(tile), url, settings=settings, catalog=str(cat), progress=False)
    store = SurveyStore.open(url, mode="r+")
    attach_truth(store, read_truth(truth))
    ids = np.asarray(store.read_catalog(["object_id"])["object_id"]).astype(str)
    return url, ~np.isin(ids, sorted(shows_neighbours)), None


def sim_tile(where: Path, seed: int, settings, copy: bool = True) -> tuple[str, np.ndarray, int]:
    """A simulated tile of `bench/quality.py --tiles` (2 000 objects, 5 % perturbed, 10 epochs), copied
    out of the cache (`copy`) so that the labels written here stay out of it."""
    import shutil

    from infra.store import SurveyStore
    from quality import simulate_tile

    url = simulate_tile(where, settings, argparse.Namespace(train=2000, train_anomalies=0.05), seed)
    if copy:
        url = shutil.copytree(url, settings.home / Path(url).name)
    return str(url), np.ones(SurveyStore.open(str(url)).n, bool), 10


def review(store, ids: np.ndarray, score: np.ndarray, odd: np.ndarray, size: int, model: str, known: set) -> np.ndarray:
    """A reviewer (the truth) looks at the `size` highest finite `score`s and labels them through the store's
    labels table (`infra.labels`): `odd` objects (an anomaly, or planted light in the cutout) `interesting`,
    the rest `not_interesting`. Returns the rows looked at (fewer where fewer scores are finite)."""
    from infra import labels as lab

    look = np.argsort(-score, kind="stable")[:size]
    look = look[np.isfinite(score[look])]
    for label, which in (("interesting", look[odd[look]]), ("not_interesting", look[~odd[look]])):
        if len(which):
            lab.append_labels(store, lab.make_rows(ids[which].tolist(), label, model=model, who="bench"), known_ids=known)
    return look


def main() -> None:
    args = parse_args()
    threads = set_threads(args.threads)
    print(machine_line() + f"; torch threads {threads}")
    with bench_home("review") as home:
        from gsafe_models.detector import Detector
        from gsafe_models.metrics import auroc
        from infra.settings import Settings
        from infra.store import SurveyStore
        from tasks.train import fit_detector_task, review_calibration_rows

        if args.tile == "hdf":
            settings = Settings(home=home, progress=False, cutout_size=32, bands=("g", "r", "i"), chunk_size=256)
            url, judged, epochs = hdf_tile(home, args.seed, settings)
        else:
            settings = Settings(home=home, progress=False, cutout_size=64)
            where = Path(args.cache) if args.cache else home / "cache"
            where.mkdir(parents=True, exist_ok=True)
            url, judged, epochs = sim_tile(where, int(args.tile), settings)
        store = SurveyStore.open(url, mode="r+")
        c = store.read_catalog(["object_id", "label"])
        ids, truth = np.asarray(c["object_id"]).astype(str), np.asarray(c["label"]).astype(int)
        images = store.read_images()
        # the fields a user set, as `gsafe train` passes them: the review's cross-fitting applies unless one says otherwise
        from quality import config_overrides

        config = {"seed": args.seed} | ({"epochs": epochs} if epochs else {}) | config_overrides(args)
        if args.next is not None:
            nxt = SurveyStore.open(sim_tile(where, args.next, settings, copy=False)[0])
            next_images, next_truth = nxt.read_images(), np.asarray(nxt.read_catalog(["label"])["label"]).astype(int)
        known = set(ids.tolist())
        reviewed = np.zeros(len(ids), bool)
        n_anom = int((truth[judged] == 1).sum())
        print(f"tile {args.tile}: {len(ids)} objects, {n_anom} anomalies judged, {int((~judged).sum())} left out "
              f"(a neighbour's planted light in their cutout)")
        rows = []
        for r in range(args.rounds + 1):
            if r:
                score = np.where(reviewed, -np.inf, np.nan_to_num(out["score"], nan=-np.inf))
                if args.look == "calibration":  # the next model's calibration objects only (gsafe review --calibration)
                    offered = np.zeros(len(ids), bool)
                    offered[review_calibration_rows(url, det.config)] = True
                    score = np.where(offered, score, -np.inf)
                look = review(store, ids, score, (truth == 1) | ~judged, args.size, f"review_loop/round{r}", known)
                reviewed[look] = True
            with Timer() as t:
                det = Detector.from_bytes(fit_detector_task.fn(url, config, settings.model_dump(mode="json")))
            out = det.score(images)
            fresh = judged & ~reviewed
            new = (out["q_value"] <= 0.1) & fresh
            found = (reviewed | new) & judged & (truth == 1)
            rows.append([r, int(reviewed.sum()), int((reviewed & judged & (truth == 1)).sum()), det.config.calibration_folds,
                         int(det.diagnostics.get("reviewed_left_out", 0)), t.seconds,
                         auroc(np.nan_to_num(out["score"][fresh], nan=-np.inf), truth[fresh]),
                         int((new & (truth == 1)).sum()), int((new & (truth == 0)).sum()),
                         float((new & (truth == 0)).sum() / max(1, new.sum())), int(found.sum()), float(found.sum() / n_anom)])
            if args.next is not None:
                o = det.score(next_images)
                hit = o["q_value"] <= 0.1
                null = o["p_value"][next_truth == 0]   # validity: the next tile's normal objects against nominal
                rows[-1] += [auroc(np.nan_to_num(o["score"], nan=-np.inf), next_truth),
                             float((hit & (next_truth == 1)).sum() / max(1, next_truth.sum())), int((hit & (next_truth == 0)).sum()),
                             float((hit & (next_truth == 0)).sum() / max(1, hit.sum())),
                             float(np.mean(null <= 1e-2) / 1e-2), float(np.mean(null <= 1e-3) / 1e-3)]
            print(f"round {r}: fitted in {t.seconds:.0f} s; {rows[-1][7]} anomalies and {rows[-1][8]} normal objects newly listed", flush=True)
        where_look = "the tile" if args.look == "top" else "the model's calibration objects"
        print_table(rows, ["round", "reviewed", "anomalies reviewed", "calibration folds", "left out of the fit", "fit s",
                           "AUROC (not reviewed)", "anomalies listed", "normal listed", "FDP of the list", "anomalies found",
                           "found share"] + ([f"tile {args.next}: AUROC", "listed share", "normal listed", "FDP",
                                              "normal p<=1e-2 / nominal", "normal p<=1e-3 / nominal"]
                                             if args.next is not None else []),
                    f"the review loop on tile {args.tile}: {args.size} objects reviewed per round "
                    f"({where_look}, top first), the detector fitted again "
                    f"after each (as `gsafe train` after a review), the tile scored again; lists over the objects not yet reviewed")
        last = rows[-1]
        print(f"review_loop: tile {args.tile}, {args.rounds} rounds of {args.size}: {last[10]} of {n_anom} anomalies found "
              f"({last[11]:.0%}): {last[2]} by review, {last[7]} listed at q ≤ 0.1 beside {last[8]} normal objects"
              + (f"; the next tile {args.next}, hunted out of sample: AUROC {rows[0][12]:.3f} -> {last[12]:.3f}, listed "
                 f"{rows[0][13]:.0%} -> {last[13]:.0%} of its anomalies (FDP {rows[0][15]:.2f} -> {last[15]:.2f})"
                 if args.next is not None else ""))


if __name__ == "__main__":
    main()
