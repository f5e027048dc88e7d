r"""Convolutional representations of cutouts: one encoder/decoder family for an autoencoder and a VAE."""

__all__ = [
    "astro_view",
    "nt_xent",
    "Encoder",
    "Decoder",
    "AutoEncoder",
    "VAE",
    "PCABasis",
    "build_representation",
    "masked_mse",
]

import torch
import torch.nn as nn

from torch import Tensor


def masked_mse(x: Tensor, x_hat: Tensor, mask: Tensor) -> Tensor:
    r"""Returns the mean squared error over valid pixels only (a scalar).

    Arguments:
        x: Normalised cutouts, shape :math:`(N, B, H, W)`.
        x_hat: Their reconstructions, same shape.
        mask: 1 where a pixel is valid, 0 where it is missing, same shape.
    """

    sse = (mask * (x_hat.float() - x.float()).square()).sum()
    return sse / mask.sum().clamp_min(1.0)


class Encoder(nn.Module):
    r"""Creates a convolutional encoder of cutouts and their masks.

    The input is the :math:`B` normalised bands (missing pixels set to 0) stacked with the
    :math:`B` per-band masks, so the network tells a missing pixel from a zero one. Each stage is a
    stride-2 :math:`3 \times 3` convolution followed by a stride-1 one; the stage outputs are the
    features used by the feature residual (Schlegl et al. 2017; Storey-Fisher et al. 2021).

    Arguments:
        shape: The cutout shape :math:`(B, H, W)`.
        out_features: The size of the output vector.
        channels: The channels of each stage; the spatial size halves at each.

    Example:
        >>> enc = Encoder((3, 16, 16), 8)
        >>> enc(torch.randn(2, 3, 16, 16), torch.ones(2, 3, 16, 16)).shape
        torch.Size([2, 8])
    """

    def __init__(self, shape: tuple[int, int, int], out_features: int, channels: tuple[int, ...] = (8, 16, 32, 64)) -> None:
        super().__init__()

        B, H, W = shape
        stages, c_in = [], 2 * B
        for c in channels:
            stages.append(
                nn.Sequential(
                    nn.Conv2d(c_in, c, 3, stride=2, padding=1),
                    nn.SiLU(),
                    nn.Conv2d(c, c, 3, padding=1),
                    nn.SiLU(),
                )
            )
            c_in = c
        self.stages = nn.ModuleList(stages)

        h, w = H, W
        for _ in channels:
            h, w = (h + 1) // 2, (w + 1) // 2
        self.feature_shape = (channels[-1], h, w)
        self.head = nn.Linear(channels[-1] * h * w, out_features)

    def features(self, x: Tensor, mask: Tensor) -> list[Tensor]:
        r"""Returns the output of every stage, each :math:`(N, C_i, H_i, W_i)`."""

        h = torch.cat((x * mask, mask), dim=1)
        out = []
        for stage in self.stages:
            h = stage(h)
            out.append(h)
        return out

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        return self.head(self.features(x, mask)[-1].flatten(1))


class Decoder(nn.Module):
    r"""Creates a convolutional decoder, the mirror of :class:`Encoder`.

    Arguments:
        shape: The cutout shape :math:`(B, H, W)`.
        latent_dim: The latent size :math:`D`.
        channels: The encoder's channels; the decoder runs them in reverse.

    Example:
        >>> Decoder((3, 16, 16), 8)(torch.randn(2, 8)).shape
        torch.Size([2, 3, 16, 16])
    """

    def __init__(self, shape: tuple[int, int, int], latent_dim: int, channels: tuple[int, ...] = (8, 16, 32, 64)) -> None:
        super().__init__()

        B, H, W = shape
        h, w = H, W
        for _ in channels:
            h, w = (h + 1) // 2, (w + 1) // 2
        self.shape = (B, H, W)
        self.start = (channels[-1], h, w)
        self.head = nn.Sequential(nn.Linear(latent_dim, channels[-1] * h * w), nn.SiLU())

        layers = []
        rev = list(channels[::-1])
        for c_in, c_out in zip(rev, rev[1:] + [None]):
            if c_out is None:  # last stage: up to the bands, linear output
                layers += [nn.Conv2d(c_in, c_in, 3, padding=1), nn.SiLU(), nn.ConvTranspose2d(c_in, B, 4, stride=2, padding=1)]
            else:
                layers += [nn.Conv2d(c_in, c_in, 3, padding=1), nn.SiLU(), nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1), nn.SiLU()]
        self.body = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        h = self.head(z).view(-1, *self.start)
        x = self.body(h)
        return x[..., : self.shape[1], : self.shape[2]]  # crop the padding of odd sizes


