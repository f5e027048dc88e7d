r"""The Detector bundle: normaliser, representation, latent densities, statistics and the calibrated
combined test, trained from streamed batches and serialised to bytes as one model version.

How the defaults were chosen (`bench/quality.py`: simulated survey, 64x64 pixels, grizy): train on
3000 cutouts with 1 % contamination (calibration split: 452 of them), score 3000 fresh cutouts
with 10 % anomalies. The statistic set and the combination rule were picked on the AUROC of the
classes other than `merger` and `blend_point`, then checked on those two. AUROC per statistic
(all; blend_point, cosmic_ray, lens, merger, saturated_star, trail), one AE, seed 0::

    G               0.846  0.726 0.697 0.879 0.846 1.000 0.937
    C               0.780  0.675 0.504 0.885 0.832 1.000 0.809
    AS              0.814  0.696 0.589 0.896 0.847 1.000 0.872
    peak            0.927  0.898 0.919 0.935 0.892 1.000 0.929
    peak_core       0.903  0.953 0.728 0.981 0.963 1.000 0.816
    sharpness       0.642  0.491 0.998 0.466 0.510 0.941 0.504
    line            0.828  0.621 0.646 0.891 0.813 1.000 0.998
    nll_gmm         0.792  0.642 0.496 0.881 0.854 1.000 0.894
    nll_flow        0.781  0.631 0.479 0.851 0.863 1.000 0.879
    typicality_gmm  0.724  0.600 0.487 0.780 0.717 1.000 0.787
    typicality_flow 0.703  0.563 0.490 0.710 0.737 1.000 0.755
    rao_gmm         0.825  0.727 0.530 0.875 0.919 1.000 0.916
    rao_flow        0.800  0.769 0.547 0.750 0.921 0.999 0.844
    colour          0.503  0.488 0.556 0.379 0.363 0.637 0.606
    concentration   0.644  0.541 0.626 0.497 0.494 0.987 0.762
    asymmetry       0.830  0.967 0.591 0.930 0.964 0.976 0.605
    default, simes  0.973  0.947 0.996 0.961 0.948 1.000 0.986
    same, fisher    0.968  0.945 0.987 0.971 0.959 1.000 0.954

(seed 1: simes 0.978, held-out 0.963 / 0.959; fisher 0.975.) The AE reconstructs normal galaxies
to the pixel noise, so the global residual :math:`G` is noise-dominated and misses compact
anomalies; each default statistic covers a blind spot of the others (`peak_core`: lenses,
mergers, blends; `asymmetry`: blends and mergers, from the pixels alone; `sharpness`: cosmic rays;
`line`: trails; `peak`: anything compact elsewhere). Adding any other statistic to this set
lowered the tuning-class AUROC under Simes' rule on seed 0 and at best tied it on seed 1 (`G`,
`rao_flow`), and dropping any but `peak` lowered it on both; colour and concentration are near
chance on these surveys. All remain available as settings.

Simes' rule is the default: on the tuning classes it matched Bonferroni (0.985-0.987) and beat
Fisher (0.976-0.983), Cauchy, Stouffer and DoSE on both seeds, and it needs no second calibration
fold (valid under the positive dependence statistics of one cutout have), so each statistic is
calibrated on the whole split and the survey's false-discovery list is longest: 94 and 142
discoveries at q <= 0.1 on the two seeds, none false, where the two-stage Fisher test found 70
and 33. Its combined p-values are conservative (above the uniform) rather than exactly uniform.
"""

__all__ = [
    "STATISTICS",
    "DetectorConfig",
    "Detector",
]

import dataclasses
import io
import math
import time

from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn as nn

from scipy import stats as sps
from torch import Tensor

from .calibration import CombinedTest, bh_qvalues
from .density import GaussianMixture
from .flow import LatentFlow
from .nets import build_representation, AutoEncoder, VAE
from .normalise import BandNormaliser
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
    peak_of,
    sharpness,
    reconstruction_residual,
    typicality,
)
from .training import fit_representation, resolve_device

BatchFactory = Callable[[], Iterable[np.ndarray]]

#: Every statistic a Detector can compute, larger = more anomalous, one number per object:
#: `G` pixel residual, `C` feature residual, `AS` their HSC mix, `peak` the largest local
#: residual and `peak_core` the same within the central aperture (the object, not its
#: neighbours), `sharpness` (sub-PSF residual: cosmic rays), `line` (residual along a line:
#: trails), latent `nll_*` and `typicality_*` under the GMM and the flow, Rao's score
#: `rao_*`, the Mahalanobis distances of the `colour` and `concentration` to those of normal
#: objects of the same magnitude, and the (noise-corrected) `asymmetry`.
STATISTICS: tuple[str, ...] = (
    "G",
    "C",
    "AS",
    "peak",
    "peak_core",
    "sharpness",
    "line",
    "nll_gmm",
    "nll_flow",
    "typicality_gmm",
    "typicality_flow",
    "rao_gmm",
    "rao_flow",
    "colour",
    "concentration",
    "asymmetry",
)

