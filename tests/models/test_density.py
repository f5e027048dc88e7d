"""GaussianMixture: known answers against sklearn, EM recovery, BIC choice, state round trip."""

import numpy as np
import pytest
import torch

from sklearn.mixture import GaussianMixture as SkGaussianMixture

from gsafe_models.density import GaussianMixture


def three_clusters(n_per: int = 300, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centers = torch.tensor([[-6.0, 0.0], [6.0, 0.0], [0.0, 8.0]])
    z = torch.cat([c + 0.7 * torch.randn(n_per, 2, generator=g) for c in centers])
    return z, centers


def random_mixture(covariance_type: str, K: int = 3, D: int = 4, seed: int = 0) -> GaussianMixture:
    g = torch.Generator().manual_seed(seed)
    gmm = GaussianMixture(K, D, covariance_type=covariance_type)
    weights = torch.rand(K, generator=g, dtype=torch.float64) + 0.2
    gmm.weights = weights / weights.sum()
    gmm.means = 3 * torch.randn(K, D, generator=g, dtype=torch.float64)
    if covariance_type == "full":
        A = torch.randn(K, D, D, generator=g, dtype=torch.float64)
        cov = A @ A.transpose(1, 2) + 0.5 * torch.eye(D, dtype=torch.float64)
        gmm.scale_tril = torch.linalg.cholesky(cov)
    else:
        gmm.variances = torch.rand(K, D, generator=g, dtype=torch.float64) * 2 + 0.1
    return gmm


@pytest.mark.parametrize("covariance_type", ["full", "diag"])
def test_log_prob_matches_sklearn_score_samples(covariance_type):
    gmm = random_mixture(covariance_type)
    sk = SkGaussianMixture(gmm.n_components, covariance_type=covariance_type)
    sk.weights_ = gmm.weights.numpy()
    sk.means_ = gmm.means.numpy()
    if covariance_type == "full":
        L = gmm.scale_tril.numpy()
        sk.covariances_ = L @ L.transpose(0, 2, 1)
        sk.precisions_cholesky_ = np.linalg.inv(L).transpose(0, 2, 1)
    else:
        sk.covariances_ = gmm.variances.numpy()
        sk.precisions_cholesky_ = 1 / np.sqrt(sk.covariances_)

    z = 4 * torch.randn(500, gmm.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    np.testing.assert_allclose(gmm.log_prob(z).numpy(), sk.score_samples(z.numpy()), rtol=1e-10, atol=1e-10)


def test_log_prob_keeps_float32_dtype():
    gmm = random_mixture("full")
    z = torch.randn(10, gmm.dim)
    lp = gmm.log_prob(z)
    assert lp.dtype == torch.float32
    torch.testing.assert_close(lp, gmm.log_prob(z.double()).float())


@pytest.mark.parametrize("covariance_type", ["full", "diag"])
def test_em_recovers_separated_clusters(covariance_type):
    z, centers = three_clusters()
    gmm = GaussianMixture(3, 2, covariance_type=covariance_type).fit(z)

    order = torch.cdist(centers.double(), gmm.means).argmin(1)
    assert sorted(order.tolist()) == [0, 1, 2]
    torch.testing.assert_close(gmm.means[order], centers.double(), atol=0.15, rtol=0)
    torch.testing.assert_close(gmm.weights, torch.full((3,), 1 / 3, dtype=torch.float64), atol=0.02, rtol=0)
    var = gmm.scale_tril.diagonal(dim1=1, dim2=2).square() if covariance_type == "full" else gmm.variances
    torch.testing.assert_close(var, torch.full_like(var, 0.49), atol=0.12, rtol=0)
    assert bool(gmm.converged)


def test_em_log_likelihood_close_to_sklearn_fit():
    z, _ = three_clusters()
    ours = GaussianMixture(3, 2).fit(z)
    sk = SkGaussianMixture(3, random_state=0).fit(z.numpy())
    assert ours.log_prob(z).mean().item() == pytest.approx(sk.score(z.numpy()), abs=1e-3)


@pytest.mark.parametrize("covariance_type", ["full", "diag"])
def test_bic_picks_true_number_of_components(covariance_type):
    z, _ = three_clusters()
    gmm = GaussianMixture.fit_bic(z, components=(1, 2, 3, 4, 8), covariance_type=covariance_type)
    assert gmm.n_components == 3


def test_bic_matches_sklearn_bic_for_same_fit():
    z, _ = three_clusters()
    gmm = GaussianMixture(3, 2).fit(z)
    sk = SkGaussianMixture(3, random_state=0).fit(z.numpy())
    # Same parameter count, same (near) likelihood -> same BIC.
    assert gmm.bic(z) == pytest.approx(sk.bic(z.numpy()), rel=1e-5)


@pytest.mark.parametrize("covariance_type", ["full", "diag"])
def test_state_dict_round_trip_rebuilds_from_config(covariance_type):
    z, _ = three_clusters()
    gmm = GaussianMixture(3, 2, covariance_type=covariance_type).fit(z)

    clone = GaussianMixture(**gmm.config())
    clone.load_state_dict(gmm.state_dict())
    assert torch.equal(clone.log_prob(z), gmm.log_prob(z))
    assert "covariance_type='%s'" % covariance_type in repr(clone)


def test_fit_is_deterministic_with_seed():
    z, _ = three_clusters()
    a = GaussianMixture(4, 2).fit(z, seed=3)
    b = GaussianMixture(4, 2).fit(z, seed=3)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


def test_log_prob_integrates_to_one_on_grid():
    z, _ = three_clusters(n_per=100)
    gmm = GaussianMixture(3, 2).fit(z)
    axis = torch.linspace(-12, 12, 301, dtype=torch.float64)
    grid = torch.cartesian_prod(axis, torch.linspace(-6, 14, 251, dtype=torch.float64))
    cell = (axis[1] - axis[0]) * (20 / 250)
    assert (gmm.log_prob(grid).exp().sum() * cell).item() == pytest.approx(1.0, abs=1e-3)


def test_fit_rejects_wrong_shape_and_non_finite():
    gmm = GaussianMixture(2, 3)
    with pytest.raises(ValueError, match=r"expected \(N, 3\)"):
        gmm.fit(torch.randn(10, 2))
    z = torch.randn(10, 3)
    z[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        gmm.fit(z)


def test_unknown_covariance_type_is_refused():
    with pytest.raises(ValueError, match="covariance_type"):
        GaussianMixture(2, 2, covariance_type="tied")
