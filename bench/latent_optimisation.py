"""The cost of the alternative: scoring by per-image latent optimisation (AnoGAN, the HSC WGAN hunt)
against gsafe's amortized encoder, on the same cutouts with the same trained decoder.

AnoGAN-style scoring has no encoder: for each cutout it searches the latent space for the code whose
decoding best matches it, by gradient steps on z through the (frozen) generator, and scores the
cutout by the residual left at the end. gsafe's encoder gives z in one forward pass. This script:

1. simulates a small training survey (1 % contamination) and a labelled sample (`--anomalies`),
   and fits a Detector (DetectorConfig defaults);
2. times `Detector.score` on the sample (every statistic, p-values), and the amortized residual
   alone (normalise → encode → decode → RMS residual G);
3. times latent optimisation on the same sample: `--steps` Adam steps (lr `--lr`) on z, a batch of
   `--batch` cutouts optimised together (each cutout's loss is its own masked MSE, so the codes do
   not interact), starting from the mean training latent, steps in units of each latent
   dimension's spread over the training set; the decoder's weights are frozen;
4. reports cutouts/s for each and the AUROC of the residual left by each (and of gsafe's combined
   score) on the labelled sample, with the optimisation's loss along the way.

Last line: ``latent optimisation: X cutouts/s vs amortized Y cutouts/s (Z× slower)``, Y being the
full `Detector.score` rate (the amortized residual alone is faster still; it is in the table).

    python bench/latent_optimisation.py              # 256 cutouts, 200 steps: ~4 min on 2 cores
    python bench/latent_optimisation.py --quick      # 64 cutouts, 100 steps, 2 epochs: timings only
    python bench/latent_optimisation.py --steps 500 --lr 0.02
    python bench/latent_optimisation.py --representation gan --epochs 30 --batch-size 32   # the HSC hunt's GAN
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np
import torch

from _common import Timer, bench_home, machine_line, print_table, set_threads


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", type=int, default=1024, help="training cutouts (1%% contamination)")
    p.add_argument("--sample", type=int, default=256, help="labelled cutouts scored both ways")
    p.add_argument("--anomalies", type=float, default=0.3, help="share of anomalies in the labelled sample")
    p.add_argument("--steps", type=int, default=200, help="Adam steps on z per cutout")
    p.add_argument("--lr", type=float, default=0.05, help="Adam learning rate on z, in units of the latents' std")
    p.add_argument("--batch", type=int, default=64, help="cutouts optimised together")
    p.add_argument("--epochs", type=int, default=None,
                   help="training epochs of the Detector (default: DetectorConfig's; with few, the decoder "
                        "barely uses z and the comparison says nothing)")
    p.add_argument("--size", type=int, default=64, help="cutout side H = W, pixels")
    p.add_argument("--representation", default="ae",
                   help="ae, or gan: the HSC hunt's WGAN-GP, whose AnoGAN scoring is exactly this latent optimisation "
                        "through the generator (the encoder is f-AnoGAN's); AS = λG + (1-λ)C uses the critic's features")
    p.add_argument("--batch-size", type=int, default=None, help="training batch size (default: DetectorConfig's)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: one per core)")
    p.add_argument("--quick", action="store_true",
                   help="a smaller run: 512 training, 64 scored, 100 steps, 2 epochs (timings only)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    if a.quick:
        a.train, a.sample, a.steps, a.epochs = min(a.train, 512), min(a.sample, 64), min(a.steps, 100), 2
    return a


def simulate(home, args):
    """(train cutouts, sample cutouts, sample labels, sample classes), simulated in 2 processes."""
    from infra.settings import Settings
    from infra.store import SurveyStore
    from tasks.simulate import simulate_survey

    settings = Settings(home=home, cutout_size=args.size, progress=False)
    train, sample = str(home / "train.zarr"), str(home / "sample.zarr")
    simulate_survey(args.train, settings=settings, seed=args.seed, anomaly_frac=0.01, store=train, workers=2)
    simulate_survey(args.sample, settings=settings, seed=args.seed + 1, anomaly_frac=args.anomalies, store=sample,
                    workers=2)
    s = SurveyStore.open(sample)
    cat = s.read_catalog(["label", "anomaly_class"])
    return SurveyStore.open(train).read_images(), s.read_images(), np.asarray(cat["label"]).astype(int), \
        np.asarray(cat["anomaly_class"]).astype(str)


def fit(train: np.ndarray, args):
    from gsafe_models.detector import Detector, DetectorConfig

    n_cal = max(64, len(train) // 5)
    fit_rows, cal_rows = train[:-n_cal], train[-n_cal:]
    config = DetectorConfig(seed=args.seed, representation=args.representation,
                            **({"epochs": args.epochs} if args.epochs else {}),
                            **({"batch_size": args.batch_size} if args.batch_size else {}))
    bs = config.batch_size

    def batches(x):
        return lambda: (x[i:i + bs] for i in range(0, len(x), bs))

    return Detector.fit(batches(fit_rows), batches(cal_rows), config=config), config


def residuals(net, x, mask, x_hat) -> np.ndarray:
    """(G, C) per cutout, (n, 2): the RMS pixel residual and the RMS residual of the network's
    features (the encoder's for an autoencoder, the critic's for the GAN), as the registry's G and C."""
    from gsafe_models.statistics import feature_residual, reconstruction_residual

    filled, ones = mask * x + (1 - mask) * x_hat, torch.ones_like(mask)
    c = feature_residual(net.features(filled, ones), net.features(x_hat, ones))
    return torch.stack([reconstruction_residual(x, x_hat, mask), c], 1).double().numpy()


