"""Validity on the next tile: do a single-tile model's p-values hold on normal objects it has not seen?

A model trained on one new tile (~2 000 objects, as `gsafe demo` and a one-tile hunt train) is used on
the next tiles of a survey. Its p-values are conformal inside its calibration split's range (~300
objects) and rest on a generalized Pareto tail beyond it (`gsafe_models.calibration.TailCalibrator`;
with `--config calibration_trim=0.05`, the default before 2026-12-07, after an outlier test has trimmed
what it took for contaminants, which made 2 of 4 tile models invalid). BH lists at p ≈ 10⁻⁴–10⁻³ on a
survey of thousands, i.e. beyond that range, so that is where validity must be checked; a KS test on
the bulk (`bench/quality.py`) does not see it. Normal objects only: no anomaly class is read.

Per simulated tile of `bench/quality.py --tiles` (2 000 objects, 5 % generic perturbations, 10 epochs),
the default Detector is fitted on it as `gsafe train` fits it (`tasks.train.fit_detector_task`), and
every *other* tile is scored with it. Printed per model and per default statistic (and the combined
p-value): how many calibration values were trimmed, the fitted tail shape, and the share of the other
tiles' normal objects with p ≤ 10⁻², 10⁻³, 10⁻⁴ beside the binomial 99 % bound of a valid p-value;
then the false-discovery proportion of each other tile's BH list at q ≤ 0.1.

**Held-out seeds** (`--seeds`, default 2 and 3): the same check at survey scale, on seeds that no selection
reads (`bench/quality.py` chooses on seeds 0 and 1 and tiles 7 and 8). Per seed, a training survey (3 000
cutouts, 1 % anomalies of every class) and a fresh test survey (3 000, 15 %, seed + 100) are simulated as
`bench/quality.py` makes them; the default Detector is fitted on the training survey as `gsafe train` fits it
and scores the test survey: the test survey's normal objects, and its BH list (realised FDR, share of the
anomalies listed). Seeds 0 and 1 alone hid a realised FDR twice q for days (BENCHMARKS.md, "Validity repaired").

Fitted detectors are cached under a key of the whole `DetectorConfig` that `gsafe train` plans for the store (a small
store gets a cross-fitted calibration, `tasks.train.training_plan`), so a change of default refits them.

    python bench/validity.py --cache DIR                      # tiles 7-10, seeds 2-3: ~20 min on 2 cores the first time
    python bench/validity.py --cache DIR --config FIELD=VALUE # a DetectorConfig setting, as in quality.py
    python bench/validity.py --cache DIR --seeds              # tiles only
    python bench/validity.py --cache DIR --tiles --seeds 50 51 52 53 54 55 56 57 --train 400 --test 400   # small surveys

**Reviewed models** (`--review SIZE`): a one-tile hunt lists little until a scientist reviews it
(`bench/review_loop.py`); then `gsafe train` leaves the labelled departures out and cross-fits the calibration.
With `--review`, each tile model and each held-out seed's model is also fitted again after one review round
of its training store: the truth labels the SIZE objects a scientist looks at (`--look top`: the store's top;
`calibration`: the top of the model's own calibration objects, as `gsafe review --calibration` offers them),
on a copy outside the cache; the reviewed model is checked as above, and the normal p-values and lists are
pooled, unreviewed and reviewed apart.

    python bench/validity.py --cache DIR --seeds --review 50                  # tiles 7-10, ~35 min the first time

**Small surveys** (`--train`, `--test`): the held-out seeds at another size. The FDR is an expectation over
calibration draws, so with several seeds the mean FDP of their lists is printed with its standard error, and
their normal objects are pooled.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np

from _common import Timer, bench_home, machine_line, print_table, set_threads

LEVELS = (1e-2, 1e-3, 1e-4)
REVIEWED = "reviewed"  # the label of a tile or seed model fitted again after a review round (--review)
ALPHA = 0.1  # the BH level of a list


def config_key(config: dict) -> str:
    """A short key of the whole DetectorConfig a detector is fitted with (defaults included)."""
    from gsafe_models.detector import DetectorConfig

    full = dataclasses.asdict(DetectorConfig(**config))
    return hashlib.sha1(json.dumps(full, sort_keys=True, default=str).encode()).hexdigest()[:10]


def fitted(where: Path, name: str, url: str, config: dict, settings, what: str):
    """The detector fitted on `url` as `gsafe train` fits it, cached in `where` under `name` and a key of
    the config `gsafe train` plans for that store (`tasks.train.training_plan`: a small store's
    calibration is cross-fitted)."""
    import warnings

    from gsafe_models.detector import Detector
    from tasks.train import fit_detector_task, training_plan

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fit_detector_task plans again, and warns there
        planned, _ = training_plan(url, config)
    path = where / f"{name}_{config_key(planned)}.bin"
    if not path.exists():
        with Timer() as t:
            payload = fit_detector_task.fn(url, config, settings.model_dump(mode="json"))
        path.write_bytes(payload)
        print(f"{what}: fitted in {t.seconds:.0f} s", flush=True)
    return Detector.from_bytes(path.read_bytes())


def reviewed_copy(home: Path, name: str, tile: tuple, det, size: int, look: str) -> str:
    """A copy of a training store (`tile`: its images, truth and url; the copy outside the cache, as `name`)
    with one review round's labels: the truth labels the `size` objects a scientist would look at after
    `det`'s hunt of the store (`look`: its top, or the top of `det`'s calibration objects), as
    `bench/review_loop.py` does. Returns the copy's url."""
    import shutil

    from infra.store import SurveyStore
    from review_loop import review
    from tasks.train import review_calibration_rows

    images, truth, url = tile
    copy = home / f"{name}_reviewed.zarr"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(url, copy)
    store = SurveyStore.open(str(copy), mode="r+")
    ids = np.asarray(store.read_catalog(["object_id"])["object_id"]).astype(str)
    score = np.nan_to_num(det.score(images)["score"], nan=-np.inf)
    if look == "calibration":
        offered = np.zeros(len(ids), bool)
        offered[review_calibration_rows(str(copy), det.config)] = True
        score = np.where(offered, score, -np.inf)
    look_at = review(store, ids, score, truth == 1, size, f"validity/{look}", set(ids.tolist()))
    print(f"{name}: reviewed {len(look_at)} objects ({look}), {int((truth[look_at] == 1).sum())} anomalies among them", flush=True)
    return str(copy)


