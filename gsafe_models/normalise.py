r"""Per-band normalisation of survey cutouts: robust sky and noise, then an asinh stretch."""

__all__ = [
    "BandNormaliser",
]

import math

import numpy as np
import torch
import torch.nn as nn

from torch import Tensor

from .robust import robust_scale


def _clipped_median_mad(values: np.ndarray, sigma: float = 3.0, iterations: int = 5) -> tuple[float, float]:
    r"""Returns the sigma-clipped median and :math:`1.4826 \times` MAD of a 1-D sample
    (:func:`~gsafe_models.robust.robust_scale` after clipping)."""

    v = values[np.isfinite(values)]
    if v.size == 0:
        return 0.0, 1.0
    for _ in range(iterations):
        med, noise = robust_scale(v, fallback=False)
        if noise <= 0:
            break
        keep = np.abs(v - med) < sigma * noise
        if keep.all() or keep.sum() < 10:
            break
        v = v[keep]
    med, noise = robust_scale(v)   # constant or near-constant band: the spread, then 1
    return float(med), float(noise)


class BandNormaliser(nn.Module):
    r"""Creates a per-band normaliser :math:`x \mapsto \operatorname{asinh}((x - s_b) / (k \sigma_b)) / c_b`.

    The sky level :math:`s_b` and noise :math:`\sigma_b` of each band are robust statistics of the
    cutout borders (sigma-clipped median and :math:`1.4826 \times` MAD), so bright objects do not
    bias them. The asinh stretch is linear within a few :math:`\sigma_b` of the sky and logarithmic
    for bright cores, so faint structure and bright galaxies share one dynamic range; :math:`c_b`
    scales the stretched band so its 99.9th percentile is 1. Everything lives in buffers, so the
    normaliser travels with the model's :py:`state_dict`.

    Non-finite pixels (NaN: missing, masked, off the footprint) come back as 0 with mask 0.

    References:
        | A Modified Magnitude System that Produces Well-Behaved Magnitudes, Colors, and Errors
        | Even for Low Signal-to-Noise Ratio Measurements (Lupton et al., 1999)
        | https://arxiv.org/abs/astro-ph/9903081

    Arguments:
        bands: The number of bands :math:`B`.
        softening: :math:`k`, the stretch's linear range in units of the band noise.
        border: Width in pixels of the cutout border used to estimate sky and noise.

    Example:
        >>> x = 100 + 5 * torch.randn(8, 3, 16, 16)
        >>> x[0, 0, 0, 0] = float("nan")
        >>> norm = BandNormaliser(3).fit(x.numpy())
        >>> y, mask = norm(x)
        >>> bool(torch.isfinite(y).all()), int(mask[0, 0, 0, 0])
        (True, 0)
    """

    def __init__(self, bands: int, softening: float = 2.0, border: int = 4) -> None:
        super().__init__()

        self.bands = bands
        self.softening = softening
        self.border = border

        self.register_buffer("sky", torch.zeros(bands))
        self.register_buffer("noise", torch.ones(bands))
        self.register_buffer("scale", torch.ones(bands))
        self.register_buffer("fitted", torch.tensor(False))

    def config(self) -> dict:
        r"""Returns the constructor arguments, to rebuild the module before :py:`load_state_dict`."""

        return {"bands": self.bands, "softening": self.softening, "border": self.border}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.config().items())

    def fit(self, images: np.ndarray, max_values: int = 500_000, seed: int = 0) -> "BandNormaliser":
        r"""Estimates sky, noise and stretch scale per band from a sample of raw cutouts.

        Arguments:
            images: Raw cutouts, shape :math:`(N, B, H, W)`, counts, NaN = missing.
            max_values: At most this many pixels per band enter each robust estimate.
            seed: Seeds the subsampling of pixels.

        Returns:
            The module itself.
        """

        x = np.asarray(images, dtype=np.float64)
        if x.ndim != 4 or x.shape[1] != self.bands:
            raise ValueError(f"BandNormaliser.fit: images have shape {x.shape}, expected (N, {self.bands}, H, W)")

        rng = np.random.default_rng(seed)
        H, W = x.shape[-2:]
        w = max(1, min(self.border, H // 4, W // 4))
        edge = np.zeros((H, W), dtype=bool)
        edge[:w], edge[-w:], edge[:, :w], edge[:, -w:] = True, True, True, True

        sky, noise, scale = [], [], []
        for b in range(self.bands):
            band = x[:, b]
            values = band[:, edge].ravel()
            if not np.isfinite(values).any():  # no valid border: use every pixel
                values = band.ravel()
            if values.size > max_values:
                values = rng.choice(values, max_values, replace=False)
            s, n = _clipped_median_mad(values)

            stretched = band[np.isfinite(band)].ravel()
            if stretched.size > max_values:
                stretched = rng.choice(stretched, max_values, replace=False)
            stretched = np.arcsinh((stretched - s) / (self.softening * n))
            c = float(np.quantile(stretched, 0.999)) if stretched.size else 1.0
            sky.append(s), noise.append(n), scale.append(max(c, 1.0))

        dtype, device = self.sky.dtype, self.sky.device
        self.sky = torch.tensor(sky, dtype=dtype, device=device)
        self.noise = torch.tensor(noise, dtype=dtype, device=device)
        self.scale = torch.tensor(scale, dtype=dtype, device=device)
        self.fitted = torch.tensor(True, device=device)

        return self

    def _view(self, t: Tensor, x: Tensor) -> Tensor:
        return t.to(dtype=x.dtype).view(1, -1, 1, 1)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        r"""Normalises raw cutouts.

        Arguments:
            images: Raw cutouts, shape :math:`(N, B, H, W)`, counts, NaN = missing.

        Returns:
            The normalised cutouts :math:`(N, B, H, W)` with missing pixels set to 0, and the
            mask :math:`(N, B, H, W)` in the same dtype, 1 where the pixel is valid.
        """

        if images.ndim != 4 or images.shape[1] != self.bands:
            raise ValueError(
                f"BandNormaliser: images have shape {tuple(images.shape)}, expected (N, {self.bands}, H, W)"
            )
        if not images.is_floating_point():
            images = images.float()

        valid = torch.isfinite(images)
        x = torch.where(valid, images, torch.zeros((), dtype=images.dtype, device=images.device))
        y = torch.asinh((x - self._view(self.sky, x)) / self._view(self.softening * self.noise, x))
        y = y / self._view(self.scale, x)
        mask = valid.to(images.dtype)
        return y * mask, mask

    @property
    def unit_noise(self) -> Tensor:
        r"""Returns the sky noise of each band in normalised units, :math:`1 / (k c_b)`, shape :math:`(B,)`.

        The stretch is linear near the sky, so a residual divided by this is in units of the
        band's noise there (and conservative on bright pixels, where the stretch compresses).
        """

        return 1.0 / (self.softening * self.scale)

    def variance(self, at: Tensor, variance: Tensor, nodes: int = 8) -> Tensor:
        r"""Maps raw pixel variances to normalised units: the variance of the stretched value of
        :math:`x \sim \mathcal{N}(\mu, v)`, :math:`\mu` the raw value of the normalised `at`,
        by Gauss-Hermite quadrature with `nodes` nodes. Not the linearised :math:`v J^2`
        (Lupton et al. 1999, eq. 5), which overstates the spread where the noise reaches the
        stretch's curved part: within a few :math:`\sigma_b` of the sky, where a shallower
        exposure puts its noise.

        Arguments:
            at: Normalised values :math:`(N, B, H, W)`: the expected pixel values (a
                reconstruction), not the noisy pixels, whose excursions would bias the result.
            variance: The pixel variances in counts squared, same shape, NaN where unknown.

        Returns:
            The variances in normalised units, NaN where unknown.

        Example:
            >>> norm = BandNormaliser(1).fit(100 + 5 * torch.randn(8, 1, 16, 16).numpy())
            >>> y, _ = norm(torch.full((1, 1, 1, 1), 400.0))  # far above the sky: nearly linear
            >>> v = norm.variance(y, torch.full((1, 1, 1, 1), 4.0))
            >>> x = torch.full((1, 1, 1, 1), 400.0, requires_grad=True)
            >>> (g,) = torch.autograd.grad(norm(x)[0].sum(), x)
            >>> bool(torch.allclose(v, 4.0 * g * g, rtol=1e-3))
            True
        """

        y = at.detach().double()
        c = self._view(self.scale, y)
        u0 = torch.sinh(c * y)  # the expected value in units of k sigma_b from the sky
        su = variance.detach().double().clamp_min(0).sqrt() / self._view(self.softening * self.noise, y)
        t, w = np.polynomial.hermite.hermgauss(nodes)
        base = torch.asinh(u0)
        mean = torch.zeros_like(y)
        second = torch.zeros_like(y)
        for ti, wi in zip(t, w):  # moments of the departure from the stretched mean: no cancellation
            d = torch.asinh(u0 + su * (math.sqrt(2.0) * float(ti))) - base
            mean = mean + (float(wi) / math.sqrt(math.pi)) * d
            second = second + (float(wi) / math.sqrt(math.pi)) * d * d
        out = ((second - mean * mean).clamp_min(0) / (c * c)).to(variance.dtype)
        return torch.where(torch.isfinite(variance), out, variance)

    def inverse(self, normalised: Tensor) -> Tensor:
        r"""Maps normalised cutouts :math:`(N, B, H, W)` back to raw counts."""

        y = normalised * self._view(self.scale, normalised)
        return torch.sinh(y) * self._view(self.softening * self.noise, y) + self._view(self.sky, y)