def amortized_residual(det, images: np.ndarray, batch: int = 256) -> np.ndarray:
    """(G, C) (n, 2) from the encoder's z: normalise → encode → decode → residuals."""
    b = det._bundle
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            x, mask = b.normaliser(torch.as_tensor(images[i:i + batch]))
            out.append(residuals(b.net, x, mask, b.net.decode(b.net.encode(x, mask))))
    return np.concatenate(out)


def anomaly_score(gc: np.ndarray, reference: np.ndarray, lam: float) -> np.ndarray:
    """AS = λ G / s_G + (1 − λ) C / s_C, scales the medians of `reference` (n, 2) (Storey-Fisher et al. 2021)."""
    s = np.median(reference, axis=0)
    return lam * gc[:, 0] / s[0] + (1 - lam) * gc[:, 1] / s[1]


def optimised_residual(det, images: np.ndarray, z_train: np.ndarray, args) -> tuple[np.ndarray, list[float]]:
    """(G, C) (n, 2) left after `args.steps` Adam steps on z per cutout (decoder frozen); and the mean
    loss of the first batch every tenth of the way.

    z = mean + std ⊙ u over the training latents, u from 0: the step size is then in units of each
    latent dimension's spread, whatever the encoder's scale."""
    b = det._bundle
    z_mean = torch.as_tensor(z_train.mean(0, keepdims=True))
    z_std = torch.as_tensor(z_train.std(0, keepdims=True)).clamp_min(1e-6)
    params = list(b.net.parameters())
    before = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    out, trace = [], []
    try:
        for i in range(0, len(images), args.batch):
            with torch.no_grad():
                x, mask = b.normaliser(torch.as_tensor(images[i:i + args.batch]))
            u = torch.zeros(len(x), z_mean.shape[1], requires_grad=True)
            opt = torch.optim.Adam([u], lr=args.lr)
            n_valid = mask.flatten(1).sum(1).clamp_min(1.0)
            for step in range(args.steps):
                per_image = (mask * (b.net.decode(z_mean + z_std * u) - x).square()).flatten(1).sum(1) / n_valid
                opt.zero_grad(set_to_none=True)
                per_image.sum().backward()
                opt.step()
                if i == 0 and step % max(1, args.steps // 10) == 0:
                    trace.append(float(per_image.detach().mean()))
            with torch.no_grad():
                out.append(residuals(b.net, x, mask, b.net.decode(z_mean + z_std * u)))
    finally:
        for p, r in zip(params, before):
            p.requires_grad_(r)
    return np.concatenate(out), trace


def main() -> None:
    args = parse_args()
    threads = set_threads(args.threads)
    print(machine_line() + f"; torch threads {threads}")
    with bench_home("latent") as home:
        from gsafe_models.metrics import auroc

        with Timer() as t:
            train, sample, labels, classes = simulate(home, args)
        print(f"simulated {len(train)} training cutouts (1% contamination) and {len(sample)} labelled "
              f"({labels.sum()} anomalies) of {sample.shape[1:]} in {t.seconds:.0f} s")
        with Timer() as t:
            det, config = fit(train, args)
        print(f"Detector fitted in {t.seconds:.0f} s; config: {dataclasses.asdict(config)}")

        det.score(sample[:16], q_values=False)          # first-call costs out of the timings
        with Timer() as t_score:
            score = det.score(sample)["score"]
        with Timer() as t_amort:
            gc_amort = amortized_residual(det, sample)
        z_train = det.encode(train)
        with Timer() as t_opt:
            gc_opt, trace = optimised_residual(det, sample, z_train, args)
        reference = amortized_residual(det, train[:512])
        g_amort, g_opt = gc_amort[:, 0], gc_opt[:, 0]
        as_amort, as_opt = (anomaly_score(gc, reference, config.lam) for gc in (gc_amort, gc_opt))

        n = len(sample)
        normal = labels == 0
        rows = [
            ["gsafe Detector.score (amortized, all statistics + p-values)", n / t_score.seconds,
             1000 * t_score.seconds / n, auroc(score, labels), "-"],
            ["amortized residual G (encode → decode)", n / t_amort.seconds, 1000 * t_amort.seconds / n,
             auroc(g_amort, labels), float(np.median(g_amort[normal]))],
            [f"latent optimisation G ({args.steps} Adam steps, lr {args.lr}, batch {args.batch})",
             n / t_opt.seconds, 1000 * t_opt.seconds / n, auroc(g_opt, labels), float(np.median(g_opt[normal]))],
            [f"amortized AS = {config.lam} G + {1 - config.lam:.1f} C ({'critic' if args.representation == 'gan' else 'encoder'} features)",
             n / t_amort.seconds, 1000 * t_amort.seconds / n, auroc(as_amort, labels), "-"],
            ["latent optimisation AS (same z as its G)", n / t_opt.seconds, 1000 * t_opt.seconds / n, auroc(as_opt, labels), "-"],
        ]
        print_table([[r[0], f"{r[1]:.1f}", f"{r[2]:.1f}", r[3], r[4]] for r in rows],
                    ["scoring", "cutouts/s", "ms per cutout", "AUROC", "median G (normals)"],
                    f"Scoring {n} cutouts ({labels.sum()} anomalies), same decoder")
        per_class = [[c, int((classes == c).sum()), *(auroc(v[normal | (classes == c)], labels[normal | (classes == c)])
                                                       for v in (g_amort, g_opt, as_amort, as_opt))]
                     for c in sorted(set(classes[labels == 1]))]
        print_table(per_class, ["class", "n", "AUROC amortized G", "AUROC optimised G", "amortized AS", "optimised AS"],
                    "Per class (each vs all normal objects of the sample; small n: indicative)")
        step = max(1, args.steps // 10)
        print("\nmean masked MSE of the first batch along the optimisation: "
              + ", ".join(f"step {i * step}: {v:.4f}" for i, v in enumerate(trace))
              + f"; amortized: {float(np.mean(g_amort[: args.batch] ** 2)):.4f}")
        print(f"per cutout and step: {1000 * t_opt.seconds / (n * args.steps):.2f} ms "
              f"(decoder forward + backward, batch {args.batch})")
        slower = (n / t_score.seconds) / (n / t_opt.seconds)
        print(f"latent optimisation: {n / t_opt.seconds:.1f} cutouts/s vs amortized {n / t_score.seconds:.0f} "
              f"cutouts/s ({slower:.0f}× slower)")


if __name__ == "__main__":
    main()
