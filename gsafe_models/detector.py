r"""The Detector bundle: normaliser, representation, fitted references, statistics and the calibrated
combined test, trained from streamed batches and serialised to bytes as one model version.

Every statistic is one registered object in :mod:`gsafe_models.registry` (what it reads, what it
needs fitted, how it is computed); the Detector fits exactly what its statistics need. How the
defaults were chosen is in `bench/quality.py` and BENCHMARKS.md (leave-one-class-out protocol).
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
import zlib

from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn as nn

from scipy import stats as sps
from torch import Tensor

from .calibration import COMBINERS, CombinedTest, bh_qvalues
from .nets import build_representation, AutoEncoder, VAE
from .normalise import BandNormaliser
from .registry import FEATURES, PARTS, STATISTICS as _REGISTRY, Pass, null_units, reads_representation, requirements
from .training import BatchFactory, fit_representation, resolve_device, unpack_batch

#: Every statistic a Detector can compute (see :mod:`gsafe_models.registry`), larger = more anomalous.
STATISTICS: tuple[str, ...] = tuple(_REGISTRY)

#: The representations `DetectorConfig.representation` accepts.
REPRESENTATIONS: tuple[str, ...] = ("ae", "vae", "gan")

#: The combination rules `DetectorConfig.combination` accepts.
COMBINATIONS: tuple[str, ...] = (*COMBINERS, "dose", "exposure")

#: At most this many validation cutouts (and 7 perturbed copies of each) train `combination="exposure"`.
EXPOSURE_SAMPLE = 1000

_FORMAT = 2  # bumped when the byte layout of `to_bytes` changes
_CHUNK = 256  # cutouts per forward pass when scoring: bounded memory for any input size


@dataclasses.dataclass
class DetectorConfig:
    r"""The settings of :meth:`Detector.fit`; every field is a setting of `gsafe train`.

    Arguments:
        representation: `"ae"` (autoencoder), `"vae"` or `"gan"` (WGAN-GP with an encoder, :mod:`gsafe_models.gan`).
        latent_dim: The latent size :math:`D`.
        beta: The VAE's KL weight :math:`\beta`.
        epochs: The maximum number of training epochs.
        batch_size: The batch size the caller's factories yield (advisory: batches are theirs).
        lr: The learning rate.
        patience: Early-stopping patience, in epochs.
        statistics: The statistics that enter the combined test, among :data:`STATISTICS`, or
            `"all"` for every one of them.
        combination: The combination rule of :class:`~gsafe_models.calibration.CombinedTest`;
            `"exposure"` trains monotone trees over the statistics on the validation split's objects
            against their generically perturbed copies (:class:`~gsafe_models.calibration.ExposureScore`):
            it needs `val`, and more than a few statistics to be worth it.
        seed: Seeds everything: weights, EM start, flow, calibration folds.
        channels: The encoder's channels per stage.
        lam: :math:`\lambda` of :math:`AS = \lambda G + (1 - \lambda) C`.
        gmm_components: The candidate numbers of GMM components (chosen by BIC).
        flow_transforms: The number of MAF transforms of the latent flow.
        flow_epochs: The maximum number of epochs of the latent flow.
        augment: Train on random rotations and flips of the cutouts.
        normaliser_sample: The number of first training cutouts the normaliser, the PCA basis and
            the residual noise models are fitted on.
        softening: The normaliser's asinh softening :math:`k`, in units of the band noise.
        calibration_trim: The largest share of the calibration split's values per statistic
            that may be removed as outliers (the anomalies every real "normal" set holds; see
            :class:`~gsafe_models.calibration.TailCalibrator`); 0 keeps them all, the default:
            the outlier test cannot tell a heavy normal tail from contaminants on a split of a few
            hundred, and with 0.05 the defaults' p-values were 50-100 times too small at
            :math:`10^{-4}` on 4 of 8 simulated surveys and tiles (BENCHMARKS.md, "Validity").
        pca_components: Components of the PCA reconstruction (`*_pca` statistics).
        chi_scales: Smoothing widths (pixels) of the multi-scale :math:`\chi` statistics.
        noise_bins: Brightness bins of the residual noise models.
        optimizer: How the autoencoder / VAE is trained: `"adam"` or `"langevin"` (constrained
            Langevin dynamics, :class:`~gsafe_models.langevin.ConstrainedLangevin`; see
            `bench/robustness.py`).
        contrastive: Weight of a SimCLR term on the autoencoder's latents (:func:`~gsafe_models.nets.nt_xent`
            between two :func:`~gsafe_models.nets.astro_view` views of each cutout); 0 = a plain
            autoencoder. See `bench/quality.py --config contrastive=...` and BENCHMARKS.md.
        fit_trim: The share of training objects left out of the fit of the statistics' models (the
            PCA basis, the noise models, the densities and references): a first fit ranks every
            training object on the statistics, the most anomalous `fit_trim` of them are set aside
            and the models are fitted again on the rest, so that the anomalies a training set holds
            (~1 % of a survey, ~10 % of a single crowded tile) do not become part of "normal". The
            representation and the calibration are untouched: the p-values stay valid whatever it is.
            0 (off) by default: under `bench/quality.py` it lowers the synthetic AUROC at 1 %
            contamination and leaves it at 10 %, and it leaves real pixels where they were
            (BENCHMARKS.md, "fit_trim").
        calibration_folds: Cross-fitted calibration: with :math:`K \ge 2`, the training objects
            are dealt into :math:`K` folds (by a hash of their pixels, so a fold does not depend on
            the batch order), the statistics' models are fitted again :math:`K` times, each time
            without one fold, and each fold's statistics from the models that did not see it join
            the calibration split: ~6 times as many calibration objects, so the p-values a
            false-discovery list needs rest on ranks, not on a tail model (cross-conformal,
            Vovk 2015; CV+, Barber et al. 2021). Only for statistics that do not read the trained
            representation (it has seen every training object). 0 (off): the calibration split alone.
        chi_density_floor: The variance added to every covariance of the mixtures behind
            `chi_density_pca` and `departure_density_pca`, in units of the descriptor's null (squared): no component of the
            density of normal departures narrower than its square root. At 1e-6 a component can
            collapse onto a degenerate direction, so that float-level input differences move the
            statistic by up to ~0.006 nats on normal objects (and 2.5 nats once in a flow test);
            1e-2 removes that and improves `chi_density_pca` alone, but the protocol's winner under
            it (with the statistics of 2026-12-03 morning) listed nothing in `gsafe demo`, so it is not
            the default (BENCHMARKS.md, "A covariance floor"); not measured with `departure_density_pca`.
    """

    representation: str = "ae"
    latent_dim: int = 32
    beta: float = 1.0
    epochs: int = 20
    batch_size: int = 128
    lr: float = 1e-3
    patience: int = 4
    # chosen by `bench/quality.py` on generic synthetic perturbations of normal objects, on two seeds
    # at once, never on an anomaly class (BENCHMARKS.md, "Detection quality")
    statistics: tuple[str, ...] = ("departure_density_pca", "chi_chromatic_pca")
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
    calibration_trim: float = 0.0
    pca_components: int = 32
    chi_scales: tuple[float, ...] = (0.0, 1.0, 2.0, 4.0)
    noise_bins: int = 16
    optimizer: str = "adam"
    contrastive: float = 0.0
    fit_trim: float = 0.0
    calibration_folds: int = 0
    chi_density_floor: float = 1e-6

    def __post_init__(self) -> None:
        self.statistics = tuple([self.statistics] if isinstance(self.statistics, str) else self.statistics)
        if self.statistics == ("all",):  # every registered statistic (what combination="exposure" learns from)
            self.statistics = STATISTICS
        self.channels = tuple(int(c) for c in self.channels)
        self.gmm_components = tuple(int(c) for c in self.gmm_components)
        self.chi_scales = tuple(float(s) for s in self.chi_scales)
        unknown = [s for s in self.statistics if s not in STATISTICS]
        if unknown or not self.statistics:
            raise ValueError(f"DetectorConfig: statistics {list(self.statistics)}: unknown {unknown}; choose among {STATISTICS}")
        if len(set(self.statistics)) != len(self.statistics):
            raise ValueError(f"DetectorConfig: statistics {list(self.statistics)} repeat a name")
        if self.representation not in REPRESENTATIONS:
            raise ValueError(f"DetectorConfig: representation={self.representation!r}, expected one of {REPRESENTATIONS}")
        if self.optimizer not in ("adam", "langevin"):
            raise ValueError(f"DetectorConfig: optimizer={self.optimizer!r}, expected one of ('adam', 'langevin')")
        if not self.contrastive >= 0:
            raise ValueError(f"DetectorConfig: contrastive={self.contrastive} must be >= 0 (0 = a plain autoencoder)")
        if self.contrastive > 0 and self.representation != "ae":
            raise ValueError(f"DetectorConfig: contrastive={self.contrastive} needs representation='ae', got {self.representation!r}")
        if self.combination not in COMBINATIONS:
            raise ValueError(f"DetectorConfig: combination={self.combination!r}, expected one of {COMBINATIONS}")
        if not 0 <= self.fit_trim < 0.5:
            raise ValueError(f"DetectorConfig: fit_trim={self.fit_trim} must be in [0, 0.5) (a share of the training objects)")
        if self.calibration_folds != 0 and not 2 <= self.calibration_folds <= 20:
            raise ValueError(f"DetectorConfig: calibration_folds={self.calibration_folds} must be 0 (off) or 2 to 20")
        if self.calibration_folds and self.fit_trim > 0:
            raise ValueError(f"DetectorConfig: calibration_folds={self.calibration_folds} with fit_trim={self.fit_trim}: the "
                             f"cross-fitted models would not be trimmed as the final ones are; use one or the other")
        if self.calibration_folds and reads_representation(self.statistics):
            raise ValueError(f"DetectorConfig: calibration_folds={self.calibration_folds} cross-fits the statistics' models over "
                             f"the training objects, but {reads_representation(self.statistics)} read the trained representation, "
                             f"which has seen them all: drop those statistics or set calibration_folds=0")


class _Bundle(nn.Module):
    r"""Every torch part of a Detector, so one :py:`state_dict` carries them all: the normaliser,
    the representation, and the fitted parts of :mod:`gsafe_models.registry` by name.

    The statistics are computed in two steps: :meth:`features` runs one forward pass on raw
    cutouts and returns per-object features; :meth:`derive` turns features into statistics with
    the fitted parts. Training computes the features once over the survey, fits the parts, then
    derives.
    """

    def __init__(self, normaliser: BandNormaliser, net: AutoEncoder | VAE) -> None:
        super().__init__()
        self.normaliser = normaliser
        self.net = net
        self.parts = nn.ModuleDict()
        # the differentiable surrogate of the combined score: statistics standardised on the calibration split
        self.register_buffer("surrogate_loc", torch.zeros(0, dtype=torch.float64))
        self.register_buffer("surrogate_scale", torch.ones(0, dtype=torch.float64))

    def fitted(self, name: str) -> bool:
        r"""Returns whether every part statistic `name` needs was fitted."""

        return all(p in self.parts for p in requirements([name])[1])

    def features(self, images: Tensor, names: Iterable[str], variance: Tensor | None = None) -> dict[str, Tensor]:
        r"""Returns the features that statistics `names` read, of raw cutouts :math:`(N, B, H, W)`
        (`variance`: their pixel variances, NaN where unknown, or None)."""

        feats = requirements(names)[0]
        missing = [p for f in feats for p in FEATURES[f].parts if p not in self.parts]
        if missing:
            raise KeyError(f"statistics {list(names)} need parts {sorted(set(missing))} this detector did not fit: "
                           f"fit one with them among its statistics")
        p = Pass(self, images, variance)
        return {f: FEATURES[f].compute(p) for f in feats}

    def derive(self, feats: dict[str, Tensor], names: Iterable[str]) -> dict[str, Tensor]:
        r"""Returns the named statistics, each :math:`(N,)`, from :meth:`features`."""

        out = {}
        for name in names:
            s = _REGISTRY[name]
            if not self.fitted(name):
                raise KeyError(f"statistic {name!r} was not fitted by this detector: fit one with it among its statistics")
            out[name] = s.compute(feats, self.parts)
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
    3. the parts the statistics need (:mod:`gsafe_models.registry`): residual noise models and a
       PCA basis on a sample, then latent densities, photometric references and the nulls of the
       residual summaries on the training split;
    4. per-object statistics;
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
                NaN = missing, or of pairs `(cutouts, variances)` (a survey's variance plane,
                NaN where unknown: the noise model then follows each pixel's depth; see
                :func:`~gsafe_models.training.unpack_batch`); called once per epoch and a few more times.
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
        sample, sample_variance = _take(train, config.normaliser_sample)
        if sample.ndim != 4:
            raise ValueError(f"Detector.fit: training batches have shape {sample.shape[1:]}, expected (B, H, W)")
        shape = tuple(int(s) for s in sample.shape[1:])
        bands = tuple(bands) if bands is not None else tuple(f"band{i}" for i in range(shape[0]))
        if len(bands) != shape[0]:
            raise ValueError(f"Detector.fit: {len(bands)} band names {bands} for cutouts with {shape[0]} bands")
        normaliser = BandNormaliser(shape[0], softening=config.softening).fit(sample, seed=config.seed)

        report({"stage": "representation"})
        if config.representation == "gan":  # WGAN-GP + encoder (gsafe_models.gan): its own two-stage training
            from .gan import EncodedWGAN, fit_gan

            net = EncodedWGAN(shape, config.latent_dim, config.channels)
            history = fit_gan(net, normaliser, train, val, epochs=config.epochs, device=device, seed=config.seed,
                              patience=config.patience, augment=config.augment, progress=progress)
        else:
            if config.representation == "vae":
                net = VAE(shape, config.latent_dim, config.beta, config.channels)
            else:
                net = AutoEncoder(shape, config.latent_dim, config.channels, contrastive=config.contrastive)
            history = fit_representation(
                net, normaliser, train, val,
                epochs=config.epochs, lr=config.lr, device=device, seed=config.seed,
                patience=config.patience, augment=config.augment, progress=progress, optimizer=config.optimizer,
            )

        detector = cls.assemble(normaliser, net, train, calib, config=config, bands=bands, device=device,
                                progress=progress, sample=(sample, sample_variance), val=val)
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
        sample: np.ndarray | tuple | None = None,
        val: BatchFactory | None = None,
    ) -> "Detector":
        r"""Builds a detector around a trained representation: fits the parts its statistics need
        on `train`, and calibrates on `calib`.

        :meth:`fit` calls it after training; call it directly to re-calibrate a trained
        representation with other statistics or another combination rule.

        Arguments:
            normaliser: A fitted :class:`~gsafe_models.normalise.BandNormaliser`.
            net: A trained representation.
            train: Batches of training cutouts (as in :meth:`fit`).
            calib: Batches of calibration cutouts.
            config: The settings; `statistics`, `combination`, `lam`, `gmm_components`,
                `flow_*`, `pca_components`, `chi_scales` and `noise_bins` are those used here.
            bands: The band names; default `band0`, `band1`...
            device: `"cuda"`, `"cpu"`..., or None for CUDA when present.
            progress: Called with `{"stage": ...}` as each stage starts.
            sample: The first training cutouts the sample parts are fitted on, or a pair
                `(cutouts, variances)` (default: the first `config.normaliser_sample` of `train`).
            val: Batches of held-out cutouts that neither the statistics' models nor the
                calibration see; `combination="exposure"` trains on them (at most
                :data:`EXPOSURE_SAMPLE`) and on perturbed copies of them. Other rules ignore it.
        """

        device = resolve_device(device)
        report = progress or (lambda event: None)
        bands = tuple(bands) if bands is not None else tuple(f"band{i}" for i in range(net.shape[0]))
        bundle = _Bundle(normaliser, net).to(device).eval()
        names = list(config.statistics)
        feats, parts = requirements(names)

        sample_parts = [p for p in parts if PARTS[p].sample]
        raw_sample = (_take(train, config.normaliser_sample) if sample is None else unpack_batch(sample)) if sample_parts else None
        keep_sample, keep_train = None, None
        for attempt in range(2 if config.fit_trim > 0 else 1):
            # attempt 1 (with fit_trim): the same fits on the objects the first fit found least anomalous
            if sample_parts:
                report({"stage": "noise model"})
                images, variance = raw_sample
                if keep_sample is not None:
                    images, variance = images[keep_sample], None if variance is None else variance[keep_sample]
                data = _sample_data(bundle, images, variance, device)
                for p in sample_parts:
                    bundle.parts[p] = PARTS[p].fit(bundle, data, config).to(device)
                del data, images, variance
                if (config.fit_trim <= 0 or keep_sample is not None) and not config.calibration_folds:
                    raw_sample = None  # not needed again: release it before the pass over the training split

            report({"stage": "latents"})
            f_train = _features_all(bundle, train, device, names)
            if len(next(iter(f_train.values()))) < 2:
                raise ValueError("Detector.fit: fewer than 2 training cutouts")
            fit_on = f_train if keep_train is None else {k: v[keep_train] for k, v in f_train.items()}

            report({"stage": "density"})
            for p in parts:
                if not PARTS[p].sample:
                    bundle.parts[p] = PARTS[p].fit(bundle, fit_on, config).to(device)
            del fit_on
            if config.fit_trim > 0 and attempt == 0:
                report({"stage": "fit trim"})
                with torch.no_grad():
                    S_first = _matrix(bundle.derive(f_train, names), names)
                    keep_train = _least_anomalous(S_first, S_first, config.fit_trim)
                    if raw_sample is not None:
                        S_sample = np.concatenate([_matrix(bundle.derive(bundle.features(x, names, v), names), names)
                                                   for x, v in _tensor_chunks(*raw_sample, device)])
                        keep_sample = _least_anomalous(S_sample, S_first, config.fit_trim)
                del S_first

        report({"stage": "calibration"})
        with torch.no_grad():
            S_train = _matrix(bundle.derive(f_train, names), names)
            S_calib = _matrix(bundle.derive(_features_all(bundle, calib, device, names), names), names)
        del f_train
        if len(S_calib) < 2:
            raise ValueError("Detector.fit: fewer than 2 calibration cutouts")
        n_split = len(S_calib)
        if config.calibration_folds:
            report({"stage": "cross-fitted calibration"})
            if raw_sample is None:  # no sample part: nothing fitted on the sample
                raw_sample = (np.zeros((0, *net.shape), np.float32), None)
            S_calib = np.concatenate([S_calib, _crossfit_statistics(bundle, train, raw_sample, config, names, device)])
            raw_sample = None
        S_fit, S_perturbed = S_train, None
        if config.combination == "exposure":
            report({"stage": "outlier exposure"})
            S_fit, S_perturbed = _exposure_statistics(bundle, val, config, names, device)
        test = CombinedTest(config.combination, seed=config.seed, trim=config.calibration_trim).fit(S_fit, S_calib, names, S_perturbed)

        # The differentiable surrogate of the combined score standardises each statistic on normal
        # data (median, IQR) of the calibration split.
        q25, q50, q75 = np.quantile(S_calib, [0.25, 0.5, 0.75], axis=0)
        bundle.surrogate_loc = torch.as_tensor(q50, dtype=torch.float64, device=device)
        bundle.surrogate_scale = torch.as_tensor(np.maximum(q75 - q25, 1e-12) / 1.349, dtype=torch.float64, device=device)

        diagnostics = _crossfit_check(S_fit, S_calib, names, config, S_perturbed)
        if S_perturbed is not None:  # the objects (and their perturbed copies) the exposure trees learned from
            diagnostics["exposure_n"] = int(len(S_fit))
        if config.calibration_folds:  # calibration objects beyond the calibration split: training objects, out of fold
            diagnostics["calibration_crossfit_n"] = int(len(S_calib) - n_split)
        if keep_train is not None:  # training objects the statistics' models were not fitted on
            diagnostics["fit_trimmed"] = int(len(S_train) - len(keep_train))
        # calibration values left out as outliers (anomalies among the "normal" objects)
        for name, cal in zip(names, test.calibrators):
            diagnostics[f"calibration_trimmed_{name}"] = cal.trimmed
        if test.combined is not None:
            diagnostics["calibration_trimmed_combined"] = test.combined.trimmed
        return cls(config, bundle, test, bands, [], diagnostics)

    # Scoring

    def _device(self) -> torch.device:
        return self._bundle.normaliser.sky.device

    def _chunks(self, images: np.ndarray) -> Iterator[Tensor]:
        for x, _ in self._pairs(images):
            yield x

    def _pairs(self, images: np.ndarray, variance: np.ndarray | None = None) -> Iterator[tuple[Tensor, Tensor | None]]:
        images = np.asarray(images)
        if images.ndim != 4 or tuple(images.shape[1:]) != self.image_shape:
            raise ValueError(f"Detector: images have shape {images.shape}, expected (N, {', '.join(map(str, self.image_shape))})")
        if variance is not None and np.shape(variance) != images.shape:
            raise ValueError(f"Detector: variances have shape {np.shape(variance)}, expected the images' {images.shape}")
        yield from _tensor_chunks(images, variance, self._device())

    @torch.no_grad()
    def encode(self, images: np.ndarray) -> np.ndarray:
        r"""Returns the latents :math:`(N, D)` of raw cutouts :math:`(N, B, H, W)`."""

        out = [self._bundle.net.encode(*self._bundle.normaliser(x)).float().cpu().numpy() for x in self._chunks(images)]
        return np.concatenate(out) if out else np.zeros((0, self._bundle.net.latent_dim), np.float32)

    @torch.no_grad()
    def describe(self, images: np.ndarray, variance: np.ndarray | None = None) -> np.ndarray:
        r"""Returns what kind of departure each raw cutout shows, :math:`(N, k)`: the multi-scale
        :math:`\chi` features of its residual (largest :math:`|\chi|`, inside the central aperture,
        mean :math:`\chi^2`, largest band-to-band difference, per smoothing scale), each in units of
        its spread on normal objects. The PCA residual's where the detector fitted it, else the
        autoencoder's; :math:`(N, 0)` where it fitted neither. The review groups look-alike
        candidates on these and the statistics (:func:`~gsafe_models.relevance.grouping_space`).
        """

        for feature, null, stat in (("chi_pca", "chi_null_pca", "chi_core_pca"), ("chi", "chi_null", "chi_core")):
            if self._bundle.fitted(stat):
                break
        else:
            return np.zeros((len(images), 0))
        out = [null_units(self._bundle.features(x, [stat], v)[feature], self._bundle.parts[null]).cpu().numpy()
               for x, v in self._pairs(images, variance)]
        return np.concatenate(out) if out else np.zeros((0, 0))

    @torch.no_grad()
    def reconstruct(self, images: np.ndarray) -> np.ndarray:
        r"""Returns the reconstructions of raw cutouts, :math:`(N, B, H, W)` float32 counts."""

        out = []
        for x in self._chunks(images):
            x_hat, _ = self._bundle.net(*self._bundle.normaliser(x))
            out.append(self._bundle.normaliser.inverse(x_hat).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, *self.image_shape), np.float32)

    @torch.no_grad()
    def statistics(self, images: np.ndarray, names: Iterable[str] | None = None,
                   variance: np.ndarray | None = None) -> dict[str, np.ndarray]:
        r"""Returns the raw per-object statistics of raw cutouts, one :math:`(N,)` float64 array each.

        Arguments:
            images: Raw cutouts :math:`(N, B, H, W)`, counts, NaN = missing.
            names: The statistics to compute (they must be fitted); default the detector's own.
            variance: The cutouts' pixel variances in counts squared (a survey's variance plane),
                same shape, NaN where unknown; or None. Used by the noise model where the
                detector was fitted with variances (see :class:`~gsafe_models.noise.ResidualNoise`).
        """

        names = list(self.statistic_names if names is None else names)
        unknown = [n for n in names if n not in STATISTICS]
        if unknown:
            raise KeyError(f"Detector.statistics: unknown statistics {unknown}; known: {STATISTICS}")
        for n in names:
            if not self._bundle.fitted(n):
                raise KeyError(f"statistic {n!r} was not fitted by this detector: fit one with it among its statistics")
        parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
        for x, v in self._pairs(images, variance):
            for n, s in self._bundle.derive(self._bundle.features(x, names, v), names).items():
                parts[n].append(s.double().cpu().numpy())
        return {n: np.concatenate(v) if v else np.zeros(0) for n, v in parts.items()}

    def score(self, images: np.ndarray, q_values: bool = True, variance: np.ndarray | None = None) -> dict[str, np.ndarray]:
        r"""Scores raw cutouts.

        Arguments:
            images: Raw cutouts :math:`(N, B, H, W)`, counts, NaN = missing.
            variance: Their pixel variances, as in :meth:`statistics`, or None.
            q_values: Add Benjamini-Hochberg q-values over these cutouts (leave out when scoring
                a survey chunk by chunk: q-values belong to the whole survey).

        Returns:
            `score` (continuous, larger = more anomalous), `p_value` (combined), `q_value`,
            and `stat_<name>` and `p_<name>` per statistic, each :math:`(N,)`.
        """

        raw = self.statistics(images, variance=variance)
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
            stats = bundle.derive(bundle.features(images, wanted), wanted)
            if statistic is not None:
                return stats[statistic]
            S = torch.stack([stats[n].to(torch.float64) for n in names], dim=1)
            u = (S - bundle.surrogate_loc.to(S)) / bundle.surrogate_scale.to(S)
            return u.mean(1).to(images.dtype)

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
            "parts": {k: m.config() for k, m in b.parts.items()},
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
        bundle = _Bundle(BandNormaliser(**payload["normaliser"]), build_representation(net_config))
        for name, c in payload["parts"].items():
            if name not in PARTS:
                raise ValueError(f"Detector.from_bytes: part {name!r} is unknown to this gsafe; retrain it (`gsafe train`) "
                                 f"or use the gsafe that made it")
            bundle.parts[name] = PARTS[name].build(**c)
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


@torch.no_grad()
def _sample_data(bundle: _Bundle, sample: np.ndarray, variance: np.ndarray | None, device: torch.device) -> dict[str, Tensor]:
    r"""The normalised sample the sample parts are fitted on: `x`, `mask`, `x_hat` :math:`(n, B, H, W)`,
    and `variance`, the raw pixel variances, when given."""

    xs, masks, hats = [], [], []
    for i in range(0, len(sample), _CHUNK):
        x, m = bundle.normaliser(torch.as_tensor(np.asarray(sample[i : i + _CHUNK], np.float32)).to(device))
        xs.append(x), masks.append(m), hats.append(bundle.net.decode(bundle.net.encode(x, m)))
    data = {"x": torch.cat(xs), "mask": torch.cat(masks), "x_hat": torch.cat(hats)}
    if variance is not None:
        data["variance"] = torch.as_tensor(np.asarray(variance, np.float32)).to(device)
    return data


def _tensor_chunks(images: np.ndarray, variance: np.ndarray | None, device: torch.device) -> Iterator[tuple[Tensor, Tensor | None]]:
    r"""Yields raw cutouts and their variances (or None) as float32 tensors on `device`, `_CHUNK` at a time."""
    for i in range(0, len(images), _CHUNK):
        yield (torch.as_tensor(np.asarray(images[i : i + _CHUNK], np.float32)).to(device),
               None if variance is None else torch.as_tensor(np.asarray(variance[i : i + _CHUNK], np.float32)).to(device))


def _least_anomalous(S: np.ndarray, reference: np.ndarray, trim: float) -> np.ndarray:
    r"""Returns the indices of the rows of `S` :math:`(n, k)` outside the most anomalous `trim` share:
    each statistic is ranked among the `reference` rows (the training objects), an object's
    anomaly is its largest rank over the statistics (a min-p rule, so one extreme statistic
    suffices), and the `trim` share with the largest are left out (NaN statistics rank last)."""

    S = np.nan_to_num(np.asarray(S, np.float64), nan=np.inf)
    ref = np.sort(np.nan_to_num(np.asarray(reference, np.float64), nan=np.inf), axis=0)
    ranks = np.stack([np.searchsorted(ref[:, j], S[:, j], side="right") for j in range(S.shape[1])], 1)
    worst = ranks.max(1) + 1e-9 * ranks.sum(1)  # ties broken by the other statistics
    n_drop = int(math.floor(trim * len(S)))
    return np.sort(np.argsort(worst, kind="stable")[: len(S) - n_drop])


def _take(factory: BatchFactory, n: int) -> tuple[np.ndarray, np.ndarray | None]:
    r"""Returns the first `n` cutouts a factory yields (fewer if it has fewer), and their variances
    (None unless every batch has them)."""

    parts, variances, held = [], [], 0
    for batch in factory():
        images, variance = unpack_batch(batch)
        parts.append(images[: n - held])
        variances.append(None if variance is None else variance[: n - held])
        held += len(parts[-1])
        if held >= n:
            break
    if not parts:
        raise ValueError("Detector.fit: the training factory yielded no batch")
    return np.concatenate(parts), None if any(v is None for v in variances) else np.concatenate(variances)


def _reservoir(factory: BatchFactory, n: int, seed: int) -> tuple[np.ndarray, np.ndarray | None]:
    r"""Returns `n` cutouts drawn uniformly from all those a factory yields, in one pass with at most `n`
    held (reservoir sampling, Vitter's algorithm R), and their variances (None unless every batch has
    them); all of them, in order, where it yields `n` or fewer. A large survey's first chunks are
    one part of the sky: a sample of the whole split is not."""

    rng = np.random.default_rng(seed)
    images, variances, seen, plain = None, None, 0, False
    for batch in factory():
        x, v = unpack_batch(batch)
        plain |= v is None
        if images is None:
            images = np.empty((n, *x.shape[1:]), np.float32)
            variances = np.full((n, *x.shape[1:]), np.nan, np.float32)
        for i in range(len(x)):
            j = seen if seen < n else int(rng.integers(0, seen + 1))
            if j < n:
                images[j] = x[i]
                if v is not None:
                    variances[j] = v[i]
            seen += 1
    if images is None:
        return np.zeros((0,), np.float32), None
    k = min(seen, n)
    return images[:k], None if plain else variances[:k]


@torch.no_grad()
def _features_all(bundle: _Bundle, factory: BatchFactory, device: torch.device, names: Iterable[str],
                  folds: int = 0) -> dict[str, Tensor] | tuple[dict[str, Tensor], np.ndarray]:
    r"""Runs :meth:`_Bundle.features` over every batch of a factory, `_CHUNK` cutouts at a time;
    with `folds`, also returns each cutout's fold (:func:`_content_folds`)."""

    parts: dict[str, list[Tensor]] = {}
    fold: list[np.ndarray] = []
    for batch in factory():
        batch, variance = unpack_batch(batch)
        if folds:
            fold.append(_content_folds(batch, folds))
        for i in range(0, len(batch), _CHUNK):
            x = torch.as_tensor(batch[i : i + _CHUNK]).to(device)
            var = None if variance is None else torch.as_tensor(variance[i : i + _CHUNK]).to(device)
            for k, v in bundle.features(x, names, var).items():
                parts.setdefault(k, []).append(v)
    if not parts:
        raise ValueError("Detector.fit: a batch factory yielded no batch")
    out = {k: torch.cat(v) for k, v in parts.items()}
    return (out, np.concatenate(fold)) if folds else out