_FORMAT = 1  # bumped when the byte layout of `to_bytes` changes
_CHUNK = 256  # cutouts per forward pass when scoring: bounded memory for any input size


@dataclasses.dataclass
class DetectorConfig:
    r"""The settings of :meth:`Detector.fit`; every field is a setting of `gsafe train`.

    Arguments:
        representation: `"ae"` (autoencoder) or `"vae"`.
        latent_dim: The latent size :math:`D`.
        beta: The VAE's KL weight :math:`\beta`.
        epochs: The maximum number of training epochs.
        batch_size: The batch size the caller's factories yield (advisory: batches are theirs).
        lr: The learning rate.
        patience: Early-stopping patience, in epochs.
        statistics: The statistics that enter the combined test, among :data:`STATISTICS`.
        combination: The combination rule of :class:`~gsafe_models.calibration.CombinedTest`.
        seed: Seeds everything: weights, EM start, flow, calibration folds.
        channels: The encoder's channels per stage.
        lam: :math:`\lambda` of :math:`AS = \lambda G + (1 - \lambda) C`.
        gmm_components: The candidate numbers of GMM components (chosen by BIC).
        flow_transforms: The number of MAF transforms of the latent flow.
        flow_epochs: The maximum number of epochs of the latent flow.
        augment: Train on random rotations and flips of the cutouts.
        normaliser_sample: The number of first training cutouts the normaliser is fitted on.
        softening: The normaliser's asinh softening :math:`k`, in units of the band noise.
        calibration_trim: The largest share of the calibration split's values per statistic
            that may be removed as outliers (the anomalies every real "normal" set holds; see
            :class:`~gsafe_models.calibration.TailCalibrator`); 0 keeps them all.
    """

    representation: str = "ae"
    latent_dim: int = 32
    beta: float = 1.0
    epochs: int = 20
    batch_size: int = 128
    lr: float = 1e-3
    patience: int = 4
    # Chosen on simulated surveys (see the module docstring): one statistic per blind spot of
    # the others, combined by Simes' rule.
    statistics: tuple[str, ...] = ("peak_core", "asymmetry", "sharpness", "line", "peak")
    combination: str = "simes"
    seed: int = 0
    channels: tuple[int, ...] = (8, 16, 32, 64)
    lam: float = 0.9
    gmm_components: tuple[int, ...] = (1, 2, 4, 8)
    flow_transforms: int = 3
    flow_epochs: int = 100
    augment: bool = True
    normaliser_sample: int = 1024
    softening: float = 2.0
    calibration_trim: float = 0.05

    def __post_init__(self) -> None:
        self.statistics = tuple(self.statistics)
        self.channels = tuple(int(c) for c in self.channels)
        self.gmm_components = tuple(int(c) for c in self.gmm_components)
        unknown = [s for s in self.statistics if s not in STATISTICS]
        if unknown or not self.statistics:
            raise ValueError(f"DetectorConfig: statistics {list(self.statistics)}: unknown {unknown}; choose among {STATISTICS}")
        if self.representation not in ("ae", "vae"):
            raise ValueError(f"DetectorConfig: representation={self.representation!r}, expected 'ae' or 'vae'")


def _base_keys(names: Iterable[str]) -> set[str]:
    r"""Returns the :meth:`_Bundle.base` quantities that statistics `names` are derived from."""

    keys = set()
    for n in names:
        if n == "AS":
            keys |= {"G", "C"}
        elif n.endswith(("_gmm", "_flow")):
            keys.add("z")
        else:
            keys.add(n)
    return keys


def _needs(names: Iterable[str]) -> set[str]:
    r"""Returns the parts (`gmm`, `flow`, `rao_gmm`, `rao_flow`, `colour`...) the statistics need."""

    need = set()
    for n in names:
        if n.endswith("_gmm"):
            need |= {"gmm"} | ({"rao_gmm"} if n == "rao_gmm" else set())
        if n.endswith("_flow"):
            need |= {"flow"} | ({"rao_flow"} if n == "rao_flow" else set())
        if n in ("colour", "concentration"):
            need.add(n)
    return need


