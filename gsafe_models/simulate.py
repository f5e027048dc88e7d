r"""GalSim simulator of multi-band survey cutouts with injected anomalies.

Each cutout holds a bulge + disk galaxy near its centre, sometimes an unrelated neighbour, seen
through a per-band Moffat PSF with per-band sky noise (plus source shot noise), in counts,
sky-subtracted, calibrated so that the depths are those of the HSC-SSP Wide layer. A fraction of
cutouts carry one injected anomaly together with a per-pixel footprint of where it lies. The
classes (`ANOMALY_CLASSES`, each with its `(origin, extent, signature)` in `ANOMALY_KINDS`) are
those that real hunts reported (Galaxy Zoo's odd features, the HSC GAN hunt, Astronomaly on
DECaLS, survey quality-control catalogues):

- astrophysical, extended: a strong lens, a merger with tidal tails or shells, a ring galaxy, a
  dust lane across an inclined disk or an early type, a low-surface-brightness galaxy;
- astrophysical, compact: a point source blended with the galaxy, giant star-forming clumps, an
  extreme emission-line galaxy (one band boosted), a Lyman-break dropout (no flux in the blue);
- instrumental: a satellite trail, cosmic rays, a saturated star with spikes and bleed trails, an
  optical ghost (out-of-focus pupil image), a hot column, an electronic crosstalk ghost.

Every anomaly is a noiseless model added before the noise (PSF-convolved where it is light from
the sky, not for detector artefacts; negative for light absorbed by dust); a class that needs its
own kind of central object replaces the host (a lens's massive elliptical, a dusty inclined disk,
a compact starburst, a clumpy disk) or is the central object itself (a dropout, an LSB galaxy).
Amplitudes and sizes come from the literature cited in each injector, translated into counts
through the zero point, never from how a detector scores them.

Object `i` depends only on `(seed, i)` and the survey settings, never on the batch it is drawn
in: every object has its own random streams, so a survey can be simulated in any chunks, in any
order, in any number of processes, and come out the same.

References:
    | GalSim: The modular galaxy image simulation toolkit (Rowe et al., 2015)
    | https://arxiv.org/abs/1407.7676
    | A theoretical investigation of focal stellar images in the photographic emulsion (Moffat, 1969)
    | https://ui.adsabs.harvard.edu/abs/1969A&A.....3..455M
    | Gravitational lenses (Schneider, Ehlers & Falco, 1992), singular isothermal sphere
    | https://doi.org/10.1007/978-3-662-03758-4
    | The Hyper Suprime-Cam SSP survey: overview and survey design (Aihara et al., 2018)
    | https://arxiv.org/abs/1704.05858
    | Galaxy Zoo 1: data release of morphological classifications (Lintott et al., 2011), odd features
    | https://arxiv.org/abs/1007.3265
    | Anomaly detection in HSC galaxy images with generative adversarial networks (Storey-Fisher et al., 2021)
    | https://arxiv.org/abs/2105.02434
    | Astronomaly: personalised active anomaly detection in astronomical data (Lochner & Bassett, 2021)
    | https://arxiv.org/abs/2010.11202
    | Astronomaly at scale: searching for anomalies amongst 4 million galaxies (Etsebeth et al., 2024)
    | https://arxiv.org/abs/2309.08660
"""

from __future__ import annotations

__all__ = [
    "ANOMALY_CLASSES",
    "ANOMALY_KINDS",
    "DEFAULT_BANDS",
    "SimulatedBatch",
    "simulate_batch",
]

import functools
import math

from dataclasses import dataclass, field
from typing import Callable

import galsim
import numpy as np

from scipy import special
from scipy.signal import fftconvolve

ANOMALY_CLASSES: tuple[str, ...] = (
    "lens", "merger", "trail", "cosmic_ray", "saturated_star", "blend_point",
    "ring", "dust_lane", "emission_line", "dropout", "lsb", "clumpy", "ghost", "hot_column", "crosstalk",
)
# (origin, extent, signature) of each class. origin: "astrophysical" (a real object on the sky) or
# "instrumental" (made by the telescope, camera or detector: an artefact). extent: "compact" when
# each anomalous feature is at most a few PSF widths across or a line one pixel wide, "extended"
# otherwise. signature: "photometric" when the anomaly lies mainly in the fluxes or colours (a
# band's excess or deficit) of an ordinary-looking shape, "morphological" when it lies in the shape.
ANOMALY_KINDS: dict[str, tuple[str, str, str]] = {
    "lens": ("astrophysical", "extended", "morphological"),
    "merger": ("astrophysical", "extended", "morphological"),
    "trail": ("instrumental", "extended", "morphological"),
    "cosmic_ray": ("instrumental", "compact", "morphological"),
    "saturated_star": ("instrumental", "extended", "morphological"),
    "blend_point": ("astrophysical", "compact", "morphological"),
    "ring": ("astrophysical", "extended", "morphological"),
    "dust_lane": ("astrophysical", "extended", "morphological"),
    "emission_line": ("astrophysical", "compact", "photometric"),
    "dropout": ("astrophysical", "compact", "photometric"),
    "lsb": ("astrophysical", "extended", "morphological"),
    "clumpy": ("astrophysical", "compact", "morphological"),
    "ghost": ("instrumental", "extended", "morphological"),
    "hot_column": ("instrumental", "compact", "morphological"),
    "crosstalk": ("instrumental", "compact", "photometric"),
}
DEFAULT_BANDS: tuple[str, ...] = ("g", "r", "i", "z", "y")

# Per band: effective wavelength (nm, LSST-like), sky noise sigma (counts), and flux ratios to the
# i band of the component templates: old bulge (red), star-forming disk (bluer), lensed
# high-redshift source (blue), quasar (flat, UV excess).
_BAND_TABLE: dict[str, tuple[float, float, float, float, float, float]] = {
    #     wavelength  sky   bulge  disk   arc   quasar
    "u": (367.0, 4.0, 0.10, 0.50, 1.25, 1.15),
    "g": (482.0, 6.0, 0.33, 0.75, 1.30, 1.05),
    "r": (622.0, 9.0, 0.68, 0.90, 1.15, 1.00),
    "i": (755.0, 12.0, 1.00, 1.00, 1.00, 1.00),
    "z": (869.0, 15.0, 1.18, 1.05, 0.95, 1.05),
    "y": (971.0, 20.0, 1.28, 1.08, 0.92, 1.10),
}
# Approximate filter edges (nm) of the LSST bands (LSST Science Book, 2009, table 1.1): band widths
# for emission-line excesses, band coverage for intergalactic absorption.
_BAND_EDGES: dict[str, tuple[float, float]] = {
    "u": (320.0, 400.0), "g": (400.0, 552.0), "r": (552.0, 691.0),
    "i": (691.0, 818.0), "z": (818.0, 922.0), "y": (948.0, 1060.0),
}
_REF_WAVELENGTH = 755.0  # nm; fluxes are quoted in the i band
# Counts are f_nu in every band (the SEDs above are f_nu ratios) and one count is AB magnitude
# _ZERO_POINT: with the sky noise above and a 0.72" PSF, 5-sigma point-source depths are g 26.6,
# r 26.2, i 25.9, as in the HSC-SSP Wide layer (Aihara et al. 2018). Magnitudes and surface
# brightnesses from the literature translate into counts through it.
_ZERO_POINT = 32.4
_FLUX_RANGE = (1.5e3, 8.0e4)  # counts, i band, host galaxies (log-uniform): S/N ~10 to ~400
_SATURATION = 4.0e4  # counts above sky where a pixel saturates
_GAIN = 1.0  # electrons per count, for source shot noise
_PSF_BETA = 3.5
_KERNEL_HALF = 12  # pixels; half-width of the PSF kernel for components rendered in numpy
# Looser than GalSim's defaults (5e-3, 1e-3): same pixels to far below the noise, 2x faster.
_GSPARAMS = galsim.GSParams(folding_threshold=1e-2, maxk_threshold=2e-3)


@dataclass
class SimulatedBatch:
    r"""Cutouts of objects with consecutive global indices, with their truth.

    Arguments:
        images: `(n, B, H, W)` float32, counts, sky-subtracted, with noise.
        object_id: `(n,)` str, `"sim7-000000042"` for seed 7 (global index, zero padded to 9 digits):
            surveys simulated with different seeds never share ids.
        label: `(n,)` int8, 1 for an injected anomaly, 0 for a normal object.
        anomaly_class: `(n,)` str, `""` for normal objects, else one of `ANOMALY_CLASSES`.
        footprint: `(n, H, W)` uint8, 1 where the injected anomaly lies (all zeros for normals).
        ra: `(n,)` float64, degrees.
        dec: `(n,)` float64, degrees.
    """

    images: np.ndarray
    object_id: np.ndarray
    label: np.ndarray
    anomaly_class: np.ndarray
    footprint: np.ndarray
    ra: np.ndarray
    dec: np.ndarray

    def __len__(self) -> int:
        return len(self.label)


