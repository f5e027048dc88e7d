"""Detection quality under a protocol that cannot overfit anomaly classes: defaults chosen on generic
synthetic perturbations of normal objects, every class held out in turn, two seeds, peers beside.

What it does, per seed, under a temporary GSAFE_HOME:

1. simulates a training survey (`--train` cutouts, `--train-anomalies` contamination of every class:
   a real "normal" set holds a little of everything) and a fresh test survey (another seed, `--test`
   cutouts, `--test-anomalies` of every class);
2. fits one Detector exactly as `gsafe train` does (`tasks.train.fit_detector_task`: the store's
   train / val / calib split, streamed batches) with every registered statistic, so that any set of
   statistics and any combination rule can be calibrated on the same train / calib statistics;
3. makes the **selection set**: the normal objects of the training survey's validation split (never
   the calibration split), and copies of them perturbed by each generic kind of
   `gsafe_models.perturb` (blobs, point sources, absorption, a colour change, a local shuffle, a
   patch in one band, a stroke: no anomaly class is modelled);
4. chooses a statistic set per combination rule by greedy forward selection on the mean AUROC over
   the synthetic kinds (**class-free selection**: no class is looked at, so every class is held out),
   then the rule with the best synthetic AUROC among those whose set puts some synthetic
   perturbations on a BH list at q ≤ 0.1 (a test that lists nothing gives no discoveries): the
   seed's class-free winner; the same greedy on the synthetic AUROC averaged over every seed at once
   (the rule whose set lists on the most surveys, then the best objective) is the **pooled winner**,
   which should equal `DetectorConfig`'s defaults (the script says whether it does);
5. **leave one class out**: for each class c, the same greedy selection (set and rule, the rule
   listing synthetic perturbations) on the mean AUROC over the *other* classes of the test survey,
   evaluated on c;
6. reports AUROC per class and rule (minimum and mean over held-out classes), the combined test
   against its best single statistic, the BH list at q ≤ 0.1 (share of the anomalies listed,
   realised FDR), the one-sided KS check on fresh normals, every single statistic, and the peers
   (PCA residual, IsolationForest, PyOD ECOD and IForest on PCA features, a GMM on PCA features);
7. and what the statistics carry: a *supervised* combination (logistic regression, boosted trees)
   trained on the test survey's own labels and scored out of fold, per class: whether a missed
   target needs a better rule or better statistics (`supervised_ceiling`).

`--config FIELD=VALUE` fits the detector with other settings (cached apart; settings only the statistics'
models read, such as `fit_trim`, are assembled around the cached representation instead of training it
again, and `calibration_trim`, which only the calibration reads, reuses the cached statistics as they are);
`--train-anomalies 0.1` makes the training survey as dirty as a single crowded tile (use its own
`--cache`); `--reviewed 0.02 0.05 1` adds what the defaults list once a reviewer has cleaned the
calibration split's most extreme objects (the truth plays the reviewer).

    python bench/quality.py                      # 2 seeds × (3 000 + 3 000 cutouts), 64×64, grizy
    python bench/quality.py --seeds 0 --quick    # one seed, 1 000 + 1 000 cutouts, 5 epochs
    python bench/quality.py --tiles 7 8          # and two tiles (2 000 cutouts, 5 % perturbed, 10 epochs)

`--tiles 7 8` adds **tile surveys**, one new tile hunted as a user does (as `gsafe demo` does): 2 000 normal
objects simulated, 5 % of them replaced by a generic perturbation, the detector fitted with 10 epochs on the
tile and every object scored in-sample. A tile joins the pooled selection as one more survey, and a set
must put some of its perturbed objects on the tile's own BH list at q ≤ 0.1 (no class is looked at).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import pickle

import numpy as np

from _common import Timer, bench_home, fmt, machine_line, print_table, set_threads

ALPHA = 0.1     # BH level of the candidate list
SYNTH_SHARE = 0.15  # the share of anomalies the synthetic list is reckoned at (the test surveys' --test-anomalies)
MAX_SET = 6     # statistics in a selected set, at most
RULES = ("simes", "fisher", "dose")
# the defaults before this protocol, chosen while the simulator's six classes were in view: kept for comparison
PREVIOUS_DEFAULTS = (("peak_core", "asymmetry", "sharpness", "line", "peak"), "simes")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="*", default=[0, 1], help="survey seeds (test surveys use seed + 100)")
    p.add_argument("--train", type=int, default=3000, help="cutouts of the training survey")
    p.add_argument("--test", type=int, default=3000, help="cutouts of the test survey")
    p.add_argument("--train-anomalies", type=float, default=0.01, help="contamination of the training survey")
    p.add_argument("--test-anomalies", type=float, default=0.15, help="share of anomalies in the test survey")
    p.add_argument("--size", type=int, default=64, help="cutout side H = W, pixels")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: DetectorConfig's)")
    p.add_argument("--config", nargs="*", default=[], metavar="FIELD=VALUE",
                   help="DetectorConfig fields to set for the fitted detector, e.g. contrastive=0.05 (a number, "
                        "or a string); cached separately")
    p.add_argument("--rules", nargs="+", default=list(RULES), help="combination rules to compare")
    p.add_argument("--objective", choices=sorted(OBJECTIVES), default="auroc",
                   help="the class-free selection's objective on the synthetic perturbations: their mean AUROC against the "
                        "normal objects (default), or its average with the share of them a BH list at q ≤ 0.1 holds (tried "
                        "and rejected, BENCHMARKS.md: it buys the synthetic list with synthetic AUROC)")
    p.add_argument("--trimmed-are-normal", type=int, choices=(0, 1), default=1,
                   help="calibration: 1 = calibration outliers removed by the trim still count as normal objects "
                        "(conservative, the default everywhere), 0 = they leave the calibration set (rejected: FDR above q)")
    p.add_argument("--reviewed", type=float, nargs="*", default=[],
                   help="also report the defaults when a reviewer has inspected this share of the calibration split "
                        "(the objects most extreme under each statistic) and its anomalies left it (the truth plays "
                        "the reviewer; 1 = a clean calibration split): what a cleaner calibration would list")
    p.add_argument("--crossfit", type=int, default=0, metavar="K",
                   help="cross-fitted calibration (DetectorConfig.calibration_folds): the training objects' statistics "
                        "from K refits of the statistics' models, each without one fold, join the calibration split; "
                        "only the statistics that do not read the representation take part (implies --pool rf)")
    p.add_argument("--pool", choices=("all", "rf"), default="all",
                   help="the statistics the protocol chooses from: all, or rf, those that do not read the trained "
                        "representation (the ones cross-fitted calibration can take; to compare --crossfit with)")
    p.add_argument("--time-training", action="store_true",
                   help="only time `gsafe train`'s fit (fit_detector_task) of the default detector on each seed's training "
                        "survey, as it is and with --crossfit K folds (simulated first when not cached), then stop")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: one per core)")
    p.add_argument("--pca", type=int, default=32, help="PCA components of the peers")
    p.add_argument("--no-peers", action="store_true", help="skip the peers")
    p.add_argument("--cache", default=None, help="keep simulated stores and fitted detectors in this directory "
                                                 "between runs (the protocol itself is always re-run); entries "
                                                 "are keyed by seed and sizes, not by code: empty it after "
                                                 "changing the simulator, the detector or a statistic")
    p.add_argument("--quick", action="store_true", help="a smaller run: 1 000 + 1 000 cutouts, 5 epochs")
    p.add_argument("--prepare", action="store_true", help="with --cache: simulate, fit and compute the statistics of "
                                                          "each seed, then stop (run seeds in parallel processes, then "
                                                          "once more without --prepare for the protocol)")
    p.add_argument("--jobs", type=int, default=1, help="seeds whose protocol runs in parallel processes")
    p.add_argument("--tiles", type=int, nargs="*", default=[],
                   help="tile surveys (seeds, e.g. 7 8): one new tile hunted as a user does, trained on and scored "
                        "in-sample, its anomalies generic perturbations (no class); they join the pooled selection "
                        "beside the seeds, and a set must list on each tile's own BH list")
    p.add_argument("--tile", type=int, default=2000, help="cutouts of a tile survey (the demo's size)")
    p.add_argument("--tile-anomalies", type=float, default=0.05, help="share of a tile's objects perturbed (the demo's)")
    p.add_argument("--tile-epochs", type=int, default=10, help="training epochs on a tile (the demo's)")
    a = p.parse_args()
    if a.quick:
        a.train, a.test, a.epochs = min(a.train, 1000), min(a.test, 1000), a.epochs or 5
        a.tile, a.tile_epochs = min(a.tile, 1000), min(a.tile_epochs, 5)
    return a


# ---- data and detector -------------------------------------------------------------------------
def simulate(where, settings, args, seed: int) -> tuple[str, str]:
    from infra.store import SurveyStore
    from tasks.simulate import simulate_survey

    if getattr(args, "is_tile", False):
        url = simulate_tile(where, settings, args, seed)
        return url, url

    train, test = str(where / f"train{seed}_{args.train}.zarr"), str(where / f"test{seed}_{args.test}.zarr")
    if not SurveyStore.exists(train):
        simulate_survey(args.train, settings=settings, seed=seed, anomaly_frac=args.train_anomalies, store=train, workers=2)
    if not SurveyStore.exists(test):
        simulate_survey(args.test, settings=settings, seed=seed + 100, anomaly_frac=args.test_anomalies, store=test, workers=2)
    return train, test


def simulate_tile(where, settings, args, seed: int) -> str:
    """A tile survey: `args.train` normal objects simulated with `seed`, `args.train_anomalies` of them
    (chosen at random) replaced by a generic perturbation (`gsafe_models.perturb`, the kinds in rotation),
    catalogued with label 1 and their kind as `anomaly_class`. Written beside, then moved in place."""
    import shutil

    from gsafe_models.perturb import KINDS, band_noise, perturb
    from infra.store import SurveyStore
    from tasks.simulate import simulate_survey

    url = where / f"tile{seed}_{args.train}_{args.train_anomalies}.zarr"
    if SurveyStore.exists(str(url)):
        return str(url)
    normal = where / f"tilenormal{seed}_{args.train}.zarr"
    if not SurveyStore.exists(str(normal)):
        simulate_survey(args.train, settings=settings, seed=seed, anomaly_frac=0.0, store=str(normal), workers=2)
    src = SurveyStore.open(str(normal))
    images, cat = src.read_images(), src.read_catalog(["object_id", "ra", "dec", "source", "label", "anomaly_class"])
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(src.n, int(round(args.train_anomalies * src.n)), replace=False))
    kind = np.array(KINDS)[rng.permutation(len(rows)) % len(KINDS)]
    noise = band_noise(images)
    label, cls = np.zeros(src.n, np.int8), np.asarray(cat["anomaly_class"]).astype(object)
    for j, k in enumerate(KINDS):
        at = rows[kind == k]
        images[at] = perturb(images[at], k, seed=1000 * seed + j, noise=noise)
        label[at], cls[at] = 1, k
    part = where / f"{url.name}.part"
    shutil.rmtree(part, ignore_errors=True)
    out = SurveyStore.create(str(part), bands=src.bands, height=src.image_shape[1], width=src.image_shape[2],
                             pixel_scale=src.pixel_scale, chunk_size=src.chunk_size,
                             provenance={"tile": {"seed": seed, "n": src.n, "perturbed": len(rows)}})
    for a, b in src.chunk_bounds():
        out.append(images[a:b], {"object_id": cat["object_id"][a:b], "ra": cat["ra"][a:b], "dec": cat["dec"][a:b],
                                 "source": np.full(b - a, "tile", dtype=object), "label": label[a:b],
                                 "anomaly_class": cls[a:b]})
    part.rename(url)
    (where / f"{part.name}.lock").unlink(missing_ok=True)  # the lock file of the path written under
    return str(url)


def tile_args(args) -> argparse.Namespace:
    """`args` for a tile survey: its size, contamination and epochs, scored in-sample."""
    return argparse.Namespace(**(vars(args) | {"train": args.tile, "test": args.tile, "train_anomalies": args.tile_anomalies,
                                               "test_anomalies": args.tile_anomalies, "epochs": args.tile_epochs,
                                               "is_tile": True}))


def survey_label(seed: int, tile: bool) -> int | str:
    """A survey's name in results and cached file names: its seed, or "tile<seed>"."""
    return f"tile{seed}" if tile else seed


