"""Faithfulness metrics: known answers on toy detectors and hand-computed maps."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from scipy.stats import spearmanr

from gsafe_models.explain import integrated_gradients
from gsafe_models.faithfulness import (
    curve_auc,
    deletion_curve,
    insertion_curve,
    pixel_importance,
    pointing_game,
    randomization_check,
    randomize_weights,
    spearman,
)
B, H, W = 2, 16, 16


def toy_survey(n: int, seed: int, with_source: bool = True) -> torch.Tensor:
    """Empty sky (noise) cutouts (n, B, H, W), each with one point source at a random place."""
    g = torch.Generator().manual_seed(seed)
    images = 0.1 * torch.randn(n, B, H, W, generator=g)
    if with_source:
        yy, xx = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
        for i in range(n):
            cy, cx = torch.randint(2, H - 2, (2,), generator=g)
            images[i] += 2 * torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 2.0)
    return images


def score_fn(x: torch.Tensor) -> torch.Tensor:
    """Toy detector: the sky is normal, the score is the cutout's energy, (n,)."""
    return x.pow(2).flatten(1).sum(1)


def impute_fn(x: torch.Tensor) -> torch.Tensor:
    """The toy generative model imputes empty sky."""
    return torch.zeros_like(x)


@pytest.fixture(scope="module")
def survey():
    x = toy_survey(6, seed=11)
    baseline = impute_fn(x)
    good = integrated_gradients(score_fn, x, baseline, n_steps=16)
    bad = torch.rand(6, H, W, generator=torch.Generator().manual_seed(0))
    return x, baseline, good, bad


def test_deletion_curve_runs_from_the_cutout_to_the_baseline(survey):
    x, baseline, good, _ = survey
    curve = deletion_curve(score_fn, x, baseline, good, steps=10)
    assert curve.shape == (6, 11)
    torch.testing.assert_close(curve[:, 0], score_fn(x))
    torch.testing.assert_close(curve[:, -1], score_fn(baseline))
    normed = deletion_curve(score_fn, x, baseline, good, steps=10, normalize=True)
    torch.testing.assert_close(normed[:, 0], torch.ones(6))
    torch.testing.assert_close(normed[:, -1], torch.zeros(6))


def test_deletion_drops_faster_for_a_good_attribution_than_a_random_one(survey):
    x, baseline, good, bad = survey
    auc_good = curve_auc(deletion_curve(score_fn, x, baseline, good, normalize=True))
    auc_bad = curve_auc(deletion_curve(score_fn, x, baseline, bad, normalize=True))
    assert bool((auc_good < auc_bad - 0.2).all())


def test_insertion_rises_faster_for_a_good_attribution_than_a_random_one(survey):
    x, baseline, good, bad = survey
    curve = insertion_curve(score_fn, x, baseline, good, normalize=True)
    torch.testing.assert_close(curve[:, 0], torch.zeros(6))
    torch.testing.assert_close(curve[:, -1], torch.ones(6))
    auc_bad = curve_auc(insertion_curve(score_fn, x, baseline, bad, normalize=True))
    assert bool((curve_auc(curve) > auc_bad + 0.2).all())


def test_curves_treat_missing_pixels_as_imputed(survey):
    x, baseline, good, _ = survey
    holey = x.clone()
    holey[:, :, :2, :] = float("nan")
    curve = deletion_curve(score_fn, holey, baseline, good, steps=4)
    assert torch.isfinite(curve).all()


def test_curve_auc_is_the_trapezoid_area():
    curves = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.5, 1.0]])
    torch.testing.assert_close(curve_auc(curves), torch.tensor([1.0, 0.25, 0.5]))


def test_pixel_importance_sums_absolute_attribution_over_bands():
    attr = torch.tensor([[[[1.0, -2.0]], [[-3.0, 4.0]]]])  # (1, 2, 1, 2)
    torch.testing.assert_close(pixel_importance(attr), torch.tensor([[[4.0, 6.0]]]))


def test_pointing_game_share_equals_the_hand_computed_mass():
    attr = torch.zeros(2, 2, 4, 4)
    attr[0, 0, 0, 0] = 3.0  # inside
    attr[0, 1, 0, 1] = -1.0  # inside, counts by magnitude
    attr[0, 0, 3, 3] = 4.0  # outside, and the maximum
    attr[1, 0, 2, 2] = 1.0
    footprint = torch.zeros(2, 4, 4, dtype=torch.bool)
    footprint[0, 0, :2] = True
    game = pointing_game(attr, footprint)  # object 1 has no footprint: a normal object
    assert math.isclose(float(game.share[0]), 4.0 / 8.0)
    assert not bool(game.hit[0])
    assert math.isnan(float(game.share[1])) and not bool(game.hit[1])
    footprint[0, 3, 3] = True
    game = pointing_game(attr, footprint)
    assert math.isclose(float(game.share[0]), 1.0) and bool(game.hit[0])


def test_spearman_matches_scipy_with_ties():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 5, (3, 40), generator=g).float()
    b = a + torch.randn(3, 40, generator=g)
    want = [spearmanr(a[i], b[i]).statistic for i in range(3)]
    torch.testing.assert_close(spearman(a, b), torch.tensor(want, dtype=torch.float32))


class ToyDetector(nn.Module):
    """A conv autoencoder stand-in: score = squared residual of a 2-layer conv reconstruction."""


    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(B, 8, 5, padding=2), nn.Tanh(), nn.Conv2d(8, B, 5, padding=2))

    def score(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.net(x)).pow(2).flatten(1).sum(1)


def test_randomized_weights_change_the_maps_of_a_faithful_method():
    torch.manual_seed(0)
    det = ToyDetector()
    x = toy_survey(8, seed=5)
    optimizer = torch.optim.Adam(det.parameters(), lr=1e-2)
    for _ in range(60):  # learn to reconstruct the normal template: a "trained" detector
        loss = det.score(toy_survey(16, seed=6, with_source=False)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def ig_of(model):
        return integrated_gradients(model.score, x, impute_fn(x), n_steps=8)

    rho_model = randomization_check(ig_of, det, seed=1)
    assert rho_model.shape == (8,)
    assert float(rho_model.mean()) < 0.8  # IG keeps some of the image (Adebayo et al.), yet it moves
    # a "method" blind to the model, an edge map of the image, fails the check: rho stays 1
    rho_blind = randomization_check(lambda model: (x - x.roll(1, dims=-1)).abs(), det, seed=1)
    torch.testing.assert_close(rho_blind, torch.ones(8))


def test_randomize_weights_copies_and_is_seeded():
    det = ToyDetector()
    before = {k: v.clone() for k, v in det.state_dict().items()}
    a, b = randomize_weights(det, seed=3), randomize_weights(det, seed=3)
    for k, v in det.state_dict().items():
        torch.testing.assert_close(v, before[k])
        torch.testing.assert_close(a.state_dict()[k], b.state_dict()[k])
        assert not torch.equal(a.state_dict()[k], v)

    class Bare(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.arange(10.0))

    shuffled = randomize_weights(Bare(), seed=0).w.detach()
    assert not torch.equal(shuffled, torch.arange(10.0))
    torch.testing.assert_close(shuffled.sort().values, torch.arange(10.0))