def shares(p: np.ndarray) -> list[str]:
    """The share of `p` at or under each level, marked '!' above the binomial 99 % bound of a valid p-value."""
    from scipy import stats

    return [f"{np.mean(p <= a):.4f}{' !' if np.mean(p <= a) > stats.binom.ppf(0.99, len(p), a) / len(p) else ''}" for a in LEVELS]


def check(det, label, scored: dict, truth: dict, rows: list, fdp_rows: list, worst: dict, pool: dict | None = None) -> None:
    """Rows of the validity table (each statistic's and the combined p-value on the normal objects of
    the `scored` surveys) and of the list table (each survey's BH list), for one model; each p-value's
    normal values are added to `pool` (key: the statistic, or "combined")."""
    normal = {t: truth[t] == 0 for t in scored}
    n = int(sum(v.sum() for v in normal.values()))
    for name in [*det.statistic_names, None]:
        key = f"p_{name}" if name else "p_value"
        p = np.concatenate([scored[t][key][normal[t]] for t in scored])
        if pool is not None:
            pool.setdefault(name or "combined", []).append(p)
        for a in LEVELS:
            worst[a] = max(worst[a], float(np.mean(p <= a)) / a)
        trimmed = det.diagnostics.get(f"calibration_trimmed_{name}", "") if name else ""
        cal = det._test.calibrators[det._test.names.index(name)] if name else None
        rows.append([label, name or f"combined ({det.config.combination})", trimmed, "" if cal is None else cal.shape, n]
                    + shares(p))
    from gsafe_models.metrics import auroc

    for t in scored:
        hit, y = scored[t]["q_value"] <= ALPHA, truth[t]
        fdp_rows.append([label, t, int(hit.sum()), int((hit & (y == 0)).sum()),
                         float((hit & (y == 0)).sum() / max(1, hit.sum())), float((hit & (y == 1)).sum() / max(1, y.sum())),
                         auroc(np.nan_to_num(scored[t]["score"], nan=-np.inf), y)])


def pooled_rows(label: str, pool: dict, rows: list) -> None:
    """Rows of the validity table for p-values pooled over several models (`check`'s `pool`)."""
    for name, ps in pool.items():
        p = np.concatenate(ps)
        rows.append([label, name, "", "", len(p)] + shares(p))


