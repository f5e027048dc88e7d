"""A combination *trained* on generic perturbations (outlier exposure), against the default rule, on the
cached statistics of `bench/quality.py` (no refit; seconds per seed).

Every registered statistic says "larger = more anomalous". A classifier over all of them is trained,
label-free, on the validation split's normal objects ("ref", out of sample) against their copies
perturbed by each generic kind of `gsafe_models.perturb` ("synth:*": blobs, point sources, absorption,
a colour change, a local shuffle, a patch offset, a stroke): outlier exposure (Hendrycks et al. 2019)
with self-made outliers, where `quality.py` uses the same perturbations only to *choose*. Its score is
one more statistic: calibrated on the calibration split (untouched by the classifier) with the
product's `TailCalibrator`, then BH. No anomaly class is seen by any model; every class of the test
survey is held out, and the table reports AUROC per class beside the defaults' (Simes over the default
set, calibrated the same way), the share of anomalies above all but 0.5 % of the normal objects (the
ranking a BH list needs) and each method's list at q ≤ 0.1 with its realised FDR: as it stands, after a
reviewer inspects the top 1 / 2 / 5 % of the calibration split by the method's own score (`--review`; the
anomalies seen there leave the calibration, as `gsafe train`'s label-trimming does), and after a complete
review (the calibration split less all its anomalies).

Models (`--models`): `monotone-trees` (boosted trees, `monotonic_cst` +1 on every statistic: the
registry's contract as a constraint; with z features, the product's `combination="exposure"`,
`gsafe_models.calibration.ExposureScore`), `trees`, `logistic`, `monotone-logistic` (non-negative weights,
L-BFGS-B). Features: each statistic in robust-z units of ref (`--features slog`: sign · log1p|z|).
`--loko` adds the leave-one-perturbation-kind-out AUROC (each kind held out of training, scored
against held-out ref folds): a label-free way to choose among models, which was tried and does not
separate them (BENCHMARKS.md).

    python bench/quality.py --seeds 0 1 --cache DIR --prepare       # the statistics, once (~25 min per seed)
    python bench/combiner.py --cache DIR --seeds 0 1                # then this: seconds
    python bench/combiner.py                                        # or both at once, in a temporary directory
"""

from __future__ import annotations

import argparse
import pathlib
import warnings

import numpy as np

from _common import machine_line, print_table

MODELS = ("monotone-trees", "trees", "logistic", "monotone-logistic")
FPR = 0.005  # the normal objects' share a TPR is read at: where a list at q = 0.1 on a 3 000-object survey ranks
REVIEW = 0.02  # the share of the calibration split a reviewer inspects (its top by the method's score): the top ~60 of a 3 000-object store


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", default=None, help="bench/quality.py's --cache directory; seeds whose statistics are not "
                                                 "there are prepared first by `quality.py --prepare` (default: a temporary directory)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--train", type=int, default=3000, help="as quality.py's --train (names the cache)")
    p.add_argument("--test", type=int, default=3000, help="as quality.py's --test (names the cache)")
    p.add_argument("--models", nargs="+", choices=MODELS, default=["monotone-trees"])
    p.add_argument("--features", choices=("z", "slog"), default="z")
    p.add_argument("--C", type=float, default=0.1, help="inverse L2 strength of the logistic models")
    p.add_argument("--loko", action="store_true", help="also the leave-one-perturbation-kind-out AUROC")
    p.add_argument("--review", type=float, nargs="+", default=[0.01, REVIEW, 0.05],
                   help="shares of the calibration split a reviewer inspects, top first by each method's own score; the "
                        "anomalies among them leave the calibration (the product's label-trimming), the normals stay")
    return p.parse_args()