class _Bundle(nn.Module):
    r"""Every torch part of a Detector, so one :py:`state_dict` carries them all.

    The statistics are computed in two steps: :meth:`base` runs the network on raw cutouts and
    returns per-object quantities (latents, residuals, photometric features); :meth:`derive`
    turns those into statistics with the fitted densities and reference distributions. Training
    runs :meth:`base` once over the survey, fits the references, then derives.
    """

    def __init__(self, normaliser: BandNormaliser, net: AutoEncoder | VAE, lam: float) -> None:
        super().__init__()
        self.normaliser = normaliser
        self.net = net
        self.lam = lam
        self.gmm: GaussianMixture | None = None
        self.flow: LatentFlow | None = None
        self.rao_gmm: RaoScore | None = None
        self.rao_flow: RaoScore | None = None
        self.maha = nn.ModuleDict()
        B, H, W = net.shape
        # Apertures in pixels, scaled with the cutout: the photometric aperture holds a galaxy's
        # core, the asymmetry and core apertures the galaxy but mostly not its neighbours.
        self.aperture = max(2.0, 0.1 * min(H, W))
        self.asymmetry_aperture = max(3.0, 0.2 * min(H, W))
        self.register_buffer("core", aperture_weights(H, W, max(3.0, 0.19 * min(H, W))))
        # NaN until fitted: AS needs the training scales of G and C
        self.register_buffer("g_scale", torch.tensor(math.nan, dtype=torch.float64))
        self.register_buffer("c_scale", torch.tensor(math.nan, dtype=torch.float64))
        self.register_buffer("nll_mean", torch.zeros(2, dtype=torch.float64))  # gmm, flow
        self.register_buffer("surrogate_loc", torch.zeros(0, dtype=torch.float64))
        self.register_buffer("surrogate_scale", torch.ones(0, dtype=torch.float64))

    def photometry(self, images: Tensor) -> dict[str, Tensor]:
        r"""Returns photometric features of raw cutouts :math:`(N, B, H, W)` (no NaN).

        `colour` :math:`(N, B)` (adjacent-band colours, then the magnitude), `concentration`
        :math:`(N, 2)` (concentration, magnitude) and `asymmetry` :math:`(N,)`. Magnitudes are
        asinh magnitudes of the detection image (the bands in noise units, summed, with unit
        noise), in the central aperture; colours and concentration are compared with normal
        objects of the same magnitude.
        """

        norm = self.normaliser
        u = (images - norm.sky.view(1, -1, 1, 1)) / norm.noise.view(1, -1, 1, 1)  # noise units
        detection = u.sum(1) / math.sqrt(u.shape[1])  # unit noise per pixel
        npix = float(aperture_weights(*detection.shape[-2:], self.aperture).sum())
        mag = -torch.asinh(aperture_fluxes(detection[:, None], self.aperture)[:, 0] / (2 * math.sqrt(npix)))
        return {
            "colour": torch.cat([colours(u, self.aperture), mag[:, None]], dim=1),
            "concentration": torch.stack([concentration(detection), mag], dim=1),
            "asymmetry": asymmetry(detection, self.asymmetry_aperture, noise=1.0),
        }

    def base(self, images: Tensor, names: Iterable[str] = STATISTICS) -> dict[str, Tensor]:
        r"""Returns the per-object base quantities that statistics `names` need, of raw cutouts
        :math:`(N, B, H, W)` (NaN allowed): latents `z`, residual statistics, photometry."""

        keys = _base_keys(names)
        x, mask = self.normaliser(images)
        z = self.net.encode(x, mask)
        x_hat = self.net.decode(z)
        out = {"z": z}
        if "G" in keys:
            out["G"] = reconstruction_residual(x, x_hat, mask)
        if keys & {"peak", "peak_core"}:
            local = local_residual(x, x_hat, mask)  # one map for both peaks
            if "peak" in keys:
                out["peak"] = peak_of(local)
            if "peak_core" in keys:
                out["peak_core"] = peak_of(local, self.core)
        if keys & {"sharpness", "line"}:
            r = mask * (x - x_hat) / self.normaliser.unit_noise.view(1, -1, 1, 1).to(x)  # noise units
            if "sharpness" in keys:
                out["sharpness"] = sharpness(r)
            if "line" in keys:
                out["line"] = line_residual(r, mask)
        # Missing pixels take the reconstruction's value, so they add nothing to C and the
        # photometry sees a complete cutout.
        if "C" in keys:
            filled = mask * x + (1 - mask) * x_hat
            ones = torch.ones_like(mask)
            out["C"] = feature_residual(self.net.features(filled, ones), self.net.features(x_hat, ones))
        if keys & {"colour", "concentration", "asymmetry"}:
            raw = torch.where(mask.bool(), torch.nan_to_num(images.to(x.dtype)), self.normaliser.inverse(x_hat))
            out.update({k: v for k, v in self.photometry(raw).items() if k in keys})
        return out

    def fitted(self, name: str) -> bool:
        r"""Returns whether the references statistic `name` is compared with were fitted."""

        if name == "AS":
            return not bool(self.g_scale.isnan())
        if name.endswith(("_gmm", "_flow")):
            density = name.rsplit("_", 1)[1]
            part = f"rao_{density}" if name.startswith("rao") else density
            return getattr(self, part) is not None
        if name in ("colour", "concentration"):
            return name in self.maha
        return name in STATISTICS

    def derive(self, base: dict[str, Tensor], names: Iterable[str]) -> dict[str, Tensor]:
        r"""Returns the named statistics, each :math:`(N,)`, from :meth:`base` quantities."""

        out: dict[str, Tensor] = {}
        z = base["z"]
        nll: dict[str, Tensor] = {}  # each density evaluated once for its nll and typicality
        for name in names:
            if name in ("G", "C", "peak", "peak_core", "sharpness", "line", "asymmetry"):
                s = base[name]
            elif not self.fitted(name):
                raise KeyError(f"statistic {name!r} was not fitted by this detector: fit one with it among its statistics")
            elif name == "AS":
                s = anomaly_score(base["G"], base["C"], self.lam, self.g_scale.to(z.dtype), self.c_scale.to(z.dtype))
            elif name in ("nll_gmm", "typicality_gmm"):
                s = nll["gmm"] = nll["gmm"] if "gmm" in nll else -self.gmm.log_prob(z).to(z.dtype)
                s = typicality(s, self.nll_mean[0].to(z.dtype)) if name.startswith("typ") else s
            elif name in ("nll_flow", "typicality_flow"):
                s = nll["flow"] = nll["flow"] if "flow" in nll else -self.flow.log_prob(z).to(z.dtype)
                s = typicality(s, self.nll_mean[1].to(z.dtype)) if name.startswith("typ") else s
            elif name == "rao_gmm":
                s = self.rao_gmm(self.gmm, z.to(torch.float64)).to(z.dtype)
            elif name == "rao_flow":
                s = self.rao_flow(self.flow, z).to(z.dtype)
            else:
                s = self.maha[name](base[name]).to(z.dtype)
            out[name] = s
        return out


