"""Encoder/decoder family: shapes for any cutout size, mask input, AE and VAE losses."""

import pytest
import torch

from gsafe_models.nets import VAE, AutoEncoder, build_representation, masked_mse


@pytest.mark.parametrize("shape", [(3, 16, 16), (5, 64, 64), (2, 20, 12), (1, 17, 17)])
def test_autoencoder_shapes(shape):
    ae = AutoEncoder(shape, latent_dim=6, channels=(8, 16))
    x = torch.randn(4, *shape)
    x_hat, z = ae(x, torch.ones_like(x))
    assert x_hat.shape == x.shape and z.shape == (4, 6)
    assert torch.equal(ae.encode(x, torch.ones_like(x)), z)
    feats = ae.features(x, torch.ones_like(x))
    assert [f.shape[1] for f in feats] == [8, 16]


def test_encoder_sees_the_mask():
    torch.manual_seed(0)
    ae = AutoEncoder((3, 16, 16), 4, channels=(8, 16))
    x = torch.randn(2, 3, 16, 16)
    mask = torch.ones_like(x)
    holed = mask.clone()
    holed[:, :, 4:8, 4:8] = 0
    x0 = x * holed  # same pixel values: only the mask differs
    assert not torch.allclose(ae.encode(x0, mask), ae.encode(x0, holed))


def test_masked_mse_ignores_missing_pixels():
    x = torch.zeros(2, 3, 4, 4)
    x_hat = torch.zeros_like(x)
    x_hat[0, 0, 0, 0] = 1e6
    mask = torch.ones_like(x)
    mask[0, 0, 0, 0] = 0
    assert masked_mse(x, x_hat, mask) == 0


def test_vae_loss_is_mse_plus_weighted_kl():
    torch.manual_seed(0)
    vae = VAE((3, 16, 16), 4, beta=2.0, channels=(8, 16), sigma=0.1).eval()
    x, mask = torch.randn(5, 3, 16, 16), torch.ones(5, 3, 16, 16)
    loss, parts = vae.loss(x, mask)
    mu, logvar = vae.posterior(x, mask)
    kl = 0.5 * (mu.square() + logvar.exp() - 1 - logvar).sum(1).mean()
    mse = masked_mse(x, vae.decode(mu), mask)
    expected = mse + 2.0 * 2 * 0.1**2 * kl / (3 * 16 * 16)
    torch.testing.assert_close(loss, expected)
    assert parts["kl"] == pytest.approx(kl.item(), rel=1e-5)
    assert torch.equal(vae.encode(x, mask), mu)


def test_vae_training_mode_samples_and_kl_is_nonnegative():
    torch.manual_seed(0)
    vae = VAE((3, 16, 16), 4, channels=(8, 16)).train()
    x, mask = torch.randn(5, 3, 16, 16), torch.ones(5, 3, 16, 16)
    l1, p1 = vae.loss(x, mask)
    l2, _ = vae.loss(x, mask)
    assert l1 != l2 and p1["kl"] >= 0


@pytest.mark.parametrize("model", [AutoEncoder((3, 16, 16), 4, (8, 16)), VAE((3, 16, 16), 4, 0.5, (8, 16))])
def test_build_representation_rebuilds_from_config(model):
    copy = build_representation(model.config())
    copy.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(copy.eval().encode(x, torch.ones_like(x)), model.eval().encode(x, torch.ones_like(x)))