class MonotoneLogistic:
    """L2-penalised logistic regression with non-negative weights and balanced classes (L-BFGS-B)."""

    def __init__(self, C: float = 0.1):
        self.C = C

    def fit(self, X: np.ndarray, y: np.ndarray) -> "MonotoneLogistic":
        from scipy.optimize import minimize
        from scipy.special import expit

        weight = np.where(y == 1, 0.5 / (y == 1).sum(), 0.5 / (y == 0).sum())
        sign, d, lam = np.where(y == 1, 1.0, -1.0), X.shape[1], 1.0 / (self.C * len(y))

        def loss(p):
            t = X @ p[:d] + p[d]
            g = -sign * expit(-sign * t) * weight
            return (np.sum(weight * np.logaddexp(0, -sign * t)) + 0.5 * lam * p[:d] @ p[:d],
                    np.r_[X.T @ g + lam * p[:d], g.sum()])

        r = minimize(loss, np.zeros(d + 1), jac=True, method="L-BFGS-B", bounds=[(0, None)] * d + [(None, None)])
        self.w, self.b = r.x[:d], r.x[d]
        return self

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        return X @ self.w + self.b


def make_model(name: str, d: int, C: float):
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression

    if name == "monotone-logistic":
        return MonotoneLogistic(C)
    if name == "logistic":
        return LogisticRegression(C=C, max_iter=5000, class_weight="balanced")
    return HistGradientBoostingClassifier(max_iter=100, max_depth=3, learning_rate=0.1, class_weight="balanced",
                                          random_state=0, **({"monotonic_cst": [1] * d} if name == "monotone-trees" else {}))


def features(S: dict, how: str):
    """Each statistic in robust-z units of the reference normals (or sign · log1p|z|); a statistic whose
    MAD is 0 is left in its own units."""
    from gsafe_models.robust import robust_scale

    loc, scale = robust_scale(S["ref"], axis=0, fallback=False)
    scale[~(scale > 0)] = 1.0

    def f(x: np.ndarray) -> np.ndarray:
        u = (x - loc) / scale
        return u if how == "z" else np.sign(u) * np.log1p(np.abs(u))
    return f


