"""LatentFlow: change of variables against autograd, normalisation, fit quality, reproducibility."""

import math

import pytest
import torch

from torch.autograd.functional import jacobian

from gsafe_models.flow import LatentFlow


def gaussian_sample(n: int = 1024, seed: int = 0) -> tuple[torch.Tensor, torch.distributions.MultivariateNormal]:
    loc = torch.tensor([2.0, -1.0])
    cov = torch.tensor([[4.0, 1.2], [1.2, 1.0]])
    mvn = torch.distributions.MultivariateNormal(loc, cov)
    torch.manual_seed(seed)
    return mvn.sample((n,)), mvn


@pytest.fixture(scope="module")
def fitted() -> tuple[LatentFlow, torch.Tensor, torch.distributions.MultivariateNormal]:
    z, mvn = gaussian_sample()
    flow = LatentFlow(2, transforms=3, hidden=(32, 32)).fit(z, epochs=60, lr=3e-3, batch_size=128, patience=10)
    return flow, z, mvn


def test_log_prob_is_base_density_plus_log_abs_det_jacobian():
    torch.manual_seed(0)
    flow = LatentFlow(3, transforms=3, hidden=(16, 16)).double()
    flow.mean = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    flow.std = torch.tensor([2.0, 0.5, 1.5], dtype=torch.float64)
    # Perturb the untrained flow so the transforms are far from the identity.
    with torch.no_grad():
        for p in flow.flow.parameters():
            p.add_(0.3 * torch.randn_like(p))

    transform = flow.flow().transform  # standardised latent -> base noise

    def to_base(z: torch.Tensor) -> torch.Tensor:
        return transform((z - flow.mean) / flow.std)

    base = torch.distributions.Normal(0.0, 1.0)
    z = torch.randn(5, 3, dtype=torch.float64)
    for zi, lp in zip(z, flow.log_prob(z)):
        J = jacobian(to_base, zi)
        expected = base.log_prob(to_base(zi)).sum() + torch.linalg.slogdet(J).logabsdet
        assert lp.item() == pytest.approx(expected.item(), abs=1e-9)


def test_density_integrates_to_one_on_grid(fitted):
    flow, _, _ = fitted
    x = torch.linspace(-8, 12, 201)
    y = torch.linspace(-6, 4, 101)
    grid = torch.cartesian_prod(x, y)
    with torch.no_grad():
        mass = flow.log_prob(grid).exp().sum() * (x[1] - x[0]) * (y[1] - y[0])
    assert mass.item() == pytest.approx(1.0, abs=0.03)


def test_fit_approaches_true_log_likelihood(fitted):
    flow, _, mvn = fitted
    fresh, _ = gaussian_sample(4096, seed=1)
    with torch.no_grad():
        model = flow.log_prob(fresh).mean().item()
    truth = mvn.log_prob(fresh).mean().item()
    # Entropy of this Gaussian is ~3.1 nats; a good fit is within a few hundredths.
    assert model == pytest.approx(truth, abs=0.05)
    assert model <= truth + 0.02  # no density beats the true one by much on fresh data


def test_standardisation_makes_log_prob_unit_aware(fitted):
    """Rescaling latents by c shifts log p by -D log c: the standardisation log-det is included."""
    flow, z, _ = fitted
    scaled = LatentFlow(**flow.config())
    scaled.load_state_dict(flow.state_dict())
    scaled.mean = flow.mean * 10
    scaled.std = flow.std * 10
    with torch.no_grad():
        torch.testing.assert_close(scaled.log_prob(10 * z), flow.log_prob(z) - 2 * math.log(10), rtol=0, atol=1e-4)


def test_training_is_reproducible_with_seed():
    z, _ = gaussian_sample(300)
    kwargs = dict(epochs=5, batch_size=64, seed=7)
    a = LatentFlow(2, transforms=2, hidden=(8,)).fit(z, **kwargs)
    torch.randn(100)  # global RNG use in between must not matter
    b = LatentFlow(2, transforms=2, hidden=(8,)).fit(z, **kwargs)
    with torch.no_grad():
        assert torch.equal(a.log_prob(z), b.log_prob(z))
    c = LatentFlow(2, transforms=2, hidden=(8,)).fit(z, **{**kwargs, "seed": 8})
    with torch.no_grad():
        assert not torch.equal(a.log_prob(z), c.log_prob(z))


def test_state_dict_round_trip_rebuilds_from_config(fitted):
    flow, z, _ = fitted
    clone = LatentFlow(**flow.config())
    clone.load_state_dict(flow.state_dict())
    with torch.no_grad():
        assert torch.equal(clone.log_prob(z), flow.log_prob(z))


def test_early_stopping_keeps_best_validation_epoch():
    z, _ = gaussian_sample(200)
    # A large learning rate on few points overfits quickly; patience stops the run early.
    flow = LatentFlow(2, transforms=2, hidden=(64, 64)).fit(z, epochs=500, lr=1e-2, batch_size=32, patience=3)
    history = flow.history
    best = min(range(len(history)), key=history.__getitem__)
    assert len(history) == best + 1 + 3 < 500
    val_nll = history[best]
    # The kept weights are those of the best epoch: recompute its validation NLL.
    perm = torch.randperm(200, generator=torch.Generator().manual_seed(0))
    val = z[perm[:20]]
    with torch.no_grad():
        nll = -(flow.log_prob(val) + flow.std.log().sum()).mean().item()
    assert nll == pytest.approx(val_nll, abs=1e-5)


def test_wrong_shape_is_refused():
    with pytest.raises(ValueError, match=r"expected \(N, 2\)"):
        LatentFlow(2).log_prob(torch.randn(4, 3))