def mean_fdp(fdp_rows: list, which, what: str) -> None:
    """The mean FDP of the lists whose model label satisfies `which`, with its standard error: the FDR is an expectation."""
    sel = [r for r in fdp_rows if which(str(r[0]))]
    if len(sel) > 1:
        fdp = [r[4] for r in sel]
        print(f"{what}: mean FDP of {len(sel)} lists at q ≤ {ALPHA} {np.mean(fdp):.3f} ± {np.std(fdp, ddof=1) / np.sqrt(len(fdp)):.3f} "
              f"(s.e.); mean share of the anomalies listed {np.mean([r[5] for r in sel]):.3f}; "
              f"{sum(r[3] for r in sel)} normal objects among {sum(r[2] for r in sel)} listed")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiles", type=int, nargs="*", default=[7, 8, 9, 10], help="simulated tiles (seeds): none, or at least two")
    p.add_argument("--cache", default=None, help="folder for the tiles and the fitted detectors (kept between runs)")
    p.add_argument("--seeds", type=int, nargs="*", default=[2, 3],
                   help="held-out survey seeds (a training and a fresh test survey each, as quality.py makes them); none: tiles only")
    p.add_argument("--train", type=int, default=3000, help="cutouts of a held-out seed's training survey (1 %% anomalies)")
    p.add_argument("--test", type=int, default=3000, help="cutouts of a held-out seed's test survey (15 %% anomalies)")
    p.add_argument("--seed", type=int, default=0, help="the detectors' seed")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--config", nargs="*", default=[], metavar="FIELD=VALUE", help="DetectorConfig fields to set")
    p.add_argument("--review", type=int, default=0, metavar="SIZE",
                   help="also check each tile and seed model after one review round: a reviewer (the truth) labels SIZE "
                        "objects of its training store and the detector is fitted again, as `gsafe train` fits it after a review")
    p.add_argument("--look", choices=("top", "calibration"), default="top",
                   help="what the reviewer of --review looks at: the tile's top, or the top of the model's calibration "
                        "objects (`gsafe review --calibration`)")
    args = p.parse_args()
    if len(set(args.tiles)) == 1:
        p.error("--tiles: none, or at least two tiles (a model is checked on the others)")
    if not args.tiles and not args.seeds:
        p.error("nothing to check: give --tiles or --seeds")
    return args


