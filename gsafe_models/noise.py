r"""A per-pixel noise model of reconstruction residuals, learned from normal objects, and the
noise-normalised residual :math:`\chi` at several spatial scales.

A residual :math:`r = x - \hat x` of a normal object is noise plus what the representation cannot
reproduce; both grow with the brightness of the pixel (sky noise, source shot noise, model error of
bright cores), differently in each band. :class:`ResidualNoise` learns, per band, the location and
spread of :math:`r` as a function of the reconstructed value :math:`\hat x`, so that
:math:`\chi = (r - \mu_b(\hat x)) / \sigma_b(\hat x)` is close to unit-variance noise on every pixel
of a normal object, and an anomaly of any kind (compact or extended, positive or absorbing, in one
band or all) stands out of one known null. :func:`multiscale_chi` smooths :math:`\chi` with Gaussian
kernels of several widths, each renormalised to unit variance on normal objects, so the maximum over
scales is a matched filter for departures of any size (Starck & Murtagh 2006; the same idea as a
source detector's multi-scale search).

References:
    | Astronomical Image and Data Analysis (Starck & Murtagh, 2006)
    | https://doi.org/10.1007/978-3-540-33025-7
    | Photometry and noise models: SExtractor (Bertin & Arnouts, 1996)
    | https://doi.org/10.1051/aas:1996164
"""

from __future__ import annotations

__all__ = [
    "ChiScanner",
    "ResidualNoise",
    "gaussian_kernel",
    "smooth_normalised",
    "multiscale_chi",
    "line_kernels",
    "line_chi",
    "line_median_chi",
]

import math

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn as nn

from torch import Tensor

MAD_TO_SIGMA = 1.4826


