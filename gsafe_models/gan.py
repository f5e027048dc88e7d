r"""A Wasserstein GAN with gradient penalty and an encoder, as the HSC anomaly hunt used (a representation).

Storey-Fisher et al. (2021) trained a WGAN-GP on HSC cutouts and scored each object by
:math:`AS = \lambda G + (1 - \lambda) C`: :math:`G` the pixel residual of the generator's best
reconstruction, :math:`C` the residual of the *critic's* features between the object and that
reconstruction. They found the reconstruction by per-object latent optimisation (AnoGAN); here an
encoder gives it in one pass, trained after the GAN with the generator and critic frozen on the
f-AnoGAN :math:`izi_f` loss (Schlegl et al. 2019): pixel residual plus critic-feature residual.

:class:`EncodedWGAN` is a representation like :class:`~gsafe_models.nets.AutoEncoder` (`encode`,
`decode`, `features`, `config`), so every registered statistic runs on it unchanged; its
`features` are the critic's, so the registered `C` and `AS` of a GAN detector are the HSC hunt's.
:func:`fit_gan` trains it (`gsafe train --representation gan`).

References:
    | Improved Training of Wasserstein GANs (Gulrajani et al., 2017) https://arxiv.org/abs/1704.00028
    | f-AnoGAN: Fast unsupervised anomaly detection with generative adversarial networks
    | (Schlegl et al., 2019) https://doi.org/10.1016/j.media.2019.01.010
    | Anomaly detection in Hyper Suprime-Cam galaxy images with generative adversarial networks
    | (Storey-Fisher et al., 2021) https://arxiv.org/abs/2105.02434

Example:
    >>> gan = EncodedWGAN((3, 16, 16), 8, channels=(8, 16))
    >>> x, mask = torch.randn(2, 3, 16, 16), torch.ones(2, 3, 16, 16)
    >>> x_hat, z = gan(x, mask)
    >>> x_hat.shape, z.shape, gan.critic(x, mask).shape
    (torch.Size([2, 3, 16, 16]), torch.Size([2, 8]), torch.Size([2]))
"""

from __future__ import annotations

__all__ = ["Critic", "EncodedWGAN", "gradient_penalty", "fit_gan"]

import copy
import math
import time

from collections.abc import Callable, Iterable

import numpy as np
import torch
import torch.nn as nn

from torch import Tensor

from .nets import _Representation, masked_mse
from .normalise import BandNormaliser
from .training import _deterministic, _dihedral, resolve_device, unpack_batch

BatchFactory = Callable[[], Iterable[np.ndarray]]


class Critic(nn.Module):
    r"""Creates a WGAN critic of normalised cutouts and their masks: :math:`(N, B, H, W) \to (N,)`.

    The layout of :class:`~gsafe_models.nets.Encoder` (bands and masks stacked, stride-2 stages)
    with LeakyReLU and no normalisation layer (a batch norm would break the gradient penalty's
    per-sample gradients); :meth:`features` returns every stage's output.

    Arguments:
        shape: The cutout shape :math:`(B, H, W)`.
        channels: The channels of each stage.

    Example:
        >>> Critic((3, 16, 16), (8, 16))(torch.randn(2, 3, 16, 16), torch.ones(2, 3, 16, 16)).shape
        torch.Size([2])
    """

    def __init__(self, shape: tuple[int, int, int], channels: tuple[int, ...] = (8, 16, 32, 64)) -> None:
        super().__init__()
        B, H, W = shape
        stages, c_in = [], 2 * B
        for c in channels:
            stages.append(nn.Sequential(nn.Conv2d(c_in, c, 3, stride=2, padding=1), nn.LeakyReLU(0.2),
                                        nn.Conv2d(c, c, 3, padding=1), nn.LeakyReLU(0.2)))
            c_in = c
        self.stages = nn.ModuleList(stages)
        h, w = H, W
        for _ in channels:
            h, w = (h + 1) // 2, (w + 1) // 2
        self.head = nn.Linear(channels[-1] * h * w, 1)

    def features(self, x: Tensor, mask: Tensor) -> list[Tensor]:
        r"""Returns the output of every stage, each :math:`(N, C_i, H_i, W_i)`."""

        h = torch.cat((x * mask, mask), dim=1)
        out = []
        for stage in self.stages:
            h = stage(h)
            out.append(h)
        return out

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        return self.head(self.features(x, mask)[-1].flatten(1))[:, 0]