def survey_key(args, seed: int) -> str:
    return str(survey_label(seed, getattr(args, "is_tile", False)))


def config_overrides(args) -> dict:
    """`--config FIELD=VALUE` as DetectorConfig overrides (numbers parsed, else strings)."""
    from gsafe_models.detector import DetectorConfig

    fields = {f.name for f in dataclasses.fields(DetectorConfig)}
    out = {}
    for item in getattr(args, "config", []) or []:
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            raise SystemExit(f"quality: --config {item!r}: expected FIELD=VALUE with FIELD among {sorted(fields)}")
        if key == "statistics":  # a comma-separated set, or all, as `gsafe train --statistics` takes it
            out[key] = tuple(v.strip() for v in value.split(",") if v.strip())
            continue
        try:
            out[key] = float(value) if any(c in value for c in ".e") else int(value)
        except ValueError:
            out[key] = value
    return out


# DetectorConfig fields that only the statistics' models read (Detector.assemble): a detector cached
# without them is re-assembled around its trained representation instead of trained again
ASSEMBLY_FIELDS = frozenset({"fit_trim", "chi_density_floor"})


# DetectorConfig fields that only the calibration reads: cached detectors and statistics are reused as
# they are, and the protocol's calibrators take the value given (else the current default)
CALIBRATION_FIELDS = frozenset({"calibration_trim"})


