"""The WGAN-GP with an encoder: the critic's known answer (the Wasserstein distance), the gradient
penalty, seeded training, and the GAN as a Detector's representation with critic-feature statistics."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from gsafe_models.detector import Detector, DetectorConfig
from gsafe_models.gan import Critic, EncodedWGAN, fit_gan, gradient_penalty
from gsafe_models.nets import build_representation
from gsafe_models.normalise import BandNormaliser
from gsafe_models.simulate import simulate_batch

SHAPE = (3, 16, 16)


@pytest.fixture(scope="module")
def cutouts() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    train = simulate_batch(0, 192, size=16, bands=("g", "r", "i"), anomaly_frac=0.0).images
    test = simulate_batch(192, 32, size=16, bands=("g", "r", "i"), anomaly_frac=0.5)
    return train, test.images, test.label


def test_shapes_of_every_part():
    gan = EncodedWGAN(SHAPE, 6, channels=(8, 16))
    x, mask = torch.randn(5, *SHAPE), torch.ones(5, *SHAPE)
    x_hat, z = gan(x, mask)
    assert x_hat.shape == x.shape and z.shape == (5, 6)
    assert gan.critic(x, mask).shape == (5,)
    assert [f.shape for f in gan.features(x, mask)] == [(5, 8, 8, 8), (5, 16, 4, 4)]
    loss, parts = gan.loss(x, mask)
    assert loss.ndim == 0 and set(parts) == {"mse", "critic_features"}


def test_gradient_penalty_of_a_linear_critic_is_known():
    # D(x) = w . x has gradient w everywhere: the penalty is (|w| - 1)^2 whatever the interpolates
    w = torch.full((1, 1, 4, 4), 0.75)  # |w| = 0.75 * 4 = 3
    critic = lambda x, m: (w * x).flatten(1).sum(1)  # noqa: E731
    gp = gradient_penalty(critic, torch.randn(8, 1, 4, 4), torch.randn(8, 1, 4, 4), torch.ones(8, 1, 4, 4))
    torch.testing.assert_close(gp, torch.tensor(4.0))


def test_critic_with_gradient_penalty_estimates_the_wasserstein_distance():
    # real cutouts are one constant image, fakes another: W1 = d = |a - b|_2 (8 x 8 pixels of 0.25: 2.0).
    # The penalty is soft: the best critic's slope s along the segment maximises d s - lambda (s - 1)^2,
    # s = 1 + d / (2 lambda), so its estimate is d (1 + d / (2 lambda)) = 2.2 at lambda = 10.
    torch.manual_seed(0)
    critic = Critic((1, 8, 8), (8, 16))
    opt = torch.optim.Adam(critic.parameters(), lr=1e-3, betas=(0.5, 0.9))
    real, fake, mask = torch.full((32, 1, 8, 8), 0.25), torch.zeros(32, 1, 8, 8), torch.ones(32, 1, 8, 8)
    for _ in range(400):
        loss = critic(fake, mask).mean() - critic(real, mask).mean() + 10 * gradient_penalty(critic, real, fake, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        estimate = float(critic(real, mask).mean() - critic(fake, mask).mean())
    assert abs(estimate - 2.2) < 0.1


def test_fit_gan_is_seeded_and_reports_both_stages(cutouts):
    train = cutouts[0]
    norm = BandNormaliser(3).fit(train)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        gan = EncodedWGAN(SHAPE, 4, channels=(8, 16))
        history = fit_gan(gan, norm, lambda: [train[:96], train[96:]], epochs=2, seed=1, n_critic=2, device="cpu")
        runs.append((gan, history))
    (a, ha), (b, hb) = runs
    assert [h["stage"] for h in ha] == ["wgan", "wgan", "encoder", "encoder"]
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(v, w), k


def test_gan_detector_scores_with_the_critics_features_and_round_trips(cutouts):
    train, test, label = cutouts
    cfg = DetectorConfig(representation="gan", epochs=2, latent_dim=4, channels=(8, 16), statistics=("G", "C", "AS"))
    det = Detector.fit(lambda: [train[:96], train[96:160]], lambda: [train[160:]], config=cfg)
    assert isinstance(det._bundle.net, EncodedWGAN)
    out = det.score(test)
    assert out["score"].shape == (len(test),) and np.isfinite(out["stat_AS"]).all()
    back = Detector.from_bytes(det.to_bytes())
    np.testing.assert_allclose(back.score(test)["score"], out["score"])
    # C reads the critic: new critic weights change C and leave the pixel residual G alone
    other = copy.deepcopy(back)
    torch.manual_seed(5)
    other._bundle.net.critic = Critic(SHAPE, (8, 16))
    s_old, s_new = back.statistics(test), other.statistics(test)
    np.testing.assert_allclose(s_new["G"], s_old["G"])
    assert not np.allclose(s_new["C"], s_old["C"])


def test_build_representation_knows_the_gan():
    gan = EncodedWGAN(SHAPE, 4, channels=(8, 16), kappa=0.5)
    rebuilt = build_representation(gan.config())
    assert isinstance(rebuilt, EncodedWGAN) and rebuilt.kappa == 0.5
    rebuilt.load_state_dict(gan.state_dict())