def fit_combiner(S: dict, kinds: list[str], name: str, how: str, C: float):
    """The model trained on ref (0) against every perturbed copy (1); returns score(x). Monotone trees on
    z features are the product's own `combination="exposure"` (`gsafe_models.calibration.ExposureScore`)."""
    if name == "monotone-trees" and how == "z":
        from gsafe_models.calibration import ExposureScore

        e = ExposureScore().fit(S["ref"], np.concatenate([S[f"synth:{k}"] for k in kinds]))
        return e.statistic
    f = features(S, how)
    X = np.concatenate([f(S["ref"])] + [f(S[f"synth:{k}"]) for k in kinds])
    y = np.r_[np.zeros(len(S["ref"])), np.ones(len(S["ref"]) * len(kinds))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = make_model(name, X.shape[1], C).fit(X, y)
    return lambda x: m.decision_function(f(x))


def loko(S: dict, kinds: list[str], name: str, how: str, C: float, folds: int = 5) -> float:
    """Mean over perturbation kinds of the AUROC of a model trained without that kind (and without a fold of ref)."""
    from gsafe_models.metrics import auroc

    n = len(S["ref"])
    fold = np.random.default_rng(0).permutation(n) % folds
    out = []
    for k in kinds:
        for j in range(folds):
            tr, te = fold != j, fold == j
            sub = {"ref": S["ref"][tr]} | {f"synth:{o}": S[f"synth:{o}"][tr] for o in kinds if o != k}
            score = fit_combiner(sub, [o for o in kinds if o != k], name, how, C)
            s0, s1 = score(S["ref"][te]), score(S[f"synth:{k}"][te])
            out.append(auroc(np.r_[s0, s1], np.r_[np.zeros(len(s0)), np.ones(len(s1))]))
    return float(np.mean(out))


def tpr_at_fpr(score: np.ndarray, labels: np.ndarray, fpr: float = FPR) -> float:
    """The share of anomalies scored above every normal object but a share `fpr` of them: the ranking a
    BH list needs (listing 60 % of 15 % anomalies at q = 0.1 needs p ≤ 0.009, i.e. below ~0.9 % of the
    calibration objects, contaminants included)."""
    t = np.quantile(score[labels == 0], 1 - fpr, method="higher")
    return float(np.mean(score[labels == 1] > t))


def reviewed(score_calib: np.ndarray, anomalous: np.ndarray, share: float) -> np.ndarray:
    """The calibration objects kept after a review of the top `share` of them by `score_calib` (most anomalous
    first, at least one): the anomalies the reviewer sees there leave, every other object stays."""
    seen = np.argsort(-score_calib, kind="stable")[:max(1, int(np.ceil(share * len(score_calib))))]
    keep = np.ones(len(score_calib), bool)
    keep[seen[anomalous[seen]]] = False
    return keep


def evaluate(score_test: np.ndarray, score_calib: np.ndarray, labels: np.ndarray, classes: np.ndarray) -> dict:
    from gsafe_models.calibration import TailCalibrator, bh_qvalues
    from gsafe_models.detector import DetectorConfig
    from gsafe_models.metrics import per_class_report, realised_fdr

    rep = per_class_report(score_test, labels, classes)
    r = {"all": rep.pop("all")["auroc"], "class": {c: v["auroc"] for c, v in rep.items()}, "tpr": tpr_at_fpr(score_test, labels)}
    p = TailCalibrator(trim=DetectorConfig().calibration_trim).fit(score_calib).pvalues(score_test)
    q = bh_qvalues(p)
    r["fdr"], _ = realised_fdr(q, labels, 0.1)
    r["listed"] = float(((q <= 0.1) & (labels == 1)).sum() / max(1, (labels == 1).sum()))
    n0 = (labels == 0).sum()
    r["normals_p_1e-2"] = float((p[labels == 0] <= 1e-2).sum() / (1e-2 * n0))
    return r


def prepare(where: pathlib.Path, args, seed: int) -> None:
    """`bench/quality.py --prepare` for one seed: simulate, fit every statistic, compute them (cached in `where`)."""
    import subprocess
    import sys

    cmd = [sys.executable, str(pathlib.Path(__file__).with_name("quality.py")), "--seeds", str(seed), "--cache", str(where),
           "--train", str(args.train), "--test", str(args.test), "--no-peers", "--prepare"]
    print(f"seed {seed}: no statistics in {where}; preparing them: {' '.join(cmd[1:])}", flush=True)
    subprocess.run(cmd, check=True)


def main():
    args = parse_args()
    if args.cache is None:
        from _common import bench_home

        with bench_home("combiner") as home:
            args.cache = str(home)
            return run(args)
    return run(args)


def run(args):
    from infra.store import SurveyStore
    from gsafe_models.calibration import CombinedTest
    from gsafe_models.detector import DetectorConfig
    from tasks.train import store_splits
    from gsafe_models.metrics import auroc
    from gsafe_models.perturb import KINDS
    from quality import Evaluator

    print(machine_line())
    where = pathlib.Path(args.cache)
    summary = []
    for seed in args.seeds:
        if not (where / f"statistics{seed}_{args.train}_None.npz").exists():
            prepare(where, args, seed)
        with np.load(where / f"statistics{seed}_{args.train}_None.npz") as z:
            names, S = list(z["names"]), {k[2:]: z[k] for k in z.files if k.startswith("S:")}
        cat = SurveyStore.open(str(where / f"test{seed}_{args.test}.zarr")).read_catalog(["label", "anomaly_class"])
        labels, classes = np.asarray(cat["label"]).astype(int), np.asarray(cat["anomaly_class"]).astype(str)
        kinds = [k for k in KINDS if f"synth:{k}" in S]
        # the calibration split less its anomalies (the truth as a complete reviewer): what a review can give the list
        train_url = str(where / f"train{seed}_{args.train}.zarr")
        clean = np.asarray(SurveyStore.open(train_url).read_catalog(["label"])["label"]).astype(int)[store_splits(train_url)["calib"]] != 1
        results = {}
        cfg = DetectorConfig()
        d = Evaluator(names, S, labels, classes, cfg.calibration_trim, seed).run(tuple(cfg.statistics), cfg.combination)
        dc = Evaluator(names, dict(S, calib=S["calib"][clean]), labels, classes, cfg.calibration_trim, seed).run(
            tuple(cfg.statistics), cfg.combination)
        key = f"defaults ({cfg.combination}: {'+'.join(cfg.statistics)})"
        results[key] = {
            "all": d["all"], "class": d["class"], "listed": d["listed"], "fdr": d["fdr"], "loko": None,
            "tpr": tpr_at_fpr(d["score"], labels), "listed_clean": dc["listed"], "fdr_clean": dc["fdr"], "review": {}}
        cols = [names.index(n) for n in cfg.statistics]
        own = CombinedTest(cfg.combination, seed=seed, trim=cfg.calibration_trim).fit(
            S["train"][:, cols], S["calib"][:, cols], list(cfg.statistics)).pvalues(S["calib"][:, cols])["score"]
        for share in args.review:
            dr = Evaluator(names, dict(S, calib=S["calib"][reviewed(own, ~clean, share)]), labels, classes,
                           cfg.calibration_trim, seed).run(tuple(cfg.statistics), cfg.combination)
            results[key]["review"][share] = (dr["listed"], dr["fdr"])
        singles = {n: auroc(S["test"][:, j], labels) for j, n in enumerate(names)}
        best = max(singles, key=singles.get)
        for m in args.models:
            score = fit_combiner(S, kinds, m, args.features, args.C)
            s_test, s_calib = score(S["test"]), score(S["calib"])
            r = evaluate(s_test, s_calib, labels, classes)
            rc = evaluate(s_test, s_calib[clean], labels, classes)
            r["listed_clean"], r["fdr_clean"] = rc["listed"], rc["fdr"]
            r["review"] = {}
            for share in args.review:
                rr = evaluate(s_test, s_calib[reviewed(s_calib, ~clean, share)], labels, classes)
                r["review"][share] = (rr["listed"], rr["fdr"])
            r["loko"] = loko(S, kinds, m, args.features, args.C) if args.loko else None
            results[f"{m} ({args.features}) over {len(names)} statistics"] = r
        present = sorted(set(classes[labels == 1]))
        rows = [[k, f"{r['all']:.3f}", f"{min(r['class'].values()):.3f}", f"{np.mean(list(r['class'].values())):.3f}",
                 f"{r['tpr']:.3f}", f"{r['listed']:.3f}", f"{r['fdr']:.3f}", f"{r['listed_clean']:.3f}", f"{r['fdr_clean']:.3f}",
                 "" if r["loko"] is None else f"{r['loko']:.3f}"]
                + [f"{r['class'][c]:.3f}" for c in present] for k, r in results.items()]
        print_table(rows, ["method", "all", "min", "mean", f"TPR@{FPR:.1%}", "list", "FDR", "clean list", "FDR", "loko"]
                    + [c[:8] for c in present],
                    f"seed {seed}: AUROC per class (every class held out of every model); TPR@{FPR:.1%} = share of anomalies "
                    f"above all but {FPR:.1%} of the normal objects; list = share of anomalies at q ≤ 0.1 (clean: calibrated "
                    f"on the calibration split less its anomalies, the truth as a complete reviewer); best single "
                    f"statistic {best} {singles[best]:.3f}")
        print_table([[k] + [f"{r['review'][x][0]:.3f} ({r['review'][x][1]:.3f})" for x in args.review]
                     + [f"{r['listed_clean']:.3f} ({r['fdr_clean']:.3f})"] for k, r in results.items()],
                    ["method"] + [f"review {x:.0%}" for x in args.review] + ["complete"],
                    f"seed {seed}: list at q ≤ 0.1 (realised FDR) after a review of the top of the calibration split by the "
                    f"method's own score, the anomalies seen there set aside ({int((~clean).sum())} of the split's {len(clean)} "
                    f"objects are anomalies; complete = all of them)")
        for k, r in results.items():
            if "normals_p_1e-2" in r:
                print(f"seed {seed}: {k}: normal objects with p ≤ 1e-2: {r['normals_p_1e-2']:.2f}× nominal")
        summary.append(f"seed {seed} " + "; ".join(f"{k.split(' (')[0]} {r['all']:.3f} (worst class {min(r['class'].values()):.3f})"
                                                     for k, r in results.items()))
    print("\ncombiner: " + " | ".join(summary))


if __name__ == "__main__":
    main()