class EncodedWGAN(_Representation):
    r"""Creates a WGAN-GP generator and critic with an encoder, as a representation of cutouts.

    `decoder` is the generator :math:`G: z \sim \mathcal{N}(0, I_D) \mapsto x`, `encoder` maps a
    cutout to the :math:`z` whose generation matches it, `critic` is the Wasserstein critic.
    :meth:`features` are the critic's, as the HSC hunt's feature residual uses.

    Arguments:
        shape: The cutout shape :math:`(B, H, W)`.
        latent_dim: :math:`D`.
        channels: The channels of each stage of encoder, generator (reversed) and critic.
        kappa: The weight of the critic-feature residual in the encoder's loss (:meth:`loss`).

    Example:
        >>> gan = EncodedWGAN((3, 16, 16), 4, channels=(8, 16))
        >>> [f.shape[1] for f in gan.features(torch.randn(1, 3, 16, 16), torch.ones(1, 3, 16, 16))]
        [8, 16]
    """

    kind = "gan"

    def __init__(self, shape: tuple[int, int, int], latent_dim: int = 32, channels: tuple[int, ...] = (8, 16, 32, 64),
                 kappa: float = 1.0) -> None:
        super().__init__(shape, latent_dim, channels, latent_dim)
        self.critic = Critic(self.shape, self.channels)
        self.kappa = float(kappa)

    def config(self) -> dict:
        return {**super().config(), "kappa": self.kappa}

    def encode(self, x: Tensor, mask: Tensor) -> Tensor:
        return self.encoder(x, mask)

    def features(self, x: Tensor, mask: Tensor) -> list[Tensor]:
        r"""Returns the critic's intermediate features of normalised cutouts (Storey-Fisher et al. 2021)."""

        return self.critic.features(x, mask)

    def loss(self, x: Tensor, mask: Tensor) -> tuple[Tensor, dict[str, float]]:
        r"""Returns the encoder's :math:`izi_f` loss (masked pixel MSE + :math:`\kappa` times the MSE of
        the critic's last features) and its parts; generator and critic are used as they are."""

        x_hat = self.decode(self.encode(x, mask))
        mse = masked_mse(x, x_hat, mask)
        f_real = self.critic.features(x, mask)[-1]
        f_fake = self.critic.features(x_hat, mask)[-1]
        feat = (f_real - f_fake).square().mean()
        return mse + self.kappa * feat, {"mse": mse.item(), "critic_features": feat.item()}


def gradient_penalty(critic: Callable[[Tensor, Tensor], Tensor], real: Tensor, fake: Tensor, mask: Tensor,
                     generator: torch.Generator | None = None) -> Tensor:
    r"""Returns the WGAN-GP penalty :math:`\mathbb{E}[(\lVert \nabla_{\hat x} D(\hat x) \rVert_2 - 1)^2]`
    at random interpolates :math:`\hat x = \epsilon x + (1 - \epsilon) \tilde x` (a scalar,
    differentiable in the critic's weights).

    Example:
        >>> w = torch.full((1, 1, 2, 2), 0.5)  # a linear critic whose gradient has norm 1
        >>> critic = lambda x, m: (w * x).flatten(1).sum(1)
        >>> float(gradient_penalty(critic, torch.randn(4, 1, 2, 2), torch.randn(4, 1, 2, 2), torch.ones(4, 1, 2, 2)))
        0.0
    """

    eps = torch.rand(len(real), 1, 1, 1, generator=generator).to(real) if generator is not None else torch.rand(len(real), 1, 1, 1).to(real)
    mix = (eps * real + (1 - eps) * fake).detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(mix, mask).sum(), mix, create_graph=True)
    return (grad.flatten(1).norm(dim=1) - 1).square().mean()


