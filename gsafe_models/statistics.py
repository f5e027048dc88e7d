r"""Per-object anomaly statistics: residuals, latent densities, typicality, Rao's score, photometry.

Every statistic maps a batch of objects to one number each, shape :math:`(N,)`, larger = more
anomalous, and is written in torch so that it is differentiable in the input (attributions) and
runs on the device of its input.
"""

__all__ = [
    "reconstruction_residual",
    "peak_residual",
    "local_residual",
    "peak_of",
    "sharpness",
    "line_residual",
    "feature_residual",
    "anomaly_score",
    "typicality",
    "per_sample_scores",
    "rao_parameter_names",
    "RaoScore",
    "aperture_weights",
    "aperture_fluxes",
    "colours",
    "concentration",
    "asymmetry",
    "second_moments",
    "smoothness",
    "morphometry",
    "Mahalanobis",
]

import functools
import math

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from torch import Tensor
from torch.func import functional_call, grad, vmap


def reconstruction_residual(x: Tensor, x_hat: Tensor, mask: Tensor) -> Tensor:
    r"""Returns :math:`G`, the RMS of the pixel residual over each object's valid pixels.

    References:
        | Unsupervised Anomaly Detection with Generative Adversarial Networks to Guide Marker
        | Discovery (Schlegl et al., 2017) https://arxiv.org/abs/1703.05921

    Arguments:
        x: Normalised cutouts, shape :math:`(N, B, H, W)`.
        x_hat: Their reconstructions, same shape.
        mask: 1 where a pixel is valid, 0 where missing, same shape.

    Returns:
        :math:`G`, shape :math:`(N,)`.

    Example:
        >>> x = torch.randn(2, 3, 8, 8)
        >>> reconstruction_residual(x, x, torch.ones_like(x))
        tensor([0., 0.])
    """

    sse = (mask * (x - x_hat).square()).flatten(1).sum(1)
    return (sse / mask.flatten(1).sum(1).clamp_min(1.0)).sqrt()


def peak_residual(x: Tensor, x_hat: Tensor, mask: Tensor, window: int = 3, weight: Tensor | None = None) -> Tensor:
    r"""Returns the largest local RMS residual: the RMS over a `window` x `window` box of valid
    pixels, maximised over positions and bands.

    :math:`G` averages over every pixel of every band, so a cosmic ray, a point source or a
    thin arc, a few dozen pixels of a cutout, barely moves it; the local maximum is a matched
    filter for such compact anomalies, and a single band is enough to raise it.

    Arguments:
        x: Normalised cutouts, shape :math:`(N, B, H, W)`.
        x_hat: Their reconstructions, same shape.
        mask: 1 where a pixel is valid, 0 where missing, same shape.
        window: The box side, in pixels (odd).
        weight: Optional weights :math:`(H, W)` in [0, 1] of the positions (e.g. a central
            aperture, to look only at the object and not at its neighbours).

    Returns:
        Peak residuals, shape :math:`(N,)`.

    Example:
        >>> x = torch.zeros(2, 3, 16, 16)
        >>> x_hat = x.clone()
        >>> x_hat[1, 2, 5, 5] = 0.9
        >>> peak_residual(x, x_hat, torch.ones_like(x)).round(decimals=4)
        tensor([0.0000, 0.3000])
    """

    return peak_of(local_residual(x, x_hat, mask, window), weight)


def local_residual(x: Tensor, x_hat: Tensor, mask: Tensor, window: int = 3) -> Tensor:
    r"""Returns the mean squared residual over the valid pixels of each `window` x `window` box,
    shape :math:`(N, B, H, W)`: the map :func:`peak_residual` maximises (computed once, it
    serves several weightings through :func:`peak_of`)."""

    pad = window // 2
    r2 = F.avg_pool2d(mask * (x - x_hat).square(), window, 1, pad, count_include_pad=False)
    n = F.avg_pool2d(mask, window, 1, pad, count_include_pad=False)
    return r2 / n.clamp_min(1.0 / window**2)


def peak_of(local: Tensor, weight: Tensor | None = None) -> Tensor:
    r"""Returns :func:`peak_residual` from a :func:`local_residual` map and optional position weights."""

    if weight is not None:
        local = local * weight.to(local)
    return (local.flatten(1).amax(1) + 1e-20).sqrt()  # finite gradient at 0


