"""Score stability under the perturbations a survey makes: a representation trained by Adam against one
trained by constrained Langevin dynamics (`DetectorConfig(optimizer="langevin")`).

A hunt that re-observes the same sky should list the same objects. This script simulates a test
survey several times, the same scene each time, changed only by what a survey changes:

- **noise**: a fresh realisation of the sky and shot noise (a re-observation);
- **shift**: the sky moved by a sub-pixel offset (0.37, -0.29) px (dithering; detector artefacts
  such as cosmic rays and hot columns stay put, as they do);
- **psf+10% / psf-10%**: the PSF's width scaled by 1.1 or 0.9 (seeing), same noise draws.

The variants are made by the simulator itself (its PSF, its noise stream), with two contained
substitutions while a variant is drawn: `gsafe_models.simulate._Conditions` by a subclass whose
PSF is dilated and shifted, and NumPy's `SeedSequence` by one that swaps the noise stream. For
each optimizer and seed it fits a Detector (DetectorConfig defaults, small), scores every
variant, and reports the Spearman rank correlation of the combined score between the base survey
and each variant (all objects, and the anomalies alone), the AUROC under each variant, and the
time to train.

    python bench/robustness.py                          # 2 seeds, 1 500 train + 800 test, 32x32, g r i
    python bench/robustness.py --seeds 0 --test 400     # quicker
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses

import numpy as np

from _common import Timer, machine_line, print_table, set_threads

SHIFT = (0.37, -0.29)  # pixels (x, y)
VARIANTS = ("base", "noise", "shift", "psf+10%", "psf-10%")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--train", type=int, default=1500, help="training cutouts (1%% contamination)")
    p.add_argument("--test", type=int, default=800, help="test cutouts")
    p.add_argument("--test-anomalies", type=float, default=0.15)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--bands", nargs="+", default=["g", "r", "i"])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--optimizers", nargs="+", default=["adam", "langevin"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--temperature", type=float, default=None,
                   help="Langevin temperature instead of fit_representation's (an exploration knob of this bench)")
    p.add_argument("--radius", type=float, default=None, help="Langevin circle radius instead of fit_representation's")
    return p.parse_args()


def langevin_settings(temperature: float | None, radius: float | None) -> None:
    """Makes `optimizer="langevin"` use this temperature / radius (fit_representation fixes its own)."""
    import functools

    import gsafe_models.langevin as lv

    overrides = {k: v for k, v in {"temperature": temperature, "radius": radius}.items() if v is not None}
    if overrides:
        base = lv.ConstrainedLangevin

        def patched(params, **kw):
            return base(params, **{**kw, **overrides})

        lv.ConstrainedLangevin = functools.wraps(base)(patched)


@contextlib.contextmanager
def survey_variant(psf_scale: float = 1.0, shift: tuple[float, float] = (0.0, 0.0), noise_stream: int | None = None):
    """The simulator, for the duration of the block, with every PSF dilated by `psf_scale` and
    shifted by `shift` pixels, and (when `noise_stream` is set) another noise realisation."""
    import numpy.random as npr

    import gsafe_models.simulate as sim

    base_conditions, base_seq = sim._Conditions, npr.SeedSequence

    class Conditions(base_conditions):
        def __init__(self, spec, rng):
            super().__init__(spec, rng)
            self.fwhm = self.fwhm * psf_scale
            dx, dy = shift[0] * spec.scale, shift[1] * spec.scale
            self.psf = [p.dilate(psf_scale).shift(dx, dy) for p in self.psf]
            self._kernels = None

    class SeedSequence:
        # the simulator spawns (scene, anomaly, noise) streams from SeedSequence([seed, index])
        def __init__(self, entropy=None, **kw):
            self._entropy, self._seq = entropy, base_seq(entropy, **kw)

        def spawn(self, n):
            kids = self._seq.spawn(n)
            if n == 3 and noise_stream is not None:
                kids[2] = base_seq([*np.atleast_1d(self._entropy).tolist(), 7919, noise_stream])
            return kids

    sim._Conditions = Conditions
    if noise_stream is not None:
        npr.SeedSequence = SeedSequence
    try:
        yield
    finally:
        sim._Conditions, npr.SeedSequence = base_conditions, base_seq


def simulate_variants(args, seed: int) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    from gsafe_models.simulate import simulate_batch

    kw = dict(seed=seed + 100, anomaly_frac=args.test_anomalies, size=args.size, bands=tuple(args.bands))
    out = {}
    for name, variant in {"base": {}, "noise": {"noise_stream": 1}, "shift": {"shift": SHIFT},
                          "psf+10%": {"psf_scale": 1.1}, "psf-10%": {"psf_scale": 0.9}}.items():
        with survey_variant(**variant):
            batch = simulate_batch(0, args.test, **kw)
        out[name] = batch.images
        if name == "base":
            labels, classes = batch.label.astype(int), batch.anomaly_class
        else:  # the same scene: the same truth
            assert np.array_equal(batch.anomaly_class, classes), name
    return out, labels, classes


def fit(train: np.ndarray, optimizer: str, seed: int, epochs: int):
    from gsafe_models.detector import Detector, DetectorConfig

    n_cal = len(train) // 5
    fit_rows, cal_rows = train[:-n_cal], train[-n_cal:]
    n_val = len(fit_rows) // 8
    tr, va = fit_rows[:-n_val], fit_rows[-n_val:]
    config = DetectorConfig(seed=seed, epochs=epochs, optimizer=optimizer, latent_dim=16, channels=(16, 32, 64), patience=epochs)
    bs = config.batch_size

    def batches(x):
        return lambda: (x[i:i + bs] for i in range(0, len(x), bs))

    with Timer() as t:
        det = Detector.fit(batches(tr), batches(cal_rows), val=batches(va), config=config)
    return det, t.seconds, config


def main() -> None:
    from scipy.stats import spearmanr

    from gsafe_models.metrics import auroc
    from gsafe_models.simulate import simulate_batch

    args = parse_args()
    threads = set_threads(args.threads)
    langevin_settings(args.temperature, args.radius)
    print(machine_line() + f"; torch threads {threads}; langevin temperature {args.temperature or 'default'}, "
          f"radius {args.radius or 'default'}, epochs {args.epochs}")
    rows, summary = [], {o: [] for o in args.optimizers}
    for seed in args.seeds:
        train = simulate_batch(0, args.train, seed=seed, anomaly_frac=0.01, size=args.size, bands=tuple(args.bands)).images
        variants, labels, classes = simulate_variants(args, seed)
        print(f"seed {seed}: {len(train)} training cutouts, {args.test} test cutouts ({labels.sum()} anomalies) "
              f"of {train.shape[1:]} in {len(variants)} variants")
        for optimizer in args.optimizers:
            det, seconds, config = fit(train, optimizer, seed, args.epochs)
            scores = {k: det.score(v, q_values=False)["score"] for k, v in variants.items()}
            stats = {k: det.statistics(v) for k, v in variants.items()}
            row = {"auroc": {k: auroc(s, labels) for k, s in scores.items()}, "seconds": seconds,
                   "epochs": len(det.history), "val": det.history[-1]["val_loss"] if det.history else float("nan")}
            row["rho"] = {k: spearmanr(scores["base"], s).statistic for k, s in scores.items() if k != "base"}
            row["rho_anom"] = {k: spearmanr(scores["base"][labels == 1], s[labels == 1]).statistic
                               for k, s in scores.items() if k != "base"}
            row["rho_stat"] = {n: np.mean([spearmanr(stats["base"][n], stats[k][n]).statistic for k in VARIANTS[1:]])
                               for n in det.statistic_names}
            summary[optimizer].append(row)
            rows.append([f"seed {seed} {optimizer}", f"{seconds:.0f}", row["auroc"]["base"],
                         *[row["rho"][k] for k in VARIANTS[1:]], *[row["auroc"][k] for k in VARIANTS[1:]]])
            print(f"  {optimizer}: trained in {seconds:.0f} s ({row['epochs']} epochs, best val loss "
                  f"{min(h['val_loss'] for h in det.history):.4f}); statistics {config.statistics}; mean rank "
                  f"correlation per statistic over the variants: "
                  + ", ".join(f"{n} {v:.3f}" for n, v in row["rho_stat"].items()), flush=True)
    print_table(rows, ["detector", "train s", "AUROC", *[f"ρ {k}" for k in VARIANTS[1:]],
                       *[f"AUROC {k}" for k in VARIANTS[1:]]],
                "Combined score: Spearman ρ with the base survey's (all objects) and AUROC under each perturbation")
    rows = []
    for o, rs in summary.items():
        rows.append([o, np.mean([r["auroc"]["base"] for r in rs]),
                     *[np.mean([r["rho"][k] for r in rs]) for k in VARIANTS[1:]],
                     *[np.mean([r["rho_anom"][k] for r in rs]) for k in VARIANTS[1:]],
                     np.mean([min(r["auroc"][k] for k in VARIANTS) for r in rs])])
    print_table(rows, ["optimizer", "AUROC", *[f"ρ {k}" for k in VARIANTS[1:]], *[f"ρ anom {k}" for k in VARIANTS[1:]],
                       "worst AUROC"], f"Mean over seeds {args.seeds}")
    mean_rho = {o: np.mean([np.mean(list(r["rho"].values())) for r in rs]) for o, rs in summary.items()}
    mean_auc = {o: np.mean([r["auroc"]["base"] for r in rs]) for o, rs in summary.items()}
    print("robustness: " + " vs ".join(f"{o} mean ρ {mean_rho[o]:.3f} AUROC {mean_auc[o]:.3f}" for o in summary))


if __name__ == "__main__":
    main()
