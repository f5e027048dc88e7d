"""Encoder/decoder family: shapes for any cutout size, mask input, AE and VAE losses."""

import pytest
import torch

import math

from gsafe_models.nets import VAE, AutoEncoder, astro_view, build_representation, masked_mse, nt_xent


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


def test_nt_xent_known_answer_for_orthogonal_views():
    # N objects whose two views coincide and are orthogonal to every other object's: each view's
    # logits are 1/T for its partner and 0 for the 2N - 2 others
    n, t = 6, 0.5
    h = torch.eye(n) * 3.0                      # the norm does not matter (cosine similarity)
    expected = -math.log(math.exp(1 / t) / (math.exp(1 / t) + 2 * n - 2))
    assert nt_xent(h, h, t).item() == pytest.approx(expected, rel=1e-6)
    # swapped partners are the worst case: the loss rises
    assert nt_xent(h, h.roll(1, 0), t).item() > expected + 1.0


def test_astro_view_moves_pixels_and_redraws_noise_at_the_cutouts_own_level():
    torch.manual_seed(0)
    # a noiseless cutout (border scatter 0): the view is a rotation / flip / shift, the same pixel values
    x = torch.zeros(1, 2, 16, 16)
    x[0, :, 6:9, 7:9] = torch.arange(12.0).view(2, 3, 2)
    v, m = astro_view(x, torch.ones_like(x))
    assert torch.equal(v.flatten().sort().values, x.flatten().sort().values)
    assert torch.equal(m, torch.ones_like(m))
    # pure noise of scatter 2 per band: the redraw adds as much again (variance 4 + 4)
    noise = 2.0 * torch.randn(64, 3, 32, 32)
    v, _ = astro_view(noise, torch.ones_like(noise))
    assert v.var().item() == pytest.approx(8.0, rel=0.05)
    # masked pixels stay zero
    mask = torch.ones_like(noise)
    mask[:, 0, :4] = 0
    v, mv = astro_view(noise * mask, mask)
    assert torch.all(v[mv == 0] == 0)


def test_contrastive_autoencoder_trains_both_terms_and_round_trips():
    torch.manual_seed(0)
    ae = AutoEncoder((2, 16, 16), 4, channels=(4, 8), contrastive=0.1)
    x = torch.randn(8, 2, 16, 16)
    loss, parts = ae.loss(x, torch.ones_like(x))
    assert set(parts) == {"mse", "nt_xent"}
    assert loss.item() == pytest.approx(parts["mse"] + 0.1 * parts["nt_xent"], rel=1e-5)
    loss.backward()
    assert ae.projection[0].weight.grad is not None and ae.encoder.head.weight.grad.abs().sum() > 0
    again = build_representation(ae.config())
    again.load_state_dict(ae.state_dict())
    assert again.contrastive == 0.1
    # a plain autoencoder has no projection head and the same config as before
    assert "contrastive" not in AutoEncoder((2, 16, 16), 4, channels=(4, 8)).config()