class _Representation(nn.Module):
    r"""What :class:`AutoEncoder` and :class:`VAE` share: shapes, decoder, features, config."""

    kind = ""

    def __init__(self, shape: tuple[int, int, int], latent_dim: int, channels: tuple[int, ...], enc_out: int) -> None:
        super().__init__()

        self.shape = tuple(int(s) for s in shape)
        self.latent_dim = int(latent_dim)
        self.channels = tuple(int(c) for c in channels)
        self.encoder = Encoder(self.shape, enc_out, self.channels)
        self.decoder = Decoder(self.shape, self.latent_dim, self.channels)

    def config(self) -> dict:
        r"""Returns what :func:`build_representation` needs to rebuild the module."""

        return {"kind": self.kind, "shape": self.shape, "latent_dim": self.latent_dim, "channels": self.channels}

    def encode(self, x: Tensor, mask: Tensor) -> Tensor:
        r"""Returns the latents :math:`z`, shape :math:`(N, D)`, of normalised cutouts and masks."""

        raise NotImplementedError

    def decode(self, z: Tensor) -> Tensor:
        r"""Returns normalised reconstructions :math:`(N, B, H, W)` of latents :math:`(N, D)`."""

        return self.decoder(z)

    def forward(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        r"""Returns the reconstruction :math:`(N, B, H, W)` and the latents :math:`(N, D)`."""

        z = self.encode(x, mask)
        return self.decode(z), z

    def features(self, x: Tensor, mask: Tensor) -> list[Tensor]:
        r"""Returns the encoder's intermediate features of normalised cutouts."""

        return self.encoder.features(x, mask)


class AutoEncoder(_Representation):
    r"""Creates a convolutional autoencoder of cutouts, trained on the masked squared error.

    References:
        | Reducing the Dimensionality of Data with Neural Networks (Hinton & Salakhutdinov, 2006)
        | https://doi.org/10.1126/science.1127647

    Arguments:
        shape: The cutout shape :math:`(B, H, W)`.
        latent_dim: The latent size :math:`D`.
        channels: The channels of each encoder stage.

    Example:
        >>> ae = AutoEncoder((3, 16, 16), 8)
        >>> x, mask = torch.randn(2, 3, 16, 16), torch.ones(2, 3, 16, 16)
        >>> x_hat, z = ae(x, mask)
        >>> x_hat.shape, z.shape
        (torch.Size([2, 3, 16, 16]), torch.Size([2, 8]))
    """

    kind = "ae"

    def __init__(self, shape: tuple[int, int, int], latent_dim: int = 32, channels: tuple[int, ...] = (8, 16, 32, 64),
                 contrastive: float = 0.0, temperature: float = 0.5) -> None:
        super().__init__(shape, latent_dim, channels, latent_dim)
        self.contrastive = float(contrastive)
        self.temperature = float(temperature)
        # SimCLR's projection head (only trained, never scored): z -> h, where the contrastive loss acts
        self.projection = nn.Sequential(nn.Linear(latent_dim, latent_dim), nn.ReLU(), nn.Linear(latent_dim, latent_dim)) \
            if self.contrastive > 0 else None

    def config(self) -> dict:
        out = super().config()
        if self.contrastive > 0:
            out |= {"contrastive": self.contrastive, "temperature": self.temperature}
        return out

    def encode(self, x: Tensor, mask: Tensor) -> Tensor:
        return self.encoder(x, mask)

    def loss(self, x: Tensor, mask: Tensor) -> tuple[Tensor, dict[str, float]]:
        r"""Returns the training loss (masked mean squared error, plus the weighted contrastive term
        when `contrastive` > 0) and its parts."""

        x_hat, _ = self(x, mask)
        mse = masked_mse(x, x_hat, mask)
        if self.contrastive <= 0 or len(x) < 2:
            return mse, {"mse": mse.item()}
        (v1, m1), (v2, m2) = astro_view(x, mask), astro_view(x, mask)
        h1, h2 = self.projection(self.encode(v1, m1)), self.projection(self.encode(v2, m2))
        nce = nt_xent(h1, h2, self.temperature)
        return mse + self.contrastive * nce, {"mse": mse.item(), "nt_xent": nce.item()}


def astro_view(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    r"""One random view of a batch of normalised cutouts for contrastive learning: a random rotation
    by a multiple of 90° and flip (the sky has no preferred orientation), a shift of up to 2 pixels
    (centroiding error), and a noise redraw (Gaussian noise with each cutout's own per-band background
    scatter, the median absolute deviation of its border pixels): what changes between two exposures
    of one object, not the object (Hayat et al. 2021, who add PSF blur and extinction).

    References:
        | Self-supervised Representation Learning for Astronomical Images (Hayat et al., 2021)
        | https://arxiv.org/abs/2012.13083

    Example:
        >>> v, m = astro_view(torch.randn(4, 3, 16, 16), torch.ones(4, 3, 16, 16))
        >>> v.shape, m.shape
        (torch.Size([4, 3, 16, 16]), torch.Size([4, 3, 16, 16]))
    """

    k = int(torch.randint(0, 4, (1,)))
    x, mask = torch.rot90(x, k, (-2, -1)), torch.rot90(mask, k, (-2, -1))
    if bool(torch.randint(0, 2, (1,))):
        x, mask = x.flip(-1), mask.flip(-1)
    dy, dx = (int(d) for d in torch.randint(-2, 3, (2,)))
    x, mask = torch.roll(x, (dy, dx), (-2, -1)), torch.roll(mask, (dy, dx), (-2, -1))
    border = torch.cat([x[..., :2, :].flatten(-2), x[..., -2:, :].flatten(-2), x[..., :, :2].flatten(-2),
                        x[..., :, -2:].flatten(-2)], dim=-1)
    scatter = 1.4826 * (border - border.median(-1, keepdim=True).values).abs().median(-1).values
    return (x + torch.randn_like(x) * scatter[..., None, None]) * mask, mask


def nt_xent(h1: Tensor, h2: Tensor, temperature: float = 0.5) -> Tensor:
    r"""SimCLR's normalised temperature-scaled cross-entropy between two views ``(N, D)`` of N objects:
    each view must pick its partner among the other 2N - 2 (Chen et al. 2020).

    References:
        | A Simple Framework for Contrastive Learning of Visual Representations (Chen et al., 2020)
        | https://arxiv.org/abs/2002.05709

    Example:
        >>> h = torch.randn(8, 4)
        >>> bool(nt_xent(h, h) < nt_xent(h, torch.randn(8, 4)))
        True
    """

    n = len(h1)
    h = nn.functional.normalize(torch.cat([h1, h2]).float(), dim=1)
    sim = h @ h.T / temperature
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=h.device), float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(h.device)
    return nn.functional.cross_entropy(sim, target)


class VAE(_Representation):
    r"""Creates a :math:`\beta`-VAE of cutouts with a Gaussian pixel likelihood of fixed width.

    The loss per valid pixel is the squared error plus :math:`\beta \, 2\sigma^2\, \mathrm{KL}`
    spread over the pixels, which is :math:`2\sigma^2 / n_{pix}` times the negative
    :math:`\beta`-ELBO with pixel noise :math:`\sigma` (in normalised units). :meth:`encode`
    returns the posterior mean, so scoring is deterministic.

    References:
        | Auto-Encoding Variational Bayes (Kingma & Welling, 2014)
        | https://arxiv.org/abs/1312.6114
        | beta-VAE: Learning Basic Visual Concepts with a Constrained Variational Framework
        | (Higgins et al., 2017) https://openreview.net/forum?id=Sy2fzU9gl

    Arguments:
        shape: The cutout shape :math:`(B, H, W)`.
        latent_dim: The latent size :math:`D`.
        beta: The weight :math:`\beta` of the KL term.
        channels: The channels of each encoder stage.
        sigma: The pixel noise :math:`\sigma` of the likelihood, in normalised units.

    Example:
        >>> vae = VAE((3, 16, 16), 8, beta=0.5)
        >>> loss, parts = vae.loss(torch.randn(2, 3, 16, 16), torch.ones(2, 3, 16, 16))
        >>> sorted(parts)
        ['kl', 'mse']
    """

    kind = "vae"

    def __init__(
        self,
        shape: tuple[int, int, int],
        latent_dim: int = 32,
        beta: float = 1.0,
        channels: tuple[int, ...] = (8, 16, 32, 64),
        sigma: float = 0.1,
    ) -> None:
        super().__init__(shape, latent_dim, channels, 2 * latent_dim)
        self.beta = float(beta)
        self.sigma = float(sigma)

    def config(self) -> dict:
        return {**super().config(), "beta": self.beta, "sigma": self.sigma}

    def posterior(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        r"""Returns the mean and log-variance of :math:`q(z \mid x)`, each :math:`(N, D)`."""

        mu, logvar = self.encoder(x, mask).chunk(2, dim=-1)
        return mu, logvar.clamp(-12.0, 8.0)

    def encode(self, x: Tensor, mask: Tensor) -> Tensor:
        return self.posterior(x, mask)[0]

    def loss(self, x: Tensor, mask: Tensor) -> tuple[Tensor, dict[str, float]]:
        r"""Returns the training loss (scaled negative :math:`\beta`-ELBO) and its parts."""

        mu, logvar = self.posterior(x, mask)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp() if self.training else mu
        x_hat = self.decode(z)
        mse = masked_mse(x, x_hat, mask)
        kl = 0.5 * (mu.float().square() + logvar.float().exp() - 1 - logvar.float()).sum(1).mean()
        pixels = mask.sum() / mask.shape[0]
        loss = mse + self.beta * 2 * self.sigma**2 * kl / pixels.clamp_min(1.0)
        return loss, {"mse": mse.item(), "kl": kl.item()}


def build_representation(config: dict) -> AutoEncoder | VAE:
    r"""Rebuilds an :class:`AutoEncoder` or :class:`VAE` from its :py:`config()`.

    Example:
        >>> ae = AutoEncoder((3, 16, 16), 8)
        >>> type(build_representation(ae.config())).__name__
        'AutoEncoder'
    """

    config = dict(config)
    kind = config.pop("kind")
    if kind == "ae":
        return AutoEncoder(**config)
    if kind == "vae":
        return VAE(**config)
    if kind == "gan":  # gsafe_models.gan imports this module: imported here, when asked for
        from .gan import EncodedWGAN

        return EncodedWGAN(**config)
    raise ValueError(f"build_representation: kind={kind!r}, expected 'ae', 'vae' or 'gan'")



class PCABasis(nn.Module):
    r"""Creates a linear reconstruction of normalised cutouts by their first :math:`k` principal
    components: few free parameters, fitted in seconds, robust where a network would learn the
    anomalies of a small, dirty training set; its residual complements the autoencoder's.

    Missing pixels are filled with the mean before projecting.

    References:
        | On Lines and Planes of Closest Fit to Systems of Points in Space (Pearson, 1901)
        | https://doi.org/10.1080/14786440109462720

    Arguments:
        shape: The cutout shape :math:`(B, H, W)`.
        components: :math:`k`.

    Example:
        >>> x = torch.randn(64, 2, 8, 8)
        >>> pca = PCABasis((2, 8, 8), 4).fit(x, torch.ones_like(x))
        >>> pca(x, torch.ones_like(x)).shape
        torch.Size([64, 2, 8, 8])
    """

    def __init__(self, shape: tuple[int, int, int], components: int = 32) -> None:
        super().__init__()
        self.shape = tuple(int(s) for s in shape)
        self.components = int(components)
        d = self.shape[0] * self.shape[1] * self.shape[2]
        self.register_buffer("mean", torch.zeros(d))
        self.register_buffer("basis", torch.zeros(self.components, d))

    def config(self) -> dict:
        return {"shape": self.shape, "components": self.components}

    @torch.no_grad()
    def fit(self, x: Tensor, mask: Tensor) -> "PCABasis":
        r"""Fits mean and components to normalised cutouts :math:`(N, B, H, W)` (mask 1 = valid)."""

        X = (x * mask).flatten(1).double()
        w = mask.flatten(1).double()
        mean = X.sum(0) / w.sum(0).clamp_min(1.0)
        X = torch.where(w > 0, X, mean.expand_as(X)) - mean
        k = min(self.components, X.shape[0] - 1, X.shape[1])
        _, _, V = torch.linalg.svd(X, full_matrices=False)
        basis = torch.zeros_like(self.basis, dtype=torch.float64)
        basis[:k] = V[:k]
        self.mean = mean.to(self.mean)
        self.basis = basis.to(self.basis)
        return self

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        r"""Returns the reconstruction :math:`(N, B, H, W)` of normalised cutouts."""

        mean = self.mean.to(x)
        X = torch.where(mask.flatten(1) > 0, x.flatten(1), mean.expand(x.shape[0], -1)) - mean
        basis = self.basis.to(x)
        return ((X @ basis.T) @ basis + mean).view_as(x)
