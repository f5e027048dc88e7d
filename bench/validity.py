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

    python bench/validity.py --cache DIR                      # tiles 7-10: ~8 min on 2 cores the first time
    python bench/validity.py --cache DIR --config FIELD=VALUE # a DetectorConfig setting, as in quality.py
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from _common import Timer, bench_home, machine_line, print_table, set_threads

LEVELS = (1e-2, 1e-3, 1e-4)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiles", type=int, nargs="+", default=[7, 8, 9, 10], help="simulated tiles (seeds), at least two")
    p.add_argument("--cache", default=None, help="folder for the tiles and the fitted detectors (kept between runs)")
    p.add_argument("--seed", type=int, default=0, help="the detectors' seed")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--config", nargs="*", default=[], metavar="FIELD=VALUE", help="DetectorConfig fields to set")
    args = p.parse_args()
    if len(set(args.tiles)) < 2:
        p.error("--tiles: at least two tiles (a model is checked on the others)")
    return args


def main() -> None:
    args = parse_args()
    threads = set_threads(args.threads)
    print(machine_line() + f"; torch threads {threads}")
    with bench_home("validity") as home:
        from scipy import stats

        from gsafe_models.detector import Detector
        from infra.settings import Settings
        from infra.store import SurveyStore
        from tasks.train import fit_detector_task

        from quality import config_overrides, config_tag, simulate_tile

        settings = Settings(home=home, progress=False, cutout_size=64)
        where = Path(args.cache) if args.cache else home / "cache"
        where.mkdir(parents=True, exist_ok=True)
        config = {"seed": args.seed, "epochs": 10} | config_overrides(args)
        tiles = {}
        for t in args.tiles:
            store = SurveyStore.open(simulate_tile(where, settings, argparse.Namespace(train=2000, train_anomalies=0.05), t))
            tiles[t] = (store.read_images(), np.asarray(store.read_catalog(["label"])["label"]).astype(int), store.url)
        rows, fdp_rows, worst = [], [], {a: 0.0 for a in LEVELS}
        for m in args.tiles:
            cached = where / f"validity_det{m}_{args.seed}{config_tag(args, frozenset())}.bin"
            if not cached.exists():
                with Timer() as t:
                    payload = fit_detector_task.fn(tiles[m][2], config, settings.model_dump(mode="json"))
                cached.write_bytes(payload)
                print(f"tile {m}: fitted in {t.seconds:.0f} s", flush=True)
            det = Detector.from_bytes(cached.read_bytes())
            others = [t for t in args.tiles if t != m]
            scored = {t: det.score(tiles[t][0]) for t in others}
            normal = {t: tiles[t][1] == 0 for t in others}
            n = int(sum(v.sum() for v in normal.values()))
            for name in [*det.statistic_names, None]:
                key = f"p_{name}" if name else "p_value"
                p = np.concatenate([scored[t][key][normal[t]] for t in others])
                share = [float(np.mean(p <= a)) for a in LEVELS]
                bound = [float(stats.binom.ppf(0.99, n, a) / n) for a in LEVELS]
                for a, s in zip(LEVELS, share):
                    worst[a] = max(worst[a], s / a)
                trimmed = det.diagnostics.get(f"calibration_trimmed_{name}", "") if name else ""
                cal = det._test.calibrators[det._test.names.index(name)] if name else None
                rows.append([m, name or f"combined ({det.config.combination})", trimmed, "" if cal is None else cal.shape, n]
                            + [f"{s:.4f}{' !' if s > b else ''}" for s, b in zip(share, bound)])
            for t in others:
                hit, truth = scored[t]["q_value"] <= 0.1, tiles[t][1]
                fdp_rows.append([m, t, int(hit.sum()), int((hit & (truth == 0)).sum()),
                                 float((hit & (truth == 0)).sum() / max(1, hit.sum())), float((hit & (truth == 1)).sum() / max(1, truth.sum()))])
        print_table(rows, ["model (tile)", "p-value of", "trimmed", "tail shape", "normal objects"]
                    + [f"P(p ≤ {a:g})" for a in LEVELS],
                    "the other tiles' normal objects under each model ('!': above the binomial 99 % bound of a valid p-value: "
                    + ", ".join(f"{a:g}: ≤ {stats.binom.ppf(0.99, n, a) / n:.4f}" for a in LEVELS) + f" at n = {n})")
        print_table(fdp_rows, ["model (tile)", "hunted tile", "listed at q ≤ 0.1", "normal listed", "FDP", "anomalies listed"],
                    "each other tile hunted with the model: its BH list")
        print("validity: worst share of fresh normal objects over nominal across "
              f"{len(args.tiles)} tile models: " + ", ".join(f"P(p ≤ {a:g}) {worst[a]:.1f}×" for a in LEVELS)
              + f"; worst FDP of a list {max(r[4] for r in fdp_rows):.2f}")


if __name__ == "__main__":
    main()