def simulate_batch(
    start: int,
    n: int,
    *,
    seed: int = 0,
    anomaly_frac: float = 0.05,
    classes: tuple[str, ...] = ANOMALY_CLASSES,
    bands: tuple[str, ...] = DEFAULT_BANDS,
    size: int = 64,
    pixel_scale: float = 0.2,
) -> SimulatedBatch:
    r"""Simulates the objects with global indices `[start, start + n)`.

    Object `i` is an anomaly when its first random draw falls below `anomaly_frac`; its class
    is then drawn uniformly from `classes`. Each object draws from its own random streams
    seeded by `(seed, i)`, so `simulate_batch(0, 100)` equals `simulate_batch(0, 50)` followed
    by `simulate_batch(50, 50)`; a normal object is the same whatever `anomaly_frac` and
    `classes` are (the anomaly and its replacement host, if any, come from their own stream).

    The footprint of an anomaly is where its noiseless component (light added, or taken away by
    a dust lane) exceeds the sky noise in some band, or exceeds half its own peak where it never
    reaches the noise, plus the pixels it saturates. For a class that replaces the host this is
    where the object departs from a normal galaxy: the ring, the lane, the line emission or the
    clumps; for a dropout or an LSB galaxy, which are the object, the whole object.

    Arguments:
        start: The global index of the first object.
        n: The number of objects.
        seed: The survey seed.
        anomaly_frac: The probability that an object carries an injected anomaly.
        classes: The anomaly classes to draw from, a subset of `ANOMALY_CLASSES` (see
            `ANOMALY_KINDS` for their kinds).
        bands: The bands, among `u, g, r, i, z, y`.
        size: The cutout side :math:`H = W`, in pixels.
        pixel_scale: The pixel side, in arcsec.

    Returns:
        The cutouts and their truth, :math:`B` = `len(bands)`.

    Example:
        >>> batch = simulate_batch(0, 4, anomaly_frac=0.5, size=32)
        >>> batch.images.shape, batch.object_id[0]
        ((4, 5, 32, 32), np.str_('sim0-000000000'))
    """
    spec = _Survey.of(seed, anomaly_frac, tuple(classes), tuple(bands), size, pixel_scale)
    if start < 0 or n < 0:
        raise ValueError(f"simulate_batch: start={start} and n={n} must be >= 0")
    n_bands = len(spec.bands)
    images = np.empty((n, n_bands, size, size), dtype=np.float32)
    footprint = np.empty((n, size, size), dtype=np.uint8)
    label = np.empty(n, dtype=np.int8)
    cls = np.empty(n, dtype="<U16")
    ra = np.empty(n, dtype=np.float64)
    dec = np.empty(n, dtype=np.float64)
    for k in range(n):
        obj = _simulate_object(spec, start + k)
        images[k] = obj.image
        footprint[k] = obj.footprint
        label[k] = obj.anomaly_class != ""
        cls[k] = obj.anomaly_class
        ra[k], dec[k] = obj.ra, obj.dec
    width = len(f"sim{seed}-{max(start + n - 1, 0):09d}")
    object_id = np.array([f"sim{seed}-{i:09d}" for i in range(start, start + n)], dtype=f"<U{width}")
    return SimulatedBatch(images, object_id, label, cls, footprint, ra, dec)


# ---------------------------------------------------------------------------------------------
# Survey description and per-object observing conditions


@dataclass(frozen=True)
class _Survey:
    """The settings every object of a survey shares, validated once."""

    seed: int
    anomaly_frac: float
    classes: tuple[str, ...]
    bands: tuple[str, ...]
    size: int
    scale: float
    wavelength: np.ndarray = field(repr=False)  # (B,) nm
    sky: np.ndarray = field(repr=False)  # (B,) counts
    templates: dict[str, np.ndarray] = field(repr=False)  # name -> (B,) flux ratio to i
    edges: np.ndarray = field(repr=False)  # (B, 2) nm, filter edges

    @classmethod
    def of(cls, seed: int, anomaly_frac: float, classes: tuple[str, ...], bands: tuple[str, ...],
           size: int, scale: float) -> "_Survey":
        if seed < 0:
            raise ValueError(f"simulate: seed={seed} must be >= 0")
        if not 0.0 <= anomaly_frac <= 1.0:
            raise ValueError(f"simulate: anomaly_frac={anomaly_frac} must lie in [0, 1]")
        unknown = [c for c in classes if c not in ANOMALY_CLASSES]
        if unknown:
            raise ValueError(f"simulate: unknown anomaly classes {unknown}; known: {ANOMALY_CLASSES}")
        if anomaly_frac > 0 and not classes:
            raise ValueError("simulate: anomaly_frac > 0 needs at least one anomaly class")
        bad = [b for b in bands if b not in _BAND_TABLE]
        if bad or not bands:
            raise ValueError(f"simulate: bands {list(bands)} must be a non-empty subset of {tuple(_BAND_TABLE)}")
        if size < 16:
            raise ValueError(f"simulate: size={size} must be >= 16 pixels")
        if scale <= 0:
            raise ValueError(f"simulate: pixel_scale={scale} must be > 0")
        table = np.array([_BAND_TABLE[b] for b in bands], dtype=np.float64)
        templates = {name: table[:, 2 + k] for k, name in enumerate(("bulge", "disk", "arc", "quasar"))}
        edges = np.array([_BAND_EDGES[b] for b in bands], dtype=np.float64)
        return cls(int(seed), float(anomaly_frac), tuple(classes), tuple(bands), int(size), float(scale),
                   table[:, 0], table[:, 1], templates, edges)

    @property
    def half(self) -> float:
        """Half the cutout side, arcsec."""
        return 0.5 * self.size * self.scale


class _Conditions:
    """One object's observing conditions: a Moffat PSF and a sky noise level per band."""

    def __init__(self, spec: _Survey, rng: np.random.Generator):
        self.spec = spec
        seeing = rng.uniform(0.62, 0.82)  # arcsec FWHM at the i band
        # Kolmogorov seeing scales as wavelength^-1/5; a little per-band scatter on top.
        jitter = np.exp(rng.normal(0, 0.03, len(spec.bands)))
        self.fwhm = seeing * (spec.wavelength / _REF_WAVELENGTH) ** -0.2 * jitter
        g1, g2 = rng.normal(0.0, 0.015, 2)
        self.psf = [galsim.Moffat(beta=_PSF_BETA, fwhm=f, gsparams=_GSPARAMS).shear(g1=g1, g2=g2)
                    for f in self.fwhm]
        self.sky = spec.sky * np.exp(rng.normal(0.0, 0.05, len(spec.bands)))
        self._kernels: list[np.ndarray] | None = None

    @property
    def alpha(self) -> np.ndarray:
        """Moffat scale radius per band, pixels."""
        return self.fwhm / self.spec.scale / (2.0 * math.sqrt(2.0 ** (1.0 / _PSF_BETA) - 1.0))

    def kernels(self) -> list[np.ndarray]:
        """PSF images sampled at pixel centres, unit sum, `(2K+1, 2K+1)` per band."""
        if self._kernels is None:
            k = 2 * _KERNEL_HALF + 1
            self._kernels = []
            for p in self.psf:
                a = p.drawImage(nx=k, ny=k, scale=self.spec.scale, method="no_pixel").array
                self._kernels.append(a / a.sum())
        return self._kernels

    def draw(self, profiles: list[galsim.GSObject]) -> np.ndarray:
        """Per-band profiles convolved with the PSF and pixel: `(B, H, W)` float64 counts."""
        n = self.spec.size
        return np.stack([galsim.Convolve(prof, psf).drawImage(nx=n, ny=n, scale=self.spec.scale).array
                         for prof, psf in zip(profiles, self.psf)])

    def convolve(self, pix: np.ndarray, fluxes: np.ndarray) -> np.ndarray:
        """A pixel-integrated shape on the padded grid of `_grid`, scaled to per-band `fluxes`
        and convolved with each band's PSF: `(B, H, W)` float64 counts."""
        pix = pix / pix.sum()
        return self.blur(pix[None] * np.asarray(fluxes)[:, None, None])

    def blur(self, images: np.ndarray) -> np.ndarray:
        """Per-band pixel-integrated images `(B, H + 2K, W + 2K)` on the padded grid of `_grid`, in
        counts per pixel, convolved with each band's PSF and cropped: `(B, H, W)` float64 counts."""
        p = _KERNEL_HALF
        return np.stack([fftconvolve(im, k, mode="same")[p:-p, p:-p] for im, k in zip(images, self.kernels())])


