"""BandNormaliser: robust sky and noise, asinh stretch, NaN handling, exact inverse."""

import numpy as np
import torch

from gsafe_models.normalise import BandNormaliser


def _cutouts(n=32, bands=3, size=16, seed=0):
    rng = np.random.default_rng(seed)
    sky = np.array([10.0, 50.0, -3.0])[:bands]
    noise = np.array([2.0, 5.0, 0.5])[:bands]
    x = sky[None, :, None, None] + noise[None, :, None, None] * rng.normal(size=(n, bands, size, size))
    x[:, :, 6:10, 6:10] += 100 * noise[None, :, None, None]  # a bright object in the middle
    return x.astype(np.float32), sky, noise


def test_fit_recovers_sky_and_noise_from_the_borders():
    x, sky, noise = _cutouts(n=200)
    norm = BandNormaliser(3).fit(x)
    np.testing.assert_allclose(norm.sky.numpy(), sky, atol=0.05 * noise.max())
    np.testing.assert_allclose(norm.noise.numpy(), noise, rtol=0.05)


def test_inverse_round_trips_valid_pixels():
    x, _, _ = _cutouts()
    norm = BandNormaliser(3).fit(x)
    t = torch.from_numpy(x).double()
    y, mask = norm.double()(t)
    torch.testing.assert_close(norm.inverse(y), t, rtol=1e-9, atol=1e-9)
    assert bool(mask.all())


def test_nan_pixels_are_zero_with_mask_zero_and_do_not_break_fit():
    x, sky, noise = _cutouts(n=100)
    x[0, 1, 3, 4] = np.nan
    x[5, :, 0, :] = np.nan
    x[7, 2] = np.inf
    norm = BandNormaliser(3).fit(x)
    assert np.isfinite(norm.sky.numpy()).all() and (norm.noise.numpy() > 0).all()
    y, mask = norm(torch.from_numpy(x))
    assert torch.isfinite(y).all()
    assert mask[0, 1, 3, 4] == 0 and y[0, 1, 3, 4] == 0
    assert mask[5, :, 0].sum() == 0 and mask[7, 2].sum() == 0
    assert mask.sum() == np.isfinite(x).sum()


def test_stretch_puts_the_bright_core_near_one_and_sky_near_zero():
    x, _, _ = _cutouts(n=100)
    y, _ = BandNormaliser(3).fit(x)(torch.from_numpy(x))
    assert y[:, :, 7, 7].mean() > 0.7
    assert y[:, :, :3, :3].abs().mean() < 0.1


def test_state_dict_carries_the_fit():
    x, _, _ = _cutouts()
    norm = BandNormaliser(3).fit(x)
    copy = BandNormaliser(**norm.config())
    copy.load_state_dict(norm.state_dict())
    t = torch.from_numpy(x)
    torch.testing.assert_close(copy(t)[0], norm(t)[0])