def config_tag(args, leave_out=CALIBRATION_FIELDS) -> str:
    return "".join(f"_{k}{v}" for k, v in sorted(config_overrides(args).items()) if k not in leave_out)


def calibration_trim(args) -> float:
    """The calibration trim the protocol applies: `--config calibration_trim=…`, else DetectorConfig's default
    (not the cached detector's, which may predate a change of default)."""
    from gsafe_models.detector import DetectorConfig

    return float(config_overrides(args).get("calibration_trim", DetectorConfig().calibration_trim))


def product_sample(train_url: str, split: dict, config):
    """The cutouts `gsafe train` fits the sample parts (PCA basis, noise models, patch density) on: the first
    `normaliser_sample` of its shuffled training stream. A re-assembly on any other sample changes every
    statistic that reads those parts (seen 2026-12-03: the defaults' figures moved by up to 0.017)."""
    from gsafe_models.detector import _take
    from infra.batches import StoreBatches

    return _take(StoreBatches(train_url, split["train"], config.batch_size, shuffle=True, seed=config.seed, variance=True),
                 config.normaliser_sample)


def fit_detector(train_url: str, settings, args, seed: int, where):
    """The Detector as `gsafe train` fits it (same split, same streaming), with every statistic."""
    from gsafe_models.detector import STATISTICS, Detector, DetectorConfig
    from tasks.train import fit_detector_task

    path = where / f"detector{survey_key(args, seed)}_{args.train}_{args.epochs}{config_tag(args)}.bin"
    overrides = config_overrides(args)
    base = where / f"detector{survey_key(args, seed)}_{args.train}_{args.epochs}{config_tag(args, ASSEMBLY_FIELDS | CALIBRATION_FIELDS)}.bin"
    if not path.exists() and base != path and base.exists():
        # only settings of the statistics' models differ from a cached fit: assembled around its representation
        from infra.batches import StoreBatches
        from tasks.train import store_splits

        det = Detector.from_bytes(base.read_bytes())
        split, b = store_splits(train_url), det._bundle
        config = dataclasses.replace(det.config, statistics=STATISTICS,
                                     **{k: v for k, v in overrides.items() if k in ASSEMBLY_FIELDS})
        with Timer() as t:
            det = Detector.assemble(b.normaliser, b.net, StoreBatches(train_url, split["train"], config.batch_size),
                                    StoreBatches(train_url, split["calib"], config.batch_size), config=config, bands=det.bands,
                                    sample=product_sample(train_url, split, config))
        path.write_bytes(det.to_bytes())
        return det, t.seconds
    if path.exists():
        det = Detector.from_bytes(path.read_bytes())
        if set(STATISTICS) <= set(det.statistic_names):
            return det, None
        # statistics registered since the cached fit: fitted around the same trained representation
        from infra.batches import StoreBatches
        from tasks.train import store_splits

        split, b = store_splits(train_url), det._bundle
        config = dataclasses.replace(det.config, statistics=STATISTICS)
        det = Detector.assemble(b.normaliser, b.net, StoreBatches(train_url, split["train"], config.batch_size),
                                StoreBatches(train_url, split["calib"], config.batch_size), config=config, bands=det.bands,
                                sample=product_sample(train_url, split, config))
        path.write_bytes(det.to_bytes())
        return det, None
    overrides = {"seed": seed, "statistics": STATISTICS} | ({"epochs": args.epochs} if args.epochs else {}) | config_overrides(args)
    with Timer() as t:
        payload = fit_detector_task.fn(train_url, dataclasses.asdict(DetectorConfig(**overrides)), settings.model_dump(mode="json"))
    path.write_bytes(payload)
    return Detector.from_bytes(payload), t.seconds


def crossfit_matrix(det, train_url: str, split: dict, args, seed: int, names: list[str], where) -> tuple[np.ndarray, np.ndarray]:
    """The training objects' statistics `names` from `--crossfit` K refits of their models around the cached
    representation, each without one fold, as `Detector.assemble` computes them with `calibration_folds=K`
    (the sample parts on the same first cutouts of the shuffled training stream); and their labels, in the
    same order (cached)."""
    import torch

    from gsafe_models.detector import _content_folds, _crossfit_statistics
    from infra.batches import StoreBatches
    from infra.store import SurveyStore

    cached = where / f"crossfit{survey_key(args, seed)}_{args.train}_{args.epochs}{config_tag(args)}_k{args.crossfit}.npz"
    if cached.exists() and list(np.load(cached)["names"]) == names:
        with np.load(cached) as z:
            return z["S"], z["labels"]
    config = dataclasses.replace(det.config, statistics=tuple(names), calibration_folds=args.crossfit)
    sample = product_sample(train_url, split, config)
    rows = np.sort(split["train"])
    S = _crossfit_statistics(det._bundle, StoreBatches(train_url, rows, config.batch_size, variance=True), sample, config,
                             names, torch.device("cpu"))
    store = SurveyStore.open(train_url)
    fold = np.concatenate([_content_folds(store.read_rows(rows[i:i + 512]), args.crossfit) for i in range(0, len(rows), 512)])
    labels = np.asarray(store.read_catalog(["label"])["label"]).astype(int)[rows]
    labels = np.concatenate([labels[fold == k] for k in range(args.crossfit)])
    np.savez(cached, names=np.array(names), S=S, labels=labels)
    return S, labels


def statistics_matrix(det, images: np.ndarray, names: list[str]) -> np.ndarray:
    raw = det.statistics(images, names)
    return np.stack([raw[n] for n in names], axis=1)


