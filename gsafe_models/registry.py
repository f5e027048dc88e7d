r"""The statistics a :class:`~gsafe_models.detector.Detector` can compute, each one registered object.

Three kinds of entry, each in one place:

- a **feature** is a per-object quantity computed from one forward pass over raw cutouts (the
  latents `z`, a residual summary, the morphometry vector...), possibly with fitted parts;
- a **part** is something fitted once on normal training objects (a latent density, the noise
  model of the residuals, a Mahalanobis reference, the null scale of a statistic); *sample* parts
  are fitted on a sample of cutouts before the survey pass, *feature* parts on the features of
  every training object;
- a **statistic** is one number per object, larger = more anomalous, computed from features and
  parts. It names what it needs; the Detector fits exactly that.

Adding a statistic is one :func:`statistic` call here: its name, the features and parts it reads,
and how it is computed. Nothing else in the Detector changes.

Example:
    >>> sorted(STATISTICS)[:3]
    ['AS', 'C', 'G']
    >>> STATISTICS["nll_gmm"].parts
    ('gmm',)
"""

from __future__ import annotations

__all__ = [
    "Feature",
    "Part",
    "Statistic",
    "FEATURES",
    "PARTS",
    "STATISTICS",
    "Pass",
    "Constants",
    "statistic",
    "requirements",
]

import math

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn as nn

from torch import Tensor

from .density import GaussianMixture
from .flow import LatentFlow
from .nets import PCABasis
from .noise import ChiScanner, line_chi, line_kernels, line_median_chi
from .patches import PatchDensity
from .statistics import (
    Mahalanobis,
    RaoScore,
    anomaly_score,
    aperture_fluxes,
    aperture_weights,
    asymmetry,
    colours,
    concentration,
    feature_residual,
    line_residual,
    local_residual,
    morphometry,
    peak_of,
    reconstruction_residual,
    sharpness,
    typicality,
)


class Constants(nn.Module):
    r"""Creates a module of named float64 buffers (fitted reference values: a mean NLL, the
    median and spread of a statistic on normal objects...), so they travel in a :py:`state_dict`.

    Arguments:
        shapes: Buffer name to shape.

    Example:
        >>> c = Constants({"loc": [3], "scale": [3]})
        >>> c.loc.shape
        torch.Size([3])
    """

    def __init__(self, shapes: dict[str, Iterable[int]]) -> None:
        super().__init__()
        self.shapes = {k: [int(s) for s in v] for k, v in shapes.items()}
        for k, shape in self.shapes.items():
            self.register_buffer(k, torch.zeros(shape, dtype=torch.float64))

    def config(self) -> dict:
        return {"shapes": self.shapes}

    @classmethod
    def of(cls, **values: Tensor) -> "Constants":
        r"""Returns constants holding `values` (tensors or numbers)."""

        values = {k: torch.as_tensor(v, dtype=torch.float64).detach().cpu() for k, v in values.items()}
        out = cls({k: list(v.shape) for k, v in values.items()})
        for k, v in values.items():
            setattr(out, k, v.clone())
        return out


