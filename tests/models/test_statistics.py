"""Statistics on known answers: perfect reconstructions, symmetric images, scipy, autograd."""

import numpy as np
import pytest
import torch

from scipy.spatial.distance import mahalanobis as scipy_mahalanobis

from gsafe_models.density import GaussianMixture
from gsafe_models.flow import LatentFlow
from gsafe_models.statistics import (
    Mahalanobis,
    RaoScore,
    anomaly_score,
    aperture_fluxes,
    asymmetry,
    colours,
    concentration,
    feature_residual,
    peak_residual,
    per_sample_scores,
    rao_parameter_names,
    reconstruction_residual,
    typicality,
)


def test_reconstruction_residual_is_zero_for_a_perfect_reconstruction_and_rms_otherwise():
    x = torch.randn(3, 2, 8, 8)
    mask = torch.ones_like(x)
    assert torch.equal(reconstruction_residual(x, x, mask), torch.zeros(3))
    torch.testing.assert_close(reconstruction_residual(x, x + 0.5, mask), torch.full((3,), 0.5))


def test_reconstruction_residual_ignores_missing_pixels():
    x = torch.zeros(1, 1, 4, 4)
    x_hat = x.clone()
    x_hat[0, 0, 0, 0] = 100.0
    mask = torch.ones_like(x)
    mask[0, 0, 0, 0] = 0
    assert reconstruction_residual(x, x_hat, mask).item() == 0


def test_feature_residual_zero_for_equal_features_and_averages_layer_rms():
    f = [torch.randn(2, 4, 8, 8), torch.randn(2, 8, 4, 4)]
    assert torch.equal(feature_residual(f, f), torch.zeros(2))
    g = [f[0] + 1.0, f[1] + 3.0]
    torch.testing.assert_close(feature_residual(f, g), torch.full((2,), 2.0))


def test_anomaly_score_mixes_standardised_g_and_c():
    g, c = torch.tensor([2.0]), torch.tensor([10.0])
    torch.testing.assert_close(anomaly_score(g, c, lam=0.9, g_scale=2.0, c_scale=5.0), torch.tensor([0.9 * 1 + 0.1 * 2]))


def test_typicality_is_two_sided():
    torch.testing.assert_close(typicality(torch.tensor([0.0, 4.0, 2.0]), 2.0), torch.tensor([2.0, 2.0, 0.0]))


def test_mahalanobis_equals_scipy():
    rng = np.random.default_rng(0)
    x = rng.multivariate_normal([1, -2, 0.5], [[2, 0.5, 0.1], [0.5, 1, -0.3], [0.1, -0.3, 0.5]], size=400)
    maha = Mahalanobis(3).fit(torch.from_numpy(x), trim=0.0, ridge=0.0)
    VI = np.linalg.inv(np.cov(x.T))
    q = rng.normal(size=(5, 3))
    expected = [scipy_mahalanobis(v, x.mean(0), VI) for v in q]
    np.testing.assert_allclose(maha(torch.from_numpy(q)).numpy(), expected, rtol=1e-8)


def test_mahalanobis_trimmed_fit_resists_contamination():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(size=(980, 2)), rng.normal(size=(20, 2)) * 0.1 + 30])
    plain = Mahalanobis(2).fit(torch.from_numpy(x), trim=0.0)
    robust = Mahalanobis(2).fit(torch.from_numpy(x), trim=0.05)
    outlier = torch.tensor([[30.0, 30.0]], dtype=torch.float64)
    assert plain(outlier).item() < 10 < 40 < robust(outlier).item()  # 30 sqrt(2) = 42.4 once trimmed


def test_asymmetry_zero_for_a_180_degree_symmetric_image_and_positive_otherwise():
    x = torch.randn(2, 9, 12).abs()
    sym = x + x.flip(-1, -2)
    torch.testing.assert_close(asymmetry(sym), torch.zeros(2))
    off = torch.zeros(1, 9, 9)
    off[0, 4, 6] = 1.0  # one point off-centre: its rotation lands elsewhere
    assert asymmetry(off).item() == pytest.approx(1.0)


def test_concentration_grows_with_a_peakier_profile():
    y, x = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    r = torch.sqrt((y - 15.5) ** 2 + (x - 15.5) ** 2)
    gaussian = torch.exp(-(r**2) / 8)[None]
    exponential = torch.exp(-r / 1.0)[None]
    de_vauc = torch.exp(-7.67 * (r / 3.0) ** 0.25)[None]
    c = [concentration(p).item() for p in (gaussian, exponential, de_vauc)]
    assert c[0] < c[1] < c[2]
    # a Gaussian's r80 / r20 is sqrt(ln 5 / ln 1.25) = 2.69 (to the pixel sampling)
    assert c[0] == pytest.approx(5 * np.log10(np.sqrt(np.log(5) / np.log(1.25))), abs=0.1)


def test_aperture_fluxes_and_colours_of_flat_bands():
    img = torch.ones(1, 3, 15, 15) * torch.tensor([1.0, 2.0, 2.0])[None, :, None, None]
    f = aperture_fluxes(img, 5.0)
    torch.testing.assert_close(f, torch.tensor([[1.0, 2.0, 2.0]]) * np.pi * 25, rtol=0.01, atol=0)
    col = colours(img * 1000, 5.0)
    assert col[0, 0] > 0.6 and col[0, 1].abs() < 1e-6  # redder band 2 than 1 (~ln 2 in asinh mag)


