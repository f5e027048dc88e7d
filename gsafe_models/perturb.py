r"""Generic synthetic perturbations of normal cutouts, which model no particular anomaly class.

gsafe's defaults (which statistics, which combination rule) are chosen on how well they find
*these*, never on a named anomaly class: a blob of light of random size and colour, a point
source, absorption of part of the object's light, a colour change of the object in one band, a
local shuffle of pixels (structure destroyed, flux and noise kept), a patch offset in one band, a
stroke (a straight segment of light of random length, width, orientation and colour, anywhere:
the linear primitive beside the compact and the extended ones).
Each is drawn over a wide range of strengths, from below the noise to obvious, at a random place.
This is the idea of outlier exposure with generic, self-made outliers (Hendrycks et al. 2019) and
of the synthetic anomalies of defect detection (CutPaste, Li et al. 2021), used here only to
choose, never to train.

References:
    | Deep Anomaly Detection with Outlier Exposure (Hendrycks et al., 2019)
    | https://arxiv.org/abs/1812.04606
    | CutPaste: Self-Supervised Learning for Anomaly Detection and Localization (Li et al., 2021)
    | https://arxiv.org/abs/2104.04015

Example:
    >>> x = np.random.default_rng(0).normal(size=(4, 3, 32, 32)).astype(np.float32)
    >>> y = perturb(x, "blob", seed=1)
    >>> y.shape == x.shape and not np.allclose(x, y)
    True
"""

from __future__ import annotations

__all__ = ["KINDS", "perturb", "band_noise"]

import numpy as np

from scipy.ndimage import gaussian_filter

#: The perturbation kinds, in a fixed order.
#: (New kinds go at the end: a kind's draws are seeded by its index.)
KINDS: tuple[str, ...] = ("blob", "point", "absorb", "colour", "shuffle", "patch", "stroke")

MAD_TO_SIGMA = 1.4826