class Pass:
    r"""The per-batch quantities that features share, each computed at most once: the normalised
    cutouts and mask, latents, reconstructions (network and PCA), raw pixels in noise units.

    Arguments:
        bundle: The detector's torch parts (`normaliser`, `net`, `parts`).
        images: Raw cutouts :math:`(N, B, H, W)`, counts, NaN = missing, on the bundle's device.
        variance: Their pixel variances in counts squared, NaN where unknown, or None.
    """

    def __init__(self, bundle: nn.Module, images: Tensor, variance: Tensor | None = None) -> None:
        self.bundle = bundle
        self.images = images
        self.variance = variance

    @cached_property
    def normalised(self) -> tuple[Tensor, Tensor]:
        return self.bundle.normaliser(self.images)

    @property
    def x(self) -> Tensor:
        return self.normalised[0]

    @property
    def mask(self) -> Tensor:
        return self.normalised[1]

    def known(self, at: Tensor) -> Tensor | None:
        r"""The pixel variances in normalised units at reconstruction `at` (NaN where unknown), or None
        without any."""

        if self.variance is None:
            return None
        return self.bundle.normaliser.variance(at, self.variance.to(self.x.dtype))

    @cached_property
    def z(self) -> Tensor:
        return self.bundle.net.encode(self.x, self.mask)

    @cached_property
    def x_hat(self) -> Tensor:
        return self.bundle.net.decode(self.z)

    @cached_property
    def pca_hat(self) -> Tensor:
        return self.bundle.parts["pca"](self.x, self.mask)

    @cached_property
    def pca_chi(self) -> Tensor:
        r"""The PCA residual in units of its noise model (the `chi_scanner_pca` part's), one map per band."""

        return self.bundle.parts["chi_scanner_pca"].noise.chi(self.x - self.pca_hat, self.pca_hat, self.mask, self.known(self.pca_hat))

    @cached_property
    def noise_units(self) -> Tensor:
        r"""Sky-subtracted raw cutouts in units of each band's noise, missing pixels filled from
        the reconstruction, so photometry sees a complete cutout (the network runs only for a
        batch with missing pixels: statistics that read no representation, such as the defaults,
        need no encoder pass otherwise)."""

        norm = self.bundle.normaliser
        raw = torch.nan_to_num(self.images.to(self.x.dtype))
        if not bool(self.mask.bool().all()):
            raw = torch.where(self.mask.bool(), raw, norm.inverse(self.x_hat))
        return (raw - norm.sky.view(1, -1, 1, 1).to(raw)) / norm.noise.view(1, -1, 1, 1).to(raw)

    @cached_property
    def apertures(self) -> tuple[float, float, Tensor]:
        r"""(photometric radius, structural radius, core weights) for this cutout size."""

        H, W = self.images.shape[-2:]
        core = aperture_weights(H, W, max(3.0, 0.19 * min(H, W)), self.images.device)
        return max(2.0, 0.1 * min(H, W)), max(3.0, 0.2 * min(H, W)), core


@dataclass(frozen=True)
class Feature:
    r"""A per-object quantity of one forward pass, :math:`(N, \dots)`.

    Arguments:
        name: Its key.
        compute: Maps a :class:`Pass` to the quantity.
        parts: Fitted parts it reads (sample parts: fitted before the survey pass).
        representation: Whether it reads the trained representation (its latents or its
            reconstruction), which was fitted on every training object: such a feature of a
            training object is not what it would be for a new object, so calibration cannot be
            cross-fitted over the training objects with it.
    """

    name: str
    compute: Callable[[Pass], Tensor]
    parts: tuple[str, ...] = ()
    representation: bool = False


@dataclass(frozen=True)
class Part:
    r"""Something fitted on normal training objects.

    Arguments:
        name: Its key in the Detector's parts.
        build: Rebuilds the (unfitted) module from its :py:`config()` dict.
        fit: `(bundle, data, config) -> module`: `data` is the normalised sample (`x`, `mask`,
            `x_hat`, and the raw pixel `variance` when the batches carry it) for a sample part, or the training features by name for a
            feature part; `config` the :class:`~gsafe_models.detector.DetectorConfig`.
        features: The training features a feature part is fitted on.
        requires: Parts fitted before it.
        sample: Fitted on a sample of cutouts before the survey pass.
    """

    name: str
    build: Callable[..., nn.Module]
    fit: Callable
    features: tuple[str, ...] = ()
    requires: tuple[str, ...] = ()
    sample: bool = False


@dataclass(frozen=True)
class Statistic:
    r"""One number per object, larger = more anomalous.

    Arguments:
        name: Its name (a column `stat_<name>` of every score table).
        compute: `(features, parts) -> (N,)`.
        features: The features it reads.
        parts: The fitted parts it reads.
        doc: One line for users.
    """

    name: str
    compute: Callable[[dict[str, Tensor], nn.ModuleDict], Tensor]
    features: tuple[str, ...]
    parts: tuple[str, ...] = ()
    doc: str = ""