def _tree_to_torch(obj):
    r"""Turns NumPy values into tensors (tagged), so :py:`torch.load(weights_only=True)` reads them."""

    if isinstance(obj, np.ndarray):
        if obj.dtype.kind in "US":
            return {"__strings__": obj.astype(str).tolist()}
        return {"__ndarray__": torch.from_numpy(np.ascontiguousarray(obj))}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {k: _tree_to_torch(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_tree_to_torch(v) for v in obj)
    return obj


def _tree_from_torch(obj):
    if isinstance(obj, dict):
        if set(obj) == {"__ndarray__"}:
            return obj["__ndarray__"].numpy()
        if set(obj) == {"__strings__"}:
            return np.array(obj["__strings__"])
        return {k: _tree_from_torch(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_tree_from_torch(v) for v in obj)
    return obj


class Detector:
    r"""Creates a detector: scores cutouts by how far they are from normal, with calibrated p-values.

    The pipeline, fitted by :meth:`fit` on a training split (normal objects, lightly contaminated
    as real surveys are) and a held-out calibration split:

    1. :class:`~gsafe_models.normalise.BandNormaliser` (per-band sky, noise, asinh stretch);
    2. a convolutional :class:`~gsafe_models.nets.AutoEncoder` or :class:`~gsafe_models.nets.VAE`;
    3. latent densities, :class:`~gsafe_models.density.GaussianMixture` (BIC) and
       :class:`~gsafe_models.flow.LatentFlow`;
    4. per-object statistics (:data:`STATISTICS`), with their references (AS scales, mean
       training NLL for typicality, Fisher information for Rao, Mahalanobis fits for photometry)
       fitted on the training split;
    5. a :class:`~gsafe_models.calibration.CombinedTest` on the calibration split: one conformal
       p-value per statistic, combined into one p-value and a continuous score.

    Use :meth:`fit` to build one and :meth:`from_bytes` to load one.

    References:
        | Anomaly Detection in Astronomical Images with Generative Adversarial Networks
        | (Storey-Fisher et al., 2021) https://arxiv.org/abs/2012.08082
        | Model-agnostic out-of-distribution detection using combined statistical tests
        | (Bergamin et al., 2022) https://arxiv.org/abs/2203.01097

    Example:
        >>> from gsafe_models.simulate import simulate_batch
        >>> x = simulate_batch(0, 96, size=16, bands=("g", "r", "i"), anomaly_frac=0.0).images
        >>> cfg = DetectorConfig(epochs=1, latent_dim=4, statistics=("G", "colour"))
        >>> det = Detector.fit(lambda: [x[:32], x[32:64]], lambda: [x[64:]], config=cfg)
        >>> sorted(det.score(x[:3]))
        ['p_G', 'p_colour', 'p_value', 'q_value', 'score', 'stat_G', 'stat_colour']
    """

    def __init__(
        self,
        config: DetectorConfig,
        bundle: _Bundle,
        test: CombinedTest,
        bands: tuple[str, ...],
        history: list[dict] | None = None,
        diagnostics: dict | None = None,
    ) -> None:
        self.config = config
        self._bundle = bundle.eval()
        self._test = test
        self.bands = tuple(bands)
        self.image_shape = tuple(bundle.net.shape)
        self.statistic_names = list(config.statistics)
        self.history = list(history or [])
        self.diagnostics = dict(diagnostics or {})

    # Fitting

    @classmethod
    def fit(
        cls,
        train: BatchFactory,
        calib: BatchFactory,
        *,
        config: DetectorConfig,
        val: BatchFactory | None = None,
        bands: tuple[str, ...] | None = None,
        device: str | None = None,
        progress: Callable[[dict], None] | None = None,
    ) -> "Detector":
        r"""Fits a detector on streamed batches of raw cutouts.

        Arguments:
            train: Returns an iterable of training batches :math:`(b, B, H, W)` float32 counts,
                NaN = missing; called once per epoch and a few more times.
            calib: The same for held-out normal objects, which calibrate the p-values.
            config: The settings.
            val: The same for the early-stopping split, or None.
            bands: The band names; default `band0`, `band1`...
            device: `"cuda"`, `"cpu"`..., or None for CUDA when present.
            progress: Called with `{"stage": ...}` as each stage starts and with the training
                loop's per-batch and per-epoch records.

        Returns:
            The fitted detector, on `device`.
        """

        device = resolve_device(device)
        report = progress or (lambda event: None)
        torch.manual_seed(config.seed)
        start = time.perf_counter()

        report({"stage": "normaliser"})
        sample = _take(train, config.normaliser_sample)
        if sample.ndim != 4:
            raise ValueError(f"Detector.fit: training batches have shape {sample.shape[1:]}, expected (B, H, W)")
        shape = tuple(int(s) for s in sample.shape[1:])
        bands = tuple(bands) if bands is not None else tuple(f"band{i}" for i in range(shape[0]))
        if len(bands) != shape[0]:
            raise ValueError(f"Detector.fit: {len(bands)} band names {bands} for cutouts with {shape[0]} bands")
        normaliser = BandNormaliser(shape[0], softening=config.softening).fit(sample, seed=config.seed)
        del sample

        report({"stage": "representation"})
        if config.representation == "vae":
            net = VAE(shape, config.latent_dim, config.beta, config.channels)
        else:
            net = AutoEncoder(shape, config.latent_dim, config.channels)
        history = fit_representation(
            net, normaliser, train, val,
            epochs=config.epochs, lr=config.lr, device=device, seed=config.seed,
            patience=config.patience, augment=config.augment, progress=progress,
        )

        detector = cls.assemble(normaliser, net, train, calib, config=config, bands=bands, device=device, progress=progress)
        detector.history = history
        detector.diagnostics["fit_seconds"] = time.perf_counter() - start
        return detector

    @classmethod
    def assemble(
        cls,
        normaliser: BandNormaliser,
        net: AutoEncoder | VAE,
        train: BatchFactory,
        calib: BatchFactory,
        *,
        config: DetectorConfig,
        bands: tuple[str, ...] | None = None,
        device: str | None = None,
        progress: Callable[[dict], None] | None = None,
    ) -> "Detector":
        r"""Builds a detector around a trained representation: fits the latent densities and
        the statistics' references on `train`, and calibrates on `calib`.

        :meth:`fit` calls it after training; call it directly to re-calibrate a trained
        representation with other statistics or another combination rule.

        Arguments:
            normaliser: A fitted :class:`~gsafe_models.normalise.BandNormaliser`.
            net: A trained representation.
            train: Batches of training cutouts (as in :meth:`fit`).
            calib: Batches of calibration cutouts.
            config: The settings; `statistics`, `combination`, `lam`, `gmm_components` and
                `flow_*` are those used here.
            bands: The band names; default `band0`, `band1`...
            device: `"cuda"`, `"cpu"`..., or None for CUDA when present.
            progress: Called with `{"stage": ...}` as each stage starts.
        """

        device = resolve_device(device)
        report = progress or (lambda event: None)
        bands = tuple(bands) if bands is not None else tuple(f"band{i}" for i in range(net.shape[0]))
        bundle = _Bundle(normaliser, net, config.lam).to(device).eval()

        report({"stage": "latents"})
        base = _base_all(bundle, train, device, config.statistics)
        if len(base["z"]) < 2:
            raise ValueError("Detector.fit: fewer than 2 training cutouts")

        report({"stage": "density"})
        _fit_references(bundle, base, config, device)

        report({"stage": "calibration"})
        names = list(config.statistics)
        with torch.no_grad():
            S_train = _matrix(bundle.derive(base, names), names)
            S_calib = _matrix(bundle.derive(_base_all(bundle, calib, device, names), names), names)
        if len(S_calib) < 2:
            raise ValueError("Detector.fit: fewer than 2 calibration cutouts")
        test = CombinedTest(config.combination, seed=config.seed, trim=config.calibration_trim).fit(S_train, S_calib, names)

        # The differentiable surrogate of the combined score standardises each statistic on
        # normal data (median, IQR) of the calibration split.
        q25, q50, q75 = np.quantile(S_calib, [0.25, 0.5, 0.75], axis=0)
        bundle.surrogate_loc = torch.as_tensor(q50, dtype=torch.float64, device=device)
        bundle.surrogate_scale = torch.as_tensor(np.maximum(q75 - q25, 1e-12) / 1.349, dtype=torch.float64, device=device)

        diagnostics = _crossfit_check(S_train, S_calib, names, config)
        # calibration values left out as outliers (anomalies among the "normal" objects)
        for name, cal in zip(names, test.calibrators):
            diagnostics[f"calibration_trimmed_{name}"] = cal.trimmed
        if test.combined is not None:
            diagnostics["calibration_trimmed_combined"] = test.combined.trimmed
        return cls(config, bundle, test, bands, [], diagnostics)

    # Scoring

    def _device(self) -> torch.device:
        return self._bundle.core.device

    def _chunks(self, images: np.ndarray) -> Iterator[Tensor]:
        images = np.asarray(images)
        if images.ndim != 4 or tuple(images.shape[1:]) != self.image_shape:
            raise ValueError(f"Detector: images have shape {images.shape}, expected (N, {', '.join(map(str, self.image_shape))})")
        for i in range(0, len(images), _CHUNK):
            yield torch.as_tensor(np.asarray(images[i : i + _CHUNK], dtype=np.float32)).to(self._device())

    @torch.no_grad()
    def encode(self, images: np.ndarray) -> np.ndarray:
        r"""Returns the latents :math:`(N, D)` of raw cutouts :math:`(N, B, H, W)`."""

        out = [self._bundle.net.encode(*self._bundle.normaliser(x)).float().cpu().numpy() for x in self._chunks(images)]
        return np.concatenate(out) if out else np.zeros((0, self._bundle.net.latent_dim), np.float32)

    @torch.no_grad()
    def reconstruct(self, images: np.ndarray) -> np.ndarray:
        r"""Returns the reconstructions of raw cutouts, :math:`(N, B, H, W)` float32 counts."""

        out = []
        for x in self._chunks(images):
            x_hat, _ = self._bundle.net(*self._bundle.normaliser(x))
            out.append(self._bundle.normaliser.inverse(x_hat).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, *self.image_shape), np.float32)

    @torch.no_grad()
    def statistics(self, images: np.ndarray, names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        r"""Returns the raw per-object statistics of raw cutouts, one :math:`(N,)` float64 array each.

        Arguments:
            images: Raw cutouts :math:`(N, B, H, W)`, counts, NaN = missing.
            names: The statistics to compute (they must be fitted); default the detector's own.
        """

        names = list(self.statistic_names if names is None else names)
        parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
        for x in self._chunks(images):
            for n, s in self._bundle.derive(self._bundle.base(x, names), names).items():
                parts[n].append(s.double().cpu().numpy())
        return {n: np.concatenate(v) if v else np.zeros(0) for n, v in parts.items()}

    def score(self, images: np.ndarray, q_values: bool = True) -> dict[str, np.ndarray]:
        r"""Scores raw cutouts.

        Arguments:
            images: Raw cutouts :math:`(N, B, H, W)`, counts, NaN = missing.
            q_values: Add Benjamini-Hochberg q-values over these cutouts (leave out when scoring
                a survey chunk by chunk: q-values belong to the whole survey).

        Returns:
            `score` (continuous, larger = more anomalous), `p_value` (combined), `q_value`,
            and `stat_<name>` and `p_<name>` per statistic, each :math:`(N,)`.
        """

        raw = self.statistics(images)
        S = _matrix(raw, self.statistic_names)
        out: dict[str, np.ndarray] = {}
        if len(S):
            res = self._test.pvalues(S)
        else:
            res = {k: np.zeros(0) for k in ["score", "p_value", *(f"p_{n}" for n in self.statistic_names)]}
        out["score"] = res["score"]
        # the tail model can underflow to 0 far beyond the calibration range; a p-value of exactly 0
        # would claim the impossible, so report the smallest positive double instead (score stays exact)
        out["p_value"] = np.maximum(res["p_value"], np.finfo(np.float64).tiny)
        if q_values:
            out["q_value"] = bh_qvalues(out["p_value"])
        for n in self.statistic_names:
            out[f"stat_{n}"] = raw[n]
        for n in self.statistic_names:
            out[f"p_{n}"] = res[f"p_{n}"]
        return out

    # Differentiable views, for attributions

    def score_function(self, statistic: str | None = None) -> Callable[[Tensor], Tensor]:
        r"""Returns a differentiable map from raw cutouts :math:`(N, B, H, W)` to :math:`(N,)`.

        Arguments:
            statistic: One of the detector's statistics, or None for a surrogate of the combined
                score: the mean of the statistics standardised on the calibration split (median,
                IQR), increasing in each statistic as the combined score is.
        """

        bundle = self._bundle
        names = self.statistic_names
        if statistic is not None and statistic not in names:
            raise ValueError(f"Detector.score_function: statistic={statistic!r}, this detector has {names}")

        def fn(images: Tensor) -> Tensor:
            images = images.to(self._device(), torch.float32)
            wanted = names if statistic is None else [statistic]
            stats = bundle.derive(bundle.base(images, wanted), wanted)
            if statistic is not None:
                return stats[statistic]
            S = torch.stack([stats[n] for n in names], dim=1)
            u = (S - bundle.surrogate_loc.to(S)) / bundle.surrogate_scale.to(S)
            return u.mean(1)

        return fn

    def impute_function(self) -> Callable[[Tensor], Tensor]:
        r"""Returns a map from raw cutouts :math:`(N, B, H, W)` to their reconstructions in counts."""

        bundle = self._bundle

        def fn(images: Tensor) -> Tensor:
            with torch.no_grad():
                x = images.to(self._device(), torch.float32)
                x_hat, _ = bundle.net(*bundle.normaliser(x))
                return bundle.normaliser.inverse(x_hat).to(images.device)

        return fn

    def to(self, device: str | torch.device) -> "Detector":
        r"""Moves the detector to `device` (in place) and returns it."""

        self._bundle.to(torch.device(device))
        return self

    # Serialisation

    def to_bytes(self) -> bytes:
        r"""Returns the detector as bytes (loaded with :meth:`from_bytes`; no pickled code)."""

        b = self._bundle
        payload = {
            "format": _FORMAT,
            "config": dataclasses.asdict(self.config),
            "bands": list(self.bands),
            "normaliser": b.normaliser.config(),
            "net": b.net.config(),
            "gmm": None if b.gmm is None else b.gmm.config(),
            "flow": None if b.flow is None else b.flow.config(),
            "rao_gmm": None if b.rao_gmm is None else b.rao_gmm.config(),
            "rao_flow": None if b.rao_flow is None else b.rao_flow.config(),
            "maha": {k: m.config() for k, m in b.maha.items()},
            "lam": b.lam,
            "state_dict": {k: v.detach().cpu() for k, v in b.state_dict().items()},
            "test": _tree_to_torch(self._test.state()),
            "history": _tree_to_torch(self.history),
            "diagnostics": _tree_to_torch(self.diagnostics),
        }
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, map_location: str | torch.device = "cpu") -> "Detector":
        r"""Loads a detector written by :meth:`to_bytes`; it scores exactly as the original."""

        payload = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
        if payload.get("format") != _FORMAT:
            raise ValueError(f"Detector.from_bytes: the detector was saved in format {payload.get('format')}, this "
                             f"gsafe reads format {_FORMAT}; retrain it (`gsafe train`) or use the gsafe that made it")
        config = DetectorConfig(**payload["config"])
        net_config = dict(payload["net"])
        net_config["shape"] = tuple(net_config["shape"])
        net_config["channels"] = tuple(net_config["channels"])
        bundle = _Bundle(BandNormaliser(**payload["normaliser"]), build_representation(net_config), payload["lam"])
        if payload["gmm"] is not None:
            bundle.gmm = GaussianMixture(**payload["gmm"])
        if payload["flow"] is not None:
            bundle.flow = LatentFlow(**{**payload["flow"], "hidden": tuple(payload["flow"]["hidden"])})
        if payload["rao_gmm"] is not None:
            bundle.rao_gmm = RaoScore(**payload["rao_gmm"])
        if payload["rao_flow"] is not None:
            bundle.rao_flow = RaoScore(**payload["rao_flow"])
        for k, c in payload["maha"].items():
            bundle.maha[k] = Mahalanobis(**c)
        state = payload["state_dict"]
        for name in ("surrogate_loc", "surrogate_scale"):  # sized at fit time
            setattr(bundle, name, torch.empty_like(state[name]))
        try:
            bundle.load_state_dict(state)
        except RuntimeError as e:  # buffers changed without a format bump: say so, not torch's key list
            raise ValueError(f"Detector.from_bytes: the saved weights do not fit this gsafe's Detector (format "
                             f"{_FORMAT}); retrain it (`gsafe train`) or use the gsafe that made it. "
                             f"torch: {str(e).splitlines()[0]}") from e
        bundle.to(map_location)
        test = CombinedTest.from_state(_tree_from_torch(payload["test"]))
        return cls(config, bundle, test, tuple(payload["bands"]), _tree_from_torch(payload["history"]), _tree_from_torch(payload["diagnostics"]))


def _fit_references(bundle: _Bundle, base: dict[str, Tensor], config: DetectorConfig, device: torch.device) -> None:
    r"""Fits, on the training split's base quantities, what the statistics compare with: the
    latent densities, the mean training NLL (typicality), the Fisher information (Rao), the
    photometric Mahalanobis fits and the AS scales."""

    needs = _needs(config.statistics)
    z = base["z"]
    if "gmm" in needs:
        # at least ~4 D objects per component, so full covariances stay well determined
        components = tuple(k for k in config.gmm_components if k <= max(1, len(z) // (4 * z.shape[1])))
        bundle.gmm = GaussianMixture.fit_bic(z, components=components or (1,), seed=config.seed)
        bundle.nll_mean[0] = -bundle.gmm.log_prob(z).double().mean()
    if "flow" in needs:
        flow = LatentFlow(z.shape[1], transforms=config.flow_transforms, hidden=(64, 64))
        bundle.flow = flow.fit(z, epochs=config.flow_epochs, seed=config.seed)
        with torch.no_grad():
            bundle.nll_mean[1] = -bundle.flow.log_prob(z).double().mean()
    if "rao_gmm" in needs:
        bundle.rao_gmm = RaoScore.for_density(bundle.gmm).to(device).fit(bundle.gmm, z.double())
    if "rao_flow" in needs:
        bundle.rao_flow = RaoScore.for_density(bundle.flow).to(device).fit(bundle.flow, z)
    for name in ("colour", "concentration"):
        if name in needs:
            bundle.maha[name] = Mahalanobis(base[name].shape[1], given=1).to(device).fit(base[name])
    if "AS" in config.statistics:
        bundle.g_scale = base["G"].double().median().clamp_min(1e-12)
        bundle.c_scale = base["C"].double().median().clamp_min(1e-12)


def _take(factory: BatchFactory, n: int) -> np.ndarray:
    r"""Returns the first `n` cutouts a factory yields (fewer if it has fewer)."""

    parts, held = [], 0
    for batch in factory():
        batch = np.asarray(batch, dtype=np.float32)
        parts.append(batch[: n - held])
        held += len(parts[-1])
        if held >= n:
            break
    if not parts:
        raise ValueError("Detector.fit: the training factory yielded no batch")
    return np.concatenate(parts)


@torch.no_grad()
def _base_all(bundle: _Bundle, factory: BatchFactory, device: torch.device, names: Iterable[str]) -> dict[str, Tensor]:
    r"""Runs :meth:`_Bundle.base` over every batch of a factory, `_CHUNK` cutouts at a time."""

    parts: dict[str, list[Tensor]] = {}
    for batch in factory():
        batch = np.asarray(batch, dtype=np.float32)
        for i in range(0, len(batch), _CHUNK):
            x = torch.as_tensor(batch[i : i + _CHUNK]).to(device)
            for k, v in bundle.base(x, names).items():
                parts.setdefault(k, []).append(v)
    if not parts:
        raise ValueError("Detector.fit: a batch factory yielded no batch")
    return {k: torch.cat(v) for k, v in parts.items()}


def _matrix(stats: dict, names: list[str]) -> np.ndarray:
    r"""Stacks per-statistic arrays into :math:`(N, k)` float64, columns in `names` order."""

    cols = [s.detach().double().cpu().numpy() if isinstance(s, Tensor) else np.asarray(s, np.float64) for s in (stats[n] for n in names)]
    return np.stack(cols, axis=1)


def _crossfit_check(S_train: np.ndarray, S_calib: np.ndarray, names: list[str], config: DetectorConfig) -> dict:
    r"""Checks calibration on the calibration split by cross-fitting: the test is fitted on one
    half and the other half's combined p-values are compared with the uniform: the one-sided KS
    statistic D+ (too many small p-values, what breaks a false-discovery list; a conservative rule
    such as Simes' passes) and its p-value, and the false positive rate at p <= 0.05."""

    n = len(S_calib)
    out: dict = {"calibration_n": n}
    if n < 40:
        return out
    perm = np.random.default_rng(config.seed + 1).permutation(n)
    halves = perm[: n // 2], perm[n // 2 :]
    pvals = []
    for fit_half, test_half in (halves, halves[::-1]):
        t = CombinedTest(config.combination, seed=config.seed, trim=config.calibration_trim).fit(S_train, S_calib[fit_half], names)
        pvals.append(t.pvalues(S_calib[test_half])["p_value"])
    p = np.concatenate(pvals)
    ks = sps.kstest(p, "uniform", alternative="greater")
    out["calibration_ks"] = float(ks.statistic)
    out["calibration_ks_p"] = float(ks.pvalue)
    out["calibration_fpr_05"] = float((p <= 0.05).mean())
    return out

