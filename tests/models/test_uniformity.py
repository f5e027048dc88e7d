"""Uniformity checks: the one-sided KS of promotion and the hunt's drift alarm, on known laws and on
simulated surveys whose sky noise or PSF changed."""

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from gsafe_models.detector import Detector, DetectorConfig
from gsafe_models.simulate import simulate_batch
from gsafe_models.uniformity import calibration_ks, drift_check, ks_critical

BANDS = ("g", "r", "i")
SIZE = 32
SEEING_PX = 0.72 / 0.2 / 2.355   # the simulator's median seeing (0.62-0.82" FWHM), as a Gaussian sigma in pixels


def test_d_plus_of_a_known_law():
    """p = U^4 has F(t) = t^(1/4): sup (F(t) - t) is at t = 4^(-4/3), D+ = 4^(-1/3) - 4^(-4/3)."""
    n = 4000
    p = ((np.arange(n) + 0.5) / n) ** 4
    d, crit = calibration_ks(p)
    assert d == pytest.approx(4 ** (-1 / 3) - 4 ** (-4 / 3), abs=1 / n)
    assert crit == pytest.approx(np.sqrt(-np.log(0.01) / 2 / n))
    assert calibration_ks(1 - p)[0] < 1 / n       # piled up near 1: the one-sided check does not mind
    assert np.isnan(calibration_ks(p[:10])[0])    # too few to test


def test_false_alarm_rate_of_uniform_p_values_stays_below_alpha():
    rng = np.random.default_rng(0)
    rejections = [calibration_ks(rng.uniform(size=200), alpha=0.05)[0] > ks_critical(200, alpha=0.05)
                  for _ in range(1000)]
    assert np.mean(rejections) <= 0.05 + 3 * np.sqrt(0.05 * 0.95 / 1000)


def test_two_sample_yardstick_is_wider_than_one_sample():
    assert ks_critical(1000, 100) == pytest.approx(1.5174 * np.sqrt(1 / 1000 + 1 / 100), rel=1e-4)
    assert ks_critical(1000, 100) > ks_critical(1000)


def _noise_sigma(x: np.ndarray) -> np.ndarray:
    """Per-cutout, per-band sky noise from the MAD of neighbour differences, (n, B, 1, 1)."""
    d = np.diff(x, axis=-1)
    med = np.median(d, axis=(-2, -1), keepdims=True)
    return 1.4826 * np.median(np.abs(d - med), axis=(-2, -1), keepdims=True) / np.sqrt(2)


def doubled_noise(x: np.ndarray, seed: int = 0) -> np.ndarray:
    """The same cutouts under twice the sky noise: add independent noise of sqrt(3) sigma."""
    rng = np.random.default_rng(seed)
    return (x + rng.standard_normal(x.shape) * np.sqrt(3) * _noise_sigma(x)).astype(np.float32)


def wider_psf(x: np.ndarray, seed: int = 0) -> np.ndarray:
    """The same cutouts seen through a PSF twice as wide: a Gaussian of sqrt(3) the seeing sigma
    (widths add in quadrature), then noise added back to the sky level the smoothing removed."""
    rng = np.random.default_rng(seed)
    wide = np.stack([[gaussian_filter(b, np.sqrt(3) * SEEING_PX, mode="nearest") for b in im] for im in x])
    lost = np.clip(_noise_sigma(x) ** 2 - _noise_sigma(wide) ** 2, 0, None)
    return (wide + rng.standard_normal(x.shape) * np.sqrt(lost)).astype(np.float32)


@pytest.fixture(scope="module")
def fitted():
    torch.manual_seed(0)
    sim = dict(bands=BANDS, size=SIZE, anomaly_frac=0.0)
    train = simulate_batch(0, 400, seed=1, **sim).images
    calib = simulate_batch(0, 200, seed=2, **sim).images
    new = simulate_batch(0, 200, seed=3, bands=BANDS, size=SIZE, anomaly_frac=0.02).images
    batches = lambda x: (lambda: (x[i:i + 64] for i in range(0, len(x), 64)))  # noqa: E731
    cfg = DetectorConfig(latent_dim=8, epochs=4, channels=(8, 16), flow_epochs=15, flow_transforms=2, seed=0)
    det = Detector.fit(batches(train), batches(calib), config=cfg, bands=BANDS)
    return det, new


def _check(det, x, groups=None):
    out = det.score(x, q_values=False)
    stats = {s: out[f"p_{s}"] for s in det.statistic_names}
    return drift_check(out["p_value"], groups, n_calib=det.diagnostics["calibration_n"], statistics=stats)


def test_a_normal_batch_raises_no_alarm(fitted):
    det, new = fitted
    r = _check(det, new)
    assert not r["alarm"], r["alarms"]
    assert r["overall"]["n"] == len(new)


@pytest.mark.parametrize("change", [doubled_noise, wider_psf], ids=["sky noise x2", "PSF x2"])
def test_a_batch_with_changed_conditions_raises_the_alarm(fitted, change):
    det, new = fitted
    r = _check(det, change(new))
    assert r["alarm"] and r["overall"]["alarm"], r


def test_one_odd_tile_among_normal_ones_is_named(fitted):
    det, new = fitted
    x = np.concatenate([new[:100], wider_psf(new[100:])])
    groups = ["tile_a.fits"] * 100 + ["tile_b.fits"] * 100
    r = _check(det, x, groups)
    assert r["groups"]["tile_b.fits"]["alarm"] and not r["groups"]["tile_a.fits"]["alarm"], r
    assert any(a.startswith("tile_b.fits") for a in r["alarms"])


def test_groups_too_small_are_not_tested():
    r = drift_check(np.full(10, 1e-6), ["t"] * 10)
    assert not r["alarm"] and np.isnan(r["groups"]["t"]["d_plus"])
