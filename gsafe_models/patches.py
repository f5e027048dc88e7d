r"""A density of small image patches of normal cutouts, anywhere in the cutout, at two scales.

Whole-cutout models (an autoencoder, a PCA of the cutout) cannot reproduce what sits at random
places: a neighbour galaxy, a star at the edge, the crowding of a real deep field. Their residual
there is large for perfectly normal objects, and it drowns the anomalies. A model of *patches*,
pooled over every position, learns what normal sky looks like locally (background, the cores and
discs of galaxies, their colours) whatever the layout of the cutout; a satellite trail, a hot
column, a cosmic ray, an arc or a colour no galaxy has are unlike every normal patch. This is the
idea of PaDiM and PatchCore in industrial inspection (anomalib), made position-free for the sky.

Each patch of :math:`P \times P` pixels in every band (:math:`D = B P^2` values of the normalised
cutout) is scored by a probabilistic-PCA-like density: a Gaussian mixture on its first :math:`k`
principal components plus an isotropic Gaussian for what is left outside them,

.. math:: -\log p(v) = -\log p_\mathrm{GMM}(U^T (v - \mu)) + \frac{\|v - \mu - U U^T (v - \mu)\|^2}{2 \sigma^2} + \mathrm{const},

and a cutout's statistics are the largest patch score and the mean of its `top` largest (an
extended departure moves many patches), at full resolution and on the 2×2-binned cutout.

References:
    | PaDiM: a Patch Distribution Modeling Framework for Anomaly Detection and Localization
    | (Defard et al., 2020) https://arxiv.org/abs/2011.08785
    | Towards Total Recall in Industrial Anomaly Detection (PatchCore; Roth et al., 2022)
    | https://arxiv.org/abs/2106.08265
    | Probabilistic Principal Component Analysis (Tipping & Bishop, 1999)
    | https://doi.org/10.1111/1467-9868.00196
"""

from __future__ import annotations

__all__ = ["PatchDensity"]

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from torch import Tensor

from .density import GaussianMixture