def fit_gan(
    model: EncodedWGAN,
    normaliser: BandNormaliser,
    train: BatchFactory,
    val: BatchFactory | None = None,
    *,
    epochs: int = 20,
    lr: float = 2e-4,
    device: str | torch.device | None = None,
    seed: int = 0,
    patience: int = 4,
    augment: bool = True,
    n_critic: int = 5,
    gp_weight: float = 10.0,
    progress: Callable[[dict], None] | None = None,
) -> list[dict]:
    r"""Trains an :class:`EncodedWGAN` on raw cutouts streamed in batches: the WGAN-GP for `epochs`
    epochs, then the encoder (generator and critic frozen) for up to `epochs` epochs with early
    stopping on the validation :math:`izi_f` loss, whose best epoch is restored.

    Each WGAN batch is one critic step (:math:`D(\tilde x) - D(x) + \lambda_{GP}` penalty); every
    `n_critic`-th batch also takes a generator step (:math:`-D(G(z))`). Fakes carry the real
    batch's masks, so missing pixels tell the critic nothing. Adam with
    :math:`\beta = (0.5, 0.9)` (Gulrajani et al. 2017). Device-agnostic, float32, seeded: on CPU
    with deterministic algorithms, the same seed and batches give the same weights.

    Arguments:
        model: The GAN to train (in place).
        normaliser: A fitted :class:`~gsafe_models.normalise.BandNormaliser`.
        train: Returns an iterable of raw batches :math:`(b, B, H, W)` float32 counts, NaN = missing.
        val: The same for the validation split (encoder early stopping), or None.
        epochs: Epochs of each stage.
        lr: Adam's learning rate (all three networks).
        device: `"cuda"`, `"cpu"`..., or None for CUDA when present.
        seed: Seeds the latent draws, the interpolates and the augmentation.
        patience: Encoder stage: stop after this many epochs without improvement.
        augment: Train on random rotations and flips of each batch.
        n_critic: Critic steps per generator step.
        gp_weight: :math:`\lambda_{GP}`.
        progress: Called after every epoch with `{"event": "epoch", ...}` and its record.

    Returns:
        One dict per epoch: `stage` (`"wgan"` or `"encoder"`), `epoch`, `train_loss` (critic
        loss, or encoder loss), `val_loss` (encoder stage), `wasserstein` (the critic's estimate
        of the distance between real and generated cutouts, WGAN stage), `seconds`.
    """

    device = resolve_device(device)
    model.to(device)
    normaliser.to(device)
    g = torch.Generator().manual_seed(seed)
    betas = (0.5, 0.9)
    opt_c = torch.optim.Adam(model.critic.parameters(), lr=lr, betas=betas)
    opt_g = torch.optim.Adam(model.decoder.parameters(), lr=lr, betas=betas)
    opt_e = torch.optim.Adam(model.encoder.parameters(), lr=lr * 5, betas=(0.9, 0.999))
    report = progress or (lambda event: None)

    def batches(factory: BatchFactory):
        for batch in factory():
            x, mask = normaliser(torch.as_tensor(unpack_batch(batch)[0]).to(device))
            if augment and model.training:
                k = int(torch.randint(8, (1,), generator=g))
                x, mask = _dihedral(x, k), _dihedral(mask, k)
            yield x * mask, mask

    def latent(n: int) -> Tensor:
        return torch.randn(n, model.latent_dim, generator=g).to(device)

    history: list[dict] = []
    with _deterministic(device.type != "cuda"):
        torch.manual_seed(seed)
        step = 0
        for epoch in range(epochs):
            start = time.perf_counter()
            model.train()
            c_total, w_total, count = 0.0, 0.0, 0
            for x, mask in batches(train):
                fake = model.decode(latent(len(x))) * mask
                d_real, d_fake = model.critic(x, mask), model.critic(fake.detach(), mask)
                loss_c = d_fake.mean() - d_real.mean() + gp_weight * gradient_penalty(model.critic, x, fake.detach(), mask, g)
                opt_c.zero_grad(set_to_none=True)
                loss_c.backward()
                opt_c.step()
                step += 1
                if step % n_critic == 0:
                    for p in model.critic.parameters():
                        p.requires_grad_(False)
                    loss_g = -model.critic(model.decode(latent(len(x))) * mask, mask).mean()
                    opt_g.zero_grad(set_to_none=True)
                    loss_g.backward()
                    opt_g.step()
                    for p in model.critic.parameters():
                        p.requires_grad_(True)
                c_total += loss_c.item() * len(x)
                w_total += (d_real.mean() - d_fake.mean()).item() * len(x)
                count += len(x)
            if count == 0:
                raise ValueError("fit_gan: the training factory yielded no batch")
            record = {"stage": "wgan", "epoch": epoch, "train_loss": c_total / count, "val_loss": None,
                      "wasserstein": w_total / count, "seconds": time.perf_counter() - start}
            history.append(record)
            report({"event": "epoch", **record})

        # the encoder, generator and critic frozen (f-AnoGAN izi_f)
        for p in (*model.decoder.parameters(), *model.critic.parameters()):
            p.requires_grad_(False)
        best, best_state, stale = math.inf, None, 0
        try:
            for epoch in range(epochs):
                start = time.perf_counter()
                model.train()
                total, count = 0.0, 0
                for x, mask in batches(train):
                    loss, _ = model.loss(x, mask)
                    opt_e.zero_grad(set_to_none=True)
                    loss.backward()
                    opt_e.step()
                    total += loss.item() * len(x)
                    count += len(x)
                val_loss = None
                if val is not None:
                    model.eval()
                    v_total, v_count = 0.0, 0
                    with torch.no_grad():
                        for x, mask in batches(val):
                            v_total += model.loss(x, mask)[0].item() * len(x)
                            v_count += len(x)
                    val_loss = v_total / max(v_count, 1)
                record = {"stage": "encoder", "epoch": epoch, "train_loss": total / max(count, 1), "val_loss": val_loss,
                          "wasserstein": None, "seconds": time.perf_counter() - start}
                history.append(record)
                report({"event": "epoch", **record})
                watched = record["train_loss"] if val_loss is None else val_loss
                if watched < best:
                    best, stale, best_state = watched, 0, copy.deepcopy(model.encoder.state_dict())
                else:
                    stale += 1
                    if stale >= patience:
                        break
        finally:
            for p in (*model.decoder.parameters(), *model.critic.parameters()):
                p.requires_grad_(True)
    if best_state is not None:
        model.encoder.load_state_dict(best_state)
    model.eval()
    return history