def _content_folds(images: np.ndarray, folds: int) -> np.ndarray:
    r"""Deals cutouts :math:`(N, \dots)` into `folds` folds by a CRC-32 of their float32 pixels: the
    same cutout is in the same fold however the batches are ordered or shuffled."""

    x = np.ascontiguousarray(images, dtype=np.float32).reshape(len(images), -1)
    return np.array([zlib.crc32(row.tobytes()) % folds for row in x], dtype=np.int64)


def _crossfit_statistics(bundle: _Bundle, train: BatchFactory, sample: tuple[np.ndarray, np.ndarray | None],
                         config: DetectorConfig, names: list[str], device: torch.device) -> np.ndarray:
    r"""The statistics :math:`(n, k)` of every training object from models fitted without it: the
    training objects are dealt into `config.calibration_folds` folds (:func:`_content_folds`) and
    for each fold the statistics' parts are fitted on the other folds, the sample parts on the
    sample's objects of the other folds, around the same normaliser and representation."""

    _, parts = requirements(names)
    images, variance = sample
    sample_fold = _content_folds(images, config.calibration_folds)
    out = []
    for k in range(config.calibration_folds):
        b = _Bundle(bundle.normaliser, bundle.net).to(device).eval()
        keep = sample_fold != k
        if any(PARTS[p].sample for p in parts):
            data = _sample_data(b, images[keep], None if variance is None else variance[keep], device)
            for p in parts:
                if PARTS[p].sample:
                    b.parts[p] = PARTS[p].fit(b, data, config).to(device)
            del data
        feats, fold = _features_all(b, train, device, names, folds=config.calibration_folds)
        if not (fold == k).any():
            continue
        if (fold != k).sum() < 2:
            raise ValueError(f"Detector.fit: calibration_folds={config.calibration_folds} leaves fewer than 2 training "
                             f"cutouts outside fold {k}: use fewer folds")
        rest = {n: v[torch.as_tensor(fold != k, device=v.device)] for n, v in feats.items()}
        for p in parts:
            if not PARTS[p].sample:
                b.parts[p] = PARTS[p].fit(b, rest, config).to(device)
        del rest
        with torch.no_grad():
            out.append(_matrix(b.derive({n: v[torch.as_tensor(fold == k, device=v.device)] for n, v in feats.items()}, names), names))
    return np.concatenate(out) if out else np.zeros((0, len(names)))