def band_noise(images: np.ndarray, border: int = 4) -> np.ndarray:
    r"""Returns the per-band sky noise, :math:`1.4826 \times` MAD of the cutout borders, :math:`(B,)`."""

    x = np.asarray(images, np.float32)
    H, W = x.shape[-2:]
    w = max(1, min(border, H // 4, W // 4))
    edge = np.zeros((H, W), bool)
    edge[:w], edge[-w:], edge[:, :w], edge[:, -w:] = True, True, True, True
    out = []
    for b in range(x.shape[1]):
        v = x[:, b][:, edge].ravel()
        v = v[np.isfinite(v)]
        out.append(MAD_TO_SIGMA * np.median(np.abs(v - np.median(v))) if v.size else 1.0)
    return np.maximum(np.asarray(out, np.float32), 1e-12)


def _gaussian(H: int, W: int, y0: float, x0: float, s: float) -> np.ndarray:
    yy, xx = np.mgrid[0:H, 0:W]
    g = np.exp(-0.5 * ((yy - y0) ** 2 + (xx - x0) ** 2) / s**2)
    return g / g.sum()


def _near_centre(rng: np.random.Generator, H: int, W: int, frac: float) -> tuple[float, float]:
    r = frac * min(H, W) * np.sqrt(rng.uniform())
    phi = rng.uniform(0, 2 * np.pi)
    return (H - 1) / 2 + r * np.sin(phi), (W - 1) / 2 + r * np.cos(phi)


def perturb(images: np.ndarray, kind: str, seed: int = 0, noise: np.ndarray | None = None) -> np.ndarray:
    r"""Returns perturbed copies of raw cutouts :math:`(N, B, H, W)` (counts, sky-subtracted).

    Arguments:
        images: Normal cutouts; NaN pixels stay NaN.
        kind: One of :data:`KINDS`.
        seed: Seeds every draw: same seed, same perturbations.
        noise: The per-band sky noise :math:`(B,)`; default :func:`band_noise` of `images`.

    Returns:
        The perturbed cutouts, float32, same shape.
    """

    if kind not in KINDS:
        raise ValueError(f"perturb: kind={kind!r}, expected one of {KINDS}")
    x = np.array(images, dtype=np.float32, copy=True)
    N, B, H, W = x.shape
    noise = band_noise(x) if noise is None else np.asarray(noise, np.float32)
    rng = np.random.default_rng(seed)
    for i in range(N):
        img = np.nan_to_num(x[i])
        if kind in ("blob", "point"):
            s = rng.uniform(0.7, 1.5) if kind == "point" else float(np.exp(rng.uniform(np.log(1.0), np.log(6.0))))
            y0, x0 = _near_centre(rng, H, W, 0.4)
            g = _gaussian(H, W, y0, x0, s)
            sed = rng.dirichlet(np.full(B, 0.7)) * B  # from one band to all: any colour
            snr = float(np.exp(rng.uniform(np.log(5.0), np.log(80.0))))  # matched-filter S/N, whole component
            flux = snr * noise * np.sqrt(4 * np.pi) * s / np.sqrt(B)
            img = img + (flux * sed)[:, None, None] * g[None]
        elif kind == "absorb":
            s = float(np.exp(rng.uniform(np.log(1.5), np.log(6.0))))
            y0, x0 = _near_centre(rng, H, W, 0.12)
            g = _gaussian(H, W, y0, x0, s)
            depth = rng.uniform(0.2, 0.9) * rng.dirichlet(np.full(B, 2.0)) * B / 1.5
            img = img * (1.0 - np.clip(depth, 0, 0.95)[:, None, None] * (g / g.max())[None])
        elif kind == "colour":
            b = int(rng.integers(B))
            factor = float(np.exp(rng.choice([-1.0, 1.0]) * rng.uniform(0.2, 1.0)))
            img[b] = img[b] + (factor - 1.0) * gaussian_filter(img[b], 1.0)
        elif kind == "shuffle":
            s = int(rng.integers(4, max(5, min(H, W) // 5) + 1))
            y0, x0 = _near_centre(rng, H, W, 0.1)
            ya, xa = int(np.clip(round(y0 - s / 2), 0, H - s)), int(np.clip(round(x0 - s / 2), 0, W - s))
            block = img[:, ya : ya + s, xa : xa + s].reshape(B, -1)
            img[:, ya : ya + s, xa : xa + s] = block[:, rng.permutation(s * s)].reshape(B, s, s)
        elif kind == "stroke":
            length = float(np.exp(rng.uniform(np.log(4.0), np.log(1.5 * max(H, W)))))
            width = rng.uniform(0.5, 1.5)
            a = rng.uniform(0, np.pi)
            y0, x0 = rng.uniform(0, H - 1), rng.uniform(0, W - 1)  # its middle, anywhere in the cutout
            yy, xx = np.mgrid[0:H, 0:W]
            along = (xx - x0) * np.cos(a) + (yy - y0) * np.sin(a)
            across = -(xx - x0) * np.sin(a) + (yy - y0) * np.cos(a)
            prof = np.exp(-0.5 * (across / width) ** 2) * (np.abs(along) <= length / 2)
            sed = rng.dirichlet(np.full(B, 0.7)) * B
            snr = float(np.exp(rng.uniform(np.log(5.0), np.log(80.0))))  # matched-filter S/N, whole stroke
            norm = np.sqrt((prof**2).sum()) * np.sqrt(B)
            img = img + (snr * noise * sed)[:, None, None] * prof[None] / max(norm, 1e-12)
        else:  # patch
            b = int(rng.integers(B))
            s = int(rng.integers(3, max(4, min(H, W) // 4) + 1))
            ya, xa = int(rng.integers(0, H - s + 1)), int(rng.integers(0, W - s + 1))
            img[b, ya : ya + s, xa : xa + s] += rng.choice([-1.0, 1.0]) * rng.uniform(0.5, 3.0) * noise[b]
        x[i] = np.where(np.isnan(x[i]), np.nan, img)
    return x
