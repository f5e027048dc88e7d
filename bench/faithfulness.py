"""Faithfulness of each explanation method on a simulated survey, where the truth is known.

Simulates a small survey with injected anomalies, trains a small Detector, explains the top
anomalies (and a few injected anomalies of every class) with each method, and prints per method:

- deletion / insertion AUC of the top anomalies' mean curve as pixels are swapped for a sample of
  the imputation, normalised (1 = their mean score, 0 = their imputations'; deletion: lower is
  better, insertion: higher), next to a random map's;
- the model-randomization check: Spearman rho between the maps of the trained detector and of one
  whose network weights are re-drawn (Adebayo et al., 2018; lower = the map depends on the model);
- the pointing game per anomaly class: the share of attribution mass inside the injected anomaly's
  footprint, the chance level (footprint area share) and the hit rate (max inside).

Runs with no arguments in a few minutes on 2 CPU cores:

    python bench/faithfulness.py [--survey 512] [--top-k 32] [--seed 0] [--classes 6]
"""

from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import torch

from gsafe_models.detector import Detector, DetectorConfig
from gsafe_models.explain import METHODS, LexSelector, counterfactual_function, explain, sample_imputation
from gsafe_models.faithfulness import (
    curve_auc,
    deletion_curve,
    insertion_curve,
    pointing_game,
    randomization_check,
)
from gsafe_models.simulate import ANOMALY_CLASSES, simulate_batch

SIZE = 32
BATCH = 64


def _batches(images: np.ndarray, shuffle_seed: int | None = None, size: int = BATCH):
    def factory():
        order = np.arange(len(images))
        if shuffle_seed is not None:
            np.random.default_rng(shuffle_seed).shuffle(order)
        for i in range(0, len(images), size):
            yield images[np.sort(order[i : i + size])]

    return factory


def _with_net(det: Detector, net: torch.nn.Module) -> Detector:
    # The same detector (normaliser, densities, calibration) around another network.
    bundle = copy.deepcopy(det._bundle)
    bundle.net = net
    clone = copy.copy(det)
    clone._bundle = bundle
    return clone


def _lex(det: Detector, survey: np.ndarray, epochs: int, n: int = 256) -> LexSelector:
    # Trained on (the first n cutouts of) the survey stream itself, no labels: the training split
    # holds no anomalies to keep. Every step back-propagates through the whole detector: the cost.
    selector = LexSelector(bands=survey.shape[1])
    batches = _batches(survey[:n], shuffle_seed=1, size=32)
    selector.fit(det.score_function(), det.impute_function(), lambda: (torch.as_tensor(b) for b in batches()),
                 epochs=epochs, seed=0)
    return selector