@torch.no_grad()
def _exposure_statistics(bundle: _Bundle, val: BatchFactory | None, config: DetectorConfig, names: list[str],
                         device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    r"""The statistics of (at most :data:`EXPOSURE_SAMPLE`, drawn evenly from the whole split)
    validation cutouts, :math:`(n, k)`, and of
    their copies perturbed by each generic kind of :mod:`gsafe_models.perturb`, :math:`(7n, k)`: what
    `combination="exposure"` trains on. A kind's draws are seeded by `config.seed` and its index."""

    from .perturb import KINDS, band_noise, perturb

    if val is None:
        raise ValueError("Detector.fit: combination='exposure' trains on the validation split's cutouts and perturbed "
                         "copies of them, but no validation batches were given: pass `val`, or choose another combination")
    images, variance = _reservoir(val, EXPOSURE_SAMPLE, config.seed)
    if len(images) < 20:
        raise ValueError(f"Detector.fit: combination='exposure' trains on the validation split's cutouts and perturbed "
                         f"copies of them, but it holds {len(images)}: it needs 20 or more (a store of ~200 objects), or "
                         f"choose another combination")

    def matrix(x: np.ndarray) -> np.ndarray:
        return np.concatenate([_matrix(bundle.derive(bundle.features(a, names, v), names), names)
                               for a, v in _tensor_chunks(x, variance, device)])

    noise = band_noise(images)
    perturbed = [matrix(perturb(images, k, seed=1000 * config.seed + j, noise=noise)) for j, k in enumerate(KINDS)]
    return matrix(images), np.concatenate(perturbed)


def _matrix(stats: dict, names: list[str]) -> np.ndarray:
    r"""Stacks per-statistic arrays into :math:`(N, k)` float64, columns in `names` order."""

    cols = [s.detach().double().cpu().numpy() if isinstance(s, Tensor) else np.asarray(s, np.float64) for s in (stats[n] for n in names)]
    return np.stack(cols, axis=1)


def _crossfit_check(S_train: np.ndarray, S_calib: np.ndarray, names: list[str], config: DetectorConfig,
                    S_perturbed: np.ndarray | None = None) -> dict:
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
        t = CombinedTest(config.combination, seed=config.seed, trim=config.calibration_trim).fit(S_train, S_calib[fit_half], names, S_perturbed)
        pvals.append(t.pvalues(S_calib[test_half])["p_value"])
    p = np.concatenate(pvals)
    ks = sps.kstest(p, "uniform", alternative="greater")
    out["calibration_ks"] = float(ks.statistic)
    out["calibration_ks_p"] = float(ks.pvalue)
    out["calibration_fpr_05"] = float((p <= 0.05).mean())
    return out