class ResidualNoise(nn.Module):
    r"""Creates a per-band model of the residual's location and spread as a function of the
    reconstructed pixel value, :math:`\mu_b(\hat x)` and :math:`\sigma_b(\hat x)`; where the input
    comes with a per-pixel variance (a survey's variance or inverse-variance plane), the spread
    also follows each pixel's depth.

    :meth:`fit` bins the valid pixels of each band by :math:`\hat x` into `bins` quantile bins and
    takes the median and :math:`1.4826 \times` MAD of the residual in each (robust: the anomalies a
    training set holds do not inflate it); between bin centres both are interpolated linearly (the
    spread in log), beyond the outer centres they are held constant.

    With a known variance :math:`v` per pixel (in the units of the residual), the spread is
    :math:`\sigma_b(\hat x) \sqrt{v / \bar v_b(\hat x)}`, :math:`\bar v_b` the median known variance
    of the training pixels at that brightness, and :math:`\sigma_b` is fitted on residuals each
    divided by its :math:`\sqrt{v / \bar v_b}`: a pixel of four times the typical variance (a
    shallower exposure, a noisy column) gets twice the spread, where a model of brightness alone
    would flag it, and a pixel of typical depth gets the spread it would get without variances.
    (The residual's share that is model error, not noise, does not grow with the variance: on
    deep pixels the spread is then slightly too large; tests/models/test_detector.py measures the
    net effect.) Pixels whose variance is unknown (NaN) get the typical one. Buffers only, so the
    fitted model travels with a :py:`state_dict`.

    Arguments:
        bands: The number of bands :math:`B`.
        bins: The number of brightness bins per band.

    Example:
        >>> x_hat = torch.rand(64, 2, 8, 8)
        >>> r = (0.1 + x_hat) * torch.randn(64, 2, 8, 8)  # spread grows with brightness
        >>> noise = ResidualNoise(2).fit(r, x_hat, torch.ones_like(r))
        >>> chi = noise.chi(r, x_hat, torch.ones_like(r))
        >>> bool(0.8 < chi.std() < 1.2)
        True
    """

    def __init__(self, bands: int, bins: int = 16) -> None:
        super().__init__()
        self.bands = int(bands)
        self.bins = int(bins)
        self.register_buffer("centres", torch.zeros(bands, bins))
        self.register_buffer("loc", torch.zeros(bands, bins))
        self.register_buffer("log_scale", torch.zeros(bands, bins))
        for name, value in self._unknown().items():  # whether fitted with a known variance, and its typical value
            self.register_buffer(name, value)

    def _unknown(self) -> dict[str, Tensor]:
        return {"known": torch.tensor(False), "known_typical": torch.zeros(self.bands, self.bins)}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name, value in self._unknown().items():  # saved before the known-variance terms: fitted without
            state_dict.setdefault(prefix + name, value)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def config(self) -> dict:
        return {"bands": self.bands, "bins": self.bins}

    @torch.no_grad()
    def fit(self, residual: Tensor, x_hat: Tensor, mask: Tensor, known: Tensor | None = None,
            max_values: int = 2_000_000, seed: int = 0) -> "ResidualNoise":
        r"""Fits location and spread from residuals of normal objects.

        Arguments:
            residual: :math:`x - \hat x`, shape :math:`(N, B, H, W)`.
            x_hat: The reconstructions, same shape.
            mask: 1 where a pixel is valid, same shape.
            known: The known noise variance of each pixel in the units of `residual`, NaN where
                unknown, same shape; or None. With no finite value, the fit is as without.
            max_values: At most this many pixels per band enter the fit (drawn at random).
            seed: Seeds that draw.
        """

        g = torch.Generator().manual_seed(seed)
        use_known = known is not None and bool((torch.isfinite(known) & (mask > 0)).any())
        centres, locs, scales, typicals = [], [], [], []
        for b in range(self.bands):
            valid = mask[:, b].reshape(-1) > 0
            r = residual[:, b].reshape(-1)[valid].double().cpu()
            v = x_hat[:, b].reshape(-1)[valid].double().cpu()
            k = known[:, b].reshape(-1)[valid].double().cpu() if use_known else torch.zeros_like(r)
            if r.numel() > max_values:
                pick = torch.randperm(r.numel(), generator=g)[:max_values]
                r, v, k = r[pick], v[pick], k[pick]
            if r.numel() < 2 * self.bins:
                raise ValueError(f"ResidualNoise.fit: band {b} has {r.numel()} valid pixels, need >= {2 * self.bins}")
            order = torch.argsort(v)
            r, v, k = r[order], v[order], k[order]
            c, l, s, t = [], [], [], []
            for pr, pv, pk in zip(*(torch.tensor_split(u, self.bins) for u in (r, v, k))):
                med = pr.median()
                dev = (pr - med).abs()
                finite = torch.isfinite(pk) & (pk >= 0)
                typical = pk[finite].median() if finite.any() else pr.new_zeros(())
                c.append(pv.median())
                l.append(med)
                t.append(typical)
                if use_known and typical > 0:  # each residual in units of its own depth
                    dev = dev / torch.where(finite, pk / typical, pk.new_ones(())).clamp_min(1e-6).sqrt()
                s.append(MAD_TO_SIGMA * dev.median())
            s = torch.stack(s)
            floor = 1e-3 * s.max().clamp_min(1e-12)
            centres.append(torch.stack(c))
            locs.append(torch.stack(l))
            scales.append(s.clamp_min(floor).log())
            typicals.append(torch.stack(t))
        dev, dt = self.centres.device, self.centres.dtype
        self.centres = torch.stack(centres).to(dev, dt)
        self.loc = torch.stack(locs).to(dev, dt)
        self.log_scale = torch.stack(scales).to(dev, dt)
        self.known = torch.tensor(use_known, device=dev)
        self.known_typical = torch.stack(typicals).to(dev, dt)
        return self

    def _weights(self, v: Tensor) -> tuple[Tensor, Tensor]:
        r"""Where values `v` :math:`(N, B, H, W)` fall between bin centres: the upper centre's index
        and the linear weight on it, each :math:`(B, NHW)` (one search for every table)."""

        B = v.shape[1]
        c = self.centres.to(v)
        flat = v.detach().transpose(0, 1).reshape(B, -1)
        idx = torch.searchsorted(c.contiguous(), flat.contiguous()).clamp(1, self.bins - 1)
        c0, c1 = c.gather(1, idx - 1), c.gather(1, idx)
        w = ((v.transpose(0, 1).reshape(B, -1) - c0) / (c1 - c0).clamp_min(1e-12)).clamp(0.0, 1.0)
        return idx, w

    def _interp(self, table: Tensor, v: Tensor, at: tuple[Tensor, Tensor] | None = None) -> Tensor:
        r"""Piecewise-linear interpolation of per-band `table` :math:`(B, K)` at values `v` :math:`(N, B, H, W)`
        (`at`: :meth:`_weights` of `v`, when already computed)."""

        N, B, H, W = v.shape
        idx, w = at if at is not None else self._weights(v)
        t = table.to(v)
        t0, t1 = t.gather(1, idx - 1), t.gather(1, idx)
        out = t0 + w * (t1 - t0)
        return out.reshape(B, N, H, W).transpose(0, 1)

    def scale(self, x_hat: Tensor, known: Tensor | None = None, at: tuple[Tensor, Tensor] | None = None) -> Tensor:
        r"""Returns :math:`\sigma_b(\hat x)`, the residual spread expected at each pixel, shape of `x_hat`;
        `known`: the pixels' known variance (NaN where unknown), used when the model was fitted with one."""

        at = at if at is not None else self._weights(x_hat)
        model = self._interp(self.log_scale, x_hat, at).exp()
        if not bool(self.known):
            return model
        if known is None:
            return model
        typical = self._interp(self.known_typical, x_hat, at)
        ratio = torch.where(torch.isfinite(known) & (known >= 0) & (typical > 0), known.to(x_hat) / typical.clamp_min(1e-30), 1.0)
        return model * ratio.clamp_min(1e-6).sqrt()

    def chi(self, residual: Tensor, x_hat: Tensor, mask: Tensor, known: Tensor | None = None) -> Tensor:
        r"""Returns :math:`\chi = (r - \mu_b(\hat x)) / \sigma_b(\hat x)` on valid pixels, 0 elsewhere,
        shape :math:`(N, B, H, W)`; `known` as in :meth:`scale`."""

        at = self._weights(x_hat)
        return mask * (residual - self._interp(self.loc, x_hat, at)) / self.scale(x_hat, known, at)