def _attribute(method: str, det: Detector, images: torch.Tensor, selector: LexSelector | None) -> torch.Tensor:
    out = []
    counterfactual = counterfactual_function(det) if method == "duplex" else None
    for chunk in images.split(32):
        out.append(explain(method, det.score_function(), det.impute_function(), chunk, selector=selector,
                           n_steps=16, window=8, stride=4, counterfactual_fn=counterfactual))
    return torch.cat(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=1024, help="normal training cutouts")
    parser.add_argument("--calib", type=int, default=256, help="normal calibration cutouts")
    parser.add_argument("--survey", type=int, default=512, help="survey cutouts (15%% injected anomalies)")
    parser.add_argument("--top-k", type=int, default=32, help="top anomalies to explain")
    parser.add_argument("--per-class", type=int, default=5, help="injected anomalies per class added for the pointing game")
    parser.add_argument("--check", type=int, default=8, help="cutouts in the randomization check")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--classes", type=int, default=len(ANOMALY_CLASSES),
                        help="inject only the first N anomaly classes (6: the simulator's classes before the nine added later)")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()

    sim = dict(seed=args.seed, size=SIZE)
    train = simulate_batch(0, args.train, anomaly_frac=0.0, **sim).images
    calib = simulate_batch(args.train, args.calib, anomaly_frac=0.0, **sim).images
    survey = simulate_batch(args.train + args.calib, args.survey, anomaly_frac=0.15, classes=ANOMALY_CLASSES[: args.classes], **sim)
    print(f"simulated {args.train} train, {args.calib} calib, {args.survey} survey cutouts "
          f"({survey.label.sum()} injected) of {survey.images.shape[1:]} in {time.perf_counter() - t0:.0f} s")

    t = time.perf_counter()
    config = DetectorConfig(epochs=args.epochs, latent_dim=16, channels=(16, 32), flow_epochs=30, batch_size=BATCH,
                            augment=False, seed=args.seed)
    det = Detector.fit(_batches(train, shuffle_seed=args.seed), _batches(calib), config=config)
    scores = det.score(survey.images)
    order = np.argsort(-scores["score"], kind="stable")
    top = order[: args.top_k]
    print(f"detector {config.statistics} trained in {time.perf_counter() - t:.0f} s; "
          f"top-{args.top_k} holds {survey.label[top].sum()} injected anomalies")

    extra: list[int] = []
    for c in ANOMALY_CLASSES:
        extra += [int(i) for i in order if survey.anomaly_class[i] == c and i not in set(top.tolist())][: args.per_class]
    rows = np.concatenate([top, np.asarray(extra, dtype=np.int64)])
    images = torch.as_tensor(survey.images[rows])
    footprint = torch.as_tensor(survey.footprint[rows]).bool()
    classes = survey.anomaly_class[rows]
    in_top = np.arange(len(rows)) < len(top)
    score_fn, impute_fn = det.score_function(), det.impute_function()
    with torch.no_grad():
        # Curves replace pixels by a sample of the imputation, not the noise-free reconstruction:
        # a smooth patch in a noisy cutout is an artefact the score notices (it can rise).
        torch.manual_seed(args.seed)
        baseline = sample_imputation(images, impute_fn(images))

    def auc(curve_fn, attribution) -> float:
        # Curves averaged over objects, then normalised (1 = the cutouts' mean score, 0 = their
        # imputations'): per-object normalisation explodes where a cutout scores like its imputation.
        curve = curve_fn(score_fn, images[in_top], baseline[in_top], attribution[in_top]).mean(0)
        start, end = (curve[-1], curve[0]) if curve_fn is deletion_curve else (curve[0], curve[-1])
        return float(curve_auc(((curve - start) / (end - start))[None])[0])

    g = torch.Generator().manual_seed(args.seed)
    random_map = torch.rand(images.shape[0], SIZE, SIZE, generator=g)
    random_del, random_ins = auc(deletion_curve, random_map), auc(insertion_curve, random_map)

    lex_epochs = 6
    results = {}
    # "lex" is LEX per instance; "lex_amortized" the one-pass selector it replaced, kept for the record
    for method in (*METHODS, "lex_amortized"):
        t = time.perf_counter()
        amortized = method == "lex_amortized"
        method = "lex" if amortized else method
        selector = _lex(det, survey.images, lex_epochs) if amortized else None
        attribution = _attribute(method, det, images, selector)
        seconds = time.perf_counter() - t
        deletion, insertion = auc(deletion_curve, attribution), auc(insertion_curve, attribution)
        check = images[in_top][: args.check]

        def attr_fn(net, method=method, amortized=amortized):
            other = _with_net(det, net)
            sel = _lex(other, survey.images, lex_epochs) if amortized else None
            return _attribute(method, other, check, sel)

        rho = randomization_check(attr_fn, det._bundle.net, seed=args.seed)
        game = pointing_game(attribution, footprint)
        method = "lex_amortized" if amortized else method
        results[method] = dict(deletion=deletion, insertion=insertion, rho=rho, game=game, seconds=seconds)

        print(f"\n== {method}  ({len(rows)} cutouts explained in {seconds:.1f} s)")
        print(f"   deletion AUC  {deletion:.3f}  (random map {random_del:.3f}; lower is better)")
        print(f"   insertion AUC {insertion:.3f}  (random map {random_ins:.3f}; higher is better)")
        print(f"   randomization rho {rho.nanmean():.3f} +- {rho[~rho.isnan()].std():.3f}  (trained vs re-drawn weights; lower is better)")
        print(f"   {'class':<16}{'n':>4}{'share':>8}{'chance':>8}{'hit':>7}")
        chance = footprint.float().mean((1, 2))
        for c in ANOMALY_CLASSES:
            sel = torch.as_tensor(classes == c)
            if sel.any():
                print(f"   {c:<16}{int(sel.sum()):>4}{game.share[sel].nanmean():>8.3f}{chance[sel].mean():>8.3f}"
                      f"{game.hit[sel].float().mean():>7.2f}")
        anomalous = torch.as_tensor(classes != "")
        print(f"   {'all injected':<16}{int(anomalous.sum()):>4}{game.share[anomalous].nanmean():>8.3f}"
              f"{chance[anomalous].mean():>8.3f}{game.hit[anomalous].float().mean():>7.2f}")

    short = {"integrated_gradients": "ig", "occlusion": "occ", "lex": "lex", "residual": "res", "duplex": "duplex",
             "lex_amortized": "lex-amortized"}
    parts = [
        f"{short[m]}: del {r['deletion']:.2f} ins {r['insertion']:.2f} "
        f"rho {r['rho'].nanmean():.2f} share {r['game'].share[torch.as_tensor(classes != '')].nanmean():.2f}"
        for m, r in results.items()
    ]
    print(f"\nsummary ({time.perf_counter() - t0:.0f} s; random map del {random_del:.2f} "
          f"ins {random_ins:.2f}): " + " | ".join(parts))


if __name__ == "__main__":
    main()