FEATURES: dict[str, Feature] = {}
PARTS: dict[str, Part] = {}
STATISTICS: dict[str, Statistic] = {}


def _feature(name: str, parts: tuple[str, ...] = (), representation: bool = False):
    def deco(fn):
        FEATURES[name] = Feature(name, fn, parts, representation)
        return fn

    return deco


def statistic(name: str, features: tuple[str, ...], parts: tuple[str, ...] = (), doc: str = ""):
    r"""Registers a statistic computed by the decorated `(features, parts) -> (N,)` function."""

    def deco(fn):
        STATISTICS[name] = Statistic(name, fn, tuple(features), tuple(parts), doc or (fn.__doc__ or "").strip())
        return fn

    return deco


def requirements(names: Iterable[str]) -> tuple[list[str], list[str]]:
    r"""Returns (features, parts in fitting order) that statistics `names` need."""

    feats: list[str] = []
    parts: list[str] = []

    def need_part(p: str) -> None:
        if p in parts:
            return
        for q in PARTS[p].requires:
            need_part(q)
        for f in PARTS[p].features:
            need_feature(f)
        parts.append(p)

    def need_feature(f: str) -> None:
        for p in FEATURES[f].parts:
            need_part(p)
        if f not in feats:
            feats.append(f)

    for n in names:
        s = STATISTICS[n]
        for f in s.features:
            need_feature(f)
        for p in s.parts:
            need_part(p)
    # sample parts come first: features need them during the survey pass
    order = [p for p in parts if PARTS[p].sample] + [p for p in parts if not PARTS[p].sample]
    return feats, order


def reads_representation(names: Iterable[str]) -> list[str]:
    r"""Returns those of statistics `names` that read the trained representation (a feature with
    :py:`representation=True`; photometry fills missing pixels from the reconstruction, which
    does not count)."""

    return [n for n in names if any(FEATURES[f].representation for f in requirements([n])[0])]


# ---------------------------------------------------------------------------------------------
# Features


@_feature("z", representation=True)
def _z(p: Pass) -> Tensor:
    return p.z


@_feature("G", representation=True)
def _g(p: Pass) -> Tensor:
    return reconstruction_residual(p.x, p.x_hat, p.mask)


@_feature("C", representation=True)
def _c(p: Pass) -> Tensor:
    # missing pixels take the reconstruction's value, so they add nothing to C
    net, x, m = p.bundle.net, p.x, p.mask
    filled = m * x + (1 - m) * p.x_hat
    ones = torch.ones_like(m)
    return feature_residual(net.features(filled, ones), net.features(p.x_hat, ones))


@_feature("peaks", representation=True)
def _peaks(p: Pass) -> Tensor:
    local = local_residual(p.x, p.x_hat, p.mask)  # one map for both peaks
    return torch.stack([peak_of(local), peak_of(local, p.apertures[2])], 1)


def _noise_units_residual(p: Pass) -> Tensor:
    return p.mask * (p.x - p.x_hat) / p.bundle.normaliser.unit_noise.view(1, -1, 1, 1).to(p.x)


@_feature("sharpness", representation=True)
def _sharpness(p: Pass) -> Tensor:
    return sharpness(_noise_units_residual(p))


@_feature("line", representation=True)
def _line(p: Pass) -> Tensor:
    return line_residual(_noise_units_residual(p), p.mask)


@_feature("photometry")
def _photometry(p: Pass) -> Tensor:
    r"""(colours (B - 1), magnitude, concentration, asymmetry) of the central object."""

    u = p.noise_units
    detection = u.sum(1) / math.sqrt(u.shape[1])
    ap, outer, _ = p.apertures
    npix = float(aperture_weights(*detection.shape[-2:], ap).sum())
    mag = -torch.asinh(aperture_fluxes(detection[:, None], ap)[:, 0] / (2 * math.sqrt(npix)))
    return torch.cat([colours(u, ap), torch.stack([mag, concentration(detection), asymmetry(detection, outer, noise=1.0)], 1)], 1)