class PatchDensity(nn.Module):
    r"""Creates the patch density of normal cutouts at scales 1 and 2 (2×2 binning).

    Arguments:
        bands: The number of bands :math:`B`.
        patch: The patch side :math:`P` in pixels (of the binned image at scale 2).
        stride: The step between patches.
        components: The principal components :math:`k` kept per scale.
        top: How many of the highest patch scores the `mass` summary averages.
        gmm_components: The numbers of mixture components tried (BIC).

    Example:
        >>> x = torch.randn(64, 2, 16, 16) * 0.1
        >>> pd = PatchDensity(2, patch=5, components=4, gmm_components=(1,)).fit(x, torch.ones_like(x))
        >>> y = x[:2].clone()
        >>> y[1, 0, 6:9, 6:9] += 3.0  # a bright square in one band
        >>> s = pd.features(y, torch.ones_like(y))
        >>> s.shape, bool(s[1, 0] > s[0, 0])
        (torch.Size([2, 4]), True)
    """

    SCALES = (1, 2)
    SUMMARIES = ("peak", "mass")

    def __init__(self, bands: int, patch: int = 7, stride: int = 2, components: int = 16, top: int = 8,
                 gmm_components: tuple[int, ...] = (1, 2, 4, 8)) -> None:
        super().__init__()
        self.bands, self.patch, self.stride = int(bands), int(patch), int(stride)
        self.components, self.top = int(components), int(top)
        self.gmm_components = tuple(int(c) for c in gmm_components)
        D = self.bands * self.patch**2
        for s in self.SCALES:
            self.register_buffer(f"mean{s}", torch.zeros(D, dtype=torch.float64))
            self.register_buffer(f"basis{s}", torch.zeros(self.components, D, dtype=torch.float64))
            self.register_buffer(f"rest_var{s}", torch.ones((), dtype=torch.float64))
            self.register_buffer(f"gmm_k{s}", torch.ones((), dtype=torch.int64))
        self.gmms = nn.ModuleDict()

    def config(self) -> dict:
        return {"bands": self.bands, "patch": self.patch, "stride": self.stride, "components": self.components,
                "top": self.top, "gmm_components": self.gmm_components, "fitted_k": self._fitted_k()}

    def _fitted_k(self) -> dict:
        return {str(s): int(getattr(self, f"gmm_k{s}")) for s in self.SCALES}

    def _binned(self, x: Tensor, mask: Tensor, scale: int) -> tuple[Tensor, Tensor]:
        r"""The cutouts and their mask at `scale` (:math:`scale \times scale` binning of the valid pixels)."""

        if scale > 1:
            w = F.avg_pool2d(mask, scale)
            x = F.avg_pool2d(x * mask, scale) / w.clamp_min(1e-6)
            mask = (w > 0.5).to(x)
            x = x * mask
        if min(x.shape[-2:]) < self.patch:
            raise ValueError(f"PatchDensity: cutouts of {tuple(x.shape[-2:])} px at scale {scale} are smaller than "
                             f"the {self.patch}x{self.patch} patch; use a smaller patch")
        return x, mask

    def _patches(self, x: Tensor, mask: Tensor, scale: int) -> tuple[Tensor, Tensor]:
        r"""(patches :math:`(N, L, D)`, valid :math:`(N, L)`) of normalised cutouts at `scale`."""

        x, mask = self._binned(x, mask, scale)
        v = F.unfold(x, self.patch, stride=self.stride).transpose(1, 2)  # (N, L, B P^2)
        m = F.unfold(mask, self.patch, stride=self.stride).transpose(1, 2).mean(2)
        return v, m > 0.8

    def _sample_patches(self, x: Tensor, mask: Tensor, scale: int, max_patches: int, g: torch.Generator) -> Tensor:
        r"""The valid patches of :meth:`_patches` in row-major order, or `max_patches` of them drawn
        at random, :math:`(n, D)` float64 on the CPU, without copying out every patch first (a
        thousand 64-pixel cutouts hold ~10^6 patches)."""

        xb, mb = self._binned(x, mask, scale)
        B, P, st = xb.shape[1], self.patch, self.stride
        D = B * P * P
        # the valid fraction of each patch, as `_patches` computes it (an exact count, then / D)
        count = F.conv2d(mb, mb.new_ones(1, B, P, P), stride=st).flatten(1)
        where = torch.nonzero((count / D > 0.8).reshape(-1)).squeeze(1).cpu()
        if len(where) > max_patches:
            where = where[torch.randperm(len(where), generator=g)[:max_patches]]
        L = count.shape[1]
        out = torch.empty(len(where), D, dtype=torch.float64)
        rows = where // L
        for i in range(0, len(xb), 128):
            sel = torch.nonzero((rows >= i) & (rows < i + 128)).squeeze(1)
            if len(sel):
                v = F.unfold(xb[i : i + 128], P, stride=st).transpose(1, 2).reshape(-1, D)
                out[sel] = v[(where[sel] - i * L).to(v.device)].double().cpu()
        return out

    @torch.no_grad()
    def fit(self, x: Tensor, mask: Tensor, max_patches: int = 60_000, seed: int = 0) -> "PatchDensity":
        r"""Fits both scales on normalised normal cutouts :math:`(N, B, H, W)`."""

        g = torch.Generator().manual_seed(seed)
        for s in self.SCALES:
            v = self._sample_patches(x, mask, s, max_patches, g)
            if v.shape[0] < 10 * self.components:
                raise ValueError(f"PatchDensity.fit: {v.shape[0]} valid patches at scale {s}, need {10 * self.components}")
            mean = v.mean(0)
            _, S, V = torch.linalg.svd(v - mean, full_matrices=False)
            k = min(self.components, V.shape[0])
            basis = torch.zeros_like(getattr(self, f"basis{s}"), device="cpu")
            basis[:k] = V[:k]
            coef = (v - mean) @ basis.T
            rest = (v - mean) - coef @ basis
            rest_var = rest.square().mean().clamp_min(1e-12)
            comps = tuple(c for c in self.gmm_components if c * 20 * self.components <= v.shape[0]) or (1,)
            gmm = GaussianMixture.fit_bic(coef, components=comps, seed=seed, reg=1e-4)
            dev = getattr(self, f"mean{s}").device
            setattr(self, f"mean{s}", mean.to(dev))
            setattr(self, f"basis{s}", basis.to(dev))
            setattr(self, f"rest_var{s}", rest_var.to(dev))
            setattr(self, f"gmm_k{s}", torch.tensor(gmm.n_components, device=dev))
            self.gmms[str(s)] = gmm.to(dev)
        return self

    def build_gmms(self, fitted_k: dict) -> None:
        r"""Creates the (unfitted) mixtures of a saved density, before :py:`load_state_dict`."""

        for s, k in fitted_k.items():
            self.gmms[str(s)] = GaussianMixture(int(k), self.components, reg=1e-4)

    def scores(self, x: Tensor, mask: Tensor, scale: int) -> Tensor:
        r"""Returns the :math:`-\log p` of every patch, :math:`(N, L)` (invalid patches: :math:`-\infty`).

        The projections on the mean and the principal axes, and the patches' squared norms, are
        convolutions of the cutout (no patch is copied out; differentiable): with orthonormal axes
        :math:`U`, :math:`\|c - U U^T c\|^2 = \|c\|^2 - \|U^T c\|^2` for :math:`c = v - \mu`, in
        double precision (for an anomalous patch the difference is small against both terms)."""

        x, mask = self._binned(x, mask, scale)
        N, B = x.shape[:2]
        P, st = self.patch, self.stride
        mean, basis = getattr(self, f"mean{scale}"), getattr(self, f"basis{scale}")
        xd = x.double()
        proj = F.conv2d(xd, torch.cat([basis, mean[None]]).to(xd).view(-1, B, P, P), stride=st)
        coef = proj[:, :-1] - (basis @ mean).to(xd).view(1, -1, 1, 1)        # U^T (v - mu)
        sq = F.conv2d(xd.square(), xd.new_ones(1, B, P, P), stride=st)[:, 0]  # |v|^2
        cc = sq - 2 * proj[:, -1] + mean.square().sum().to(xd)               # |v - mu|^2
        rest = (cc - coef.square().sum(1)).clamp_min(0.0) / (2 * getattr(self, f"rest_var{scale}").to(xd))
        valid = F.avg_pool2d(mask, P, stride=st).mean(1) > 0.8               # the mean of the patch's mask
        coef = coef.permute(0, 2, 3, 1).reshape(-1, coef.shape[1]).to(x)     # the mixture's input precision
        nll = -self.gmms[str(scale)].log_prob(coef).to(xd).view(N, -1) + rest.reshape(N, -1)
        return nll.to(x).masked_fill(~valid.reshape(N, -1), -math.inf)

    def features(self, x: Tensor, mask: Tensor) -> Tensor:
        r"""Returns, per cutout, (peak, mass) at scale 1 then scale 2: :math:`(N, 4)`."""

        cols = []
        for s in self.SCALES:
            nll = self.scores(x, mask, s)
            finite = torch.isfinite(nll)
            floor = nll.masked_fill(~finite, math.inf).amin(1, keepdim=True).nan_to_num(0.0, posinf=0.0)
            nll = torch.where(finite, nll, floor)  # a cutout with no valid patch scores as the floor
            top = nll.topk(min(self.top, nll.shape[1]), dim=1).values
            cols += [top[:, 0], top.mean(1)]
        return torch.stack(cols, 1)