def gaussian_kernel(sigma: float, dtype: torch.dtype = torch.float32, device=None) -> Tensor:
    r"""Returns a normalised 1-D Gaussian kernel of width `sigma` pixels (half-width :math:`3\sigma`)."""

    half = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-half, half + 1, dtype=dtype, device=device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def _band(size: int, k: Tensor) -> Tensor:
    r"""The :math:`(size, size)` matrix of a 1-D correlation with the odd kernel `k` and zero padding:
    :math:`M_{ij} = k_{j - i + h}` for :math:`|j - i| \le h`, :math:`h` the kernel's half-width."""

    h = k.numel() // 2
    d = torch.arange(size, device=k.device).view(1, -1) - torch.arange(size, device=k.device).view(-1, 1)
    return torch.where(d.abs() <= h, k[(d + h).clamp(0, 2 * h)], k.new_zeros(()))


def _separable(x: Tensor, k: Tensor) -> Tensor:
    r"""`x` :math:`(N, C, H, W)` correlated with `k` along both image axes, zero-padded: the same
    as two grouped :py:`conv2d` with :py:`padding=len(k) // 2`, as two banded matrix products
    (2-4 times faster on CPU than a depthwise convolution)."""

    H, W = x.shape[-2:]
    return _band(H, k) @ (x @ _band(W, k).T)


def smooth_normalised(chi: Tensor, mask: Tensor, sigma: float) -> Tensor:
    r"""Returns :math:`\sum_i w_i m_i \chi_i / \sqrt{\sum_i w_i^2 m_i}`: `chi` :math:`(N, C, H, W)`
    smoothed by a Gaussian of width `sigma` pixels, scaled so that white unit-variance noise stays
    unit-variance whatever the mask (edges and missing pixels included). `sigma` 0 returns `chi`."""

    if sigma <= 0:
        return chi
    k = gaussian_kernel(sigma, chi.dtype, chi.device)
    num = _separable(chi * mask, k)
    den = _separable(mask, k * k).clamp_min(1e-12).sqrt()
    return num / den * (mask.sum((-2, -1), keepdim=True) > 0)


def multiscale_chi(chi: Tensor, mask: Tensor, scales: Sequence[float]) -> list[Tensor]:
    r"""Returns, for each scale, the smoothed :math:`\chi` of every band and of the band coadd
    :math:`\sum_b \chi_b / \sqrt{B}`: a list of :math:`(N, B + 1, H, W)` maps, unit variance per
    pixel under white noise (see :func:`smooth_normalised`)."""

    B = chi.shape[1]
    m = mask
    coadd = (chi * m).sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp_min(1.0).sqrt()
    cm = (m.sum(1, keepdim=True) > 0).to(chi)
    both, both_mask = torch.cat([chi, coadd], 1), torch.cat([m, cm], 1)
    return [smooth_normalised(both, both_mask, s) for s in scales]