# ---- the protocol ------------------------------------------------------------------------------
class _MemoTail:
    """TailCalibrator.fit remembered by its input: a statistic's calibrator does not depend on the
    set it is combined in, so the greedy search fits it once per statistic and fold instead of
    once per candidate (identical results, minutes instead of hours)."""

    def __init__(self):
        from gsafe_models.calibration import TailCalibrator

        self.cls, self.original, self.memo = TailCalibrator, TailCalibrator.fit, {}

    def __enter__(self):
        import copy
        import hashlib

        memo, original = self.memo, self.original

        def fit(cal, calib):
            a = np.ascontiguousarray(calib, dtype=np.float64)
            key = (hashlib.sha1(a.tobytes()).hexdigest(), cal.tail_frac, cal.min_tail, cal.trim, cal.trim_alpha,
                   cal.trim_max_shape, cal.log_pvalue, cal.trimmed_are_normal)
            if key not in memo:
                memo[key] = copy.deepcopy(original(cal, a).__dict__)
            cal.__dict__.update(copy.deepcopy(memo[key]))
            return cal

        self.cls.fit = fit
        return self

    def __exit__(self, *exc):
        self.cls.fit = self.original


class Evaluator:
    """Calibrates any (statistics, rule) on the detector's train / calib statistics and scores the
    selection set and the test survey with it; results are cached per candidate."""

    def __init__(self, names, S, labels, classes, trim: float, seed: int, trimmed_are_normal: bool = True,
                 in_sample: bool = False):
        self.names, self.S, self.labels, self.classes = list(names), S, labels, classes
        self.in_sample = in_sample  # a tile: the test survey is the training survey, its anomalies perturbations
        self.trim, self.seed, self.trimmed_are_normal = trim, seed, trimmed_are_normal
        self.cache: dict = {}
        self.present = sorted(set(classes[labels == 1]))

    def run(self, stats: tuple[str, ...], rule: str) -> dict:
        from gsafe_models.calibration import CombinedTest, bh_qvalues
        from gsafe_models.metrics import auroc, realised_fdr

        key = (tuple(sorted(stats)), rule)
        if key in self.cache:
            return self.cache[key]
        cols = [self.names.index(s) for s in key[0]]
        test = CombinedTest(rule, seed=self.seed, trim=self.trim, trimmed_are_normal=self.trimmed_are_normal).fit(self.S["train"][:, cols], self.S["calib"][:, cols], list(key[0]))
        score = {k: test.pvalues(v[:, cols]) for k, v in self.S.items() if k not in ("train", "calib")}
        ref = score["ref"]["score"]
        r = {"synth": {}, "synth_listed": {}, "class": {}}
        for k in self.S:
            if k.startswith("synth:"):
                s = score[k]["score"]
                r["synth"][k[6:]] = auroc(np.r_[ref, s], np.r_[np.zeros(len(ref)), np.ones(len(s))])
                r["synth_listed"][k[6:]] = bh_share(score[k]["p_value"], ALPHA * SYNTH_SHARE)
        t = score["test"]
        normal = self.labels == 0
        for c in self.present:
            m = normal | (self.classes == c)
            r["class"][c] = auroc(t["score"][m], self.classes[m] == c)
        r["all"] = auroc(t["score"], self.labels)
        q = bh_qvalues(t["p_value"])
        r["fdr"], r["discoveries"] = realised_fdr(q, self.labels, ALPHA)
        r["listed"] = float(((q <= ALPHA) & (self.labels == 1)).sum() / max(1, (self.labels == 1).sum()))
        r["p_normal"] = t["p_value"][normal]
        r["score"] = t["score"]
        self.cache[key] = r
        return r

    def greedy(self, objective, rules) -> tuple[tuple[str, ...], str, float]:
        """Greedy forward selection of a set per rule on `objective(result)`, then the best rule."""
        return greedy(lambda stats, rule: objective(self.run(stats, rule)), self.names, rules)

    def choose(self, objective, rules) -> tuple[tuple[str, ...], str, float]:
        """Greedy forward selection of a set per rule, then the best rule whose set lists (:func:`best_listing`)."""
        return best_listing([self.greedy(objective, [rule]) for rule in rules], [self])


def greedy(value_of, names, rules) -> tuple[tuple[str, ...], str, float]:
    """Greedy forward selection of at most MAX_SET statistics per rule on `value_of(stats, rule)`
    (stop when no addition gains 1e-3), then the rule whose set has the best value."""
    best = (None, None, -np.inf)
    for rule in rules:
        chosen, value = [], -np.inf
        while len(chosen) < MAX_SET:
            v, n = max((value_of(tuple(chosen + [n]), rule), n) for n in names if n not in chosen)
            if v <= value + 1e-3:
                break
            chosen.append(n)
            value = v
        if value > best[2]:
            best = (tuple(chosen), rule, value)
    return best


def bh_share(p: np.ndarray, level: float) -> float:
    """The share of anomalies a BH list holds when they are `SYNTH_SHARE` of a survey and the normal objects
    add no discovery: the largest L with L of their p-values at most ALPHA · SYNTH_SHARE · L (BH's step-up
    at its threshold q·R/N with R = L·n_anomalies, N = n_anomalies / SYNTH_SHARE). Deterministic, and a
    lower bound on the real list (false discoveries only raise R)."""
    p = np.sort(np.asarray(p, np.float64))
    n = p.size
    ok = np.nonzero(p <= level * np.arange(1, n + 1) / n)[0]
    return float((ok[-1] + 1) / n) if ok.size else 0.0


def synth_auroc(r) -> float:
    return float(np.mean(list(r["synth"].values())))


def synth_list(r) -> float:
    """Mean synthetic BH list (`bh_share`) over the perturbation kinds."""
    return float(np.mean(list(r["synth_listed"].values())))


def synth_auroc_listed(r) -> float:
    """Mean synthetic AUROC and mean synthetic BH list, averaged (fixed before it was run; rejected, see BENCHMARKS.md)."""
    return 0.5 * (synth_auroc(r) + synth_list(r))


OBJECTIVES = {"auroc": synth_auroc, "auroc+listed": synth_auroc_listed}
synth_objective = synth_auroc  # the default objective (bench/methods.py reads it)


def classes_objective(held: str):
    def f(r) -> float:
        return float(np.mean([v for c, v in r["class"].items() if c != held]))
    return f