def _grid(spec: _Survey, oversample: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Arcsec coordinates `(y, x)` of (sub)pixel centres of the cutout padded by the PSF kernel
    half-width, origin at the cutout centre as in GalSim."""
    n = (spec.size + 2 * _KERNEL_HALF) * oversample
    t = (np.arange(n) + 0.5) / oversample - _KERNEL_HALF - 0.5 * spec.size
    t = t * spec.scale
    return np.meshgrid(t, t, indexing="ij")


def _bin(a: np.ndarray, oversample: int) -> np.ndarray:
    """Averages `oversample x oversample` blocks: pixel integration of an oversampled image."""
    if oversample == 1:
        return a
    n = a.shape[0] // oversample
    return a.reshape(n, oversample, n, oversample).mean(axis=(1, 3))


def _bin_sum(a: np.ndarray, oversample: int) -> np.ndarray:
    """Sums `oversample x oversample` blocks of per-band images `(B, n * oversample, n * oversample)`
    in counts per subpixel: `(B, n, n)` counts per pixel."""
    n = a.shape[1] // oversample
    return a.reshape(len(a), n, oversample, n, oversample).sum(axis=(2, 4))


def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def _planck_sed(spec: _Survey, temperature: float) -> np.ndarray:
    """Blackbody f_nu ratios to the i band, for stars."""
    x = 1.438777e7 / (spec.wavelength * temperature)  # h c / (lambda k T), lambda in nm
    x0 = 1.438777e7 / (_REF_WAVELENGTH * temperature)
    return (_REF_WAVELENGTH / spec.wavelength) ** 3 * np.expm1(x0) / np.expm1(x)


def _scattered(spec: _Survey, template: np.ndarray, rng: np.random.Generator, tilt: float) -> np.ndarray:
    """A template SED tilted by a power law in wavelength with per-band scatter."""
    return template * np.exp(tilt * np.log(spec.wavelength / _REF_WAVELENGTH) + rng.normal(0, 0.04, len(template)))


# ---------------------------------------------------------------------------------------------
# Galaxies


@dataclass
class _Galaxy:
    """A bulge + disk galaxy: one shape, per-band fluxes from the two components' SEDs."""

    flux: float  # i band, counts
    bulge_frac: float
    x: float  # arcsec from the cutout centre
    y: float
    bulge: galsim.GSObject  # unit flux, sheared, not shifted
    disk: galsim.GSObject
    sed_bulge: np.ndarray  # (B,)
    sed_disk: np.ndarray
    r_disk: float = 0.0  # arcsec, half-light radius of the disk
    g: float = 0.0  # reduced shear of the disk: axis ratio (1 - g) / (1 + g)
    angle: float = 0.0  # radians, position angle of the major axis from +x

    def profiles(self) -> list[galsim.GSObject]:
        """One profile per band."""
        fb, fd = self.flux * self.bulge_frac, self.flux * (1.0 - self.bulge_frac)
        out = []
        for sb, sd in zip(self.sed_bulge, self.sed_disk):
            parts = [c.withFlux(f) for c, f in ((self.bulge, fb * sb), (self.disk, fd * sd)) if f > 0]
            prof = galsim.Add(parts) if len(parts) > 1 else parts[0]
            out.append(prof.shift(self.x, self.y))
        return out


def _draw_galaxy(spec: _Survey, rng: np.random.Generator, flux: float, x: float, y: float,
                 elliptical: bool | None = None) -> _Galaxy:
    """Draws a galaxy's structure and colours: 30% ellipticals (bulge-dominated, red), the rest
    disks with a small bulge; half-light radii log-normal and growing with flux."""
    if elliptical is None:
        elliptical = rng.random() < 0.3
    r = float(np.clip(0.55 * (flux / 8e3) ** 0.2 * math.exp(rng.normal(0.0, 0.35)), 0.25, 1.6))
    if elliptical:
        bulge_frac, r_bulge, r_disk = rng.uniform(0.75, 1.0), r, 1.3 * r
    else:
        bulge_frac, r_bulge, r_disk = rng.uniform(0.0, 0.45), r * rng.uniform(0.25, 0.5), 1.1 * r
    angle = rng.uniform(0.0, math.pi)
    g_disk = min(0.5, abs(rng.normal(0.0, 0.25)))
    g_bulge = min(0.3, abs(rng.normal(0.0, 0.12))) if not elliptical else min(0.4, abs(rng.normal(0.0, 0.18)))
    beta = angle * galsim.radians
    # truncated at 8 half-light radii, as in common survey model fitting: the untruncated wings
    # would need FFTs of up to 512^2 for no visible difference
    bulge = galsim.DeVaucouleurs(half_light_radius=r_bulge, trunc=8.0 * r_bulge, gsparams=_GSPARAMS)
    bulge = bulge.shear(g=g_bulge, beta=beta)
    disk = galsim.Exponential(half_light_radius=r_disk, gsparams=_GSPARAMS).shear(g=g_disk, beta=beta)
    tilt = rng.normal(0.0, 0.25)  # colour scatter shared by both components (redshift, dust)
    sed_bulge = _scattered(spec, spec.templates["bulge"], rng, tilt)
    sed_disk = _scattered(spec, spec.templates["disk"], rng, tilt)
    return _Galaxy(flux, float(bulge_frac), x, y, bulge, disk, sed_bulge, sed_disk, float(r_disk), float(g_disk), angle)


def _star(spec: _Survey, flux: float, sed: np.ndarray, x: float, y: float) -> list[galsim.GSObject]:
    """A point source: one delta function per band (convolved with the PSF when drawn)."""
    return [galsim.DeltaFunction(flux=flux * s, gsparams=_GSPARAMS).shift(x, y) for s in sed]


def _capped(rng: np.random.Generator, lo: float, hi: float) -> float:
    """Uniform in `[lo, hi]`, or `hi` when a small cutout caps it below `lo`."""
    return float(rng.uniform(min(lo, hi), hi))


def _polar(rng: np.random.Generator, r_lo: float, r_hi: float, x0: float = 0.0, y0: float = 0.0) -> tuple[float, float]:
    r, phi = _capped(rng, r_lo, r_hi), rng.uniform(0.0, 2 * math.pi)
    return x0 + r * math.cos(phi), y0 + r * math.sin(phi)


# ---------------------------------------------------------------------------------------------
# Anomalies: each returns its noiseless model `(B, H, W)` in counts, PSF-convolved where physical


def _lens_host(spec: _Survey, rng: np.random.Generator, host: _Galaxy) -> _Galaxy:
    """Lenses are massive ellipticals: a bright, red, bulge-dominated host in place of the drawn one."""
    flux = max(host.flux, _log_uniform(rng, 4e3, _FLUX_RANGE[1]))
    return _draw_galaxy(spec, rng, flux, host.x, host.y, elliptical=True)


def _lens(spec: _Survey, rng: np.random.Generator, cond: _Conditions, host: _Galaxy) -> np.ndarray:
    """A blue source behind the host, ray-traced through a singular isothermal sphere plus external
    shear: arcs, counter-images or an Einstein ring of radius 1-2.5 arcsec."""
    theta_e = _capped(rng, 1.0, min(2.5, 0.45 * spec.half))
    gamma1, gamma2 = rng.normal(0.0, 0.05, 2)
    # well inside the caustic: multiple images, stretched into arcs (tangential magnification
    # of an SIS image at theta_E + beta is 1 + theta_E / beta); near-perfect rings at small beta
    beta_r = theta_e * rng.uniform(0.02, 0.4)
    beta_x, beta_y = _polar(rng, beta_r, beta_r)
    r_src = rng.uniform(0.08, 0.25)  # arcsec, half-light radius of the source
    q_src, phi_src = rng.uniform(0.5, 1.0), rng.uniform(0.0, math.pi)
    os_ = 4
    y, x = _grid(spec, os_)
    x, y = x - host.x, y - host.y
    rad = np.hypot(x, y) + 1e-9
    bx = x - theta_e * x / rad - (gamma1 * x + gamma2 * y) - beta_x
    by = y - theta_e * y / rad - (gamma2 * x - gamma1 * y) - beta_y
    c, s = math.cos(phi_src), math.sin(phi_src)
    u, v = c * bx + s * by, (-s * bx + c * by) / q_src
    pix = _bin(np.exp(-1.678 * np.hypot(u, v) / r_src), os_)  # exponential source, surface brightness conserved
    flux = max(2.5e3, host.flux * _log_uniform(rng, 0.2, 0.8))  # floor: above the noise
    sed = _scattered(spec, spec.templates["arc"], rng, rng.normal(0.0, 0.2))
    return cond.convolve(pix, flux * sed)


def _merger(spec: _Survey, rng: np.random.Generator, cond: _Conditions, host: _Galaxy) -> np.ndarray:
    """A companion galaxy close to the host, with tidal tails (S-shaped pair of curved streams)
    or shells (sharp-edged arcs around the host)."""
    cx, cy = _polar(rng, 0.8, min(2.2, 0.35 * spec.half), host.x, host.y)
    # a floor keeps the companion above the noise around faint hosts
    comp = _draw_galaxy(spec, rng, max(2e3, host.flux * _log_uniform(rng, 0.3, 1.0)), cx, cy)
    model = cond.draw(comp.profiles())
    os_ = 2  # shell edges are sharper than a pixel
    y, x = _grid(spec, os_)
    pix = np.zeros_like(x)
    if rng.random() < 0.7:
        sep = math.atan2(cy - host.y, cx - host.x)
        bend = rng.choice((-1.0, 1.0))
        for (x0, y0), heading in (((cx, cy), sep), ((host.x, host.y), sep + math.pi)):
            # a circular arc leaving the galaxy away from its partner, bending one way; the two
            # tails are point-symmetric, as in the Antennae
            radius, length = rng.uniform(1.5, 4.0), _capped(rng, 1.5, min(4.0, spec.half))
            t = np.linspace(0.4, length, 40)
            ang = t / radius
            ux, uy = math.cos(heading), math.sin(heading)
            px = x0 + radius * (np.sin(ang) * ux - bend * (1 - np.cos(ang)) * uy)
            py = y0 + radius * (np.sin(ang) * uy + bend * (1 - np.cos(ang)) * ux)
            width = rng.uniform(0.15, 0.25) + 0.05 * t
            amp = np.exp(-t / (0.5 * length)) * rng.uniform(0.5, 1.0)
            for a, w, qx, qy in zip(amp, width, px, py):
                pix += a / w**2 * np.exp(-0.5 * ((x - qx) ** 2 + (y - qy) ** 2) / w**2)
    else:
        toward = math.atan2(cy - host.y, cx - host.x)
        r = np.hypot(x - host.x, y - host.y)
        phi = np.arctan2(y - host.y, x - host.x)
        for k in range(rng.integers(1, 4)):
            radius, width = _capped(rng, 1.2, min(3.5, 0.55 * spec.half)), rng.uniform(0.12, 0.25)
            centre = toward + (math.pi if k % 2 else 0.0) + rng.normal(0.0, 0.3)
            span = rng.uniform(math.radians(60), math.radians(160))
            window = np.exp((np.cos(phi - centre) - 1.0) / (span / 2.0) ** 2 * 2.0)
            # shells have a sharp outer edge and a softer inside
            edge = np.where(r < radius, np.exp(-0.5 * ((r - radius) / (2 * width)) ** 2),
                            np.exp(-0.5 * ((r - radius) / (0.5 * width)) ** 2))
            pix += rng.uniform(0.5, 1.0) * window * edge
    stream_flux = (host.flux + comp.flux) * rng.uniform(0.15, 0.35)
    sed = 0.5 * (host.sed_disk + comp.sed_disk)  # streams are stripped disk stars: bluish
    return model + cond.convolve(_bin(pix, os_), stream_flux * sed)


def _moffat_line(d: np.ndarray, alpha: float) -> np.ndarray:
    """Line-spread function of a Moffat PSF (its projection on one axis), unit integral;
    `d` and `alpha` in pixels."""
    p = _PSF_BETA - 0.5
    norm = alpha * math.sqrt(math.pi) * math.gamma(p - 0.5) / math.gamma(p)
    return (1.0 + (d / alpha) ** 2) ** -p / norm


def _trail(spec: _Survey, rng: np.random.Generator, cond: _Conditions, host: _Galaxy) -> np.ndarray:
    """A satellite or aircraft trail: a straight line across the cutout at a random angle, in one
    to three bands with a different brightness in each."""
    n_bands = len(spec.bands)
    k = min(n_bands, int(rng.choice((1, 2, 3), p=(0.5, 0.3, 0.2))))
    which = rng.choice(n_bands, size=k, replace=False)
    angle = rng.uniform(0.0, math.pi)
    px, py = rng.uniform(-0.5, 0.5, 2) * spec.size  # a point on the line, pixels from the centre
    defocus = rng.uniform(1.0, 1.8)  # low orbits are out of focus: wider than the PSF
    t = np.arange(spec.size) - 0.5 * (spec.size - 1)
    yy, xx = np.meshgrid(t, t, indexing="ij")
    d = (xx - px) * math.sin(angle) - (yy - py) * math.cos(angle)
    model = np.zeros((n_bands, spec.size, spec.size))
    for b in which:
        alpha = cond.alpha[b] * defocus
        peak = _log_uniform(rng, 2.0, 12.0) * cond.sky[b]
        model[b] = peak * _moffat_line(d, alpha) / _moffat_line(np.zeros(1), alpha)[0]
    return model


def _cosmic_ray(spec: _Survey, rng: np.random.Generator, cond: _Conditions, host: _Galaxy) -> np.ndarray:
    """One to four cosmic-ray hits in a single band: hot pixels and short worm-like tracks,
    deposited straight on the detector (not seen through the PSF)."""
    n = spec.size
    b = int(rng.integers(len(spec.bands)))
    model = np.zeros((len(spec.bands), n, n))
    for _ in range(int(rng.integers(1, 5))):
        x, y = rng.uniform(0, n, 2)
        energy = _log_uniform(rng, 8.0, 80.0) * cond.sky[b]
        if rng.random() < 0.4:
            model[b, int(y), int(x)] += energy
            if rng.random() < 0.5:  # charge shared with one neighbour
                dy, dx = ((0, 1), (1, 0), (0, -1), (-1, 0))[rng.integers(4)]
                model[b, min(n - 1, max(0, int(y) + dy)), min(n - 1, max(0, int(x) + dx))] += 0.3 * energy
            continue
        heading = rng.uniform(0, 2 * math.pi)
        for _ in range(int(rng.integers(6, 36))):  # half-pixel steps, a slowly turning track
            if 0 <= x < n and 0 <= y < n:
                model[b, int(y), int(x)] += 0.5 * energy * math.exp(rng.normal(0.0, 0.3))
            heading += rng.normal(0.0, 0.15)
            x, y = x + 0.5 * math.cos(heading), y + 0.5 * math.sin(heading)
    return model


def _saturated_star(spec: _Survey, rng: np.random.Generator, cond: _Conditions, host: _Galaxy) -> np.ndarray:
    """A very bright star in all bands: PSF core and a broad halo, four diffraction spikes whose
    length grows with wavelength. Saturation and bleed trails are applied after the noise."""
    x0, y0 = _polar(rng, 0.3 * spec.half, 0.8 * spec.half)
    flux = _log_uniform(rng, 2e6, 3e7)
    sed = _planck_sed(spec, rng.uniform(3500.0, 10000.0))
    n = spec.size
    model = np.empty((len(spec.bands), n, n))
    for b, psf in enumerate(cond.psf):
        halo = galsim.Moffat(beta=2.0, fwhm=4.0 * cond.fwhm[b], gsparams=_GSPARAMS)
        star = galsim.Add(psf.withFlux(0.97), halo.withFlux(0.03)).withFlux(flux * sed[b]).shift(x0, y0)
        # analytic profile drawn in real space: no FFT wrap-around of 10^7 counts
        model[b] = star.drawImage(nx=n, ny=n, scale=spec.scale, method="no_pixel").array
    # spikes: orientation fixed by the telescope's spider, a little field rotation per visit
    spike_angle = math.pi / 4 + rng.normal(0.0, 0.03)
    spike_frac = rng.uniform(0.005, 0.015)
    t = np.arange(n) - 0.5 * (n - 1)
    yy, xx = np.meshgrid(t, t, indexing="ij")
    dx, dy = xx - x0 / spec.scale, yy - y0 / spec.scale
    for k in range(4):
        a = spike_angle + k * math.pi / 2
        along = dx * math.cos(a) + dy * math.sin(a)
        across = -dx * math.sin(a) + dy * math.cos(a)
        ahead = np.clip(along, 0.0, None)
        for b in range(len(spec.bands)):
            r0 = 1.5 * cond.fwhm[b] / spec.scale * spec.wavelength[b] / _REF_WAVELENGTH
            per_length = spike_frac * flux * sed[b] / (4.0 * r0)
            profile = np.where(along > 0, per_length * (1.0 + ahead / r0) ** -2, 0.0)
            model[b] += profile * _moffat_line(across, cond.alpha[b])
    return model


def _blend_point(spec: _Survey, rng: np.random.Generator, cond: _Conditions, host: _Galaxy) -> np.ndarray:
    """A point source 0.5-2 arcsec from the galaxy, of another colour: a quasar or hot star on a
    red galaxy, a cool star on a blue one."""
    x, y = _polar(rng, 0.5, min(2.0, 0.4 * spec.half), host.x, host.y)
    flux = max(8e2, host.flux * _log_uniform(rng, 0.15, 1.0))  # floor: above the noise
    if host.bulge_frac > 0.5:
        if rng.random() < 0.5:
            sed = spec.templates["quasar"] * np.exp(rng.normal(0.0, 0.1, len(spec.bands)))
        else:
            sed = _planck_sed(spec, rng.uniform(7000.0, 15000.0))
    else:
        sed = _planck_sed(spec, rng.uniform(2800.0, 4200.0))
    return cond.draw(_star(spec, flux, sed, x, y))


# -- astrophysical anomalies seen by real hunts (Galaxy Zoo odd features, the HSC GAN hunt,
# -- Astronomaly on DECaLS); magnitudes and surface brightnesses become counts through _ZERO_POINT


def _counts(mag: float | np.ndarray) -> float | np.ndarray:
    """AB magnitude to counts."""
    return 10.0 ** (0.4 * (_ZERO_POINT - mag))


def _disk_galaxy(spec: _Survey, rng: np.random.Generator, flux: float, x: float, y: float, r_disk: float,
                 q: float, bulge_frac: float, tilt_disk: float = 0.0, r_bulge: float | None = None) -> _Galaxy:
    """A disk galaxy of given disk half-light radius (arcsec) and axis ratio `q` (its inclination),
    with a smaller (`r_bulge`, default 0.2-0.4 `r_disk`), rounder bulge; colours drawn as in
    `_draw_galaxy`, the disk tilted by `tilt_disk` (negative: bluer, for star-forming hosts)."""
    angle = rng.uniform(0.0, math.pi)
    g = (1.0 - q) / (1.0 + q)
    beta = angle * galsim.radians
    if r_bulge is None:
        r_bulge = r_disk * rng.uniform(0.2, 0.4)
    bulge = galsim.DeVaucouleurs(half_light_radius=r_bulge, trunc=8.0 * r_bulge, gsparams=_GSPARAMS)
    bulge = bulge.shear(g=min(0.2, 0.3 * g), beta=beta)
    disk = galsim.Exponential(half_light_radius=r_disk, gsparams=_GSPARAMS).shear(g=g, beta=beta)
    tilt = rng.normal(0.0, 0.25)
    sed_bulge = _scattered(spec, spec.templates["bulge"], rng, tilt)
    sed_disk = _scattered(spec, spec.templates["disk"], rng, tilt + tilt_disk)
    return _Galaxy(flux, float(bulge_frac), x, y, bulge, disk, sed_bulge, sed_disk, float(r_disk), float(g), angle)


def _frame(spec: _Survey, oversample: int, x0: float, y0: float, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates (arcsec) of the padded (sub)pixel grid of `_grid` in a frame centred on `(x0, y0)`
    and turned by `angle` (radians from +x): `u` along that direction, `v` across it."""
    y, x = _grid(spec, oversample)
    x, y = x - x0, y - y0
    c, s = math.cos(angle), math.sin(angle)
    return c * x + s * y, -s * x + c * y


def _ring(spec: _Survey, rng: np.random.Generator, cond: _Conditions, host: _Galaxy) -> np.ndarray:
    """A ring of young stars around the host, in the plane of its disk: a collisional ring (an
    intruder's passage drives an expanding density wave, leaving the nucleus off-centre and the
    ring lopsided and knotty, as in the Cartwheel) or a resonance ring (centred, smoother).

    Radius 1.5-4 arcsec and at least 2 disk half-light radii (outer rings lie at 2-4 disk scale
    lengths; resolved by the 0.7" seeing), width 6-15% of the radius, the nucleus up to a quarter
    radius off its centre, 3-10 star-forming knots, blue (star-forming) colours, and 20-70% of the
    host's i-band flux (at least 4e3 counts, ~1 sky sigma per pixel along the ring): collisional
    rings hold most of the blue light of their galaxy, resonance rings tens of percent. Rings are
    one of Galaxy Zoo's odd features and a classic lens impostor.

    References:
        | Collisional ring galaxies (Appleton & Struck-Marcell, 1996)
        | https://ui.adsabs.harvard.edu/abs/1996FCPh...16..111A
        | Galactic rings (Buta & Combes, 1996)
        | https://ui.adsabs.harvard.edu/abs/1996FCPh...17...95B
        | Galactic rings revisited I: CVRHS classifications of 3962 ringed galaxies from Galaxy Zoo 2 (Buta, 2017)
        | https://ui.adsabs.harvard.edu/abs/2017MNRAS.471.4027B
    """
    q = (1.0 - host.g) / (1.0 + host.g)
    radius = _capped(rng, max(1.5, 2.0 * host.r_disk), min(4.0, 0.6 * spec.half))
    width = radius * rng.uniform(0.06, 0.15)
    cx, cy = _polar(rng, 0.0, 0.25 * radius * q, host.x, host.y)  # the nucleus sits off the ring's centre
    os_ = 2
    u, v = _frame(spec, os_, cx, cy, host.angle)  # in the disk's frame, projected
    rho, phi = np.hypot(u, v / q), np.arctan2(v / q, u)  # radius and azimuth in the disk plane
    # brightness along the ring, tabulated in azimuth: lopsided, with star-forming knots
    azimuth = np.linspace(-math.pi, math.pi, 721)
    along = 1.0 + rng.uniform(0.0, 0.6) * np.cos(azimuth - rng.uniform(0.0, 2 * math.pi))
    for _ in range(int(rng.integers(3, 11))):
        arc = ((azimuth - rng.uniform(0.0, 2 * math.pi) + math.pi) % (2 * math.pi) - math.pi) * radius  # arcsec
        along += rng.uniform(0.5, 2.0) * np.exp(-0.5 * (arc / (1.5 * width)) ** 2)
    shape = np.exp(-0.5 * ((rho - radius) / width) ** 2) * np.interp(phi, azimuth, along)
    flux = max(4e3, host.flux * _log_uniform(rng, 0.2, 0.7))
    sed = _scattered(spec, spec.templates["disk"], rng, rng.uniform(-1.0, -0.4))
    return cond.convolve(_bin(shape, os_), flux * sed)


def _dust_host(spec: _Survey, rng: np.random.Generator, host: _Galaxy) -> _Galaxy:
    """Dust lanes are seen on large, bright galaxies: 70% an inclined disk (axis ratio 0.2-0.45)
    with a bulge of 30-45% of the light, 30% a nearly round bulge-dominated early type; disk
    half-light radius 1.5-2.1" (the largest normal galaxies) and i-band flux 2.5e4-8e4, in place
    of the drawn host: a lane narrower than the seeing across a small galaxy would not be seen."""
    flux = max(host.flux, _log_uniform(rng, 2.5e4, _FLUX_RANGE[1]))
    r_disk = _capped(rng, 1.5, min(2.1, 0.4 * spec.half))  # the largest normal galaxies
    if rng.random() < 0.3:  # a bulge-dominated early type, nearly round
        return _disk_galaxy(spec, rng, flux, host.x, host.y, r_disk, rng.uniform(0.6, 0.9), rng.uniform(0.75, 0.9),
                            r_bulge=r_disk * rng.uniform(0.8, 1.2))
    return _disk_galaxy(spec, rng, flux, host.x, host.y, r_disk, rng.uniform(0.2, 0.45), rng.uniform(0.3, 0.45),
                        r_bulge=r_disk * rng.uniform(0.4, 0.6))


def _host_subpixels(spec: _Survey, host: _Galaxy, oversample: int) -> np.ndarray:
    """The host's light before the PSF, per band, on the padded subpixel grid of `_grid`:
    `(B, n, n)` counts per subpixel."""
    n = (spec.size + 2 * _KERNEL_HALF) * oversample

    def draw(component: galsim.GSObject) -> np.ndarray:
        return component.shift(host.x, host.y).drawImage(nx=n, ny=n, scale=spec.scale / oversample,
                                                         method="no_pixel").array

    bulge, disk = draw(host.bulge), draw(host.disk)
    fb, fd = host.flux * host.bulge_frac, host.flux * (1.0 - host.bulge_frac)
    return np.stack([fb * sb * bulge + fd * sd * disk for sb, sd in zip(host.sed_bulge, host.sed_disk)])


def _dust_lane(spec: _Survey, rng: np.random.Generator, cond: _Conditions, host: _Galaxy) -> np.ndarray:
    """A dark lane of dust across the host (`_dust_host`): the light it absorbs, a negative
    component, PSF-convolved. An inclined disk's lane runs along its major axis, shifted towards
    the near side; an elliptical's (Centaurus A-like, from an accreted gas-rich companion) crosses
    it at any angle.

    The dust is a screen in front of 80-95% of the light along each line of sight (the stars in
    front of the midplane are not absorbed), of central optical depth tau_V = 1.5-4, radially
    exponential with 1.4 times the stellar disk scale length (Xilouris et al., 1999: dust disks
    are larger than stellar ones and thinner, face-on tau_V < 1 but edge-on lines of sight many
    times longer), Gaussian across the lane with a width of 18-30% of the disk half-light radius
    (0.3-0.6"), shifted towards the near side by 0.2-0.8 widths, and with the optical Milky Way
    extinction law, tau ~ 1/wavelength (the law Xilouris et al. find in edge-on spirals): deepest
    in the blue bands (tau_g / tau_y ~ 2), so the lane is dark and reddened. An early type's lane
    is 0.6-1.2 half-light radii long. It removes 20-40% of the host's light, as inclined spirals
    lose. Dust lanes are a Galaxy Zoo odd feature (Kaviraj et al., 2012, studied 352 early types
    with one).

    References:
        | Are spiral galaxies optically thin or thick? (Xilouris et al., 1999)
        | https://arxiv.org/abs/astro-ph/9901158
        | The relationship between infrared, optical, and ultraviolet extinction (Cardelli, Clayton & Mathis, 1989)
        | https://ui.adsabs.harvard.edu/abs/1989ApJ...345..245C
        | Galaxy Zoo: dust and molecular gas in early-type galaxies with prominent dust lanes (Kaviraj et al., 2012)
        | https://arxiv.org/abs/1107.5306
    """
    os_ = 2
    light = _host_subpixels(spec, host, os_)
    if host.bulge_frac > 0.5:  # elliptical: a lane through the centre at any angle, a little shorter
        angle, length = rng.uniform(0.0, math.pi), host.r_disk * rng.uniform(0.6, 1.2)
        offset = 0.0
    else:
        angle, length = host.angle, 1.4 * host.r_disk / 1.678  # scale length of an exponential disk
        offset = 1.0
    u, v = _frame(spec, os_, host.x, host.y, angle)
    width = host.r_disk * rng.uniform(0.18, 0.3)
    v0 = offset * rng.choice((-1.0, 1.0)) * rng.uniform(0.2, 0.8) * width  # the near side
    depth = np.exp(-np.abs(u) / length - 0.5 * ((v - v0) / width) ** 2)
    tau_v = rng.uniform(1.5, 4.0)
    behind = rng.uniform(0.8, 0.95)  # the light in front of the lane is not absorbed
    absorbed = np.stack([band * behind * -np.expm1(-tau_v * (551.0 / wl) * depth)
                         for band, wl in zip(light, spec.wavelength)])
    return -cond.blur(_bin_sum(absorbed, os_))


def _compact_host(spec: _Survey, rng: np.random.Generator, host: _Galaxy) -> _Galaxy:
    """Extreme emission-line galaxies are compact star-forming dwarfs: a small (0.25-0.45" half-light
    radius, within the normal size range), blue, pure disk of i = 21.5-24 in place of the drawn host."""
    flux = _counts(rng.uniform(21.5, 24.0))
    return _disk_galaxy(spec, rng, flux, host.x, host.y, rng.uniform(0.25, 0.45), rng.uniform(0.6, 1.0), 0.0,
                        tilt_disk=rng.uniform(-0.8, -0.3))


def _emission_line(spec: _Survey, rng: np.random.Generator, cond: _Conditions, host: _Galaxy) -> np.ndarray:
    """An extreme emission-line galaxy (green pea, blueberry, HSC "purple" or broad-band-excess
    galaxy): the [OIII] 4959, 5007 + H-beta complex of a compact starburst (`_compact_host`)
    lands in one band and raises its flux there, a photometric anomaly with a normal shape.

    The band is drawn among those the line can reach (redder than 500.7 nm at z >= 0), the line
    redshift uniformly within it; the complex's rest equivalent width is 500-2000 Angstrom
    (log-uniform), so the band's flux rises by 1 + EW (1 + z) / band width: x1.4-x3.4, i.e.
    0.4-1.3 mag, as measured for broad-band-excess selected EELGs. The line light has the shape
    of the star-forming disk.

    References:
        | Galaxy Zoo green peas: a class of compact extremely star-forming galaxies (Cardamone et al., 2009)
        | https://doi.org/10.1111/j.1365-2966.2009.15383.x
        | Extreme emission-line galaxies in CANDELS (van der Wel et al., 2011)
        | https://arxiv.org/abs/1107.5256
        | Subaru/HSC z-broadband excess selection of extreme emission line galaxies at z<1 (Rosenwasser et al., 2022)
        | https://arxiv.org/abs/2201.10562
        | Anomaly detection in HSC galaxy images with GANs (Storey-Fisher et al., 2021): extreme star-forming galaxies
        | https://arxiv.org/abs/2105.02434
    """
    rest = 500.7  # nm, [OIII] 5007
    reach = np.flatnonzero(spec.edges[:, 1] > rest)
    b = int(rng.choice(reach)) if len(reach) else int(rng.integers(len(spec.bands)))
    lo, hi = spec.edges[b]
    one_plus_z = max(1.0, rng.uniform(max(lo, rest), hi) / rest)
    ew = _log_uniform(rng, 50.0, 200.0)  # nm, rest frame
    excess = ew * one_plus_z / (hi - lo)
    line = host.disk.withFlux(excess * host.flux * host.sed_disk[b]).shift(host.x, host.y)
    n = spec.size
    model = np.zeros((len(spec.bands), n, n))
    model[b] = galsim.Convolve(line, cond.psf[b]).drawImage(nx=n, ny=n, scale=spec.scale).array
    return model


def _no_host(spec: _Survey, rng: np.random.Generator, host: _Galaxy) -> None:
    """The anomaly is the central object: no host galaxy; the injector draws it where the host was."""
    return None


@functools.lru_cache(maxsize=16)
def _dropout_window(edges: tuple[tuple[float, float], ...]) -> tuple[float, float]:
    """For band `edges` (nm) sorted by wavelength: the lowest redshift at which the bluest band
    keeps at most 10% of a Lyman-break galaxy's flux, and the highest at which the reddest keeps
    at least half of it (the first exceeds the second when there is a single band)."""
    z = np.linspace(2.0, 8.0, 601)
    t = np.array([_igm_transmission(np.array(edges), zz) for zz in z])  # (Z, B)
    lo = z[np.argmax(t[:, 0] <= 0.1)] if (t[:, 0] <= 0.1).any() else z[-1]
    hi = z[t[:, -1] >= 0.5].max() if (t[:, -1] >= 0.5).any() else z[0]
    return float(lo), float(hi)


def _igm_transmission(edges: np.ndarray, z: float) -> np.ndarray:
    """Mean intergalactic transmission over each band `(B, 2)` (nm) of a source at redshift `z`:
    nothing below the Lyman limit, the Lyman-alpha forest's exp(-0.0036 (lambda / 121.6 nm)^3.46)
    between the limit and Lyman alpha (Madau, 1995), all of it redward. `(B,)`."""
    lam = edges[:, :1] + (edges[:, 1:] - edges[:, :1]) * (np.arange(64) + 0.5) / 64  # (B, 64) nm
    forest = np.exp(-0.0036 * (lam / 121.6) ** 3.46)
    t = np.where(lam < 91.2 * (1 + z), 0.0, np.where(lam < 121.6 * (1 + z), forest, 1.0))
    return t.mean(axis=1)


def _dropout(spec: _Survey, rng: np.random.Generator, cond: _Conditions, host: _Galaxy) -> np.ndarray:
    """A Lyman-break ("dropout") galaxy at redshift ~3.5-7 in place of the host: compact, faint,
    with no flux blueward of its redshifted Lyman-alpha line (absorbed by intergalactic hydrogen)
    and a flat, blue UV continuum redward: it vanishes in the bluest band(s), a photometric anomaly.

    The redshift is uniform over the range where the bluest band keeps at most 10% of the flux
    and the reddest at least half (z ~ 4-7.2 in grizy: g-, r-, i- and z-dropouts), the UV slope
    beta = -2.5..-1.5 (f_lambda ~ lambda^beta; mean -2.0 to -2.3 at z ~ 4-7), the continuum AB
    magnitude 22.5-24 in the reddest band (the bright end of the HSC dropout samples, which reach
    ~26; a >15 sigma detection even in y here), an exponential profile of half-light radius
    0.08-0.25" (~0.5-1.5 kpc), barely resolved.

    References:
        | Radiative transfer in a clumpy universe: the colors of high-redshift galaxies (Madau, 1995)
        | https://ui.adsabs.harvard.edu/abs/1995ApJ...441...18M
        | GOLDRUSH I: dropout galaxies at z~4-7 from the HSC-SSP (Ono et al., 2018)
        | https://arxiv.org/abs/1704.06004
        | UV continuum slopes of galaxies at z~4-8 (Bouwens et al., 2014)
        | https://arxiv.org/abs/1306.2950
        | Sizes of star-forming galaxies at z~0-10 (Shibuya, Ouchi & Harikane, 2015)
        | https://arxiv.org/abs/1503.07481
    """
    order = np.argsort(spec.wavelength)
    z_lo, z_hi = _dropout_window(tuple(tuple(e) for e in spec.edges[order]))
    z = _capped(rng, z_lo, z_hi)
    beta = rng.uniform(-2.5, -1.5)
    reddest = spec.wavelength[order[-1]]
    continuum = _counts(rng.uniform(22.5, 24.0)) * (spec.wavelength / reddest) ** (beta + 2.0)
    fluxes = continuum * _igm_transmission(spec.edges, z)
    shape = galsim.Exponential(half_light_radius=rng.uniform(0.08, 0.25), gsparams=_GSPARAMS)
    shape = shape.shear(g=rng.uniform(0.0, 0.3), beta=rng.uniform(0.0, math.pi) * galsim.radians)
    return cond.draw([shape.withFlux(f).shift(host.x, host.y) for f in fluxes])


def _lsb(spec: _Survey, rng: np.random.Generator, cond: _Conditions, host: _Galaxy) -> np.ndarray:
    """A low-surface-brightness or ultra-diffuse galaxy in place of the host: as large as a bright
    galaxy, as faint per pixel as the sky noise; 30% have a faint nucleus.

    Central surface brightness mu_0(g) = 23.5-26 mag/arcsec^2 and effective radius 2.5-6"
    (capped at 0.6 of the half cutout), Sersic index 0.6-1, axis ratio 0.6-1, colour g - i =
    0.3-1.0: the HSC-SSP LSB galaxies of Greco et al. (2018) span mu_0(g) = 18-27.4 (half fainter
    than 24.3, 95% fainter than 22), r_eff = 2.5-14", blue and red populations split at g - i =
    0.64, and include nucleated galaxies; 26 mag/arcsec^2 is ~2 sigma per pixel here, still seen
    by eye. The nucleus holds 1-5% of the light (an assumption, of the order of dwarf nuclei).

    References:
        | Illuminating low surface brightness galaxies in the HSC survey (Greco et al., 2018)
        | https://arxiv.org/abs/1709.04474
        | Forty-seven Milky Way-sized, extremely diffuse galaxies in the Coma cluster (van Dokkum et al., 2015)
        | https://arxiv.org/abs/1410.8141
    """
    r_eff = _capped(rng, 2.5, min(6.0, 0.6 * spec.half))
    n_sersic = float(rng.choice((0.6, 0.8, 1.0)))  # a few values: GalSim tabulates each Sersic index once
    shape = galsim.Sersic(n_sersic, half_light_radius=r_eff, gsparams=_GSPARAMS)
    shape = shape.shear(q=rng.uniform(0.6, 1.0), beta=rng.uniform(0.0, math.pi) * galsim.radians)
    g_i = rng.uniform(0.3, 1.0)
    k_g = int(np.argmin(np.abs(spec.wavelength - _BAND_TABLE["g"][0])))  # the band nearest g
    slope = -0.4 * g_i / math.log10(_BAND_TABLE["g"][0] / _REF_WAVELENGTH)  # f_nu ~ lambda^slope
    sed = (spec.wavelength / _BAND_TABLE["g"][0]) ** slope
    centre = _counts(rng.uniform(23.5, 26.0)) / sed[k_g] * sed  # counts / arcsec^2 at the centre, per band
    unit_centre = shape.xValue(0.0, 0.0)  # surface brightness of the unit-flux profile at its centre
    profiles = [shape.withFlux(c / unit_centre) for c in centre]
    if rng.random() < 0.3:
        nucleus = _log_uniform(rng, 0.01, 0.05) * profiles[-1].flux / sed[-1]
        profiles = [p + galsim.DeltaFunction(flux=nucleus * s, gsparams=_GSPARAMS) for p, s in zip(profiles, sed)]
    return cond.draw([p.shift(host.x, host.y) for p in profiles])


def _clumpy_host(spec: _Survey, rng: np.random.Generator, host: _Galaxy) -> _Galaxy:
    """Clumpy galaxies are large star-forming disks: a resolved (disk half-light radius 1-1.75"),
    bright, bulge-poor disk in place of the drawn host."""
    flux = max(host.flux, _log_uniform(rng, 5e3, _FLUX_RANGE[1]))
    r_disk = _capped(rng, 1.0, min(1.75, 0.4 * spec.half))
    return _disk_galaxy(spec, rng, flux, host.x, host.y, r_disk, rng.uniform(0.35, 1.0), rng.uniform(0.0, 0.2))


def _clumpy(spec: _Survey, rng: np.random.Generator, cond: _Conditions, host: _Galaxy) -> np.ndarray:
    """Two to six giant star-forming clumps on the host's disk (`_clumpy_host`): compact (0.05-0.15",
    sub-kiloparsec, unresolved), blue knots at 0.5-1.5 disk half-light radii, in the plane of the disk.

    Each clump holds 5-20% of the host's light in the bluest band (at least 40 sky sigmas there, a
    ~6 sigma point source): clumps are defined by >= 8% of their galaxy's rest-UV light in CANDELS
    and by >= 8% (or 3%) of its u-band light in Galaxy Zoo: Clump Scout; their colours are those
    of young star-forming regions (the blue high-redshift template). The HSC GAN hunt's
    spectroscopic follow-up was such a system: a dwarf with an extremely blue HII region.

    References:
        | Clumpy galaxies in CANDELS I (Guo et al., 2015)
        | https://arxiv.org/abs/1410.7398
        | Galaxy Zoo: Clump Scout, surveying the local Universe for giant star-forming clumps (Adams et al., 2022)
        | https://arxiv.org/abs/2201.06581
        | Anomaly detection in HSC galaxy images with GANs (Storey-Fisher et al., 2021)
        | https://arxiv.org/abs/2105.02434
    """
    q = (1.0 - host.g) / (1.0 + host.g)
    c, s = math.cos(host.angle), math.sin(host.angle)
    k = int(np.argmin(spec.wavelength))  # the bluest band
    blue = host.flux * (host.bulge_frac * host.sed_bulge[k] + (1.0 - host.bulge_frac) * host.sed_disk[k])
    os_ = 2
    y, x = _grid(spec, os_)
    images = np.zeros((len(spec.bands),) + x.shape)
    for _ in range(int(rng.integers(2, 7))):
        rho, phi = host.r_disk * rng.uniform(0.5, 1.5), rng.uniform(0.0, 2 * math.pi)
        u, v = rho * math.cos(phi), rho * math.sin(phi) * q  # in the disk plane, projected
        px, py = host.x + c * u - s * v, host.y + s * u + c * v
        sigma = rng.uniform(0.05, 0.15)
        blob = np.outer(np.exp(-0.5 * ((y[:, 0] - py) / sigma) ** 2), np.exp(-0.5 * ((x[0] - px) / sigma) ** 2))
        sed = _scattered(spec, spec.templates["arc"], rng, rng.normal(0.0, 0.2))
        flux = max(40.0 * spec.sky[k], blue * _log_uniform(rng, 0.05, 0.2)) * sed / sed[k]
        images += flux[:, None, None] * (blob / blob.sum())[None]
    return cond.blur(_bin_sum(images, os_))


# -- instrumental anomalies, deposited on the detector (not seen through the PSF)


def _ghost(spec: _Survey, rng: np.random.Generator, cond: _Conditions, host: _Galaxy) -> np.ndarray:
    """An optical ghost of a bright star outside the cutout: light reflected between the filter, the
    dewar window and the detector reaches focus far behind it and forms an out-of-focus image of
    the pupil, a doughnut (the secondary mirror's shadow in the middle, the spider's vanes across)
    with soft edges, in every band but with colours set by the coatings' reflectivity.

    Outer radius 15-60% of the cutout side (log-uniform), so that it is often cut by the cutout
    edge; central obscuration 30-50% of it; 0.7-4 sky sigmas per pixel (log-uniform) in the band
    where it stands out most, i.e. mu ~ 24.7-26.6 mag/arcsec^2 in i: ghosts and scattered light
    are the commonest impostors in LSB galaxy searches (Tanoglidis et al., 2021), hence as faint
    as LSB galaxies, and are marked by eye in survey quality control (Melchior et al., 2016).
    Colour: the star's (3500-10000 K) times a factor exp(N(0, 0.4)) per band (coatings).

    References:
        | Crowdsourcing quality control for Dark Energy Survey images (Melchior et al., 2016)
        | https://arxiv.org/abs/1511.03391
        | DeepGhostBusters: ghosting and scattered-light artifacts in DES (Tanoglidis et al., 2021)
        | https://arxiv.org/abs/2109.08246
        | The Hyper Suprime-Cam software pipeline (Bosch et al., 2018), ghosts and scattered light
        | https://arxiv.org/abs/1705.06766
    """
    n = spec.size
    t = (np.arange(n) - 0.5 * (n - 1)) * spec.scale
    yy, xx = np.meshgrid(t, t, indexing="ij")
    r_out = _log_uniform(rng, 0.15, 0.6) * n * spec.scale
    r_in = r_out * rng.uniform(0.3, 0.5)
    x0, y0 = rng.uniform(-0.5, 0.5, 2) * n * spec.scale
    soft = rng.uniform(0.1, 0.3)  # arcsec
    dx, dy = xx - x0, yy - y0
    r = np.hypot(dx, dy)
    shape = special.expit((r_out - r) / soft) * special.expit((r - r_in) / soft)
    vane = rng.uniform(0.0, math.pi / 2)
    vane_width = r_out * rng.uniform(0.02, 0.04)
    for k in range(4):  # the spider's shadow: four radial vanes
        a = vane + k * math.pi / 2
        along, across = dx * math.cos(a) + dy * math.sin(a), -dx * math.sin(a) + dy * math.cos(a)
        shape *= 1.0 - 0.8 * (along > 0) * np.exp(-0.5 * (across / vane_width) ** 2)
    tilt = rng.uniform(0.0, 0.4)  # uneven illumination of the pupil
    heading = rng.uniform(0.0, 2 * math.pi)
    shape *= 1.0 + tilt * (dx * math.cos(heading) + dy * math.sin(heading)) / r_out
    colour = _planck_sed(spec, rng.uniform(3500.0, 10000.0)) * np.exp(rng.normal(0.0, 0.4, len(spec.bands)))
    strongest = int(np.argmax(colour / spec.sky))  # the band where it stands out most from the sky
    level = _log_uniform(rng, 0.7, 4.0) * cond.sky[strongest] * colour / colour[strongest]  # counts per pixel
    return level[:, None, None] * shape[None]


def _hot_column(spec: _Survey, rng: np.random.Generator, cond: _Conditions, host: _Galaxy) -> np.ndarray:
    """A hot (bright) column in one band: a charge trap or hot pixel leaks charge into every pixel
    clocked through it, raising a one- or two-pixel wide column from the defect to the readout
    edge; 25% of the time along a row instead (a cutout rotated by 90 degrees, or a serial-register
    defect). The defect pixel itself is 2-5 times brighter.

    Level 2.5-10 sky sigmas per pixel (log-uniform) with 10% pixel-to-pixel scatter, length at
    least a quarter of the cutout. Bright and bad columns are flagged by detector masks and by
    eye in survey quality control ("bright column" in the DES exposure checker); the ones that
    escape the masks are the faint ones, modelled here as a few sigma per pixel (an assumption:
    no catalogue gives their amplitudes).

    References:
        | Crowdsourcing quality control for Dark Energy Survey images (Melchior et al., 2016), "bright column"
        | https://arxiv.org/abs/1511.03391
        | Instrumental response model and detrending for the Dark Energy Camera (Bernstein et al., 2017)
        | https://arxiv.org/abs/1706.09928
        | Scientific charge-coupled devices (Janesick, 2001): charge traps, hot pixels and columns
        | https://doi.org/10.1117/3.374903
    """
    n = spec.size
    b = int(rng.integers(len(spec.bands)))
    shortest = max(2, n // 4)
    toward_high = rng.random() < 0.5  # the readout edge lies after the defect or before it
    start = int(rng.integers(0, n - shortest + 1)) if toward_high else int(rng.integers(shortest - 1, n))
    rows = np.arange(start, n) if toward_high else np.arange(0, start + 1)
    col = int(rng.integers(0, n))
    level = _log_uniform(rng, 2.5, 10.0) * cond.sky[b]
    plane = np.zeros((n, n))
    for c in range(col, min(n, col + (2 if rng.random() < 0.2 else 1))):
        plane[rows, c] = level * np.exp(rng.normal(0.0, 0.1, len(rows)))
        plane[start, c] *= rng.uniform(2.0, 5.0)
    model = np.zeros((len(spec.bands), n, n))
    model[b] = plane.T if rng.random() < 0.25 else plane
    return model


def _crosstalk(spec: _Survey, rng: np.random.Generator, cond: _Conditions, host: _Galaxy) -> np.ndarray:
    """An electronic crosstalk ghost in one band: a saturated star read out by another amplifier
    leaks a small copy of its image into this one, a flat-topped disc (the saturated core) with a
    soft edge, sometimes with the copy of its bleed trail; not a source, so in no other band.

    Crosstalk coefficients between amplifiers are ~3e-4-3e-3 (e.g. 0.04-0.28% measured for the
    CTIO Y4KCam), applied to a saturated core of ~1e5 electrons: up to a few hundred electrons,
    diluted in a stack of exposures to a few sky sigmas per pixel. Here 2-10 sigma (log-uniform),
    a core of radius 1.5-4 pixels and, half the time, a bleed copy of 2-6 core radii up and down
    its column. Pipelines correct most crosstalk; what they miss (non-linear crosstalk from
    heavily saturated stars) is what remains to be found.

    References:
        | Instrumental response model and detrending for the Dark Energy Camera (Bernstein et al., 2017)
        | https://arxiv.org/abs/1706.09928
        | Cross-talk correction for the Y4KCam (Subasavage, 2011), coefficients between quadrants
        | http://www.ctio.noirlab.edu/noao/sites/default/files/instruments/imagers/y4kcam_xtalk.txt
    """
    n = spec.size
    b = int(rng.integers(len(spec.bands)))
    x0, y0 = rng.uniform(0.0, n, 2) - 0.5
    t = np.arange(n)
    yy, xx = np.meshgrid(t, t, indexing="ij")
    radius = rng.uniform(1.5, 4.0)
    r = np.hypot(xx - x0, yy - y0)
    edge = cond.alpha[b]
    plane = np.where(r <= radius, 1.0, (1.0 + ((r - radius) / edge) ** 2) ** -_PSF_BETA)
    if rng.random() < 0.5:
        half = radius * rng.uniform(2.0, 6.0)
        plane[(np.abs(xx - x0) <= 0.5) & (np.abs(yy - y0) <= half)] = 1.0
    model = np.zeros((len(spec.bands), n, n))
    model[b] = _log_uniform(rng, 2.0, 10.0) * cond.sky[b] * plane
    return model


_Injector = Callable[[_Survey, np.random.Generator, _Conditions, _Galaxy], np.ndarray]
_INJECTORS: dict[str, _Injector] = {
    "lens": _lens,
    "merger": _merger,
    "trail": _trail,
    "cosmic_ray": _cosmic_ray,
    "saturated_star": _saturated_star,
    "blend_point": _blend_point,
    "ring": _ring,
    "dust_lane": _dust_lane,
    "emission_line": _emission_line,
    "dropout": _dropout,
    "lsb": _lsb,
    "clumpy": _clumpy,
    "ghost": _ghost,
    "hot_column": _hot_column,
    "crosstalk": _crosstalk,
}
# Classes whose anomaly needs its own kind of central object: it replaces the drawn host in the
# scene (drawn from the anomaly's random stream, so normal objects never see it). `None`: the
# anomaly is the central object itself, drawn by the injector where the host was.
_HostReplacement = Callable[[_Survey, np.random.Generator, _Galaxy], "_Galaxy | None"]
_HOSTS: dict[str, _HostReplacement] = {
    "lens": _lens_host,
    "dust_lane": _dust_host,
    "emission_line": _compact_host,
    "clumpy": _clumpy_host,
    "dropout": _no_host,
    "lsb": _no_host,
}


def _saturate(image: np.ndarray, level: float) -> np.ndarray:
    """Clips `(B, H, W)` counts at `level` in place; the charge above it bleeds up and down the
    column from the saturated run. Returns the `(H, W)` mask of saturated or bled pixels."""
    mask = np.zeros(image.shape[1:], dtype=bool)
    for band in image:
        for col in np.flatnonzero((band > level).any(axis=0)):
            column = band[:, col]
            over = np.flatnonzero(column > level)
            excess = float((column[over] - level).sum())
            lo, hi = over[0], over[-1]
            extra = excess / level
            grow = int(extra // 2)
            lo2, hi2 = max(0, lo - grow), min(len(column) - 1, hi + grow)
            column[lo2 : hi2 + 1] = np.maximum(column[lo2 : hi2 + 1], level)
            column[column > level] = level
            mask[lo2 : hi2 + 1, col] = True
    return mask


# ---------------------------------------------------------------------------------------------
# One object


@dataclass
class _Object:
    image: np.ndarray  # (B, H, W) float32
    footprint: np.ndarray  # (H, W) uint8
    anomaly_class: str
    ra: float
    dec: float


def _simulate_object(spec: _Survey, index: int, inject: bool = True) -> _Object:
    """Object `index` of the survey. With `inject=False` the same object without its anomalous
    component (same host, same noise draws): what the anomaly adds is the difference."""
    streams = np.random.SeedSequence([spec.seed, index]).spawn(3)
    rng_scene, rng_anom, rng_noise = (np.random.default_rng(s) for s in streams)
    cls = ""
    if rng_anom.random() < spec.anomaly_frac:
        cls = spec.classes[int(rng_anom.integers(len(spec.classes)))]

    dec = 2.0 + rng_scene.uniform(-0.5, 0.5)
    ra = 150.0 + rng_scene.uniform(-0.5, 0.5) / math.cos(math.radians(dec))
    cond = _Conditions(spec, rng_scene)
    flux = _log_uniform(rng_scene, *_FLUX_RANGE)
    dx, dy = np.clip(rng_scene.normal(0.0, 0.35, 2), -1.0, 1.0) * spec.scale
    host = _draw_galaxy(spec, rng_scene, flux, float(dx), float(dy))
    central = _HOSTS[cls](spec, rng_anom, host) if cls in _HOSTS else host
    profiles = central.profiles() if central is not None else None
    if rng_scene.random() < 0.2:  # an unrelated neighbour somewhere in the cutout
        nx, ny = _polar(rng_scene, 0.45 * spec.half, 0.85 * spec.half)
        n_flux = flux * _log_uniform(rng_scene, 0.03, 0.6)
        if rng_scene.random() < 0.75:
            extra = _draw_galaxy(spec, rng_scene, n_flux, nx, ny).profiles()
        else:
            extra = _star(spec, n_flux, _planck_sed(spec, rng_scene.uniform(3500.0, 9000.0)), nx, ny)
        profiles = extra if profiles is None else [p + q for p, q in zip(profiles, extra)]
    model = cond.draw(profiles) if profiles is not None else np.zeros((len(spec.bands), spec.size, spec.size))

    footprint = np.zeros((spec.size, spec.size), dtype=bool)
    if cls and inject:
        anomaly = _INJECTORS[cls](spec, rng_anom, cond, central if central is not None else host)
        # where the anomaly (added light, or light taken away: a dust lane) rises above the sky
        # noise in any band, or its stronger half where it never does; for a class that replaces
        # the host, where the object departs from a normal galaxy (the whole object when the
        # anomaly is the object itself)
        strength = np.abs(anomaly)
        peak = strength.reshape(len(anomaly), -1).max(axis=1)
        threshold = np.minimum(cond.sky, 0.5 * peak)[:, None, None]
        footprint = ((strength > threshold) & (peak > 0)[:, None, None]).any(axis=0)
        model = model + anomaly

    var = cond.sky[:, None, None] ** 2 + np.clip(model, 0.0, None) / _GAIN
    image = model + rng_noise.standard_normal(model.shape) * np.sqrt(var)
    saturated = _saturate(image, _SATURATION)
    if cls and inject:
        footprint |= saturated
    return _Object(image.astype(np.float32), footprint.astype(np.uint8), cls, ra, dec)