class ChiScanner(nn.Module):
    r"""Creates the multi-scale :math:`\chi` summaries of a residual: per scale, the largest
    :math:`|\chi|` over the cutout (every band and the band coadd), the largest inside the central
    aperture, the mean :math:`\chi^2`, and the largest *chromatic* :math:`|\chi|`, a band's
    departure from the mean of the bands (a departure in one band only: a colour feature, an
    electronic artefact; a neighbour galaxy's residual, alike in every band, cancels out).

    It holds the :class:`ResidualNoise` and, per scale and channel, the spread of the smoothed
    :math:`\chi` on normal objects (smoothing white noise keeps it unit-variance; real noise is
    correlated, and the model's errors are too), so each summary is in units of its own null.

    Arguments:
        bands: The number of bands :math:`B`.
        height: The cutout height :math:`H`.
        width: The cutout width :math:`W`.
        scales: The Gaussian smoothing widths in pixels (0: none).
        bins: The brightness bins of the noise model.

    Example:
        >>> scan = ChiScanner(2, 16, 16, scales=(0.0, 2.0))
        >>> x_hat = torch.rand(64, 2, 16, 16)
        >>> r = 0.1 * torch.randn(64, 2, 16, 16)
        >>> f = scan.fit(r, x_hat, torch.ones_like(r)).features(r, x_hat, torch.ones_like(r))
        >>> f.shape  # (N, 4 summaries x 2 scales)
        torch.Size([64, 8])
    """

    SUMMARIES = ("max", "core", "sumsq", "chromatic")

    def __init__(self, bands: int, height: int, width: int, scales: Sequence[float] = (0.0, 1.0, 2.0, 4.0), bins: int = 16) -> None:
        super().__init__()
        from .statistics import aperture_weights

        self.bands, self.height, self.width = int(bands), int(height), int(width)
        self.scales = tuple(float(s) for s in scales)
        self.noise = ResidualNoise(bands, bins)
        self.register_buffer("core", aperture_weights(height, width, max(3.0, 0.19 * min(height, width))))
        # per scale: spread of the smoothed chi of each band and the coadd, then of the chromatic chi
        self.register_buffer("spread", torch.ones(len(self.scales), bands + 1))
        self.register_buffer("chromatic_spread", torch.ones(len(self.scales), bands))

    def config(self) -> dict:
        return {"bands": self.bands, "height": self.height, "width": self.width, "scales": self.scales, "bins": self.noise.bins}

    def names(self) -> list[str]:
        r"""Returns the name of each column of :meth:`features`, `"<summary>@<scale>"`."""

        return [f"{k}@{s:g}" for s in self.scales for k in self.SUMMARIES]

    def _maps(self, residual: Tensor, x_hat: Tensor, mask: Tensor, known: Tensor | None = None,
              chi: Tensor | None = None) -> tuple[list[Tensor], list[Tensor]]:
        chi = self.noise.chi(residual, x_hat, mask, known) if chi is None else chi
        B = self.bands
        m = mask
        n = m.sum(1, keepdim=True)
        coadd = (chi * m).sum(1, keepdim=True) / n.clamp_min(1.0).sqrt()
        # a band's departure from the band mean, scaled to unit variance under white noise
        mean = (chi * m).sum(1, keepdim=True) / n.clamp_min(1.0)
        chromatic = m * (chi - mean) / math.sqrt(max(1.0 - 1.0 / B, 1e-6)) if B > 1 else chi * 0
        # one smoothing per scale for every channel: bands, coadd, chromatic bands
        stack = torch.cat([chi, coadd, chromatic], 1)
        stack_mask = torch.cat([m, (n > 0).to(chi), m], 1)
        maps = [smooth_normalised(stack, stack_mask, s) for s in self.scales]
        return [x[:, : B + 1] for x in maps], [x[:, B + 1 :] for x in maps]

    @torch.no_grad()
    def fit(self, residual: Tensor, x_hat: Tensor, mask: Tensor, known: Tensor | None = None) -> "ChiScanner":
        r"""Fits the noise model and the per-scale spreads on residuals of normal objects
        :math:`(N, B, H, W)`; `known`: the pixels' known noise variance in the residual's units, NaN
        where unknown (see :class:`ResidualNoise`), or None."""

        self.noise.fit(residual, x_hat, mask, known)
        both, chrom = self._maps(residual, x_hat, mask, known)

        def spread(maps: Tensor) -> Tensor:  # robust per-channel spread over objects and pixels
            v = maps.transpose(0, 1).reshape(maps.shape[1], -1)
            v = v[:, : 4_000_000 // max(1, maps.shape[1])] if v.shape[1] > 4_000_000 else v
            mad = (v - v.median(1, keepdim=True).values).abs().median(1).values * MAD_TO_SIGMA
            return torch.maximum(mad, 0.5 * v.std(1)).clamp_min(1e-6)

        self.spread = torch.stack([spread(b) for b in both]).to(self.spread)
        self.chromatic_spread = torch.stack([spread(c) for c in chrom]).to(self.chromatic_spread)
        return self

    def features(self, residual: Tensor, x_hat: Tensor, mask: Tensor, known: Tensor | None = None,
                 chi: Tensor | None = None) -> Tensor:
        r"""Returns the summaries :math:`(N, 4 S)` of residuals :math:`(N, B, H, W)`, in the column
        order of :meth:`names`; `known` as in :meth:`fit`; `chi`: the residual's χ map under this
        scanner's noise model when the caller has it already (:meth:`ResidualNoise.chi` of the same
        arguments), so it is not computed twice."""

        both, chrom = self._maps(residual, x_hat, mask, known, chi)
        core = self.core.to(residual)
        cols = []
        for j, (b, c) in enumerate(zip(both, chrom)):
            a = (b / self.spread[j].to(b).view(1, -1, 1, 1)).abs()
            cc = (c / self.chromatic_spread[j].to(c).view(1, -1, 1, 1)).abs()
            valid = mask.amax(1).flatten(1).sum(1).clamp_min(1.0)
            cols += [
                a.flatten(1).amax(1),
                (a * core).flatten(1).amax(1),
                a.square().mean(1).flatten(1).sum(1) / valid,
                cc.flatten(1).amax(1),
            ]
        return torch.stack(cols, 1)


def line_kernels(length: int = 11, orientations: int = 12, width: float = 0.7, dtype: torch.dtype = torch.float32,
                 device=None) -> Tensor:
    r"""Returns `orientations` line kernels :math:`(n, 1, L, L)`: a segment of `length` pixels through
    the centre at angles :math:`i \pi / n`, Gaussian across (width `width` pixels), each scaled to
    :math:`\sum w^2 = 1`, so white unit-variance noise stays unit-variance under it.

    Example:
        >>> k = line_kernels(7, 4)
        >>> k.shape, bool(torch.allclose(k.square().sum((1, 2, 3)), torch.ones(4)))
        (torch.Size([4, 1, 7, 7]), True)
    """

    h = length // 2
    t = torch.arange(-h, h + 1, dtype=torch.float64)
    yy, xx = torch.meshgrid(t, t, indexing="ij")
    out = []
    for i in range(orientations):
        a = math.pi * i / orientations
        along, across = xx * math.cos(a) + yy * math.sin(a), -xx * math.sin(a) + yy * math.cos(a)
        w = torch.exp(-0.5 * (across / width) ** 2) * (along.abs() <= h + 0.5)
        w = torch.where(w > 1e-6, w, torch.zeros_like(w))  # no subnormal squares: they slow the convolutions ~3x
        out.append(w / w.square().sum().sqrt())
    return torch.stack(out)[:, None].to(dtype=dtype, device=device)


def line_chi(chi: Tensor, mask: Tensor, kernels: Tensor) -> Tensor:
    r"""Returns the largest :math:`|\chi|` under any line kernel (:func:`line_kernels`) of each band
    and of the band coadd, :math:`(N, B + 1)`: a matched filter for linear departures (satellite and
    aeroplane trails, bad columns, diffraction spikes, arcs' segments), each response scaled as in
    :func:`smooth_normalised` so that white unit-variance noise stays unit-variance whatever the mask.

    Example:
        >>> chi, mask = torch.randn(2, 1, 24, 24), torch.ones(2, 1, 24, 24)
        >>> chi[1, 0, 12, 4:20] += 1.5  # a faint column, 16 pixels long
        >>> f = line_chi(chi, mask, line_kernels(11, 8))
        >>> f.shape, bool(f[1, 0] > f[0, 0])
        (torch.Size([2, 2]), True)
    """

    import torch.nn.functional as F

    N, B = chi.shape[:2]
    coadd = (chi * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp_min(1.0).sqrt()
    x = torch.cat([chi * mask, coadd], 1).reshape(N * (B + 1), 1, *chi.shape[-2:])
    m = torch.cat([mask, (mask.sum(1, keepdim=True) > 0).to(mask)], 1).reshape(N * (B + 1), 1, *chi.shape[-2:])
    k = kernels.to(chi)
    pad = k.shape[-1] // 2
    num = F.conv2d(x, k, padding=pad)
    # the normalisation reads only the mask: computed once for the maps with no missing pixel
    full = m.flatten(1).amin(1) > 0
    if bool(full.all()):
        num.mul_(F.conv2d(torch.ones_like(m[:1]), k * k, padding=pad).clamp_min(1e-6).rsqrt())
    else:
        num.mul_(F.conv2d(m, k * k, padding=pad).clamp_min(1e-6).rsqrt()).mul_(m > 0)
    low, high = torch.aminmax(num.flatten(1), dim=1)  # the largest |response| without a copy of |num|
    return torch.maximum(high, -low).reshape(N, B + 1)


# Devillard's 19-exchange network for the median of 9 (after Paeth, Graphics Gems, 1990)
_MEDIAN9 = ((1, 2), (4, 5), (7, 8), (0, 1), (3, 4), (6, 7), (1, 2), (4, 5), (7, 8), (0, 3), (5, 8), (4, 7),
            (3, 6), (1, 4), (2, 5), (4, 7), (4, 2), (6, 4), (4, 2))


def _median9(p: list[Tensor]) -> Tensor:
    p = list(p)
    for i, j in _MEDIAN9:
        p[i], p[j] = torch.minimum(p[i], p[j]), torch.maximum(p[i], p[j])
    return p[4]


def line_median_chi(chi: Tensor, mask: Tensor, orientations: int = 12) -> Tensor:
    r"""Returns the largest :math:`|\mathrm{median}\,\chi|` along any straight 9-pixel segment
    (nearest-pixel samples at `orientations` angles :math:`i \pi / n`) of each band and of the band
    coadd, :math:`(N, B + 1)`, in units of the median's spread under white unit-variance noise,
    :math:`\sqrt{\pi / 18}`.

    A robust matched filter for linear departures: a sum along the segment (:func:`line_chi`)
    responds as much to one compact residual (a neighbour the reconstruction misses, a hot pixel, a
    compression speck) as to a faint line, whereas the median moves only when most of the segment
    departs. So a faint trail, column or arc stands out of a crowded, speckled residual that holds
    many compact departures. Samples outside the cutout or the mask count as 0 (the null's median),
    so a segment leaving the cutout can only respond less.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> chi, mask = torch.randn(3, 1, 24, 24, generator=g), torch.ones(3, 1, 24, 24)
        >>> chi[1, 0, 4:20, 12] += 3.0   # a faint column, 16 pixels long
        >>> chi[2, 0, 11:13, 11:13] += 30.0  # one bright compact residual
        >>> f = line_median_chi(chi, mask)
        >>> f.shape, bool(f[1, 0] > f[0, 0] + 2), bool(f[2, 0] < f[0, 0] + 2)  # noise alone: ~4
        (torch.Size([3, 2]), True, True)
    """

    import torch.nn.functional as F

    N, B, H, W = chi.shape
    c = torch.where((mask > 0) & torch.isfinite(chi), chi, torch.zeros_like(chi))
    coadd = c.sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp_min(1.0).sqrt()
    x = torch.cat([c, coadd], 1)
    h = 4
    xp = F.pad(x, (h, h, h, h))
    best = torch.zeros(N, B + 1, dtype=chi.dtype, device=chi.device)
    for i in range(orientations):
        a = math.pi * i / orientations
        offsets = [(round(t * math.sin(a)), round(t * math.cos(a))) for t in range(-h, h + 1)]
        med = _median9([xp[..., h + u:h + u + H, h + v:h + v + W] for u, v in offsets])
        best = torch.maximum(best, med.abs().flatten(2).amax(-1))
    return best * math.sqrt(18 / math.pi)
