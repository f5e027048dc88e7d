"""Detection quality on a simulated survey: gsafe's combined test, its single statistics and every
combination rule, beside the peers a user would try first, per anomaly class, with calibration.

What it does, all under a temporary GSAFE_HOME:

1. simulates a training survey (`--train` cutouts, `--train-anomalies` contamination: real training
   sets are never clean) whose anomalies come only from the classes that are *not* held out, and a
   fresh test survey (another seed, `--test` cutouts, `--test-anomalies`) with every class;
2. fits a Detector exactly as `gsafe train` does (`tasks.train.fit_detector_task`: the store's
   train / val / calib split, streamed batches) with DetectorConfig defaults, except what the flags
   change; the config is printed;
3. scores the test survey (`Detector.score`, BH q-values over the survey), computes every statistic
   the fitted detector can give (`Detector.statistics`), and refits only the CombinedTest for every
   combination rule on the same train / calib statistics;
4. fits the peers on the same training survey (all its rows), on pixels given gsafe's own per-band
   asinh stretch (the Detector's fitted `BandNormaliser`): PCA reconstruction error, IsolationForest
   on pixels (scikit-learn), and on PCA features PyOD ECOD, PyOD IForest and a Gaussian mixture
   (scikit-learn, components by BIC); PyOD ECOD on raw pixels too with `--pixel-ecod` (slow).

Prints AUROC, average precision and precision@50 per anomaly class (each class against all normal
objects; the held-out classes, default `merger` and `blend_point`, marked), and the calibration:
realised false discovery rate of the BH list at q = 0.1 and the KS distance of the p-values of the
fresh normal objects from the uniform.

    python bench/quality.py                    # ~3 000 + 3 000 cutouts, 64×64, a few minutes on 2 cores
    python bench/quality.py --quick            # 1 000 + 1 000 cutouts, 5 epochs
    python bench/quality.py --epochs 10 --threads 1 --held-out lens trail
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np

from _common import Timer, bench_home, fmt, machine_line, print_table, set_threads

K = 50          # precision@K
ALPHA = 0.1     # BH level of the calibration check


def parse_args() -> argparse.Namespace:
    from gsafe_models.simulate import ANOMALY_CLASSES

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", type=int, default=3000, help="cutouts of the training survey")
    p.add_argument("--test", type=int, default=3000, help="cutouts of the test survey")
    p.add_argument("--train-anomalies", type=float, default=0.01, help="contamination of the training survey")
    p.add_argument("--test-anomalies", type=float, default=0.10, help="share of anomalies in the test survey")
    p.add_argument("--held-out", nargs="*", default=["merger", "blend_point"], choices=ANOMALY_CLASSES,
                   help="classes kept out of training and of anything tuned; reported apart")
    p.add_argument("--size", type=int, default=64, help="cutout side H = W, pixels")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: DetectorConfig's)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: one per core)")
    p.add_argument("--pca", type=int, default=32, help="PCA components of the peers")
    p.add_argument("--pixel-ecod", action="store_true",
                   help="also run PyOD ECOD on the raw pixel features (B·H·W of them: minutes and several "
                        "GB of memory at 5×64×64)")
    p.add_argument("--quick", action="store_true", help="a smaller run: 1 000 + 1 000 cutouts, 5 epochs")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    if a.quick:
        a.train, a.test, a.epochs = min(a.train, 1000), min(a.test, 1000), a.epochs or 5
    return a


# ---- data and detector -------------------------------------------------------------------------
def simulate(home, settings, args) -> tuple[str, str]:
    from gsafe_models.simulate import ANOMALY_CLASSES
    from tasks.simulate import simulate_survey

    tuned = tuple(c for c in ANOMALY_CLASSES if c not in args.held_out)
    train, test = str(home / "train.zarr"), str(home / "test.zarr")
    simulate_survey(args.train, settings=settings, seed=args.seed, anomaly_frac=args.train_anomalies,
                    store=train, classes=tuned, workers=2)
    simulate_survey(args.test, settings=settings, seed=args.seed + 1, anomaly_frac=args.test_anomalies,
                    store=test, workers=2)
    return train, test


def fit_detector(train_url: str, settings, args):
    """The Detector as `gsafe train` fits it (same split, same streaming), without MLflow."""
    from gsafe_models.detector import Detector, DetectorConfig
    from tasks.train import fit_detector_task

    overrides = {"seed": args.seed} | ({"epochs": args.epochs} if args.epochs else {})
    config = dataclasses.asdict(DetectorConfig(**overrides))
    payload = fit_detector_task.fn(train_url, config, settings.model_dump(mode="json"))
    return Detector.from_bytes(payload), overrides


def available_statistics(det, probe: np.ndarray) -> list[str]:
    """Every statistic the fitted detector can compute: its own, then each other one its fitted
    parts allow (tried on a few cutouts: what a statistic needs is the Detector's business)."""
    from gsafe_models.detector import STATISTICS

    own = list(det.statistic_names)
    more = []
    for s in STATISTICS:
        if s in own:
            continue
        try:
            det.statistics(probe, [s])
        except (AttributeError, KeyError, TypeError, RuntimeError):
            continue
        more.append(s)
    return own + more


def statistics_matrix(det, images: np.ndarray, names: list[str]) -> np.ndarray:
    raw = det.statistics(images, names)
    return np.stack([raw[n] for n in names], axis=1)


# ---- methods -----------------------------------------------------------------------------------
def gsafe_methods(det, train_url: str, test_images: np.ndarray) -> tuple[dict, dict]:
    """Scores of gsafe's combined test (its own rule and every other), and of every single statistic.

    Returns (scores by method name, extra per method: p-values, q-values, seconds).
    """
    from gsafe_models.calibration import COMBINERS, CombinedTest, bh_qvalues
    from infra.store import SurveyStore
    from tasks.train import store_splits

    names = available_statistics(det, test_images[:4])
    own = list(det.statistic_names)
    store = SurveyStore.open(train_url)
    split = store_splits(train_url)
    scores, extra = {}, {}

    with Timer() as t:
        out = det.score(test_images)
    rule = det.config.combination
    scores[f"gsafe combined ({rule}, default)"] = out["score"]
    extra[f"gsafe combined ({rule}, default)"] = {"p": out["p_value"], "q": out["q_value"], "seconds": t.seconds}

    S_train = statistics_matrix(det, store.read_rows(split["train"]), own)
    S_calib = statistics_matrix(det, store.read_rows(split["calib"]), own)
    S_test = np.stack([out[f"stat_{n}"] for n in own], axis=1)
    for method in [*COMBINERS, "dose"]:
        if method == rule:
            continue
        with Timer() as t:
            res = CombinedTest(method, seed=det.config.seed, trim=det.config.calibration_trim).fit(S_train, S_calib, own).pvalues(S_test)
        key = f"gsafe combined ({method})"
        scores[key] = res["score"]
        extra[key] = {"p": res["p_value"], "q": bh_qvalues(res["p_value"]), "seconds": t.seconds}

    others = [n for n in names if n not in own]
    more = det.statistics(test_images, others) if others else {}
    for n in names:
        key = f"  statistic {n}" + ("" if n in own else " (not in the test)")
        scores[key] = out[f"stat_{n}"] if n in own else more[n]
        if n in own:
            extra[key] = {"p": out[f"p_{n}"], "q": bh_qvalues(out[f"p_{n}"])}
    return scores, extra


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


def peer_methods(X_fit: np.ndarray, X_test: np.ndarray, n_pca: int, seed: int,
                 pixel_ecod: bool = False) -> tuple[dict, dict]:
    """Scores (larger = more anomalous) of the peers, fitted on X_fit; and their fit+score seconds."""
    from pyod.models.ecod import ECOD
    from pyod.models.iforest import IForest
    from sklearn.decomposition import PCA
    from sklearn.ensemble import IsolationForest
    from sklearn.mixture import GaussianMixture

    scores, seconds = {}, {}

    def run(name, fn):
        with Timer() as t:
            scores[name] = np.asarray(fn(), np.float64)
        seconds[name] = t.seconds

    pca = PCA(n_pca, svd_solver="randomized", random_state=seed).fit(X_fit)
    Z_fit, Z_test = pca.transform(X_fit), pca.transform(X_test)

    def pca_residual():
        return ((X_test - pca.inverse_transform(Z_test)) ** 2).mean(1)

    def gmm():
        fits = [GaussianMixture(k, covariance_type="full", reg_covar=1e-4, random_state=seed).fit(Z_fit)
                for k in (1, 2, 4, 8) if k * 10 <= len(Z_fit)]
        best = min(fits, key=lambda m: m.bic(Z_fit))
        return -best.score_samples(Z_test)

    run(f"PCA reconstruction error ({n_pca} comp.), pixels", pca_residual)
    run("IsolationForest (scikit-learn), pixels",
        lambda: -IsolationForest(n_estimators=200, random_state=seed).fit(X_fit).score_samples(X_test))
    if pixel_ecod:
        run("ECOD (PyOD), pixels", lambda: ECOD().fit(X_fit).decision_function(X_test))
    run(f"ECOD (PyOD), PCA-{n_pca} features", lambda: ECOD().fit(Z_fit).decision_function(Z_test))
    run(f"IForest (PyOD), PCA-{n_pca} features",
        lambda: IForest(n_estimators=200, random_state=seed).fit(Z_fit).decision_function(Z_test))
    run(f"GMM (scikit-learn, BIC), PCA-{n_pca} features", gmm)
    return scores, seconds


# ---- report ------------------------------------------------------------------------------------
def report_tables(scores: dict, labels: np.ndarray, classes: np.ndarray, held_out: list[str],
                  seconds: dict) -> dict:
    """The AUROC, AP and P@K tables; returns the per-method reports."""
    from gsafe_models.metrics import per_class_report

    present = sorted(set(classes[labels.astype(bool)]))
    order = [c for c in present if c not in held_out] + [c for c in present if c in held_out]
    tuned = ~np.isin(classes, held_out)
    reports = {}
    for name, s in scores.items():
        rep = per_class_report(s, labels, classes, k=K)
        rep["tuned"] = per_class_report(s[tuned], labels[tuned], classes[tuned], k=K)["all"]
        reports[name] = rep
    counts = {c: int((classes == c).sum()) for c in order}
    head = ["method", "all", "tuned"] + [f"{c}{'†' if c in held_out else ''} ({counts[c]})" for c in order]
    for metric, title in (("auroc", "AUROC"), ("ap", "average precision"), (f"p@{K}", f"precision@{K}")):
        rows = [[name, rep["all"][metric], rep["tuned"][metric]] + [rep[c][metric] for c in order]
                + ([fmt(seconds.get(name), ".1f")] if metric == "auroc" else [])
                for name, rep in reports.items()]
        print_table(rows, head + (["seconds"] if metric == "auroc" else []),
                    f"{title} per anomaly class (each class vs all {int((labels == 0).sum())} normal objects; "
                    f"tuned = the classes not held out; † held out of training and tuning"
                    + (f"; at most n/{K} for a class of n < {K}" if metric.startswith("p@") else "") + ")")
    return reports


def report_calibration(extra: dict, labels: np.ndarray, n_calib: int) -> dict:
    """Realised FDR of the BH list at q = ALPHA, and KS of p-values on the fresh normal objects.

    Conformal p-values are uniform over draws of the calibration set, not given one: given
    `n_calib` calibration objects their distribution function wanders by ~1/sqrt(n_calib), so the
    one-sample KS test on thousands of fresh objects rejects for any honest detector. What breaks a
    false-discovery list is too many small p-values, so the statistic is the one-sided D+ =
    sup_t (F(t) - t) (a conservative rule, Simes or Bonferroni, passes), and the yardstick the
    two-sample one, D+ ≤ 1.52·sqrt(1/n + 1/n_calib) at 1 % (as `gsafe promote` uses).
    """
    from scipy.stats import kstest

    from gsafe_models.metrics import realised_fdr

    rows, out = [], {}
    normal = labels == 0
    for name, e in extra.items():
        fdr, n = realised_fdr(e["q"], labels, ALPHA)
        ks = kstest(e["p"][normal], "uniform", alternative="greater")  # too many small p-values
        out[name] = {"fdr": fdr, "discoveries": n, "ks": ks.statistic}
        bound = np.sqrt(-np.log(0.01) / 2) * np.sqrt(1 / normal.sum() + 1 / n_calib)
        out[name]["ks_ok"] = bool(ks.statistic <= bound)
        rows.append([name, fdr, n, ks.statistic, f"{bound:.3f}", "yes" if ks.statistic <= bound else "NO",
                     f"{ks.pvalue:.2g}", float((e["p"][normal] <= 0.05).mean()),
                     f"{np.nanmin(e['p']):.2g}", f"{np.nanmin(e['q']):.2g}"])
    print_table(rows, ["p-values of", f"realised FDR at q={ALPHA}", "discoveries", "KS D+ (normals)",
                       "D bound (1 %)", "within", "one-sample KS p", "FPR at p≤0.05", "smallest p", "smallest q"],
                f"Calibration on the test survey ({int(normal.sum())} fresh normal objects, "
                f"{int((~normal).sum())} anomalies)")
    return out


def main() -> None:
    args = parse_args()
    threads = set_threads(args.threads)
    print(machine_line() + f"; torch threads {threads}")
    with bench_home("quality") as home:
        from infra.settings import Settings
        from infra.store import SurveyStore

        settings = Settings(home=home, progress=False, cutout_size=args.size)
        seconds = {}
        with Timer() as t:
            train_url, test_url = simulate(home, settings, args)
        seconds["simulate"] = t.seconds
        with Timer() as t:
            det, overrides = fit_detector(train_url, settings, args)
        seconds["train"] = t.seconds
        cfg = dataclasses.asdict(det.config)
        print(f"surveys: train {args.train} cutouts ({args.train_anomalies:.0%} contamination, held-out classes "
              f"excluded), test {args.test} ({args.test_anomalies:.0%} anomalies, all classes), "
              f"{args.size}×{args.size} px; simulated in {seconds['simulate']:.0f} s")
        print(f"DetectorConfig (defaults except {overrides}): {cfg}")
        epochs_run = len(det.history)
        print(f"detector trained in {seconds['train']:.0f} s ({epochs_run} epochs run); "
              f"diagnostics: " + ", ".join(f"{k}={fmt(v)}" for k, v in det.diagnostics.items()))

        test = SurveyStore.open(test_url)
        cat = test.read_catalog(["label", "anomaly_class"])
        labels, classes = np.asarray(cat["label"]).astype(int), np.asarray(cat["anomaly_class"]).astype(str)
        images = test.read_images()
        with Timer() as t:
            g_scores, g_extra = gsafe_methods(det, train_url, images)
        seconds["gsafe scoring"] = t.seconds
        with Timer() as t:
            X_fit = stretched(det, SurveyStore.open(train_url).read_images())
            X_test = stretched(det, images)
            p_scores, p_seconds = peer_methods(X_fit, X_test, args.pca, args.seed, args.pixel_ecod)
        seconds["peers"] = t.seconds
        del X_fit, X_test

        per_method_seconds = {k: v["seconds"] for k, v in g_extra.items() if "seconds" in v} | p_seconds
        reports = report_tables(g_scores | p_scores, labels, classes, args.held_out, per_method_seconds)
        calib = report_calibration(g_extra, labels, max(1, int(det.diagnostics.get("calibration_n", 2)) // 2))

        main_key = next(iter(g_scores))
        singles = {k: r for k, r in reports.items() if k.startswith("  statistic") and "not in" not in k}
        best_single = max(singles, key=lambda k: singles[k]["all"]["auroc"])
        print(f"\ncombined test vs its best single statistic ({best_single.strip()}): AUROC "
              f"{reports[main_key]['all']['auroc']:.3f} vs {singles[best_single]['all']['auroc']:.3f}")
        best_peer = max(p_scores, key=lambda k: reports[k]["all"]["auroc"])
        held = [reports[main_key][c]["auroc"] for c in args.held_out if c in reports[main_key]]
        print(f"timings: " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()))
        print(f"{main_key}: realised FDR {calib[main_key]['fdr']:.3f} at q={ALPHA} "
              f"({calib[main_key]['discoveries']} discoveries), KS D+ {calib[main_key]['ks']:.3f} on normals "
              f"({'within' if calib[main_key]['ks_ok'] else 'BEYOND'} the calibration-size bound)")
        print(f"quality: gsafe combined AUROC {reports[main_key]['all']['auroc']:.3f} "
              f"(held-out classes min {min(held) if held else float('nan'):.3f}) vs best peer "
              f"{reports[best_peer]['all']['auroc']:.3f} ({best_peer})")


if __name__ == "__main__":
    main()