def _gmm():
    torch.manual_seed(0)
    z = torch.cat([torch.randn(200, 3) - 2, torch.randn(200, 3) + 2])
    return GaussianMixture(2, 3).fit(z), z


def test_per_sample_scores_equal_autograd_on_a_single_sample():
    gmm, z = _gmm()
    names = rao_parameter_names(gmm)
    assert names == ["means", "weights"]
    scores = per_sample_scores(gmm, z[:4].double(), names)
    for i in range(4):
        params = {n: getattr(gmm, n).detach().clone().requires_grad_(True) for n in names}
        probe = GaussianMixture(**gmm.config())
        probe.load_state_dict(gmm.state_dict())
        for n, p in params.items():
            setattr(probe, n, p)  # buffers replaced by leaves that track gradients
        lp = probe.log_prob(z[i : i + 1].double()).sum()
        grads = torch.autograd.grad(lp, list(params.values()))
        torch.testing.assert_close(scores[i], torch.cat([g.flatten() for g in grads]))


def test_per_sample_scores_of_a_flow_equal_autograd():
    torch.manual_seed(0)
    z = torch.randn(256, 3)
    flow = LatentFlow(3, transforms=2, hidden=(16,)).fit(z, epochs=2)
    names = rao_parameter_names(flow)
    assert names and all(n.endswith("bias") for n in names)
    scores = per_sample_scores(flow, z[:2], names)
    params = dict(flow.named_parameters())
    lp = flow.log_prob(z[1:2]).sum()
    grads = torch.autograd.grad(lp, [params[n] for n in names])
    torch.testing.assert_close(scores[1], torch.cat([g.flatten() for g in grads]), rtol=1e-4, atol=1e-5)


def test_rao_score_is_about_one_on_normal_data_and_large_far_away():
    gmm, z = _gmm()
    rao = RaoScore.for_density(gmm).fit(gmm, z.double())
    on = rao(gmm, z.double())
    assert on.mean().item() == pytest.approx(1.0, rel=1e-2)  # standardised on the same data
    far = rao(gmm, torch.full((1, 3), 8.0, dtype=torch.float64))
    assert far.item() > 10 * on.median().item()


def test_rao_score_is_differentiable_in_z():
    gmm, z = _gmm()
    rao = RaoScore.for_density(gmm).fit(gmm, z.double())
    q = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(rao(gmm, q).sum(), q)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_conditional_mahalanobis_is_the_distance_of_the_gaussian_conditional():
    rng = np.random.default_rng(1)
    cov = np.array([[1.0, 0.8], [0.8, 1.0]])
    x = rng.multivariate_normal([0, 0], cov, size=2000)
    maha = Mahalanobis(2, given=1).fit(torch.from_numpy(x), trim=0.0, ridge=0.0)
    q = np.array([[1.6, 2.0], [0.0, 2.0]])  # x given c = 2: mean 0.8 * 2, variance 1 - 0.64
    emp_cov = np.cov(x.T)
    cond_mean = x[:, 0].mean() + emp_cov[0, 1] / emp_cov[1, 1] * (q[:, 1] - x[:, 1].mean())
    cond_var = emp_cov[0, 0] - emp_cov[0, 1] ** 2 / emp_cov[1, 1]
    expected = np.abs(q[:, 0] - cond_mean) / np.sqrt(cond_var)
    np.testing.assert_allclose(maha(torch.from_numpy(q)).numpy(), expected, rtol=1e-6, atol=1e-6)


def test_peak_residual_finds_a_single_hot_pixel_that_g_dilutes():
    x = torch.zeros(2, 3, 32, 32)
    x_hat = x.clone()
    x_hat[1, 0, 10, 10] = 0.9
    mask = torch.ones_like(x)
    peak = peak_residual(x, x_hat, mask, window=3)
    torch.testing.assert_close(peak, torch.tensor([0.0, 0.3]), atol=1e-6, rtol=0)
    assert reconstruction_residual(x, x_hat, mask)[1] < 0.03
    centre = torch.zeros(32, 32)
    centre[12:20, 12:20] = 1
    assert peak_residual(x, x_hat, mask, weight=centre)[1] < 1e-6  # the hot pixel is off-centre


def test_noise_corrected_asymmetry_is_near_zero_for_noise_and_symmetric_objects():
    torch.manual_seed(0)
    y, x = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    blob = 200 * torch.exp(-((y - 15.5) ** 2 + (x - 15.5) ** 2) / 8)
    noisy = blob + torch.randn(200, 32, 32)
    a = asymmetry(noisy, 10.0, noise=1.0)
    assert a.abs().mean() < 0.02
    lopsided = noisy.clone()
    lopsided[:, 20:23, 20:23] += 30
    assert (asymmetry(lopsided, 10.0, noise=1.0) > a + 0.03).all()


def test_line_residual_matrix_equals_rotating_each_image():
    import gsafe_models.statistics as st

    g = torch.Generator().manual_seed(3)
    r = torch.randn(6, 2, 24, 20, generator=g)
    mask = (torch.rand(r.shape, generator=g) > 0.1).to(r)
    r[2, 1, :, 7] += 1.5  # a trail
    fast = st.line_residual(r * mask, mask)
    old, st._RADON_MATRIX_MAX = st._RADON_MATRIX_MAX, 0
    try:
        slow = st.line_residual(r * mask, mask)
    finally:
        st._RADON_MATRIX_MAX = old
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    assert int(fast.argmax()) == 2
