"""DupLEX: counterfactual normal versions from the generative model, and the importance maps built on them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gsafe_models.detector import Detector, DetectorConfig
from gsafe_models.explain import counterfactual_function, duplex, explain, latent_counterfactual
from gsafe_models.faithfulness import pointing_game
from gsafe_models.simulate import simulate_batch

B, H, W = 2, 16, 16


def template() -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    return torch.exp(-((yy - 8.0) ** 2 + (xx - 8.0) ** 2) / (2 * 2.5**2)).expand(B, H, W).clone()


T = template()


def decode(z: torch.Tensor) -> torch.Tensor:
    """A one-parameter generative model: the template at brightness z."""
    return z[:, :1, None, None] * T


def with_blob(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Templates at brightness 1 with noise 0.02 and a bright 2x2 blob at a random place (footprint)."""
    g = torch.Generator().manual_seed(seed)
    x = T + 0.02 * torch.randn(n, B, H, W, generator=g)
    foot = torch.zeros(n, H, W, dtype=torch.bool)
    for i in range(n):
        y0, x0 = (int(v) for v in torch.randint(5, 10, (2,), generator=g))  # on the object
        x[i, :, y0 : y0 + 2, x0 : x0 + 2] += 3.0
        foot[i, y0 : y0 + 2, x0 : x0 + 2] = True
    return x, foot


def test_counterfactual_ignores_the_anomaly_a_squared_error_follows():
    x, _ = with_blob(4, seed=0)
    ones = torch.ones_like(x)
    start = lambda x, m: torch.full((len(x), 1), 0.5)  # noqa: E731
    robust = latent_counterfactual(x, ones, start, decode, torch.full((B,), 0.02), steps=300, lr=0.02)
    gaussian = latent_counterfactual(x, ones, start, decode, torch.full((B,), 0.02), steps=300, lr=0.02, dof=1e6)
    brightness = lambda img: float((img * T).sum() / T.square().sum())  # noqa: E731
    for i in range(4):
        assert abs(brightness(robust[i]) - 1.0) < 0.02               # the normal object under the blob
        assert abs(brightness(gaussian[i]) - brightness(x[i])) < 0.01  # least squares: pulled up by it
        assert brightness(x[i]) > 1.2


def test_latent_prior_pulls_the_counterfactual_as_a_map_estimate_should():
    # Gaussian likelihood (dof -> inf) and a Gaussian prior on the brightness: the MAP is known in closed form
    x = 0.8 * T[None]
    sigma, z0, tau = 0.5, 2.0, 0.1
    prior = lambda z: 0.5 * ((z[:, 0] - z0) / tau) ** 2  # noqa: E731
    cf = latent_counterfactual(x, torch.ones_like(x), lambda x, m: torch.ones(1, 1), decode, torch.full((B,), sigma),
                               prior=prior, steps=1500, lr=0.01, dof=1e8)
    a = float(T.square().sum()) / sigma**2
    expected = (a * 0.8 + z0 / tau**2) / (a + 1 / tau**2)
    assert abs(float(cf[0, 0, 8, 8]) / float(T[0, 8, 8]) - expected) < 0.01


def test_duplex_points_at_the_planted_blob():
    x, foot = with_blob(6, seed=1)
    score = lambda img: (img - T).square().flatten(1).sum(1)  # noqa: E731
    attr, cf = duplex(score, lambda img: T.expand_as(img).clone(), x, steps=60)
    assert attr.shape == x.shape and cf.shape == x.shape
    game = pointing_game(attr, foot)
    assert bool(game.hit.all()) and bool((game.share > 0.5).all())


@pytest.fixture(scope="module")
def detector_and_survey():
    bands = ("g", "r", "i")
    train = simulate_batch(0, 256, size=16, bands=bands, anomaly_frac=0.0).images
    survey = simulate_batch(256, 48, size=16, bands=bands, anomaly_frac=0.5)
    cfg = DetectorConfig(epochs=3, latent_dim=6, channels=(8, 16), statistics=("G", "energy_ebm"), augment=False)
    det = Detector.fit(lambda: [train[:96], train[96:192]], lambda: [train[192:]], config=cfg)
    return det, survey


def test_counterfactual_of_a_detector_is_more_normal_and_leaves_it_untouched(detector_and_survey):
    det, survey = detector_and_survey
    x = survey.images[survey.label == 1][:12].copy()
    x[0, 1, 2:4, 2:4] = np.nan
    before = {k: v.clone() for k, v in det._bundle.state_dict().items()}
    cf = counterfactual_function(det, steps=60)(torch.as_tensor(x))
    assert cf.shape == x.shape and torch.isfinite(cf).all()
    for k, v in det._bundle.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.requires_grad for p in det._bundle.net.parameters())
    # the detector finds the counterfactuals more normal than the anomalies they stand for
    s_x, s_cf = det.statistics(x)["G"], det.statistics(cf.numpy())["G"]
    assert np.median(s_cf) < np.median(s_x)


def test_explain_duplex_on_a_detector(detector_and_survey):
    det, survey = detector_and_survey
    x = torch.as_tensor(survey.images[:4])
    attr = explain("duplex", det.score_function(), det.impute_function(), x,
                   counterfactual_fn=counterfactual_function(det, steps=20))
    assert attr.shape == x.shape and torch.isfinite(attr).all()