def sharpness(residual: Tensor) -> Tensor:
    r"""Returns the largest excess of a pixel's residual over the mean of its 8 neighbours.

    Everything the sky sends through the telescope is blurred by the PSF, so a pixel cannot
    stand far above all its neighbours; a cosmic ray or a hot pixel hits the detector directly
    and does. This is the Laplacian edge test of L.A.Cosmic applied to the residual.

    References:
        | Cosmic-Ray Rejection by Laplacian Edge Detection (van Dokkum, 2001)
        | https://arxiv.org/abs/astro-ph/0108003

    Arguments:
        residual: Residuals in noise units :math:`(N, B, H, W)`, 0 where pixels are missing.

    Returns:
        Sharpness, shape :math:`(N,)`, in noise units.

    Example:
        >>> r = torch.zeros(1, 2, 8, 8)
        >>> r[0, 1, 3, 3] = 8.0
        >>> sharpness(r)
        tensor([8.])
    """

    neighbours = (F.avg_pool2d(residual, 3, 1, 1, count_include_pad=False) * 9 - residual) / 8
    return (residual - neighbours).flatten(1).amax(1)


def line_residual(residual: Tensor, mask: Tensor, angles: int = 24, width: int = 3, binning: int = 2) -> Tensor:
    r"""Returns the largest mean residual along a straight band across the cutout, in noise units.

    A discrete Radon transform: the residual is rotated to `angles` orientations, summed along
    rows `width` pixels wide and normalised by the square root of the number of valid pixels,
    so pure noise gives :math:`\mathcal{N}(0, 1)` per line. A satellite trail, a few sigma per
    pixel, is tens of sigma once summed along its length. The residual is first binned
    `binning` x `binning` (trails are wider than a pixel), which makes the transform cheaper.

    References:
        | Über die Bestimmung von Funktionen durch ihre Integralwerte längs gewisser
        | Mannigfaltigkeiten (Radon, 1917)

    Arguments:
        residual: Residuals in noise units :math:`(N, B, H, W)`, 0 where pixels are missing.
        mask: 1 where a pixel is valid, same shape.
        angles: The number of orientations in :math:`[0, 180°)`.
        width: The band width in binned pixels.
        binning: The binning factor applied first.

    Returns:
        The largest absolute line statistic over orientations, offsets and bands, shape :math:`(N,)`.

    Example:
        >>> r = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
        >>> r[1, 0, :, 10] += 2.0  # a faint vertical trail
        >>> s = line_residual(r, torch.ones_like(r))
        >>> bool(s[1] > 2 * s[0])
        True
    """

    if binning > 1:  # sums over bins, rescaled to unit noise again
        count = F.avg_pool2d(mask.to(residual.dtype), binning, ceil_mode=True)
        residual = F.avg_pool2d(residual, binning, ceil_mode=True) * binning / count.clamp_min(1e-6).sqrt() * count.gt(0)
        mask = count.gt(0).to(residual.dtype)
    N, B, H, W = residual.shape
    both = torch.cat([residual, mask.to(residual.dtype)], dim=1)  # (N, 2B, H, W)
    if H * W * angles * H <= _RADON_MATRIX_MAX:
        # The transform is linear: one matrix product with its matrix (built once per shape by
        # the same rotations, so identical up to rounding) instead of `angles` grid samples.
        M = _radon_matrix(H, W, angles, width, str(residual.device), residual.dtype)
        sums = (both.flatten(2) @ M).view(N, 2 * B, angles, H)
        stat = sums[:, :B].abs() / sums[:, B:].clamp_min(1.0).sqrt()
        return stat.flatten(1).amax(1)
    best = residual.new_full((N,), -math.inf)
    for a in range(angles):
        sums = _rotated_line_sums(both, a, angles, width)  # (N, 2B, H): one row = one line
        stat = sums[:, :B].abs() / sums[:, B:].clamp_min(1.0).sqrt()
        best = torch.maximum(best, stat.flatten(1).amax(1))
    return best


_RADON_MATRIX_MAX = 1 << 25  # entries (128 MiB in float32): past that, rotate image by image


