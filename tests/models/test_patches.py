"""The patch density: its scores against the explicit patch computation, gradients, masks."""

import math

import pytest
import torch
import torch.nn.functional as F

from gsafe_models.patches import PatchDensity


@pytest.fixture(scope="module")
def density():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 2, 16, 16, generator=g) * 0.3
    x[:, :, 6:10, 6:10] += 1.0  # a "galaxy" in the middle of every cutout
    return PatchDensity(2, patch=5, components=4, gmm_components=(1, 2)).fit(x, torch.ones_like(x), seed=0), x


def _explicit(pd, x, mask, scale):
    """The definition: every patch copied out, centred, projected, the rest outside the axes."""
    v, ok = pd._patches(x.double(), mask.double(), scale)
    mean, basis = getattr(pd, f"mean{scale}"), getattr(pd, f"basis{scale}")
    c = v - mean
    coef = c @ basis.T
    rest = (c - coef @ basis).square().sum(-1) / (2 * getattr(pd, f"rest_var{scale}"))
    nll = -pd.gmms[str(scale)].log_prob(coef.reshape(-1, coef.shape[-1])).view(v.shape[:2]) + rest
    return nll.masked_fill(~ok, -math.inf)


@pytest.mark.parametrize("scale", [1, 2])
def test_scores_equal_the_explicit_patch_density(density, scale):
    pd, x = density
    y = x[:8].clone()
    y[3, 1, 2:4, 9:12] += 4.0  # an anomaly: its patches are far outside the principal axes
    mask = torch.ones_like(y)
    mask[5, :, :3] = 0  # missing rows: those patches are invalid
    got, want = pd.scores(y.double(), mask.double(), scale), _explicit(pd, y, mask, scale)
    assert torch.equal(torch.isinf(got), torch.isinf(want)) and torch.isinf(got[5]).any() and not torch.isinf(got[0]).any()
    fin = torch.isfinite(want)
    torch.testing.assert_close(got[fin], want[fin], rtol=1e-9, atol=1e-9)
    assert got[3].amax() > got[0].amax() + 10


def test_scores_are_differentiable_in_the_pixels(density):
    pd, x = density
    y = x[:2].double().clone().requires_grad_(True)
    mask = torch.ones_like(y)
    torch.autograd.gradcheck(lambda t: pd.scores(t, mask, 1).sum(), (y,), eps=1e-6, atol=1e-5)


def test_a_cutout_without_a_valid_patch_scores_as_its_floor_not_nan(density):
    pd, x = density
    mask = torch.ones_like(x[:2])
    mask[1] = 0
    f = pd.features(x[:2], mask)
    assert torch.isfinite(f).all() and f.shape == (2, 4)
