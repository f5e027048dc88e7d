"""The one robust scale: scipy's normal-consistent MAD, its fallbacks, numpy and torch alike."""

import numpy as np
import pytest
import torch

from scipy import stats

from gsafe_models.robust import MAD_TO_SIGMA, robust_scale


def test_robust_scale_is_consistent_for_a_gaussian_and_ignores_a_minority_of_outliers():
    x = np.random.default_rng(0).normal(3.0, 2.0, size=200_000)
    center, scale = robust_scale(x)
    assert center == pytest.approx(3.0, abs=0.02) and scale == pytest.approx(2.0, rel=0.01)
    x[:40_000] = 1e6                                   # 20 % wild values move it by little
    c2, s2 = robust_scale(x)
    assert abs(c2 - 3.0) < 1.0 and s2 < 3.0
    assert MAD_TO_SIGMA == pytest.approx(1 / stats.norm.ppf(0.75), rel=1e-15)


def test_robust_scale_along_an_axis_and_its_fallbacks():
    x = np.random.default_rng(1).normal(size=(101, 3)) * [1.0, 5.0, 1.0]
    x[:, 2] = 4.0                                      # constant column
    x[:60, 0] = 0.5                                    # MAD 0, spread not 0
    center, scale = robust_scale(x, axis=0)
    assert center.shape == scale.shape == (3,)
    assert scale[0] == pytest.approx(x[:, 0].std()) and scale[2] == 1.0
    assert scale[1] == pytest.approx(stats.median_abs_deviation(x[:, 1], scale="normal"))
    assert robust_scale(x, axis=0, fallback=False)[1][0] == 0.0
    with pytest.raises(ValueError, match="no values"):
        robust_scale(np.array([]))


def test_robust_scale_of_a_tensor_is_a_tensor_on_its_device():
    t = torch.randn(64, 2, dtype=torch.float32)
    center, scale = robust_scale(t, axis=0)
    assert isinstance(scale, torch.Tensor) and scale.dtype == torch.float32 and scale.device == t.device
    np.testing.assert_allclose(scale.numpy(), robust_scale(t.numpy().astype(np.float64), axis=0)[1], rtol=1e-6)
