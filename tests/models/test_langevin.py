"""Langevin dynamics against known stationary laws: Gaussian targets, the circle constraint's arcsine law."""

from __future__ import annotations

import math

import pytest
import torch

from gsafe_models.langevin import ConstrainedLangevin, langevin_sample


def test_ula_samples_a_gaussian_with_the_right_moments():
    # E(x) = 0.5 (x - m)^T diag(1/s^2) (x - m): ULA's stationary law is N(m, s^2 / (1 - alpha / (2 s^2)))
    m, s = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 2.0])
    g = torch.Generator().manual_seed(0)
    x = langevin_sample(lambda x: 0.5 * ((x - m) / s).square().sum(1), torch.zeros(4000, 2), 2000, 0.02, generator=g)
    torch.testing.assert_close(x.mean(0), m, atol=0.1, rtol=0)
    expected = s**2 / (1 - 0.02 / (2 * s**2))
    torch.testing.assert_close(x.var(0), expected, rtol=0.08, atol=0)


def test_ula_is_seeded_and_leaves_the_energy_untouched():
    lin = torch.nn.Linear(3, 1)
    energy = lambda x: lin(x)[:, 0].square()  # noqa: E731
    a = langevin_sample(energy, torch.ones(5, 3), 10, 0.1, generator=torch.Generator().manual_seed(1))
    b = langevin_sample(energy, torch.ones(5, 3), 10, 0.1, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == (5, 3)
    assert lin.weight.grad is None and not a.requires_grad


def test_unconstrained_langevin_weights_follow_the_boltzmann_law_of_a_quadratic_loss():
    # L = k/2 sum w^2 at temperature tau: each weight ~ N(0, tau / k), exactly for BAOAB on a harmonic well
    torch.manual_seed(0)
    k, tau = 4.0, 0.02
    w = torch.nn.Parameter(torch.zeros(4000))
    opt = ConstrainedLangevin([w], lr=0.2, momentum=0.8, temperature=tau, precondition=False)
    draws = []
    for step in range(1500):
        opt.zero_grad()
        (0.5 * k * w.square().sum()).backward()
        opt.step()
        if step >= 500 and step % 50 == 0:
            draws.append(w.detach().clone())
    var = torch.stack(draws).var()
    assert abs(float(var) / (tau / k) - 1) < 0.05


def test_preconditioned_langevin_keeps_the_boltzmann_law_of_a_quadratic_loss():
    # the RMSprop mass settles to a constant on a stationary chain, so the law is again N(0, tau / k)
    torch.manual_seed(1)
    k, tau = 4.0, 0.02
    w = torch.nn.Parameter(torch.randn(4000) * (tau / k) ** 0.5)  # at w = 0 the gradient, and the mass, would be 0
    opt = ConstrainedLangevin([w], lr=0.05, momentum=0.8, temperature=tau)
    draws = []
    for step in range(3000):
        opt.zero_grad()
        (0.5 * k * w.square().sum()).backward()
        opt.step()
        if step >= 1500 and step % 50 == 0:
            draws.append(w.detach().clone())
    assert abs(float(torch.stack(draws).var()) / (tau / k) - 1) < 0.15


def test_circle_constraint_holds_and_gives_the_arcsine_law_without_a_loss():
    # no loss: the arclength diffuses freely, w = r cos(s / r) follows the arcsine law, E[w^2] = r^2 / 2
    torch.manual_seed(0)
    r = 0.5
    w = torch.nn.Parameter(torch.zeros(50, 40))
    opt = ConstrainedLangevin([w], lr=0.2, momentum=0.8, temperature=1.0, radius=r, precondition=False)
    for _ in range(1500):
        opt.zero_grad()
        (0.0 * w.sum()).backward()
        opt.step()
        assert float(w.detach().abs().max()) <= r + 1e-6
    assert abs(float(w.detach().square().mean()) / (r**2 / 2) - 1) < 0.1


def test_cold_constrained_langevin_descends_to_the_minimum_inside_the_constraint():
    torch.manual_seed(0)
    target = torch.tensor([[0.2, -0.3], [0.9, -0.9]])  # two entries outside |w| <= 0.5
    w = torch.nn.Parameter(torch.zeros(2, 2))
    opt = ConstrainedLangevin([w], lr=0.02, temperature=0.0, radius=0.5)
    for _ in range(500):
        opt.zero_grad()
        (w - target).square().sum().backward()
        opt.step()
    torch.testing.assert_close(w.detach(), target.clamp(-0.5, 0.5), atol=1e-3, rtol=0)


def test_bad_settings_are_refused_with_what_to_change():
    with pytest.raises(ValueError, match="momentum in"):
        ConstrainedLangevin([torch.nn.Parameter(torch.zeros(1))], momentum=1.0)