# ---- peers -------------------------------------------------------------------------------------
def stretched(det, images: np.ndarray, batch: int = 512) -> np.ndarray:
    """Pixels after the Detector's own per-band asinh stretch, flattened: (N, B·H·W) float32."""
    import torch

    norm = det._bundle.normaliser
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            y, _ = norm(torch.as_tensor(np.ascontiguousarray(images[i:i + batch])).to(norm.sky.device))
            out.append(y.flatten(1).cpu().numpy().astype(np.float32))
    return np.concatenate(out)


def peer_methods(X_fit: np.ndarray, X_test: np.ndarray, n_pca: int, seed: int) -> dict:
    """Scores (larger = more anomalous) of the peers, fitted on X_fit."""
    from pyod.models.ecod import ECOD
    from pyod.models.iforest import IForest
    from sklearn.decomposition import PCA
    from sklearn.ensemble import IsolationForest
    from sklearn.mixture import GaussianMixture

    pca = PCA(n_pca, svd_solver="randomized", random_state=seed).fit(X_fit)
    Z_fit, Z_test = pca.transform(X_fit), pca.transform(X_test)
    fits = [GaussianMixture(k, covariance_type="full", reg_covar=1e-4, random_state=seed).fit(Z_fit)
            for k in (1, 2, 4, 8) if k * 10 <= len(Z_fit)]
    gmm = min(fits, key=lambda m: m.bic(Z_fit))
    return {
        f"PCA-{n_pca} residual, pixels": ((X_test - pca.inverse_transform(Z_test)) ** 2).mean(1),
        "IsolationForest, pixels": -IsolationForest(n_estimators=200, random_state=seed).fit(X_fit).score_samples(X_test),
        f"ECOD (PyOD), PCA-{n_pca}": ECOD().fit(Z_fit).decision_function(Z_test),
        f"IForest (PyOD), PCA-{n_pca}": IForest(n_estimators=200, random_state=seed).fit(Z_fit).decision_function(Z_test),
        f"GMM (BIC), PCA-{n_pca}": -gmm.score_samples(Z_test),
    }


def supervised_ceiling(F: np.ndarray, labels: np.ndarray, classes: np.ndarray, seed: int, model: str = "logistic") -> dict:
    """AUROC ({"all": ., class: .}) of a *supervised* combination of statistics: a logistic regression
    on the standardised statistics (or gradient-boosted trees, `model="trees"`), trained on the test
    survey's own labels (every class at once) and scored out of fold (5-fold, stratified). A label-free
    rule is not expected far above it on these statistics (a min-p rule can beat a linear combination
    on a class that one statistic alone sees): it says whether a missed target needs a better
    combination or better statistics."""
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from gsafe_models.metrics import per_class_report

    F = np.nan_to_num(np.asarray(F, np.float64), nan=0.0, posinf=1e6, neginf=-1e6)
    model = (make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000)) if model == "logistic"
             else HistGradientBoostingClassifier(max_iter=200, random_state=seed))
    p = cross_val_predict(model, F, labels, cv=StratifiedKFold(5, shuffle=True, random_state=seed), method="predict_proba")[:, 1]
    return {k: v["auroc"] for k, v in per_class_report(p, labels, classes).items()}


# ---- one seed ----------------------------------------------------------------------------------
def run_seed(seed: int, args, home, where, tile: bool = False) -> dict:
    """One survey's protocol: a seed (a training survey and a fresh test survey), or with `tile` a tile
    survey (`--tiles`: trained on and scored in-sample, its anomalies generic perturbations)."""
    from gsafe_models.uniformity import calibration_ks
    from gsafe_models.metrics import auroc
    from gsafe_models.perturb import KINDS, band_noise, perturb
    from infra.settings import Settings
    from infra.store import SurveyStore
    from tasks.train import store_splits

    args = tile_args(args) if tile else args
    settings = Settings(home=home, progress=False, cutout_size=args.size)
    out = {"seconds": {}}
    with Timer() as t:
        train_url, test_url = simulate(where, settings, args, seed)
    out["seconds"]["simulate"] = t.seconds
    det, fit_seconds = fit_detector(train_url, settings, args, seed, where)
    out["seconds"]["train (every statistic)"] = fit_seconds
    names = list(det.statistic_names)

    train, test = SurveyStore.open(train_url), SurveyStore.open(test_url)
    split = store_splits(train_url)
    tcat = test.read_catalog(["label", "anomaly_class"])
    labels, classes = np.asarray(tcat["label"]).astype(int), np.asarray(tcat["anomaly_class"]).astype(str)
    # where each block of statistics comes from: the training survey's train and calib splits, the test
    # survey, the selection set's reference normals ("ref") and its perturbed copies ("synth:<kind>");
    # on a tile the test survey is the tile itself and the selection set its own objects, in-sample
    if tile:
        inputs = {"ref": lambda: test.read_rows(np.flatnonzero(labels == 0))} | {
            f"synth:{k}": (lambda k=k: test.read_rows(np.flatnonzero(classes == k))) for k in KINDS}
    else:
        val_label = np.asarray(train.read_catalog(["label"])["label"])[split["val"]]
        ref = functools.cache(lambda: train.read_rows(split["val"][val_label == 0]))
        noise = functools.cache(lambda: band_noise(ref()))
        inputs = {"ref": ref} | {  # a kind's draws are seeded by its index, whichever run makes them
            f"synth:{k}": (lambda j=j, k=k: perturb(ref(), k, seed=1000 * seed + j, noise=noise())) for j, k in enumerate(KINDS)}
    inputs = {"train": lambda: train.read_rows(split["train"]), "calib": lambda: train.read_rows(split["calib"]),
              "test": test.read_images} | inputs
    cached = where / f"statistics{survey_key(args, seed)}_{args.train}_{args.epochs}{config_tag(args)}.npz"
    S, old_names = {}, names
    if cached.exists():
        with np.load(cached) as z:
            if set(z["names"]) <= set(names):  # statistics registered since the cache was made get their columns
                S, old_names = {k[2:]: z[k] for k in z.files if k.startswith("S:")}, list(z["names"])
    new_names = [n for n in names if n not in old_names]
    out["seconds"]["statistics"] = None
    if any(k not in S for k in inputs) or new_names:  # a cache made before a kind was added gets it
        with Timer() as t:
            for k, load in inputs.items():
                if k not in S:
                    S[k] = statistics_matrix(det, load(), names)
                elif new_names:
                    full = dict(zip(old_names, S[k].T)) | dict(zip(new_names, statistics_matrix(det, load(), new_names).T))
                    S[k] = np.stack([full[n] for n in names], axis=1)
        out["seconds"]["statistics"] = t.seconds
        np.savez(cached, names=np.array(names), **{f"S:{k}": v for k, v in S.items()})
    if args.prepare:
        return out

    calib_labels = np.asarray(train.read_catalog(["label"])["label"]).astype(int)[split["calib"]]
    if args.crossfit or args.pool == "rf":
        from gsafe_models.registry import reads_representation

        keep = [n for n in names if not reads_representation([n])]
        S = {k: v[:, [names.index(n) for n in keep]] for k, v in S.items()}
        names = keep
        if args.crossfit:
            with Timer() as t:
                oof, oof_labels = crossfit_matrix(det, train_url, split, args, seed, names, where)
            out["seconds"]["cross-fitted statistics"] = t.seconds
            S["calib"] = np.concatenate([S["calib"], oof])
            calib_labels = np.concatenate([calib_labels, oof_labels])
    ev = Evaluator(names, S, labels, classes, calibration_trim(args), seed, bool(args.trimmed_are_normal), in_sample=tile)
    objective = OBJECTIVES[args.objective]
    with Timer() as t, _MemoTail():
        sel = {rule: ev.greedy(objective, [rule]) for rule in args.rules}
        winner = best_listing(sel.values(), [ev])
        loco = {}
        for c in ([] if tile else ev.present):  # a tile's kinds are the selection's own: nothing to hold out
            loco[c] = ev.choose(classes_objective(c), args.rules)
    out["seconds"]["protocol"] = t.seconds
    out.update(ev=ev, sel=sel, winner=winner, loco=loco, names=names, labels=labels, classes=classes)
    out["defaults_match"] = is_default(*winner[:2])
    out["n_calib"] = len(S["calib"])
    out["calib_labels"] = calib_labels
    out["singles"] = {n: {"all": auroc(S["test"][:, j], labels),
                          **{c: auroc(S["test"][(labels == 0) | (classes == c), j], classes[(labels == 0) | (classes == c)] == c)
                             for c in ev.present}} for j, n in enumerate(names)}
    from gsafe_models.detector import DetectorConfig

    default_cols = [names.index(n) for n in DetectorConfig().statistics if n in names]
    out["ceiling"] = {"every statistic": supervised_ceiling(S["test"], labels, classes, seed),
                      "every statistic, trees": supervised_ceiling(S["test"], labels, classes, seed, "trees"),
                      "the default set": supervised_ceiling(S["test"][:, default_cols], labels, classes, seed)}
    out["ks"] = {rule: calibration_ks(ev.run(*sel[rule][:2])["p_normal"], out["n_calib"]) for rule in sel}
    if not args.no_peers:
        with Timer() as t:
            X_fit = stretched(det, train.read_images())
            X_test = stretched(det, test.read_images())
            out["peers"] = {k: {"all": auroc(v, labels), **{c: auroc(v[(labels == 0) | (classes == c)], classes[(labels == 0) | (classes == c)] == c) for c in ev.present}}
                            for k, v in peer_methods(X_fit, X_test, args.pca, seed).items()}
            del X_fit, X_test
        out["seconds"]["peers"] = t.seconds
    return out


