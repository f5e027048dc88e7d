"""The latent energy-based model against a density whose log-probability is known: a 2-D Gaussian mixture."""

from __future__ import annotations

import math

import pytest
import torch

from scipy.stats import spearmanr

from gsafe_models.ebm import LatentEBM

MEANS = torch.tensor([[-2.0, 0.0], [2.0, 1.0], [0.0, -2.5]])
SCALES = torch.tensor([[0.6, 0.4], [0.5, 0.8], [0.9, 0.3]])


def mixture(n: int, seed: int, widen: float = 1.0) -> torch.Tensor:
    """`n` draws of the three-component mixture, each component's scale times `widen`."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randint(3, (n,), generator=g)
    return MEANS[k] + widen * SCALES[k] * torch.randn(n, 2, generator=g)


def log_prob(x: torch.Tensor) -> torch.Tensor:
    comp = -0.5 * ((x[:, None] - MEANS[None]) / SCALES[None]).square().sum(-1) - SCALES.log().sum(-1)[None] - math.log(2 * math.pi)
    return torch.logsumexp(comp, 1) - math.log(3)


@pytest.fixture(scope="module")
def fitted() -> tuple[LatentEBM, torch.Tensor]:
    x = mixture(2000, seed=0)
    return LatentEBM(2, hidden=(64, 64)).fit(x, steps=1000, seed=0), x


def test_energy_ranks_points_like_the_true_log_density(fitted):
    ebm, _ = fitted
    # the mixture's own draws and draws twice as wide, so the tails are ranked too
    x = torch.cat([mixture(500, seed=1), mixture(500, seed=2, widen=2.0)])
    with torch.no_grad():
        rho = spearmanr(-ebm.energy(x).numpy(), log_prob(x).numpy()).statistic
    assert rho > 0.9


def test_langevin_samples_match_the_data_moments(fitted):
    ebm, x = fitted
    s = ebm.sample(2000, steps=800, step_size=0.01, seed=0)
    assert s.shape == (2000, 2)
    torch.testing.assert_close(s.mean(0), x.mean(0), atol=0.3, rtol=0)
    torch.testing.assert_close(torch.cov(s.T).diagonal(), torch.cov(x.T).diagonal(), rtol=0.25, atol=0)


def test_energy_gradient_matches_finite_differences():
    ebm = LatentEBM(3, hidden=(8,)).double()
    z = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: ebm.energy(v), (z,))


def test_fit_is_seeded_and_state_dict_round_trips():
    z = torch.randn(300, 4) * torch.tensor([1.0, 2.0, 0.5, 3.0]) + 1
    a = LatentEBM(4, hidden=(16,)).fit(z, steps=30, seed=3)
    b = LatentEBM(4, hidden=(16,)).fit(z, steps=30, seed=3)
    torch.testing.assert_close(a.energy(z[:10]), b.energy(z[:10]))
    c = LatentEBM(**a.config())
    c.load_state_dict(a.state_dict())
    torch.testing.assert_close(c.energy(z[:10]), a.energy(z[:10]))
    assert len(a.history) >= 2 and {"energy_data", "energy_chains", "temperature"} <= set(a.history[0])


def test_spectral_normalisation_is_an_option_that_survives_a_rebuild():
    ebm = LatentEBM(2, hidden=(8, 8), spectral=True)
    rebuilt = LatentEBM(**ebm.config())
    rebuilt.load_state_dict(ebm.state_dict())
    z = torch.randn(5, 2)
    torch.testing.assert_close(rebuilt.energy(z), ebm.energy(z))


def test_bad_latents_are_refused_with_a_clear_message():
    with pytest.raises(ValueError, match=r"expected \(N, 2\)"):
        LatentEBM(2).energy(torch.zeros(3, 5))
    with pytest.raises(ValueError, match="finite"):
        LatentEBM(2).fit(torch.tensor([[0.0, float("nan")], [1.0, 1.0]]), steps=1)


def test_latents_on_a_thin_subspace_get_a_gaussian_energy_off_it():
    # 3-D latents that live on a line (plus 1e-6 jitter): one principal direction; leaving it costs
    g = torch.Generator().manual_seed(0)
    t = torch.randn(800, 1, generator=g)
    z = torch.cat([t, 2 * t, -t], 1) + 1e-6 * torch.randn(800, 3, generator=g)
    ebm = LatentEBM(3, hidden=(16,)).fit(z, steps=200, seed=0)
    assert int(ebm.keep.sum()) == 1
    on, off = torch.tensor([[0.5, 1.0, -0.5]]), torch.tensor([[0.5, 1.0, 0.5]])
    with torch.no_grad():
        assert float(ebm.energy(off)) > float(ebm.energy(on)) + 100
    s = ebm.sample(200, steps=200, seed=1)
    torch.testing.assert_close(s[:, 1], 2 * s[:, 0], atol=1e-3, rtol=0)  # samples stay on the line