@_feature("morphometry")
def _morphometry(p: Pass) -> Tensor:
    ap, outer, _ = p.apertures
    return morphometry(p.noise_units, ap, outer)


@_feature("chi", parts=("chi_scanner",), representation=True)
def _chi(p: Pass) -> Tensor:
    return p.bundle.parts["chi_scanner"].features(p.x - p.x_hat, p.x_hat, p.mask, p.known(p.x_hat))


@_feature("chi_pca", parts=("pca", "chi_scanner_pca"))
def _chi_pca(p: Pass) -> Tensor:
    return p.bundle.parts["chi_scanner_pca"].features(p.x - p.pca_hat, p.pca_hat, p.mask, p.known(p.pca_hat), chi=p.pca_chi)


# ---------------------------------------------------------------------------------------------
# Parts


def _scanner(b, data: dict, config, reconstruction: Tensor) -> ChiScanner:
    B, H, W = data["x"].shape[1:]
    scan = ChiScanner(B, H, W, scales=config.chi_scales, bins=config.noise_bins)
    known = b.normaliser.variance(reconstruction, data["variance"]) if "variance" in data else None
    return scan.fit(data["x"] - reconstruction, reconstruction, data["mask"], known)


PARTS["pca"] = Part(
    "pca", build=lambda **c: PCABasis(tuple(c["shape"]), c["components"]), sample=True,
    fit=lambda b, data, cfg: PCABasis(tuple(data["x"].shape[1:]), min(cfg.pca_components, max(1, len(data["x"]) // 4))).fit(data["x"], data["mask"]),
)
PARTS["chi_scanner"] = Part(
    "chi_scanner", build=lambda **c: ChiScanner(**c), sample=True,
    fit=lambda b, data, cfg: _scanner(b, data, cfg, data["x_hat"]),
)
PARTS["chi_scanner_pca"] = Part(
    "chi_scanner_pca", build=lambda **c: ChiScanner(**c), sample=True, requires=("pca",),
    fit=lambda b, data, cfg: _scanner(b, data, cfg, b.parts["pca"](data["x"], data["mask"])),
)


def _gmm_bic(x: Tensor, cfg, reg: float = 1e-6) -> GaussianMixture:
    # at least ~4 D objects per component, so full covariances stay well determined
    components = tuple(k for k in cfg.gmm_components if k <= max(1, len(x) // (4 * x.shape[1])))
    return GaussianMixture.fit_bic(x, components=components or (1,), seed=cfg.seed, reg=reg)


def _fit_gmm(b, f, cfg):
    return _gmm_bic(f["z"], cfg)


def null_units(x: Tensor, null: nn.Module) -> Tensor:
    r"""Each column of a feature in units of its spread on normal objects (a `_robust_scale` part), float64."""
    x = x.double()
    return (x - null.loc.to(x.device)) / null.scale.to(x.device)


def _fit_flow(b, f, cfg):
    z = f["z"]
    return LatentFlow(z.shape[1], transforms=cfg.flow_transforms, hidden=(64, 64)).fit(z, epochs=cfg.flow_epochs, seed=cfg.seed)


@torch.no_grad()
def _nll_mean(density: str):
    def fit(b, f, cfg):
        return Constants.of(value=-b.parts[density].log_prob(f["z"]).double().mean())

    return fit


def _fit_rao(density: str):
    def fit(b, f, cfg):
        d = b.parts[density]
        z = f["z"].double() if density == "gmm" else f["z"]
        return RaoScore.for_density(d).to(z.device).fit(d, z)

    return fit


def _fit_maha(feature: str, columns: slice | None = None):
    def fit(b, f, cfg):
        x = f[feature] if columns is None else f[feature][:, columns]
        return Mahalanobis(x.shape[1], given=1).to(x.device).fit(x)

    return fit


def _robust_scale(feature: str):
    r"""Median and IQR/1.349 per column of a feature on the training objects: each summary in
    units of its own null, so summaries at different scales compare."""

    def fit(b, f, cfg):
        x = f[feature].double()
        q = torch.quantile(x, torch.tensor([0.25, 0.5, 0.75], dtype=x.dtype, device=x.device), dim=0)
        return Constants.of(loc=q[1], scale=((q[2] - q[0]) / 1.349).clamp_min(1e-12))

    return fit


PARTS["gmm"] = Part("gmm", build=lambda **c: GaussianMixture(**c), fit=_fit_gmm, features=("z",))
PARTS["flow"] = Part("flow", build=lambda **c: LatentFlow(**{**c, "hidden": tuple(c["hidden"])}), fit=_fit_flow, features=("z",))
PARTS["nll_gmm_mean"] = Part("nll_gmm_mean", build=lambda **c: Constants(**c), fit=_nll_mean("gmm"), features=("z",), requires=("gmm",))
PARTS["nll_flow_mean"] = Part("nll_flow_mean", build=lambda **c: Constants(**c), fit=_nll_mean("flow"), features=("z",), requires=("flow",))
PARTS["rao_gmm"] = Part("rao_gmm", build=lambda **c: RaoScore(**c), fit=_fit_rao("gmm"), features=("z",), requires=("gmm",))
PARTS["rao_flow"] = Part("rao_flow", build=lambda **c: RaoScore(**c), fit=_fit_rao("flow"), features=("z",), requires=("flow",))
PARTS["colour_reference"] = Part("colour_reference", build=lambda **c: Mahalanobis(**c), features=("photometry",),
                                 fit=lambda b, f, cfg: _fit_maha("photometry")(b, {"photometry": f["photometry"][:, :-2]}, cfg))
PARTS["concentration_reference"] = Part(
    "concentration_reference", build=lambda **c: Mahalanobis(**c), features=("photometry",),
    fit=lambda b, f, cfg: _fit_maha("p")(b, {"p": f["photometry"][:, [-2, -3]]}, cfg))
PARTS["morphometry_reference"] = Part("morphometry_reference", build=lambda **c: Mahalanobis(**c), features=("morphometry",),
                                      fit=_fit_maha("morphometry"))
PARTS["as_scales"] = Part(
    "as_scales", build=lambda **c: Constants(**c), features=("G", "C"),
    fit=lambda b, f, cfg: Constants.of(g=f["G"].double().median().clamp_min(1e-12), c=f["C"].double().median().clamp_min(1e-12),
                                       lam=cfg.lam))
PARTS["chi_null"] = Part("chi_null", build=lambda **c: Constants(**c), features=("chi",), fit=_robust_scale("chi"))
PARTS["chi_null_pca"] = Part("chi_null_pca", build=lambda **c: Constants(**c), features=("chi_pca",), fit=_robust_scale("chi_pca"))


# ---------------------------------------------------------------------------------------------
# Statistics


def _register_simple(name: str, feature: str, column: int | None, doc: str) -> None:
    statistic(name, (feature,), doc=doc)(lambda f, parts: f[feature] if column is None else f[feature][:, column])


_register_simple("G", "G", None, "RMS pixel residual of the reconstruction (Schlegl et al. 2017)")
_register_simple("C", "C", None, "RMS residual of the encoder's features (Storey-Fisher et al. 2021)")
_register_simple("peak", "peaks", 0, "largest 3×3 local RMS residual anywhere in the cutout")
_register_simple("peak_core", "peaks", 1, "largest 3×3 local RMS residual inside the central aperture")
_register_simple("sharpness", "sharpness", None, "largest residual excess over its 8 neighbours (L.A.Cosmic)")
_register_simple("line", "line", None, "largest residual summed along a straight band (Radon)")
_register_simple("asymmetry", "photometry", -1, "rotational asymmetry of the central object, noise-corrected (CAS)")


@statistic("AS", ("G", "C"), ("as_scales",))
def _as(f, parts):
    """HSC anomaly score λ G/s_G + (1 − λ) C/s_C (Storey-Fisher et al. 2021)"""
    s = parts["as_scales"]
    return anomaly_score(f["G"], f["C"], float(s.lam), s.g.to(f["G"]), s.c.to(f["G"]))


def _density_statistics(density: str) -> None:
    statistic(f"nll_{density}", ("z",), (density,), doc=f"latent −log p(z) under the {density}")(
        lambda f, parts: -parts[density].log_prob(f["z"]).to(f["z"].dtype))
    statistic(f"typicality_{density}", ("z",), (density, f"nll_{density}_mean"),
              doc=f"|−log p(z) − its training mean| under the {density} (Nalisnick et al. 2019)")(
        lambda f, parts: typicality(-parts[density].log_prob(f["z"]).to(f["z"].dtype), parts[f"nll_{density}_mean"].value.to(f["z"].dtype)))
    statistic(f"rao_{density}", ("z",), (density, f"rao_{density}"), doc=f"Rao's score statistic of the {density} (Bergamin et al. 2022)")(
        lambda f, parts: parts[f"rao_{density}"](parts[density], f["z"].double() if density == "gmm" else f["z"]).to(f["z"].dtype))


_density_statistics("gmm")
_density_statistics("flow")


@statistic("colour", ("photometry",), ("colour_reference",))
def _colour(f, parts):
    """Mahalanobis distance of the colours to normal objects of the same magnitude"""
    return parts["colour_reference"](f["photometry"][:, :-2])


@statistic("concentration", ("photometry",), ("concentration_reference",))
def _concentration(f, parts):
    """Mahalanobis distance of the concentration to normal objects of the same magnitude"""
    return parts["concentration_reference"](f["photometry"][:, [-2, -3]])


@statistic("morphometry", ("morphometry",), ("morphometry_reference",))
def _morph(f, parts):
    """joint Mahalanobis distance of colours, concentration, size, ellipticity, asymmetry and
    smoothness to normal objects of the same magnitude"""
    return parts["morphometry_reference"](f["morphometry"])


_CHI_NAMES = {"max": "peak", "core": "core", "sumsq": "extended", "chromatic": "chromatic"}


def _chi_statistics(suffix: str, feature: str, null: str, residual: str) -> None:
    def summary(which: str, doc: str, min_scale: float = 0.0):
        k = list(ChiScanner.SUMMARIES).index(which)

        def compute(f, parts):
            x = f[feature]
            u = null_units(x, parts[null])
            S = len(ChiScanner.SUMMARIES)
            scales = parts[f"chi_scanner{suffix}"].scales
            cols = [j * S + k for j, s in enumerate(scales) if s >= min_scale] or [(len(scales) - 1) * S + k]
            return u[:, cols].amax(1).to(x.dtype)

        statistic(f"chi_{_CHI_NAMES[which]}{suffix}", (feature,), (null, f"chi_scanner{suffix}"),
                  doc=f"{doc} ({residual}), max over scales in units of each scale's null")(compute)

    summary("max", "largest |χ| of the noise-normalised residual anywhere, any band or the coadd")
    summary("core", "largest |χ| inside the central aperture")
    summary("sumsq", "mean χ² over the cutout: extended departures", min_scale=2.0)
    summary("chromatic", "largest departure of one band's χ from the mean of the bands")


_chi_statistics("", "chi", "chi_null", "autoencoder residual")
_chi_statistics("_pca", "chi_pca", "chi_null_pca", "PCA residual")


# A density of departures: a Gaussian mixture over the multi-scale χ descriptor (every scale and
# summary at once, in units of its null: what `Detector.describe` returns), fitted on the training
# objects; −log p is large for a combination of departures normal objects do not show, even where
# no single summary is extreme.

PARTS["chi_gmm_pca"] = Part("chi_gmm_pca", build=lambda **c: GaussianMixture(**c), features=("chi_pca",), requires=("chi_null_pca",),
                            fit=lambda b, f, cfg: _gmm_bic(null_units(f["chi_pca"], b.parts["chi_null_pca"]), cfg,
                                                           reg=cfg.chi_density_floor))


@statistic("chi_density_pca", ("chi_pca",), ("chi_null_pca", "chi_gmm_pca"))
def _chi_density(f, parts):
    """−log p of the PCA residual's multi-scale χ descriptor under a Gaussian mixture of normal objects'"""
    return -parts["chi_gmm_pca"].log_prob(null_units(f["chi_pca"], parts["chi_null_pca"])).to(f["chi_pca"].dtype)


# Linear departures: the PCA residual's χ under line kernels at 12 orientations (gsafe_models.noise.line_chi)

@_feature("chi_line_pca", parts=("pca", "chi_scanner_pca"))
def _chi_line_pca(p: Pass) -> Tensor:
    return line_chi(p.pca_chi, p.mask, line_kernels(11, 12, dtype=p.x.dtype, device=p.x.device))


PARTS["chi_line_null_pca"] = Part("chi_line_null_pca", build=lambda **c: Constants(**c), features=("chi_line_pca",),
                                  fit=_robust_scale("chi_line_pca"))


@statistic("chi_line_pca", ("chi_line_pca",), ("chi_line_null_pca",))
def _chi_line(f, parts):
    """largest |χ| of the PCA residual under a line kernel (11 pixels, 12 orientations), any band or the coadd, in units of its null"""
    return null_units(f["chi_line_pca"], parts["chi_line_null_pca"]).amax(1).to(f["chi_line_pca"].dtype)


# Linear departures among compact ones: the median of the PCA residual's χ along 9-pixel segments at
# 12 orientations (gsafe_models.noise.line_median_chi), which one bright compact residual does not move

@_feature("chi_line_median_pca", parts=("pca", "chi_scanner_pca"))
def _chi_line_median_pca_feature(p: Pass) -> Tensor:
    return line_median_chi(p.pca_chi, p.mask)


PARTS["chi_line_median_null_pca"] = Part("chi_line_median_null_pca", build=lambda **c: Constants(**c),
                                         features=("chi_line_median_pca",), fit=_robust_scale("chi_line_median_pca"))


@statistic("chi_line_median_pca", ("chi_line_median_pca",), ("chi_line_median_null_pca",))
def _chi_line_median(f, parts):
    """largest |median χ| of the PCA residual along a 9-pixel segment (12 orientations), any band or the coadd, in units of its null: faint lines among compact residuals"""
    return null_units(f["chi_line_median_pca"], parts["chi_line_median_null_pca"]).amax(1).to(f["chi_line_median_pca"].dtype)


# A density of departures and shapes at once: a Gaussian mixture over the PCA residual's multi-scale χ
# descriptor, its line responses and the central object's morphometry, each column in units of its null.
# A departure that is ordinary for one kind of galaxy (a strong residual on a large, bright spiral) and
# not for another (the same residual on a small, smooth one) is rare only jointly.

PARTS["morphometry_null"] = Part("morphometry_null", build=lambda **c: Constants(**c), features=("morphometry",),
                                 fit=_robust_scale("morphometry"))

_DEPARTURE = (("chi_pca", "chi_null_pca"), ("chi_line_pca", "chi_line_null_pca"), ("morphometry", "morphometry_null"))


def _departure_vector(f: dict[str, Tensor], parts) -> Tensor:
    return torch.cat([null_units(f[feature], parts[null]) for feature, null in _DEPARTURE], 1)


PARTS["departure_gmm_pca"] = Part(
    "departure_gmm_pca", build=lambda **c: GaussianMixture(**c), features=tuple(f for f, _ in _DEPARTURE),
    requires=tuple(n for _, n in _DEPARTURE),
    fit=lambda b, f, cfg: _gmm_bic(_departure_vector(f, b.parts), cfg, reg=cfg.chi_density_floor))


@statistic("departure_density_pca", tuple(f for f, _ in _DEPARTURE), tuple(n for _, n in _DEPARTURE) + ("departure_gmm_pca",))
def _departure_density(f, parts):
    """−log p of the PCA residual's multi-scale χ descriptor, its line responses and the object's morphometry, jointly, under a Gaussian mixture of normal objects'"""
    return -parts["departure_gmm_pca"].log_prob(_departure_vector(f, parts)).to(f["chi_pca"].dtype)


# ---------------------------------------------------------------------------------------------
# A density of small patches, anywhere in the cutout (gsafe_models.patches)


def _build_patches(fitted_k: dict | None = None, **c) -> PatchDensity:
    pd = PatchDensity(**{**c, "gmm_components": tuple(c["gmm_components"])})
    pd.build_gmms(fitted_k or {})
    return pd


@_feature("patches", parts=("patch_density",))
def _patches(p: Pass) -> Tensor:
    return p.bundle.parts["patch_density"].features(p.x, p.mask)


PARTS["patch_density"] = Part(
    "patch_density", build=_build_patches, sample=True,
    fit=lambda b, data, cfg: PatchDensity(data["x"].shape[1], patch=min(7, data["x"].shape[-1] // 4 | 1))
    .fit(data["x"], data["mask"], seed=cfg.seed))
PARTS["patch_null"] = Part("patch_null", build=lambda **c: Constants(**c), features=("patches",), fit=_robust_scale("patches"))


def _patch_statistic(which: str, doc: str) -> None:
    k = list(PatchDensity.SUMMARIES).index(which)

    @statistic(f"patch_{which}", ("patches",), ("patch_density", "patch_null"), doc=doc)
    def compute(f, parts):
        x, c = f["patches"], parts["patch_null"]
        u = (x.double() - c.loc.to(x.device)) / c.scale.to(x.device)
        S = len(PatchDensity.SUMMARIES)
        return u[:, [j * S + k for j in range(len(PatchDensity.SCALES))]].amax(1).to(x.dtype)


_patch_statistic("peak", "the least likely small patch of the cutout under a density of normal patches from anywhere "
                         "in normal cutouts (PaDiM / PatchCore made position-free), max over two scales")
_patch_statistic("mass", "the mean of the 8 least likely patches: extended departures move many patches")


# ---------------------------------------------------------------------------------------------
# An energy-based model of the latents, trained by maximum likelihood (gsafe_models.ebm)

from .ebm import LatentEBM  # noqa: E402  (appended section: its own import)

EBM_STEPS = 1000  # parameter updates of the EBM; ~1 000 suffice on 32-D latents of a few thousand objects


def _fit_ebm(b, f, cfg):
    z = f["z"].float()
    return LatentEBM(z.shape[1]).fit(z, steps=EBM_STEPS, seed=cfg.seed)


@torch.no_grad()
def _ebm_mean(b, f, cfg):
    return Constants.of(value=b.parts["ebm"].energy(f["z"].float()).double().mean())


PARTS["ebm"] = Part("ebm", build=lambda **c: LatentEBM(**{**c, "hidden": tuple(c["hidden"])}), fit=_fit_ebm, features=("z",))
PARTS["energy_ebm_mean"] = Part("energy_ebm_mean", build=lambda **c: Constants(**c), fit=_ebm_mean, features=("z",), requires=("ebm",))


@statistic("energy_ebm", ("z",), ("ebm",))
def _energy_ebm(f, parts):
    """latent energy E(z) of an energy-based model trained by maximum likelihood (−log p up to a constant)"""
    return parts["ebm"].energy(f["z"].float()).to(f["z"].dtype)


@statistic("typicality_ebm", ("z",), ("ebm", "energy_ebm_mean"))
def _typicality_ebm(f, parts):
    """|E(z) − its training mean| under the energy-based model (Nalisnick et al. 2019)"""
    e = parts["ebm"].energy(f["z"].float()).to(f["z"].dtype)
    return typicality(e, parts["energy_ebm_mean"].value.to(e))