def short(stats) -> str:
    return "+".join(stats)


def survey_name(label) -> str:
    """A result's name in the report: "seed 0", or "tile 7 (in-sample; classes = perturbation kinds)"."""
    return f"tile {label[4:]} (in-sample; classes = perturbation kinds)" if str(label).startswith("tile") else f"seed {label}"


def report_seed(seed, r: dict) -> None:
    ev, present, who = r["ev"], r["ev"].present, survey_name(seed)
    counts = {c: int((r["classes"] == c).sum()) for c in present}
    head = ["statistics / rule", "all", "min", "mean", "list", "FDR"] + [f"{c[:8]} ({counts[c]})" for c in present]

    rows = []
    for rule, (stats, _, obj) in r["sel"].items():
        x = ev.run(stats, rule)
        cl = [x["class"][c] for c in present]
        rows.append([f"{rule}: {short(stats)} (synthetic AUROC {synth_auroc(x):.3f}, list {synth_list(x):.3f})",
                     x["all"], min(cl), float(np.mean(cl)), x["listed"], x["fdr"]] + cl)
    print_table(rows, head, f"{who}: sets chosen on synthetic perturbations only (class-free), AUROC per class "
                            f"vs all {int((r['labels'] == 0).sum())} normal objects; list = share of anomalies at q ≤ {ALPHA}")

    rows = []
    for c in present if r["loco"] else []:
        stats, rule, obj = r["loco"][c]
        x = ev.run(stats, rule)
        rows.append([c, x["class"][c], x["all"], f"{rule}: {short(stats)}"])
    if rows:
        held = [ev.run(*r["loco"][c][:2])["class"][c] for c in present]
        rows.append(["min / mean over held-out classes", min(held), float(np.mean(held)), ""])
        print_table(rows, ["held-out class", "AUROC (held out)", "all", "chosen on the other classes"],
                    f"{who}: leave one class out (set and rule chosen on the other classes, evaluated on the held-out one)")

    rows = []
    for n, v in sorted(r["singles"].items(), key=lambda kv: -kv[1]["all"]):
        rows.append([f"statistic {n}", v["all"]] + [v[c] for c in present])
    for n, v in r.get("peers", {}).items():
        rows.append([f"peer {n}", v["all"]] + [v[c] for c in present])
    print_table(rows, ["method", "all"] + [c[:8] for c in present], f"{who}: every single statistic and the peers")

    rows = []
    for what, v in r["ceiling"].items():
        cl = [v[c] for c in present]
        rows.append([f"supervised, {what}", v["all"], min(cl), float(np.mean(cl))] + cl)
    print_table(rows, ["ceiling (labels of every class)", "all", "min", "mean"] + [c[:8] for c in present],
                f"{who}: what the statistics carry: a logistic regression (or gradient-boosted trees) trained on the "
                f"test survey's labels, scored out of fold (5-fold)")

    rows = []
    for rule, (stats, _, _) in r["sel"].items():
        x = ev.run(stats, rule)
        best = max(stats, key=lambda n: r["singles"][n]["all"])
        d, bound = r["ks"][rule]
        ok = d <= bound
        rows.append([rule, x["all"], f"{best} {r['singles'][best]['all']:.3f}", "yes" if x["all"] >= r["singles"][best]["all"] else "NO",
                     x["discoveries"], x["fdr"], f"{d:.3f}", f"{bound:.3f}", "yes" if ok else "NO"])
    print_table(rows, ["rule (class-free set)", "AUROC", "its best single statistic", "≥ best", f"listed q≤{ALPHA}", "realised FDR",
                       "KS D+ normals", "bound (1 %)", "calibrated"], f"{who}: combined test vs its statistics, calibration")
    print(f"{who}: timings " + ", ".join(f"{k} {fmt(v, '.0f')} s" for k, v in r["seconds"].items() if v is not None))


