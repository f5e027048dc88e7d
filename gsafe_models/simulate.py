r"""GalSim simulator of multi-band survey cutouts with injected anomalies.

Each cutout holds a bulge + disk galaxy near its centre, sometimes an unrelated neighbour, seen
through a per-band Moffat PSF with per-band sky noise (plus source shot noise), in counts,
sky-subtracted. A fraction of cutouts carry one injected anomaly (a strong lens, a merger, a
satellite trail, cosmic rays, a saturated star, a galaxy blended with a point source) together
with a per-pixel footprint of where it lies.

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
"""

from __future__ import annotations

__all__ = [
    "ANOMALY_CLASSES",
    "DEFAULT_BANDS",
    "SimulatedBatch",
    "simulate_batch",
]

import math

from dataclasses import dataclass, field
from typing import Callable

import galsim
import numpy as np

from scipy.signal import fftconvolve

ANOMALY_CLASSES: tuple[str, ...] = ("lens", "merger", "trail", "cosmic_ray", "saturated_star", "blend_point")
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
_REF_WAVELENGTH = 755.0  # nm; fluxes are quoted in the i band
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
    by `simulate_batch(50, 50)`.

    Arguments:
        start: The global index of the first object.
        n: The number of objects.
        seed: The survey seed.
        anomaly_frac: The probability that an object carries an injected anomaly.
        classes: The anomaly classes to draw from, a subset of `ANOMALY_CLASSES`.
        bands: The bands, among `u, g, r, i, z, y`.
        size: The cutout side :math:`H = W`, in pixels.
        pixel_scale: The pixel side, in arcsec.

    Returns:
        The cutouts and their truth, :math:`B` = `len(bands)`.

    Example:
        >>> batch = simulate_batch(0, 4, anomaly_frac=0.5, size=32)
        >>> batch.images.shape, batch.object_id[0]
        ((4, 5, 32, 32), np.str_('sim-000000000'))
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
        return cls(int(seed), float(anomaly_frac), tuple(classes), tuple(bands), int(size), float(scale),
                   table[:, 0], table[:, 1], templates)

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
        p = _KERNEL_HALF
        return np.stack([f * fftconvolve(pix, k, mode="same")[p:-p, p:-p] for f, k in zip(fluxes, self.kernels())])


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
    return _Galaxy(flux, float(bulge_frac), x, y, bulge, disk, sed_bulge, sed_disk)


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


_Injector = Callable[[_Survey, np.random.Generator, _Conditions, _Galaxy], np.ndarray]
_INJECTORS: dict[str, _Injector] = {
    "lens": _lens,
    "merger": _merger,
    "trail": _trail,
    "cosmic_ray": _cosmic_ray,
    "saturated_star": _saturated_star,
    "blend_point": _blend_point,
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
    if cls == "lens":
        host = _lens_host(spec, rng_anom, host)
    profiles = host.profiles()
    if rng_scene.random() < 0.2:  # an unrelated neighbour somewhere in the cutout
        nx, ny = _polar(rng_scene, 0.45 * spec.half, 0.85 * spec.half)
        n_flux = flux * _log_uniform(rng_scene, 0.03, 0.6)
        if rng_scene.random() < 0.75:
            extra = _draw_galaxy(spec, rng_scene, n_flux, nx, ny).profiles()
        else:
            extra = _star(spec, n_flux, _planck_sed(spec, rng_scene.uniform(3500.0, 9000.0)), nx, ny)
        profiles = [p + q for p, q in zip(profiles, extra)]
    model = cond.draw(profiles)

    footprint = np.zeros((spec.size, spec.size), dtype=bool)
    if cls and inject:
        anomaly = _INJECTORS[cls](spec, rng_anom, cond, host)
        peak = anomaly.reshape(len(anomaly), -1).max(axis=1)
        # where the anomaly rises above the sky noise in any band (its brighter half if it never does)
        threshold = np.minimum(cond.sky, 0.5 * peak)[:, None, None]
        footprint = ((anomaly > threshold) & (peak > 0)[:, None, None]).any(axis=0)
        model = model + anomaly

    var = cond.sky[:, None, None] ** 2 + np.clip(model, 0.0, None) / _GAIN
    image = model + rng_noise.standard_normal(model.shape) * np.sqrt(var)
    saturated = _saturate(image, _SATURATION)
    if cls and inject:
        footprint |= saturated
    return _Object(image.astype(np.float32), footprint.astype(np.uint8), cls, ra, dec)