def _rotated_line_sums(images: Tensor, a: int, angles: int, width: int) -> Tensor:
    r"""Sums of `images` :math:`(N, C, H, W)` along bands `width` rows wide after rotating them by
    angle number `a` of `angles` in :math:`[0, 180°)`: shape :math:`(N, C, H)`."""

    N, C, H, W = images.shape
    phi = torch.tensor(a * math.pi / angles, dtype=torch.float64)
    c, s = float(phi.cos()), float(phi.sin())
    theta = images.new_tensor([[c, -s, 0.0], [s, c, 0.0]])
    grid = F.affine_grid(theta.expand(N, 2, 3), [N, C, H, W], align_corners=False)
    rotated = F.grid_sample(images, grid, align_corners=False)  # zeros outside the cutout
    return F.avg_pool1d(rotated.sum(-1), width, 1, width // 2) * width


@functools.lru_cache(maxsize=8)
def _radon_matrix(H: int, W: int, angles: int, width: int, device: str, dtype: torch.dtype) -> Tensor:
    r"""The matrix :math:`(H W, A H)` of :func:`line_residual`'s transform, column `a·H + row`."""

    basis = torch.eye(H * W, dtype=torch.float64).view(H * W, 1, H, W)
    cols = [_rotated_line_sums(basis, a, angles, width)[:, 0] for a in range(angles)]  # each (HW, H)
    return torch.cat(cols, dim=1).to(device=device, dtype=dtype)


def feature_residual(features: Sequence[Tensor], features_hat: Sequence[Tensor]) -> Tensor:
    r"""Returns :math:`C`, the RMS difference between encoder features of an input and of its
    reconstruction, averaged over the feature layers.

    Storey-Fisher et al. (2021) take the features from the GAN critic; an autoencoder's own
    encoder plays that role here, so :math:`C` sees structure the encoder cares about rather than
    pixel noise.

    References:
        | Anomaly Detection in Astronomical Images with Generative Adversarial Networks
        | (Storey-Fisher et al., 2021) https://arxiv.org/abs/2012.08082

    Arguments:
        features: Per-layer features of the inputs, each :math:`(N, \dots)`.
        features_hat: The same layers for the reconstructions.

    Returns:
        :math:`C`, shape :math:`(N,)`.

    Example:
        >>> f = [torch.randn(2, 4, 8, 8), torch.randn(2, 8, 4, 4)]
        >>> feature_residual(f, f)
        tensor([0., 0.])
    """

    rms = [(a - b).flatten(1).square().mean(1).sqrt() for a, b in zip(features, features_hat)]
    return torch.stack(rms).mean(0)


def anomaly_score(g: Tensor, c: Tensor, lam: float = 0.9, g_scale: float | Tensor = 1.0, c_scale: float | Tensor = 1.0) -> Tensor:
    r"""Returns :math:`AS = \lambda\, G / s_G + (1 - \lambda)\, C / s_C` (Storey-Fisher et al. 2021).

    :math:`G` and :math:`C` live in different units, so each is divided by its typical value on
    normal data (:math:`s_G`, :math:`s_C`) before mixing; :math:`\lambda = 0.9` as in the HSC hunt.

    References:
        | Anomaly Detection in Astronomical Images with Generative Adversarial Networks
        | (Storey-Fisher et al., 2021) https://arxiv.org/abs/2012.08082

    Example:
        >>> anomaly_score(torch.tensor([1.0]), torch.tensor([2.0]), lam=0.5, c_scale=2.0)
        tensor([1.])
    """

    return lam * g / g_scale + (1 - lam) * c / c_scale


def typicality(nll: Tensor, reference: float | Tensor) -> Tensor:
    r"""Returns :math:`|-\log p(z) - \mathbb{E}_{train}[-\log p(z)]|`.

    Normal data lives in the typical set, a shell of nearly constant log-density, not at the
    mode; inputs whose likelihood is *too high* are as suspicious as those whose likelihood is
    too low (Nalisnick et al. 2019).

    References:
        | Detecting Out-of-Distribution Inputs to Deep Generative Models Using Typicality
        | (Nalisnick et al., 2019) https://arxiv.org/abs/1906.02994
        | Model-agnostic out-of-distribution detection using combined statistical tests
        | (Bergamin et al., 2022) https://arxiv.org/abs/2203.01097

    Example:
        >>> typicality(torch.tensor([1.0, 5.0]), 3.0)
        tensor([2., 2.])
    """

    return (nll - reference).abs()


class _LogProb(nn.Module):
    r"""Exposes a density's :py:`log_prob` as :py:`forward`, for :func:`torch.func.functional_call`."""

    def __init__(self, density: nn.Module) -> None:
        super().__init__()
        self.density = density

    def forward(self, z: Tensor) -> Tensor:
        return self.density.log_prob(z)


def rao_parameter_names(density: nn.Module) -> list[str]:
    r"""Returns the small parameter subset whose scores :class:`RaoScore` uses.

    For a module with trainable weights (a flow), the biases: one per unit, the last layer's
    being the shifts and log-scales of the transforms themselves. For a module whose parameters
    are fitted buffers (an EM Gaussian mixture), its `means` and `weights` when present.
    """

    names = [n for n, p in density.named_parameters() if p.requires_grad and n.endswith("bias")]
    if names:
        return names
    buffers = dict(density.named_buffers())
    names = [n for n in ("means", "weights") if n in buffers]
    if names:
        return names
    return [n for n, b in buffers.items() if b.is_floating_point() and b.ndim > 0]


def per_sample_scores(density: nn.Module, z: Tensor, names: Sequence[str]) -> Tensor:
    r"""Returns the per-object score vectors :math:`\nabla_\theta \log p_\theta(z_i)`.

    One :func:`torch.func.vmap` of :func:`torch.func.grad` over the objects, with the named
    parameters or buffers of `density` as :math:`\theta`; differentiable in `z`.

    Arguments:
        density: A module with :py:`log_prob(z) -> (N,)`.
        z: Latents, shape :math:`(N, D)`.
        names: Parameter or buffer names of `density`.

    Returns:
        The flattened scores, shape :math:`(N, P)`.

    Example:
        >>> from gsafe_models.density import GaussianMixture
        >>> gmm = GaussianMixture(2, 3).fit(torch.randn(100, 3))
        >>> per_sample_scores(gmm, torch.randn(5, 3), ["means"]).shape
        torch.Size([5, 6])
    """

    wrapper = _LogProb(density)
    tensors = dict(density.named_parameters()) | dict(density.named_buffers())
    params = {f"density.{n}": tensors[n].detach() for n in names}

    def log_prob(p: dict[str, Tensor], zi: Tensor) -> Tensor:
        return functional_call(wrapper, p, (zi.unsqueeze(0),)).squeeze(0)

    grads = vmap(grad(log_prob), in_dims=(None, 0))(params, z)
    return torch.cat([grads[k].flatten(1) for k in params], dim=1)


class RaoScore(nn.Module):
    r"""Creates Rao's score statistic :math:`\frac1P\, \| (s_\theta(z) - m) / \sigma \|^2` of a density.

    :math:`s_\theta(z) = \nabla_\theta \log p_\theta(z)` is the score of one object. At the
    maximum-likelihood fit its mean over normal data is ~0 and its covariance is the Fisher
    information; Rao's test measures how far one object's score is from that. The Fisher matrix
    is approximated by its diagonal (:math:`\sigma^2`, fitted on training latents, with the mean
    :math:`m` subtracted so constrained parameters such as mixture weights need no care), and
    :math:`\theta` is restricted to a small subset (:func:`rao_parameter_names`) so per-object
    gradients stay cheap.

    References:
        | Large-sample tests of statistical hypotheses concerning several parameters with
        | applications to problems of estimation (Rao, 1948) https://doi.org/10.1017/S0305004100023987
        | Model-agnostic out-of-distribution detection using combined statistical tests
        | (Bergamin et al., 2022) https://arxiv.org/abs/2203.01097

    Arguments:
        names: The parameter names of the density to use.
        size: The total number of their elements :math:`P`.

    Example:
        >>> from gsafe_models.density import GaussianMixture
        >>> z = torch.randn(200, 2)
        >>> gmm = GaussianMixture(1, 2).fit(z)
        >>> rao = RaoScore.for_density(gmm).fit(gmm, z)
        >>> rao(gmm, torch.tensor([[0.0, 0.0], [6.0, 6.0]])).argmax().item()
        1
    """

    def __init__(self, names: Sequence[str], size: int) -> None:
        super().__init__()
        self.names = list(names)
        self.register_buffer("mean", torch.zeros(size))
        self.register_buffer("std", torch.ones(size))

    @classmethod
    def for_density(cls, density: nn.Module, names: Sequence[str] | None = None) -> "RaoScore":
        r"""Creates the statistic for `density`'s default parameter subset (or `names`)."""

        names = rao_parameter_names(density) if names is None else list(names)
        tensors = dict(density.named_parameters()) | dict(density.named_buffers())
        return cls(names, sum(tensors[n].numel() for n in names))

    def config(self) -> dict:
        return {"names": self.names, "size": self.mean.numel()}

    def scores(self, density: nn.Module, z: Tensor, chunk: int = 1024) -> Tensor:
        r"""Returns the raw score vectors :math:`(N, P)`, computed `chunk` objects at a time."""

        return torch.cat([per_sample_scores(density, z[i : i + chunk], self.names) for i in range(0, len(z), chunk)])

    def fit(self, density: nn.Module, z: Tensor) -> "RaoScore":
        r"""Fits the mean and diagonal Fisher information on normal latents :math:`(N, D)`."""

        with torch.no_grad():
            s = self.scores(density, z).to(torch.float64)
        std = s.std(0)
        floor = 1e-6 * std.max().clamp_min(1e-12)
        self.mean = s.mean(0).to(self.mean)
        self.std = std.clamp_min(floor).to(self.std)
        return self

    def forward(self, density: nn.Module, z: Tensor) -> Tensor:
        r"""Returns the statistic, shape :math:`(N,)`."""

        s = self.scores(density, z)
        u = (s - self.mean.to(s)) / self.std.to(s)
        return u.square().mean(1)


def _radius(H: int, W: int, device: torch.device | None = None) -> Tensor:
    r"""Returns each pixel's distance to the cutout centre, shape :math:`(H, W)`."""

    y = torch.arange(H, device=device, dtype=torch.float32) - (H - 1) / 2
    x = torch.arange(W, device=device, dtype=torch.float32) - (W - 1) / 2
    return torch.sqrt(y[:, None].square() + x[None, :].square())


def aperture_weights(H: int, W: int, radius: float | Tensor, device: torch.device | None = None) -> Tensor:
    r"""Returns the weight of each pixel in a centred circular aperture, :math:`(H, W)` (or
    :math:`(R, H, W)` for radii :math:`(R,)`): 1 inside, 0 outside, linear across the one-pixel
    boundary, which approximates the covered pixel area so small apertures are not stepwise.

    Example:
        >>> aperture_weights(5, 5, 1.0)[2]
        tensor([0.0000, 0.5000, 1.0000, 0.5000, 0.0000])
    """

    r = _radius(H, W, device)
    radius = torch.as_tensor(radius, dtype=r.dtype, device=device)
    return (radius[..., None, None] - r + 0.5).clamp(0.0, 1.0)


def aperture_fluxes(images: Tensor, radius: float) -> Tensor:
    r"""Returns the flux of each band in a circular aperture at the cutout centre.

    Arguments:
        images: Sky-subtracted cutouts :math:`(N, B, H, W)`, no NaN.
        radius: The aperture radius in pixels.

    Returns:
        Fluxes, shape :math:`(N, B)`.

    Example:
        >>> aperture_fluxes(torch.ones(1, 2, 9, 9), 3.0)  # area 28.27
        tensor([[28.3881, 28.3881]])
    """

    H, W = images.shape[-2:]
    return (images * aperture_weights(H, W, radius, images.device).to(images.dtype)).sum((-2, -1))


def colours(images: Tensor, radius: float) -> Tensor:
    r"""Returns the colours of adjacent bands in a central aperture, as asinh magnitudes.

    With fluxes in units of each band's pixel noise, the aperture noise is :math:`\sqrt{n_{pix}}`
    and the asinh magnitude :math:`-\operatorname{asinh}(f / 2\sqrt{n_{pix}})` (in units of
    :math:`2.5 / \ln 10` mag) behaves like a magnitude for bright objects and stays finite for
    faint or negative fluxes; a colour is the difference of adjacent bands.

    References:
        | A Modified Magnitude System that Produces Well-Behaved Magnitudes, Colors, and Errors
        | Even for Low Signal-to-Noise Ratio Measurements (Lupton et al., 1999)
        | https://arxiv.org/abs/astro-ph/9903081

    Arguments:
        images: Sky-subtracted cutouts in noise units :math:`(N, B, H, W)`, no NaN.
        radius: The aperture radius in pixels.

    Returns:
        Colours, shape :math:`(N, B - 1)`.

    Example:
        >>> colours(torch.ones(1, 3, 9, 9), 2.0)
        tensor([[0., 0.]])
    """

    H, W = images.shape[-2:]
    npix = float(aperture_weights(H, W, radius).sum())
    mag = -torch.asinh(aperture_fluxes(images, radius) / (2 * math.sqrt(npix)))
    return mag[:, :-1] - mag[:, 1:]


def concentration(image: Tensor, radii: Tensor | None = None) -> Tensor:
    r"""Returns the concentration :math:`5 \log_{10}(r_{80} / r_{20})` of each object.

    :math:`r_{20}` and :math:`r_{80}` enclose 20 % and 80 % of the flux within the largest radius
    of the curve of growth, interpolated linearly between radii.

    References:
        | The Asymmetry of Galaxies: Physical Morphology for Nearby and High-Redshift Galaxies
        | (Conselice, 2003) https://arxiv.org/abs/astro-ph/0303065 (CAS system)

    Arguments:
        image: Sky-subtracted single-band (e.g. band-summed) cutouts :math:`(N, H, W)`, no NaN.
        radii: Increasing radii of the curve of growth, in pixels; default 1 to 0.45 of the
            cutout size by half pixels.

    Returns:
        Concentrations, shape :math:`(N,)`.

    Example:
        >>> y, x = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
        >>> blob = torch.exp(-((y - 15.5) ** 2 + (x - 15.5) ** 2) / 8)[None]
        >>> round(concentration(blob).item(), 1)  # a Gaussian: 5 log10(2.69) = 2.15
        2.2
    """

    H, W = image.shape[-2:]
    if radii is None:
        radii = torch.arange(1.0, 0.45 * min(H, W) + 1e-6, 0.5)
    radii = radii.to(device=image.device, dtype=image.dtype)
    inside = aperture_weights(H, W, radii, image.device).to(image.dtype)  # (R, H, W)
    growth = torch.einsum("nhw,rhw->nr", image, inside)  # (N, R)
    total = growth[:, -1:].clamp_min(1e-6)
    frac = (growth / total).cummax(dim=1).values  # monotone, so the crossings are unique

    def crossing(level: float) -> Tensor:
        above = (frac >= level).to(torch.int64)
        j = above.argmax(1).clamp_min(1)  # first radius at or above the level
        f0, f1 = frac.gather(1, (j - 1)[:, None])[:, 0], frac.gather(1, j[:, None])[:, 0]
        r0, r1 = radii[j - 1], radii[j]
        t = ((level - f0) / (f1 - f0).clamp_min(1e-6)).clamp(0.0, 1.0)
        return r0 + t * (r1 - r0)

    return 5 * torch.log10(crossing(0.8) / crossing(0.2))


def asymmetry(image: Tensor, radius: float | None = None, noise: float | Tensor | None = None) -> Tensor:
    r"""Returns the rotational asymmetry :math:`\sum |I - I_{180}| / (2 \sum |I|)` of each object.

    The rotation is about the cutout centre, where the survey catalog puts the object; the sums
    run over a central aperture. With `noise` (the pixel noise :math:`\sigma`), the expected
    pure-noise term :math:`2\sigma/\sqrt{\pi}` per pixel is subtracted from the numerator and
    the denominator is the aperture flux, as in Conselice's background correction: faint
    objects then no longer look asymmetric for their noise alone.

    References:
        | The Asymmetry of Galaxies: Physical Morphology for Nearby and High-Redshift Galaxies
        | (Conselice et al., 2000) https://arxiv.org/abs/astro-ph/0002195

    Arguments:
        image: Sky-subtracted single-band cutouts :math:`(N, H, W)`, no NaN.
        radius: The aperture radius in pixels; default 0.45 of the cutout size.
        noise: The pixel noise :math:`\sigma` (scalar or :math:`(N,)`), or None for the
            uncorrected asymmetry.

    Returns:
        Asymmetries, shape :math:`(N,)`; 0 for a 180°-symmetric object without `noise`.

    Example:
        >>> x = torch.randn(1, 8, 8)
        >>> asymmetry(x + x.flip(-1, -2))
        tensor([0.])
    """

    H, W = image.shape[-2:]
    radius = 0.45 * min(H, W) if radius is None else radius
    inside = aperture_weights(H, W, radius, image.device).to(image.dtype)
    diff = ((image - image.flip(-2, -1)).abs() * inside).sum((-2, -1))
    if noise is None:
        return diff / (2 * (image.abs() * inside).sum((-2, -1)).clamp_min(1e-6))
    noise = torch.as_tensor(noise, dtype=image.dtype, device=image.device)
    background = 2 / math.sqrt(math.pi) * noise * inside.sum()
    flux = (image * inside).sum((-2, -1))
    return (diff - background) / (2 * flux.clamp_min(noise * inside.sum().sqrt()))


class Mahalanobis(nn.Module):
    r"""Creates the Mahalanobis distance :math:`\sqrt{(x - \mu)^T \Sigma^{-1} (x - \mu)}` to a
    training distribution of feature vectors, optionally conditional on some of them.

    With `given` :math:`= g > 0`, the last :math:`g` columns are conditioning variables (e.g. an
    object's magnitude, on which its colours and morphology depend): the distance is that of the
    Gaussian conditional :math:`x \mid c`, :math:`d^2(x \mid c) = d^2(x, c) - d^2(c)` (Schur
    complement), so a bright galaxy is compared with bright galaxies.

    Training sets are never clean, so :meth:`fit` can re-estimate :math:`\mu, \Sigma` once without
    its most distant `trim` fraction (a one-step reweighted estimate in the spirit of the MCD).

    References:
        | On the generalised distance in statistics (Mahalanobis, 1936)
        | A Fast Algorithm for the Minimum Covariance Determinant Estimator
        | (Rousseeuw & Van Driessen, 1999) https://doi.org/10.1080/00401706.1999.10485670

    Arguments:
        dim: The feature dimension :math:`d`, conditioning columns included.
        given: The number :math:`g < d` of trailing conditioning columns.

    Example:
        >>> maha = Mahalanobis(2).fit(torch.randn(500, 2), trim=0.0)
        >>> maha(torch.zeros(1, 2)).shape
        torch.Size([1])
    """

    def __init__(self, dim: int, given: int = 0) -> None:
        super().__init__()
        if not 0 <= given < dim:
            raise ValueError(f"Mahalanobis: given={given} must be in [0, dim={dim})")
        self.dim = dim
        self.given = given
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("precision", torch.eye(dim, dtype=torch.float64))
        self.register_buffer("precision_given", torch.eye(given, dtype=torch.float64))

    def config(self) -> dict:
        return {"dim": self.dim, "given": self.given}

    def _estimate(self, x: Tensor, ridge: float) -> tuple[Tensor, Tensor, Tensor]:
        mean = x.mean(0)
        cov = torch.atleast_2d(torch.cov(x.T))
        cov = cov + ridge * cov.diagonal().mean().clamp_min(1e-12) * torch.eye(self.dim, dtype=x.dtype, device=x.device)
        g = self.given
        return mean, torch.linalg.inv(cov), torch.linalg.inv(cov[self.dim - g :, self.dim - g :])

    def fit(self, x: Tensor, trim: float = 0.02, ridge: float = 1e-6) -> "Mahalanobis":
        r"""Fits mean and covariance to training features :math:`(N, d)`.

        Arguments:
            x: Training features.
            trim: Drop this most distant fraction and refit once (0 for the plain estimate).
            ridge: Added to the covariance diagonal, relative to its mean variance.
        """

        x = x.detach().to(torch.float64)
        x = x[torch.isfinite(x).all(1)]
        params = self._estimate(x, ridge)
        if trim > 0:
            d = self._distance(x, *params)
            params = self._estimate(x[d <= torch.quantile(d, 1 - trim)], ridge)
        self.mean, self.precision, self.precision_given = (p.to(self.mean) for p in params)
        return self

    def _distance(self, x: Tensor, mean: Tensor, precision: Tensor, precision_given: Tensor) -> Tensor:
        d = x - mean
        d2 = torch.einsum("ni,ij,nj->n", d, precision, d)
        if self.given:
            c = d[:, self.dim - self.given :]
            d2 = d2 - torch.einsum("ni,ij,nj->n", c, precision_given, c)
        return (d2.clamp_min(0) + 1e-24).sqrt()  # finite gradient at 0

    def forward(self, x: Tensor) -> Tensor:
        r"""Returns the distances of features :math:`(N, d)`, shape :math:`(N,)`, in `x`'s dtype."""

        return self._distance(x.to(torch.float64), self.mean, self.precision, self.precision_given).to(x.dtype)


def second_moments(image: Tensor, radius: float) -> tuple[Tensor, Tensor]:
    r"""Returns the log size :math:`\log(I_{xx} + I_{yy})` (pixels²) and the ellipticity
    :math:`\sqrt{(I_{xx} - I_{yy})^2 + 4 I_{xy}^2} / (I_{xx} + I_{yy})` of the positive light
    inside a central aperture of `radius` pixels, for sky-subtracted images :math:`(N, H, W)`.

    Example:
        >>> y, x = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
        >>> blob = torch.exp(-((y - 15.5) ** 2 / 8 + (x - 15.5) ** 2 / 2))[None]
        >>> round(second_moments(blob, 12.0)[1].item(), 2)  # axis ratio 2: e = (4 - 1) / (4 + 1)
        0.6
    """

    H, W = image.shape[-2:]
    w = aperture_weights(H, W, radius, image.device).to(image.dtype) * image.clamp_min(0)
    yy = torch.arange(H, device=image.device, dtype=image.dtype) - (H - 1) / 2
    xx = torch.arange(W, device=image.device, dtype=image.dtype) - (W - 1) / 2
    yy, xx = torch.meshgrid(yy, xx, indexing="ij")
    s = w.flatten(1).sum(1).clamp_min(1e-6)
    mx, my = (w * xx).flatten(1).sum(1) / s, (w * yy).flatten(1).sum(1) / s
    dx, dy = xx - mx.view(-1, 1, 1), yy - my.view(-1, 1, 1)
    ixx, iyy, ixy = ((w * a).flatten(1).sum(1) / s for a in (dx * dx, dy * dy, dx * dy))
    size = (ixx + iyy).clamp_min(1e-3)
    return size.log(), torch.sqrt((ixx - iyy).square() + 4 * ixy.square() + 1e-12) / size


def smoothness(image: Tensor, radius: float) -> Tensor:
    r"""Returns the clumpiness :math:`S = \sum |I - I_s| / \sum I` inside a central aperture, with
    :math:`I_s` a 3×3 box smoothing (Conselice 2003), for images :math:`(N, H, W)` in noise units
    (the denominator is floored at the aperture noise, so faint objects stay finite).

    References:
        | The Relationship between Stellar Light Distributions of Galaxies and Their Formation
        | Histories (Conselice, 2003) https://arxiv.org/abs/astro-ph/0303065

    Example:
        >>> smoothness(torch.ones(1, 16, 16), 5.0)
        tensor([0.])
    """

    H, W = image.shape[-2:]
    inside = aperture_weights(H, W, radius, image.device).to(image.dtype)
    smooth = F.avg_pool2d(image[:, None], 3, 1, 1, count_include_pad=False)[:, 0]
    floor = inside.sum().sqrt()
    return ((image - smooth).abs() * inside).flatten(1).sum(1) / (image * inside).flatten(1).sum(1).clamp_min(floor)


def morphometry(u: Tensor, aperture: float, outer: float) -> Tensor:
    r"""Returns an object's photometric and structural features, :math:`(N, B + 5)`: the colours of
    adjacent bands (:math:`B - 1`), concentration, log size, ellipticity, asymmetry, smoothness and,
    last, the asinh magnitude of the detection image (the conditioning column of a
    :class:`Mahalanobis` with `given=1`).

    Arguments:
        u: Sky-subtracted cutouts in units of each band's noise :math:`(N, B, H, W)`, no NaN.
        aperture: The photometric aperture radius (pixels): colours and magnitude.
        outer: The structural aperture radius (pixels): size, ellipticity, asymmetry, smoothness.

    Example:
        >>> morphometry(torch.randn(3, 4, 32, 32), 3.0, 8.0).shape
        torch.Size([3, 9])
    """

    detection = u.sum(1) / math.sqrt(u.shape[1])
    H, W = detection.shape[-2:]
    npix = float(aperture_weights(H, W, aperture).sum())
    mag = -torch.asinh(aperture_fluxes(detection[:, None], aperture)[:, 0] / (2 * math.sqrt(npix)))
    size, ell = second_moments(detection, outer)
    cols = [
        colours(u, aperture),
        torch.stack([concentration(detection), size, ell, asymmetry(detection, outer, noise=1.0),
                     smoothness(detection, outer), mag], dim=1),
    ]
    return torch.cat(cols, dim=1)
