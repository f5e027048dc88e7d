"""The statistic registry: one object per statistic, what it needs is fitted, nothing else."""

import numpy as np
import pytest
import torch

from gsafe_models.nets import PCABasis
from gsafe_models.perturb import KINDS, band_noise, perturb
from gsafe_models.registry import FEATURES, PARTS, STATISTICS, requirements
from gsafe_models.statistics import morphometry, second_moments, smoothness


def test_every_statistic_names_known_features_and_parts():
    for s in STATISTICS.values():
        assert s.features and all(f in FEATURES for f in s.features), s.name
        assert all(p in PARTS for p in s.parts), s.name
        assert s.doc, s.name


def test_requirements_fit_sample_parts_first_and_dependencies_before_dependants():
    feats, parts = requirements(["rao_flow", "chi_core_pca", "typicality_gmm"])
    assert {"z", "chi_pca"} <= set(feats)
    assert parts.index("pca") < parts.index("chi_scanner_pca") < parts.index("chi_null_pca")
    assert parts.index("flow") < parts.index("rao_flow")
    assert parts.index("gmm") < parts.index("nll_gmm_mean")
    sample = [PARTS[p].sample for p in parts]
    assert sample == sorted(sample, reverse=True)  # every sample part before every feature part


def test_a_reference_free_statistic_needs_no_part():
    feats, parts = requirements(["G", "line"])
    assert parts == [] and set(feats) == {"G", "line"}


def test_pca_basis_reconstructs_rank_k_data_exactly():
    g = torch.Generator().manual_seed(0)
    basis = torch.randn(3, 2 * 8 * 8, generator=g)
    x = (torch.randn(100, 3, generator=g) @ basis).view(100, 2, 8, 8) + 1.0
    pca = PCABasis((2, 8, 8), 3).fit(x, torch.ones_like(x))
    torch.testing.assert_close(pca(x, torch.ones_like(x)), x, atol=1e-4, rtol=1e-4)


def test_second_moments_and_smoothness_known_answers():
    y, x = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    round_blob = torch.exp(-((y - 15.5) ** 2 + (x - 15.5) ** 2) / 8)[None]
    size, ell = second_moments(round_blob, 12.0)
    assert ell.item() < 1e-3 and abs(size.exp().item() - 8.0) < 0.1  # Ixx + Iyy = 2 sigma^2 = 8
    assert smoothness(torch.full((1, 16, 16), 5.0), 6.0).item() == pytest.approx(0.0, abs=1e-6)
    clumpy = torch.zeros(1, 16, 16)
    clumpy[0, ::2, ::2] = 5.0
    assert smoothness(clumpy, 6.0).item() > 0.5


def test_morphometry_puts_the_magnitude_last_and_brighter_is_smaller():
    y, x = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    blob = torch.exp(-((y - 15.5) ** 2 + (x - 15.5) ** 2) / 8)
    u = torch.stack([blob * 10, blob * 40])[:, None].repeat(1, 3, 1, 1)
    m = morphometry(u, 3.0, 8.0)
    assert m.shape == (2, 3 + 5)
    assert m[1, -1] < m[0, -1]
    torch.testing.assert_close(m[:, :2], torch.zeros(2, 2), atol=1e-5, rtol=0)  # grey: no colour


def test_perturbations_are_seeded_keep_nan_and_change_every_cutout():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 3, 32, 32)).astype(np.float32) * 2
    x[0, 1, :3, :3] = np.nan
    noise = band_noise(x)
    for k in KINDS:
        a, b = perturb(x, k, seed=7, noise=noise), perturb(x, k, seed=7, noise=noise)
        np.testing.assert_array_equal(a, b)
        assert np.isnan(a[0, 1, :3, :3]).all()
        changed = [not np.allclose(np.nan_to_num(a[i]), np.nan_to_num(x[i])) for i in range(len(x))]
        assert all(changed), k
    with pytest.raises(ValueError, match="expected one of"):
        perturb(x, "lens")


def _axis_ratio(light: np.ndarray) -> float:
    """The ratio of the principal axes of a non-negative image's second moments."""
    yy, xx = np.mgrid[0:light.shape[0], 0:light.shape[1]]
    w = light / light.sum()
    my, mx = (w * yy).sum(), (w * xx).sum()
    c = np.array([[(w * (yy - my) ** 2).sum(), (w * (yy - my) * (xx - mx)).sum()],
                  [(w * (yy - my) * (xx - mx)).sum(), (w * (xx - mx) ** 2).sum()]])
    ev = np.linalg.eigvalsh(c)
    return float(np.sqrt(ev[1] / max(ev[0], 1e-12)))


def test_strokes_are_the_linear_primitive_and_blobs_are_round():
    x = np.zeros((40, 3, 32, 32), np.float32)
    noise = np.ones(3, np.float32)
    ratios = {k: np.median([_axis_ratio(np.nan_to_num(y).sum(0)) for y in perturb(x, k, seed=3, noise=noise)])
              for k in ("stroke", "blob")}
    assert ratios["stroke"] > 2.0 and ratios["blob"] < 1.2, ratios