def is_default(stats, rule) -> bool:
    """Whether a statistic set and rule are `DetectorConfig`'s defaults (the set in any order)."""
    from gsafe_models.detector import DetectorConfig

    d = DetectorConfig()
    return sorted(d.statistics) == sorted(stats) and d.combination == rule


def on_test(r: dict, stats, rule) -> tuple[dict, list[float], float]:
    """(the evaluation, AUROC per present class, the best single statistic of the set) on a seed's test survey."""
    x = r["ev"].run(tuple(stats), rule)
    return x, [x["class"][c] for c in r["ev"].present], max(r["singles"][n]["all"] for n in stats)


def synth_lists(ev, stats, rule) -> bool:
    """Whether (stats, rule) puts some synthetic perturbations on a BH list at q ≤ 0.1: on a seed as
    `bh_share` reckons it, on a tile (`ev.in_sample`) on the tile's own list, as a hunt of it would
    (the share-based reckoning passed sets that list nothing there, and nothing in `gsafe demo`)."""
    r = ev.run(tuple(stats), rule)
    return r["listed"] > 0 if ev.in_sample else synth_list(r) > 0


def best_listing(candidates, evs) -> tuple[tuple[str, ...], str, float]:
    """The best (stats, rule, objective) among `candidates` (one per rule) whose test lists some
    synthetic perturbations on the most of the surveys' `evs` (on every one where some candidate does),
    ties broken by the objective. A rule that lists nothing there gives a scientist no discoveries
    whatever its AUROC (Fisher's two-stage test, whose final p-value is conformalised on half of the
    calibration split, did so on seed 0, on tiles and in `gsafe demo`). Before 2026-12-07 a candidate
    had to list on every survey, else listing was ignored: with tiles, where no rule listed on both,
    the pooled choice fell on one that lists on no tile."""
    return max(candidates, key=lambda c: (sum(synth_lists(ev, c[0], c[1]) for ev in evs), c[2]))


def reviewed_calibration(r: dict, stats, rule, share: float) -> tuple[dict, int, int]:
    """(the evaluation, objects inspected, anomalies removed) of (stats, rule) on a seed's test survey once a
    reviewer has inspected the `share` of its calibration split most extreme under each statistic and the
    anomalies among them have left it (label-trimming, Bashari et al. 2025, arXiv:2502.04807; the truth
    plays the reviewer). The calibrators keep their own conservative trim on what is left."""
    ev, calib, truth = r["ev"], r["ev"].S["calib"], r["calib_labels"]
    m = int(np.ceil(share * len(calib)))
    seen = set()
    for name in stats:
        seen |= set(np.argsort(-calib[:, ev.names.index(name)], kind="stable")[:m].tolist())
    removed = np.array(sorted(i for i in seen if truth[i] == 1), int)
    cleaner = Evaluator(ev.names, dict(ev.S, calib=np.delete(calib, removed, axis=0)), ev.labels, ev.classes,
                        ev.trim, ev.seed, ev.trimmed_are_normal)
    return cleaner.run(tuple(stats), rule), len(seen), len(removed)


def pooled_selection(results: dict, rules, objective=synth_objective) -> tuple[tuple[str, ...], str, float]:
    """Greedy forward selection, as :meth:`Evaluator.greedy`, on the synthetic objective averaged over
    every survey, per rule; then the rule whose set lists synthetic perturbations on the most surveys,
    then the best (:func:`best_listing`): one class-free choice for the defaults instead of one per seed."""
    return best_listing(pooled_candidates(results, rules, objective), [r["ev"] for r in results.values()])


def pooled_candidates(results: dict, rules, objective=synth_objective) -> list[tuple[tuple[str, ...], str, float]]:
    """Per rule, the greedy set on the synthetic objective averaged over every survey (a second call
    costs little: every evaluation is cached in its survey's :class:`Evaluator`)."""
    evs = [r["ev"] for r in results.values()]
    with _MemoTail():
        return [greedy(lambda stats, rule: float(np.mean([objective(ev.run(stats, rule)) for ev in evs])),
                       evs[0].names, [rule]) for rule in rules]


def time_training(args, home, where) -> None:
    """Seconds of the default detector's fit on each seed's training survey, with and without cross-fitting."""
    from gsafe_models.detector import DetectorConfig
    from infra.settings import Settings
    from tasks.train import fit_detector_task

    settings = Settings(home=home, progress=False, cutout_size=args.size)
    rows = []
    for seed in args.seeds:
        train_url, _ = simulate(where, settings, args, seed)
        for folds in sorted({0, args.crossfit}):
            config = dataclasses.asdict(DetectorConfig(seed=seed, calibration_folds=folds, **({"epochs": args.epochs} if args.epochs else {})))
            with Timer() as t:
                fit_detector_task.fn(train_url, config, settings.model_dump(mode="json"))
            rows.append([seed, folds, args.train, t.seconds])
            print(f"seed {seed}: calibration_folds={folds}: {t.seconds:.0f} s", flush=True)
    print_table(rows, ["seed", "calibration_folds", "training cutouts", "fit seconds"], "the default detector's fit (gsafe train)")


