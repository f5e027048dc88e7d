"""The residual noise model and the multi-scale chi summaries: known answers on synthetic noise."""

import math

import pytest
import torch

from gsafe_models.noise import ChiScanner, ResidualNoise, multiscale_chi, smooth_normalised


def _heteroscedastic(n=256, bands=2, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x_hat = torch.rand(n, bands, size, size, generator=g) * 4
    scale = 0.05 + 0.2 * x_hat * torch.tensor([1.0, 2.0]).view(1, -1, 1, 1)[:, :bands]
    r = 0.3 + scale * torch.randn(n, bands, size, size, generator=g)  # a bias and a spread that grow with brightness
    return r, x_hat, scale


def test_chi_is_unit_normal_whatever_the_brightness():
    r, x_hat, true_scale = _heteroscedastic()
    noise = ResidualNoise(2, bins=16).fit(r, x_hat, torch.ones_like(r))
    chi = noise.chi(r, x_hat, torch.ones_like(r))
    for lo, hi in ((0.0, 1.0), (3.0, 4.0)):  # faint and bright pixels alike
        sel = (x_hat >= lo) & (x_hat < hi)
        assert abs(chi[sel].mean().item()) < 0.05
        assert 0.9 < chi[sel].std().item() < 1.1
    ratio = noise.scale(x_hat) / true_scale
    assert 0.85 < ratio.median().item() < 1.15


def test_masked_pixels_give_zero_chi_and_do_not_enter_the_fit():
    r, x_hat, _ = _heteroscedastic()
    mask = torch.ones_like(r)
    mask[:, :, :4] = 0
    r_bad = r.clone()
    r_bad[:, :, :4] = 1e6  # garbage where the mask says missing
    a = ResidualNoise(2).fit(r_bad, x_hat, mask)
    b = ResidualNoise(2).fit(r, x_hat, mask)
    torch.testing.assert_close(a.log_scale, b.log_scale)
    assert (a.chi(r_bad, x_hat, mask)[:, :, :4] == 0).all()


@pytest.mark.parametrize("sigma", [1.0, 2.0, 4.0])
def test_smoothing_keeps_white_noise_unit_variance_with_a_mask(sigma):
    g = torch.Generator().manual_seed(1)
    chi = torch.randn(400, 1, 32, 32, generator=g)
    mask = (torch.rand(400, 1, 32, 32, generator=g) > 0.2).float()
    s = smooth_normalised(chi * mask, mask, sigma)
    assert 0.95 < s[mask.bool()].std().item() < 1.05


def test_multiscale_chi_adds_the_band_coadd():
    chi = torch.zeros(1, 3, 16, 16)
    chi[0, :, 8, 8] = 2.0  # the same departure in every band: the coadd sees it sqrt(3) times stronger
    maps = multiscale_chi(chi, torch.ones_like(chi), [0.0])
    assert maps[0].shape == (1, 4, 16, 16)
    assert math.isclose(maps[0][0, 3, 8, 8].item(), 2.0 * math.sqrt(3), rel_tol=1e-6)


@pytest.fixture(scope="module")
def scanner():
    g = torch.Generator().manual_seed(2)
    x_hat = torch.rand(300, 3, 24, 24, generator=g)
    r = 0.1 * torch.randn(300, 3, 24, 24, generator=g)
    return ChiScanner(3, 24, 24, scales=(0.0, 2.0)).fit(r, x_hat, torch.ones_like(r)), x_hat


def _summaries(scan, x_hat, residual):
    f = scan.features(residual, x_hat, torch.ones_like(residual))
    return dict(zip(scan.names(), f[0].tolist()))


def test_a_compact_blob_in_one_band_raises_peak_core_and_chromatic(scanner):
    scan, x_hat = scanner
    g = torch.Generator().manual_seed(3)
    base = 0.1 * torch.randn(1, 3, 24, 24, generator=g)
    blob = base.clone()
    blob[0, 1, 11:13, 11:13] += 1.0  # 10 sigma, one band, at the centre
    a, b = _summaries(scan, x_hat[:1], base), _summaries(scan, x_hat[:1], blob)
    for k in ("max@0", "core@0", "chromatic@0"):
        assert b[k] > a[k] + 5, k


def test_an_achromatic_departure_cancels_in_the_chromatic_summary(scanner):
    scan, x_hat = scanner
    g = torch.Generator().manual_seed(4)
    base = 0.1 * torch.randn(1, 3, 24, 24, generator=g)
    grey = base.clone()
    grey[0, :, 4:8, 4:8] += 1.0  # a neighbour-like residual, alike in every band
    a, b = _summaries(scan, x_hat[:1], base), _summaries(scan, x_hat[:1], grey)
    assert b["max@0"] > a["max@0"] + 5
    assert b["chromatic@0"] < a["chromatic@0"] + 1.5


def test_an_extended_faint_departure_shows_at_the_large_scale(scanner):
    scan, x_hat = scanner
    g = torch.Generator().manual_seed(5)
    base = 0.1 * torch.randn(1, 3, 24, 24, generator=g)
    halo = base.clone()
    halo[0, :, 4:20, 4:20] += 0.05  # half a sigma per pixel over 256 pixels
    a, b = _summaries(scan, x_hat[:1], base), _summaries(scan, x_hat[:1], halo)
    assert b["max@2"] - a["max@2"] > 2 * (b["max@0"] - a["max@0"])


def test_a_chi_map_given_gives_the_same_summaries_and_a_different_one_changes_them(scanner):
    scan, x_hat = scanner
    g = torch.Generator().manual_seed(6)
    r = 0.1 * torch.randn(4, 3, 24, 24, generator=g)
    mask = torch.ones_like(r)
    mask[1, 2, :5] = 0
    chi = scan.noise.chi(r, x_hat[:4], mask)
    assert torch.equal(scan.features(r, x_hat[:4], mask, chi=chi), scan.features(r, x_hat[:4], mask))
    assert not torch.equal(scan.features(r, x_hat[:4], mask, chi=2 * chi), scan.features(r, x_hat[:4], mask))


@pytest.mark.parametrize("sigma", [0.7, 2.0, 4.0])
def test_banded_smoothing_equals_the_depthwise_convolution(sigma):
    import torch.nn.functional as F

    from gsafe_models.noise import _separable, gaussian_kernel

    x = torch.randn(3, 4, 20, 13, dtype=torch.float64)  # not square, kernel wider than a border
    k = gaussian_kernel(sigma, torch.float64)
    n, C = k.numel(), x.shape[1]
    ref = F.conv2d(x, k.view(1, 1, 1, n).expand(C, 1, 1, n), padding=(0, n // 2), groups=C)
    ref = F.conv2d(ref, k.view(1, 1, n, 1).expand(C, 1, n, 1), padding=(n // 2, 0), groups=C)
    torch.testing.assert_close(_separable(x, k), ref, rtol=1e-12, atol=1e-12)


def _two_depths(seed=0, n=256):
    """Residuals whose noise grows with brightness, half of the objects at twice the noise, and
    the known variance of each pixel (a survey's variance plane)."""
    g = torch.Generator().manual_seed(seed)
    x_hat = torch.rand(n, 2, 12, 12, generator=g)
    depth = torch.where(torch.arange(n).view(-1, 1, 1, 1) < n // 2, 1.0, 4.0)
    known = (0.1 + x_hat) ** 2 * depth
    r = known.sqrt() * torch.randn(x_hat.shape, generator=g)
    return r, x_hat, known, depth.view(-1) > 1


def test_a_known_variance_makes_chi_unit_normal_at_every_depth():
    r, x_hat, known, shallow = _two_depths()
    m = torch.ones_like(r)
    blind = ResidualNoise(2).fit(r, x_hat, m)
    aware = ResidualNoise(2).fit(r, x_hat, m, known=known)
    assert not bool(blind.known) and bool(aware.known)
    chi_blind, chi_aware = blind.chi(r, x_hat, m), aware.chi(r, x_hat, m, known)
    # brightness alone cannot tell the depths apart: deep objects too quiet, shallow ones too loud
    assert chi_blind[~shallow].std() < 0.8 and chi_blind[shallow].std() > 1.3
    for part in (~shallow, shallow):
        assert abs(float(chi_aware[part].std()) - 1.0) < 0.05
    # fitted without variances, a model ignores them; unknown (NaN) variances get the typical one
    assert torch.equal(blind.chi(r, x_hat, m, known), chi_blind)
    unknown = aware.chi(r, x_hat, m, torch.full_like(known, float("nan")))
    assert torch.isfinite(unknown).all() and 1.0 < float(unknown.std()) < 1.3


def test_a_model_saved_before_known_variances_loads_as_fitted_without():
    r, x_hat, known, _ = _two_depths(1, 64)
    m = torch.ones_like(r)
    old = {k: v for k, v in ResidualNoise(2).fit(r, x_hat, m).state_dict().items()
           if k not in ("known", "known_typical")}
    loaded = ResidualNoise(2)
    loaded.load_state_dict(old)
    assert not bool(loaded.known)
    assert torch.equal(loaded.chi(r, x_hat, m, known), ResidualNoise(2).fit(r, x_hat, m).chi(r, x_hat, m))


def test_line_chi_is_a_unit_variance_matched_filter_for_lines():
    from gsafe_models.noise import line_chi, line_kernels

    k = line_kernels(11, 12)
    assert k.shape == (12, 1, 11, 11)
    torch.testing.assert_close(k.square().sum((1, 2, 3)), torch.ones(12))
    # a constant chi under one kernel, away from the edges: c * sum(w) / sqrt(sum(w^2)) exactly
    c, m = torch.full((1, 1, 32, 32), 0.5), torch.ones(1, 1, 32, 32)
    f = line_chi(c, m, k[:1])
    torch.testing.assert_close(f[0, 0], 0.5 * k[0].sum(), rtol=1e-5, atol=1e-6)
    # white noise: the response at one pixel is unit-variance whatever the orientation
    g = torch.Generator().manual_seed(0)
    z = torch.randn(20000, 1, 11, 11, generator=g)
    r = (z * k[:, 0][None]).sum((-2, -1))  # (draws, orientations)
    assert torch.allclose(r.std(0), torch.ones(12), atol=0.03)
    # a 1.5-sigma trail across the cutout, in one band of two: found by the line filter far more often
    # than by the largest single pixel
    noise = torch.randn(200, 2, 32, 32, generator=g)
    trail = noise.clone()
    trail[:, 1, 16, :] += 1.5
    mask = torch.ones_like(noise)
    line_hit = (line_chi(trail, mask, k)[:, 1] > line_chi(noise, mask, k)[:, 1].quantile(0.95)).float().mean()
    pixel_hit = (trail[:, 1].abs().flatten(1).amax(1) > noise[:, 1].abs().flatten(1).amax(1).quantile(0.95)).float().mean()
    assert line_hit > 0.9 and pixel_hit < 0.5, (line_hit, pixel_hit)


def test_line_median_chi_finds_faint_lines_that_compact_residuals_do_not_fake():
    from gsafe_models.noise import _median9, line_chi, line_kernels, line_median_chi

    g = torch.Generator().manual_seed(1)
    # the exchange network is the median of 9, exactly
    v = torch.randn(9, 5000, generator=g)
    assert torch.equal(_median9(list(v)), v.median(0).values)
    # a constant field, away from the edges: c * sqrt(18 / pi) exactly (the median's null spread)
    c, m = torch.full((1, 1, 32, 32), 0.5), torch.ones(1, 1, 32, 32)
    torch.testing.assert_close(line_median_chi(c, m, orientations=4)[0, 0], torch.tensor(0.5 * math.sqrt(18 / math.pi)))
    # white noise: the scaled median of 9 samples is close to unit-variance (0.977 for n = 9)
    z = torch.randn(9, 200000, generator=g)
    assert abs(float(_median9(list(z)).std()) * math.sqrt(18 / math.pi) - 0.977) < 0.01
    # a faint 2.5-sigma column, 20 pixels long, in one band of two: found; one bright compact residual
    # (a 2x2 speck at 30 sigma) is not, where the summing line filter takes the speck for a line
    noise = torch.randn(200, 2, 32, 32, generator=g)
    column, speck = noise.clone(), noise.clone()
    column[:, 1, 6:26, 16] += 2.5
    speck[:, 1, 15:17, 15:17] += 30.0
    mask = torch.ones_like(noise)
    null = line_median_chi(noise, mask)[:, 1].quantile(0.95)
    assert (line_median_chi(column, mask)[:, 1] > null).float().mean() > 0.9
    assert (line_median_chi(speck, mask)[:, 1] > null).float().mean() < 0.2
    k = line_kernels(11, 12)
    assert (line_chi(speck, mask, k)[:, 1] > line_chi(noise, mask, k)[:, 1].quantile(0.95)).float().mean() > 0.9
    # masked pixels and NaN count as 0: a column that is all masked gives no response
    masked = mask.clone()
    masked[:, 1, :, 16] = 0
    column[:, 1, :, 16] = float("nan")
    f = line_median_chi(column, masked)
    assert torch.isfinite(f).all() and (f[:, 1] > null).float().mean() < 0.2


def test_line_chi_normalises_by_each_cutouts_own_mask():
    from gsafe_models.noise import line_chi, line_kernels

    g = torch.Generator().manual_seed(2)
    chi, k = torch.randn(4, 2, 24, 24, generator=g), line_kernels(11, 12)
    full = torch.ones_like(chi)
    holed = full.clone()
    holed[1, 0, 5:15, 8:12] = 0
    a, b = line_chi(chi, full, k), line_chi(chi, holed, k)
    # the cutouts without missing pixels read the same whether a neighbour in the batch has some or not
    torch.testing.assert_close(b[[0, 2, 3]], a[[0, 2, 3]])
    # and the one with a hole equals its own response computed alone: sum(w chi m) / sqrt(sum(w^2 m))
    torch.testing.assert_close(b[1:2], line_chi(chi[1:2], holed[1:2], k))
    x, m = chi[1, 0] * holed[1, 0], holed[1, 0]
    num = torch.nn.functional.conv2d(x[None, None], k, padding=5)
    den = torch.nn.functional.conv2d(m[None, None], k * k, padding=5).clamp_min(1e-6).sqrt()
    torch.testing.assert_close(b[1, 0], (num / den * (m > 0)).abs().max())
