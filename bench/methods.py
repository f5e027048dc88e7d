"""The references' generative methods under the leave-one-class-out protocol of `bench/quality.py`:
the latent energy-based model's statistics (`energy_ebm`, `typicality_ebm`) and the WGAN-GP with an
encoder as the representation (`--representation gan`: G, C and AS on the critic's features).

Per seed it runs `quality.run_seed` (same surveys, same split, same synthetic selection set, same
greedy selection of a set and a rule, same held-out rotations) three times over:

1. **ae**: the autoencoder detector with every registered statistic, the EBM's included;
2. **ae without EBM**: the same statistics matrices with the EBM's two columns removed, the whole
   selection re-run: what the EBM adds to the protocol's winner and to each held-out class;
3. **gan**: the detector with the WGAN-GP representation (every statistic; `--gan-epochs` per stage,
   `--gan-batch` cutouts per step: a GAN needs more steps than an autoencoder).

It prints the class-free winner and the leave-one-class-out minimum and mean of each, the single
statistics that differ (density statistics: GMM, flow, EBM; residual statistics: autoencoder vs
critic features), and writes a figure of what the EBM calls normal: latents drawn from the EBM by
Langevin chains, decoded, beside real training cutouts.

    python bench/methods.py --seeds 0 --quick            # 1 000 + 1 000 cutouts, 5 epochs (GAN: 20 epochs)
    python bench/methods.py --figure ebm_samples.png     # also writes the EBM's samples
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from pathlib import Path

import numpy as np

from _common import Timer, bench_home, fmt, machine_line, print_table, set_threads

sys.path.insert(0, str(Path(__file__).parent))
import quality  # noqa: E402  (the protocol itself, reused as it is)

EBM_STATISTICS = ("energy_ebm", "typicality_ebm")
DENSITY = ("nll_gmm", "typicality_gmm", "rao_gmm", "nll_flow", "typicality_flow", "rao_flow", *EBM_STATISTICS)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--quick", action="store_true", help="1 000 + 1 000 cutouts, 5 epochs (the GAN: --gan-epochs)")
    p.add_argument("--train", type=int, default=3000)
    p.add_argument("--test", type=int, default=3000)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--gan-epochs", type=int, default=20, help="epochs of each GAN stage (WGAN-GP, then encoder)")
    p.add_argument("--gan-batch", type=int, default=32, help="GAN batch size (more steps per epoch)")
    p.add_argument("--representations", nargs="+", default=["ae", "gan"])
    p.add_argument("--figure", default=None, help="write the EBM's samples beside real cutouts to this PNG")
    p.add_argument("--cache", default=None, help="keep surveys and detectors here between runs")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args()
    if a.quick:
        a.train, a.test, a.epochs = min(a.train, 1000), min(a.test, 1000), a.epochs or 5
    # the protocol's own settings (bench/quality.py), peers left out: they are in its table
    a.train_anomalies, a.test_anomalies, a.rules, a.pca, a.no_peers = 0.01, 0.15, list(quality.RULES), 32, True
    return a


def fit_with(representation: str, args, kept: dict):
    """`quality.fit_detector` for another representation (its cache file named after it); the
    detector and its training store are left in `kept`."""

    def fit_detector(train_url, settings, a, seed, where):
        from gsafe_models.detector import STATISTICS, Detector, DetectorConfig
        from tasks.train import fit_detector_task

        kept["train_url"] = train_url
        epochs = a.gan_epochs if representation == "gan" else a.epochs
        path = where / f"detector{seed}_{a.train}_{epochs}_{representation}.bin"
        if path.exists():
            kept["detector"] = Detector.from_bytes(path.read_bytes())
            return kept["detector"], None
        overrides = {"seed": seed, "statistics": STATISTICS, "representation": representation}
        overrides |= {"epochs": epochs} if epochs else {}
        overrides |= {"batch_size": a.gan_batch} if representation == "gan" else {}
        with Timer() as t:
            payload = fit_detector_task.fn(train_url, dataclasses.asdict(DetectorConfig(**overrides)), settings.model_dump(mode="json"))
        path.write_bytes(payload)
        kept["detector"] = Detector.from_bytes(payload)
        return kept["detector"], t.seconds

    return fit_detector


def without(r: dict, drop: tuple[str, ...], args) -> dict:
    """The protocol re-run on the same statistics matrices with the `drop` columns removed."""
    ev = r["ev"]
    keep = [j for j, n in enumerate(ev.names) if n not in drop]
    S = {k: v[:, keep] for k, v in ev.S.items()}
    sub = quality.Evaluator([ev.names[j] for j in keep], S, ev.labels, ev.classes, ev.trim, ev.seed, ev.trimmed_are_normal)
    sel = {rule: sub.greedy(quality.synth_objective, [rule]) for rule in args.rules}
    winner = quality.best_listing(sel.values(), [sub])
    loco = {c: sub.choose(quality.classes_objective(c), args.rules) for c in sub.present}
    return {"ev": sub, "winner": winner, "loco": loco}


def headline(r: dict) -> dict:
    ev = r["ev"]
    stats, rule, obj = r["winner"]
    x = ev.run(stats, rule)
    held = {c: ev.run(*r["loco"][c][:2])["class"][c] for c in ev.present}
    return {"winner": f"{rule}: {'+'.join(stats)}", "synthetic": obj, "all": x["all"], "min class": min(x["class"].values()),
            "mean class": float(np.mean(list(x["class"].values()))), "LOCO min": min(held.values()),
            "LOCO mean": float(np.mean(list(held.values()))), "listed": x["listed"], "fdr": x["fdr"], "held": held}


def ebm_figure(det, images: np.ndarray, path: str, n: int = 16, seed: int = 0) -> None:
    """What the detector's EBM calls normal: `n` latents drawn from it by Langevin chains, decoded
    and mapped back to counts, beside `n` real cutouts, as colour composites."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from infra.gallery import composite

    b = det._bundle
    with torch.no_grad():
        z = b.parts["ebm"].sample(n, steps=500, step_size=0.01, seed=seed)
        drawn = b.normaliser.inverse(b.net.decode(z)).cpu().numpy()
    real = images[np.random.default_rng(seed).choice(len(images), n, replace=False)]
    fig, axes = plt.subplots(4, 8, figsize=(12, 6.4))
    for k, ax in enumerate(axes.ravel()):
        row, col = divmod(k, 8)
        i = (row * 4 + col % 4) % n
        img = drawn[i] if col < 4 else real[i]
        ax.imshow(composite(img, det.bands, reference=real[i]), origin="lower", interpolation="nearest")
        ax.set_axis_off()
    axes[0, 1].set_title("drawn from the EBM (Langevin), decoded", fontsize=10, loc="left")
    axes[0, 5].set_title("real training cutouts", fontsize=10, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main() -> None:
    args = parse_args()
    threads = set_threads(args.threads)
    print(machine_line() + f"; torch threads {threads}")
    with bench_home("methods") as home:
        where = Path(args.cache) if args.cache else home
        where.mkdir(parents=True, exist_ok=True)
        heads, singles = {}, {}
        for seed in args.seeds:
            for rep in args.representations:
                kept: dict = {}
                quality.fit_detector = fit_with(rep, args, kept)
                with Timer() as t:
                    r = quality.run_seed(seed, args, home, where)
                print(f"seed {seed} {rep}: protocol run in {t.seconds:.0f} s; timings "
                      + ", ".join(f"{k} {fmt(v, '.0f')} s" for k, v in r["seconds"].items() if v is not None), flush=True)
                heads[(seed, rep)] = headline(r)
                singles[(seed, rep)] = r["singles"]
                if rep == "ae":
                    heads[(seed, "ae without EBM")] = headline(without(r, EBM_STATISTICS, args))
                    if args.figure:
                        from infra.store import SurveyStore

                        train = SurveyStore.open(kept["train_url"])
                        ebm_figure(kept["detector"], train.read_rows(np.arange(min(256, train.n))), args.figure, seed=seed)
                        print(f"wrote {args.figure}")

        rows = [[f"seed {s} {rep}", h["winner"], h["all"], h["min class"], h["mean class"], h["LOCO min"], h["LOCO mean"],
                 h["listed"], h["fdr"]] for (s, rep), h in heads.items()]
        print_table(rows, ["detector", "class-free winner", "all", "min class", "mean class", "LOCO min", "LOCO mean",
                           "listed", "FDR"], "Protocol headline per detector (bench/quality.py's selection)")
        present = sorted(next(iter(heads.values()))["held"])
        rows = [[f"seed {s} {rep}", *[h["held"][c] for c in present]] for (s, rep), h in heads.items()]
        print_table(rows, ["detector", *[c[:8] for c in present]], "AUROC of each held-out class (set and rule chosen on the others)")
        rows = []
        for (s, rep), sg in singles.items():
            for n in (*DENSITY, "G", "C", "AS"):
                if n in sg:
                    rows.append([f"seed {s} {rep}: {n}", sg[n]["all"], min(sg[n][c] for c in present if c in sg[n]),
                                 *[sg[n].get(c, float("nan")) for c in present]])
        print_table(rows, ["statistic", "all", "min", *[c[:8] for c in present]], "Single statistics: densities and residuals")
        line = " | ".join(f"{rep} s{s}: LOCO min {h['LOCO min']:.3f} mean {h['LOCO mean']:.3f}" for (s, rep), h in heads.items())
        print(f"methods: {line}")


if __name__ == "__main__":
    main()