def main() -> None:
    args = parse_args()
    threads = set_threads(args.threads)
    print(machine_line() + f"; torch threads {threads}")
    with bench_home("validity") as home:
        from scipy import stats

        from infra.settings import Settings
        from infra.store import SurveyStore

        from quality import config_overrides, simulate, simulate_tile

        settings = Settings(home=home, progress=False, cutout_size=64)
        where = Path(args.cache) if args.cache else home / "cache"
        where.mkdir(parents=True, exist_ok=True)
        rows, fdp_rows, worst = [], [], {a: 0.0 for a in LEVELS}

        # held-out seeds: a default model on its own fresh test survey
        seed_config = {"seed": args.seed} | config_overrides(args)
        pooled: dict[str, list] = {}  # the held-out seeds' normal objects' p-values, pooled over seeds
        reviewed_seeds: dict[str, list] = {}  # the same, of the reviewed seed models (--review)
        for s in args.seeds:
            train_url, test_url = simulate(where, settings, argparse.Namespace(train=args.train, test=args.test,
                                                                               train_anomalies=0.01, test_anomalies=0.15), s)
            size = "" if (args.train, args.test) == (3000, 3000) else f"_{args.train}_{args.test}"
            det = fitted(where, f"validity_seed{s}{size}", train_url, seed_config, settings, f"seed {s}")
            test = SurveyStore.open(test_url)
            y = np.asarray(test.read_catalog(["label"])["label"]).astype(int)
            test_images, test_variance = test.read_images(), test.read_variance()
            scored = det.score(test_images, variance=test_variance)
            check(det, f"seed {s}", {f"seed {s} (test)": scored}, {f"seed {s} (test)": y}, rows, fdp_rows, worst, pooled)
            if args.review:  # the training survey reviewed once, the detector fitted again, the test survey hunted
                train = SurveyStore.open(train_url)
                url = reviewed_copy(home, f"seed{s}{size}", (train.read_images(), np.asarray(
                    train.read_catalog(["label"])["label"]).astype(int), train_url), det, args.review, args.look)
                det = fitted(where, f"validity_seed{s}{size}_review{args.review}{args.look}", url, seed_config, settings,
                             f"seed {s}, reviewed")
                check(det, f"seed {s} {REVIEWED}", {f"seed {s} (test)": det.score(test_images, variance=test_variance)},
                      {f"seed {s} (test)": y}, rows, fdp_rows, worst, reviewed_seeds)
        if len(args.seeds) > 1:
            pooled_rows(f"{len(args.seeds)} seeds pooled", pooled, rows)
            if args.review:
                pooled_rows(f"{len(args.seeds)} reviewed seeds pooled", reviewed_seeds, rows)

        # tiles: a single-tile model on the other tiles
        tile_config = {"seed": args.seed, "epochs": 10} | config_overrides(args)
        tiles = {}
        for t in args.tiles:
            store = SurveyStore.open(simulate_tile(where, settings, argparse.Namespace(train=2000, train_anomalies=0.05), t))
            tiles[t] = (store.read_images(), np.asarray(store.read_catalog(["label"])["label"]).astype(int), store.url)
        plain, reviewed = {}, {}  # the tile models' normal p-values, pooled over models
        for m in args.tiles:
            det = fitted(where, f"validity_det{m}", tiles[m][2], tile_config, settings, f"tile {m}")
            others = [t for t in args.tiles if t != m]
            check(det, f"tile {m}", {f"tile {t}": det.score(tiles[t][0]) for t in others},
                  {f"tile {t}": tiles[t][1] for t in others}, rows, fdp_rows, worst, plain)
            if args.review:
                url = reviewed_copy(home, f"tile{m}", tiles[m], det, args.review, args.look)
                det = fitted(where, f"validity_det{m}_review{args.review}{args.look}", url, tile_config, settings,
                             f"tile {m}, reviewed")
                check(det, f"tile {m} {REVIEWED}", {f"tile {t}": det.score(tiles[t][0]) for t in others},
                      {f"tile {t}": tiles[t][1] for t in others}, rows, fdp_rows, worst, reviewed)
        if len(args.tiles) > 1 and args.review:
            pooled_rows(f"{len(args.tiles)} tile models pooled", plain, rows)
            pooled_rows(f"{len(args.tiles)} reviewed tile models pooled", reviewed, rows)
        print_table(rows, ["model", "p-value of", "trimmed", "tail shape", "normal objects"]
                    + [f"P(p ≤ {a:g})" for a in LEVELS],
                    "fresh normal objects under each model (a seed's on its own test survey, a tile's on the other tiles; "
                    "'!': above the binomial 99 % bound of a valid p-value at that row's n, e.g. "
                    + ", ".join(f"{a:g}: ≤ {stats.binom.ppf(0.99, 5700, a) / 5700:.4f}" for a in LEVELS) + " at n = 5 700)")
        print_table(fdp_rows, ["model", "hunted survey", f"listed at q ≤ {ALPHA}", "normal listed", "FDP", "anomalies listed", "AUROC"],
                    "each survey hunted with the model: its BH list")
        # the FDR is an expectation: the mean FDP over lists, with its standard error
        mean_fdp(fdp_rows, lambda m: m.startswith("seed ") and REVIEWED not in m, f"held-out seeds ({args.train} + {args.test} cutouts)")
        mean_fdp(fdp_rows, lambda m: m.startswith("seed ") and REVIEWED in m, f"held-out seeds, {REVIEWED}")
        mean_fdp(fdp_rows, lambda m: m.startswith("tile ") and REVIEWED not in m, "tile models on the other tiles")
        mean_fdp(fdp_rows, lambda m: m.startswith("tile ") and REVIEWED in m, f"tile models {REVIEWED}, on the other tiles")
        what = " and ".join(x for x in (f"{len(args.seeds)} held-out seed models" if args.seeds else "",
                                         f"{len(args.tiles)} tile models" if args.tiles else "",
                                         f"the same reviewed ({args.look}, {args.review})" if args.review else "") if x)
        print(f"validity: worst share of fresh normal objects over nominal across {what}: "
              + ", ".join(f"P(p ≤ {a:g}) {worst[a]:.1f}×" for a in LEVELS)
              + f"; worst FDP of a list {max(r[4] for r in fdp_rows):.2f}")


if __name__ == "__main__":
    main()