def main() -> None:
    args = parse_args()
    threads = set_threads(args.threads)
    print(machine_line() + f"; torch threads {threads}")
    from pathlib import Path

    with bench_home("quality") as home:
        where = Path(args.cache) if args.cache else home
        where.mkdir(parents=True, exist_ok=True)
        if args.time_training:
            time_training(args, home, where)
            return
        surveys = [(seed, False) for seed in args.seeds] + [(seed, True) for seed in args.tiles]
        if args.prepare:
            for seed, tile in surveys:
                print(f"{survey_name(survey_label(seed, tile))}: prepared {run_seed(seed, args, home, where, tile)['seconds']}")
            return
        if args.jobs > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            # spawned (not forked: torch's thread pools do not survive a fork), each with its share of threads
            with ProcessPoolExecutor(min(args.jobs, len(surveys)), mp_context=multiprocessing.get_context("spawn"),
                                     initializer=set_threads, initargs=(max(1, threads // args.jobs),)) as pool:
                futures = {survey_label(*s): pool.submit(run_seed, s[0], args, home, where, s[1]) for s in surveys}
                results = {k: f.result() for k, f in futures.items()}
        else:
            results = {survey_label(*s): run_seed(s[0], args, home, where, s[1]) for s in surveys}
        for seed, r in results.items():
            report_seed(seed, r)
        pooled = pooled_selection(results, args.rules, OBJECTIVES[args.objective]) if len(results) > 1 else None

    if pooled is not None:
        stats, rule, obj = pooled
        print(f"\nclass-free selection on every survey's synthetic perturbations at once (objective {obj:.3f}): "
              f"{rule}: {short(stats)} — {'= the defaults' if is_default(stats, rule) else 'NOT the defaults'}")
        rows = []
        for st, ru, ob in pooled_candidates(results, args.rules, OBJECTIVES[args.objective]):
            lists = [str(k) for k, r in results.items() if synth_lists(r["ev"], st, ru)]
            rows.append([ru, short(st), ob, f"{len(lists)} of {len(results)}: {', '.join(lists) or 'none'}"])
        print_table(rows, ["rule", "its pooled set", "objective", "lists synthetic perturbations on"],
                    "each rule's pooled set: the winner lists on the most surveys, then has the best objective")
        silent = [str(k) for k, r in results.items() if not synth_lists(r["ev"], stats, rule)]
        if silent:
            print(f"  no rule's set lists on every survey: the winner lists nothing on {', '.join(silent)}")
        rows = []
        from gsafe_models.detector import DetectorConfig

        for label, (st, ru) in {"pooled winner": (stats, rule), "defaults": (DetectorConfig().statistics, DetectorConfig().combination),
                                "previous defaults": PREVIOUS_DEFAULTS, "every statistic": (None, "dose")}.items():
            if st is not None and not set(st) <= set(next(iter(results.values()))["ev"].names):
                continue  # a set outside the pool (--pool rf)
            for seed, r in results.items():
                x, cl, best = on_test(r, r["ev"].names if st is None else st, ru)
                rows.append([f"{label}, {ru}", seed, x["all"], min(cl), float(np.mean(cl)), x["listed"], x["fdr"], best,
                             "yes" if x["all"] >= best else "NO"])
        print_table(rows, ["set", "survey", "all", "min class", "mean class", "listed", "FDR", "best single", "≥ best"],
                    "the pooled class-free winner on each seed's test survey and each tile (in-sample), beside the previous defaults (chosen "
                    "with six classes in view) and every statistic under the dose rule")

    print("\nsummary over seeds (each seed's own class-free winner; leave-one-class-out = selection on the other classes)")
    rows = []
    loco_min, loco_mean = [], []
    tiles = {k: r for k, r in results.items() if r["ev"].in_sample}
    results = {k: r for k, r in results.items() if not r["ev"].in_sample}  # the seeds: their classes are the simulator's
    for seed, r in results.items():
        ev = r["ev"]
        stats, rule, obj = r["winner"]
        x, cl, best = on_test(r, stats, rule)
        held = [ev.run(*r["loco"][c][:2])["class"][c] for c in ev.present]
        loco_min.append(min(held))
        loco_mean.append(float(np.mean(held)))
        peer = max((v["all"] for v in r.get("peers", {}).values()), default=float("nan"))
        rows.append([seed, f"{rule}: {short(stats)}", x["all"], min(cl), float(np.mean(cl)), min(held), float(np.mean(held)),
                     x["listed"], x["fdr"], best, peer, min(ceil := [r["ceiling"]["every statistic"][c] for c in ev.present]),
                     float(np.mean(ceil)), "yes" if r["defaults_match"] else "no"])
    print_table(rows, ["seed", "seed's winner (class-free)", "all", "min class", "mean class", "LOCO min", "LOCO mean",
                       "listed", "FDR", "best single", "best peer", "supervised min", "supervised mean", "= defaults"])
    if args.reviewed:
        from gsafe_models.detector import DetectorConfig

        d, rows = DetectorConfig(), []
        for seed, r in results.items():
            for share in [0.0, *args.reviewed]:
                x, seen, removed = reviewed_calibration(r, d.statistics, d.combination, share)
                rows.append([seed, f"{share:.0%}", seen, f"{removed} of {int(r['calib_labels'].sum())}", x["all"],
                             synth_list(x), x["listed"], x["fdr"], x["discoveries"]])
        print_table(rows, ["seed", "reviewed", "inspected", "anomalies removed", "AUROC", "synthetic list", "listed",
                           "realised FDR", f"listed q≤{ALPHA}"],
                    f"the defaults ({d.combination}) when a reviewer has inspected the calibration split's most extreme "
                    f"objects per statistic and removed its anomalies (100 % = a clean calibration split)")

    if pooled is not None:  # the defaults' choice: one class-free selection on both seeds at once
        stats, rule, _ = pooled
        w = [results[s]["ev"].run(stats, rule) for s in results]
        label = f"pooled class-free winner {rule}: {short(stats)}"
    else:
        w = [results[s]["ev"].run(*results[s]["winner"][:2]) for s in results]
        label = "class-free winner"
    mins = [min(x["class"].values()) for x in w]
    means = [float(np.mean(list(x["class"].values()))) for x in w]
    if results:
        print(f"quality: {label}: min class AUROC {min(mins):.3f}, mean {np.mean(means):.3f} over seeds "
              f"{','.join(map(str, results))}; leave-one-class-out min {min(loco_min):.3f}, mean {np.mean(loco_mean):.3f}; "
              f"listed at q≤{ALPHA} {np.mean([x['listed'] for x in w]):.2f} of the anomalies")
    if tiles:
        t = [tiles[k]["ev"].run(*(pooled or tiles[k]["winner"])[:2]) for k in tiles]
        joined = lambda key, f: ", ".join(format(x[key], f) for x in t)  # noqa: E731
        print(f"tiles: {label}: AUROC {joined('all', '.3f')} on tiles {','.join(k[4:] for k in tiles)} (in-sample, "
              f"generic perturbations); listed at q≤{ALPHA} {joined('listed', '.2f')} (realised FDR {joined('fdr', '.3f')})")


if __name__ == "__main__":
    main()
