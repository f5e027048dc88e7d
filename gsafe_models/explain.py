"""Why an object is anomalous: residual images, pixel attributions, a LEX selector, neighbours, latent maps.

Every function takes callables, so it works with any detector:

- ``score_fn(images) -> (n,)``: a differentiable anomaly score of raw ``(n, B, H, W)`` cutouts;
- ``impute_fn(images) -> (n, B, H, W)``: the generative model's reconstruction (imputation) of the
  same cutouts, in the same units.

The attribution baseline is always the model's own imputation, never a black image: a black
galaxy cutout is itself wildly anomalous, so attributions against it explain "why is this not
empty sky" instead of "why is this not normal".
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

__all__ = [
    "ScoreFn",
    "ImputeFn",
    "METHODS",
    "fill_missing",
    "fill_from_baseline",
    "sample_imputation",
    "residual",
    "integrated_gradients",
    "occlusion",
    "LexSelector",
    "select_pixels",
    "latent_counterfactual",
    "counterfactual_function",
    "lex",
    "duplex",
    "nearest_neighbours",
    "latent_map",
    "whiten",
    "whitening",
    "explain",
]

ScoreFn = Callable[[Tensor], Tensor]
ImputeFn = Callable[[Tensor], Tensor]

METHODS = ("integrated_gradients", "occlusion", "lex", "residual", "duplex")


def fill_missing(images: Tensor, impute_fn: ImputeFn) -> tuple[Tensor, Tensor]:
    r"""Returns ``(filled, imputation)``: NaN (missing) pixels replaced by the model's imputation.

    Arguments:
        images: cutouts ``(n, B, H, W)``, NaN = missing pixel.
        impute_fn: the generative model's imputation of ``images``.

    Returns:
        ``filled`` ``(n, B, H, W)`` without NaN and the detached ``imputation`` ``(n, B, H, W)``.
        Attributions are then zero on missing pixels, where input and baseline agree.

    Example:
        >>> x = torch.ones(1, 1, 2, 2); x[0, 0, 0, 0] = float("nan")
        >>> fill_missing(x, lambda t: torch.zeros_like(t))[0][0, 0]
        tensor([[0., 1.],
                [1., 1.]])
    """
    images = torch.as_tensor(images, dtype=torch.float32)
    missing = torch.isnan(images)
    with torch.no_grad():
        imputation = impute_fn(images)
        if torch.isnan(imputation).any():  # an imputer that cannot take NaN itself
            imputation = impute_fn(torch.nan_to_num(images, nan=0.0))
    imputation = imputation.detach().to(images)
    filled = torch.where(missing, imputation, images) if missing.any() else images
    return filled, imputation


def fill_from_baseline(images: Tensor, baseline: Tensor) -> tuple[Tensor, Tensor]:
    r"""Returns detached ``(images, baseline)`` ``(n, B, H, W)``, NaN pixels of ``images`` from ``baseline``.

    Example:
        >>> x = torch.tensor([[[[float("nan"), 1.0]]]])
        >>> fill_from_baseline(x, torch.zeros_like(x))[0]
        tensor([[[[0., 1.]]]])
    """
    images = torch.as_tensor(images, dtype=torch.float32)
    baseline = torch.as_tensor(baseline).to(images).detach()
    if baseline.shape != images.shape:
        raise ValueError(f"baseline shape {tuple(baseline.shape)} != images {tuple(images.shape)}")
    return torch.where(torch.isnan(images), baseline, images).detach(), baseline


def sample_imputation(images: Tensor, imputation: Tensor) -> Tensor:
    r"""Returns a noisy imputation ``(n, B, H, W)``: the reconstruction plus Gaussian pixel noise.

    The noise level is the robust (MAD) scatter of the residual ``images - imputation`` per cutout
    and band, so an anomaly (a few pixels) hardly changes it. The reconstruction is the mean of
    the generative model's prediction; LEX imputes with samples of it (Senetaire et al., 2023).

    Example:
        >>> x = torch.randn(2, 3, 32, 32)
        >>> sample_imputation(x, torch.zeros_like(x)).std().round(decimals=1)
        tensor(1.)
    """
    residuals = (images - imputation).flatten(2)
    centre = residuals.median(dim=2, keepdim=True).values
    sigma = 1.4826 * (residuals - centre).abs().median(dim=2).values
    return imputation + sigma[..., None, None] * torch.randn_like(imputation)


def residual(images: Tensor, reconstruction: Tensor) -> Tensor:
    r"""Returns the residual image ``images - reconstruction`` ``(n, B, H, W)``, per band.

    Missing (NaN) input pixels stay NaN: there is nothing to compare there.

    Example:
        >>> residual(torch.ones(1, 2, 3, 3), torch.zeros(1, 2, 3, 3)).shape
        torch.Size([1, 2, 3, 3])
    """
    return torch.as_tensor(images, dtype=torch.float32) - torch.as_tensor(reconstruction).to(torch.float32)


def integrated_gradients(
    score_fn: ScoreFn,
    images: Tensor,
    baseline: Tensor,
    n_steps: int = 32,
    internal_batch_size: int | None = None,
) -> Tensor:
    r"""Integrated gradients of the anomaly score from ``baseline`` to ``images``, ``(n, B, H, W)``.

    Completeness holds: each map sums to ``score_fn(images) - score_fn(baseline)`` up to the
    quadrature error of ``n_steps`` Gauss-Legendre points.

    Arguments:
        score_fn: differentiable anomaly score ``(n, B, H, W) -> (n,)``.
        images: cutouts ``(n, B, H, W)``; NaN pixels are taken from ``baseline``.
        baseline: the model's imputation of ``images`` ``(n, B, H, W)``.
        n_steps: points on the straight path.
        internal_batch_size: cutouts per forward pass (default: all ``n * n_steps`` at once).

    References:
        | Axiomatic Attribution for Deep Networks (Sundararajan et al., 2017)
        | https://arxiv.org/abs/1703.01365

    Example:
        >>> f = lambda x: (x**2).flatten(1).sum(1)
        >>> integrated_gradients(f, torch.ones(1, 1, 2, 2), torch.zeros(1, 1, 2, 2)).sum().round()
        tensor(4.)
    """
    from captum.attr import IntegratedGradients

    images, baseline = fill_from_baseline(images, baseline)
    ig = IntegratedGradients(score_fn)
    attribution = ig.attribute(images, baselines=baseline, n_steps=n_steps, internal_batch_size=internal_batch_size)
    return attribution.detach()


def occlusion(
    score_fn: ScoreFn,
    images: Tensor,
    baseline: Tensor,
    window: int = 8,
    stride: int = 4,
    perturbations_per_eval: int = 16,
) -> Tensor:
    r"""Occlusion attribution ``(n, B, H, W)``: the score drop when a patch is imputed.

    A ``window x window`` patch (all bands together) slides with ``stride``; each pixel gets the
    mean of ``score(x) - score(x with the patch replaced by the imputation)`` over the patches
    covering it.

    Arguments:
        score_fn: anomaly score ``(n, B, H, W) -> (n,)`` (no gradient needed).
        images: cutouts ``(n, B, H, W)``; NaN pixels are taken from ``baseline``.
        baseline: the model's imputation of ``images`` ``(n, B, H, W)``.
        window: patch side, pixels (clipped to the cutout).
        stride: patch step, pixels.
        perturbations_per_eval: patches scored per forward pass.

    References:
        | Visualizing and Understanding Convolutional Networks (Zeiler & Fergus, 2014)
        | https://arxiv.org/abs/1311.2901

    Example:
        >>> f = lambda x: x.flatten(1).sum(1)
        >>> occlusion(f, torch.ones(1, 1, 8, 8), torch.zeros(1, 1, 8, 8), window=4, stride=4)[0, 0, 0, 0]
        tensor(16.)
    """
    from captum.attr import Occlusion

    images, baseline = fill_from_baseline(images, baseline)
    _, bands, height, width = images.shape
    window_h, window_w = min(window, height), min(window, width)
    with torch.no_grad():
        attribution = Occlusion(score_fn).attribute(
            images,
            sliding_window_shapes=(bands, window_h, window_w),
            strides=(bands, max(1, min(stride, window_h)), max(1, min(stride, window_w))),
            baselines=baseline,
            perturbations_per_eval=perturbations_per_eval,
        )
    return attribution.detach()


class LexSelector(nn.Module):
    r"""A LEX-style amortized explainer: a small conv net giving per-pixel keep-probabilities.

    Trained once per detector to keep the smallest set of pixels that preserves the anomaly score
    when every other pixel is replaced by the generative model's imputation,

    .. math:: \mathcal{L} = \frac{\left[s(x) - s(m \odot x + (1 - m) \odot \tilde{x})\right]_+^2}
              {\overline{(s(x) - s(\tilde{x}))^2}} + \lambda \, \overline{m},
              \quad m \sim \text{RelaxedBernoulli}(\sigma(g_\phi(x, x - \hat{x})))

    with :math:`\hat{x}` the reconstruction and :math:`\tilde{x}` a sample of the imputation
    (:func:`sample_imputation`). Departures from LEX's likelihood: the score is a scalar to
    preserve, so a squared error replaces the likelihood; only score *lost* counts (an anomaly
    explanation must keep what makes the object anomalous); the error is divided by the mean
    squared gap between cutouts and their imputations over the batches seen, so ``sparsity``
    :math:`\lambda` compares to a typical object's whole gap whatever the score's units. After
    training, explaining a cutout costs one forward pass: ``explain`` returns
    :math:`\sigma(g_\phi)` ``(n, H, W)``.

    It is the fast, weaker form of LEX: trained on a few hundred survey cutouts, mostly normal, it
    learns to keep the galaxy and ranks the outskirts, where trails, cosmic rays and neighbours
    lie, last (insertion AUC 0.46 against a random map's 0.64 in BENCHMARKS.md); :func:`lex`
    solves the same objective per cutout and is what ``explain("lex")`` uses.

    Arguments:
        bands: number of bands ``B``.
        hidden: channels of the hidden conv layers.
        use_imputation: feed the residual ``x - imputation`` next to ``x`` (the selector then
            needs the imputation in ``explain``; the dispatcher :func:`explain` passes it).
        temperature: relaxed Bernoulli temperature during training.
        straight_through: use a hard 0/1 mask forward and the relaxed one backward.

    References:
        | Explainability as statistical inference (Senetaire et al., 2023)
        | https://arxiv.org/abs/2212.03131
        | Generative Models and Applications for Safety in Machine Learning (Senetaire, PhD thesis, DTU, 2025)

    Example:
        >>> selector = LexSelector(bands=3)
        >>> x = torch.randn(2, 3, 16, 16)
        >>> selector.explain(x, imputation=torch.zeros_like(x)).shape
        torch.Size([2, 16, 16])
    """

    def __init__(
        self,
        bands: int,
        hidden: int = 16,
        use_imputation: bool = True,
        temperature: float = 0.5,
        straight_through: bool = True,
    ):
        super().__init__()
        self.bands = bands
        self.use_imputation = use_imputation
        self.straight_through = straight_through
        channels = 2 * bands if use_imputation else bands
        # Dilations 1, 2, 4 give a 15-pixel receptive field: enough to see a blob and its surroundings.
        self.net = nn.Sequential(
            nn.Conv2d(channels, hidden, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(hidden, hidden, 3, padding=2, dilation=2),
            nn.SiLU(),
            nn.Conv2d(hidden, hidden, 3, padding=4, dilation=4),
            nn.SiLU(),
            nn.Conv2d(hidden, 1, 1),
        )
        self.register_buffer("temperature", torch.tensor(float(temperature)))
        self.impute_fn: ImputeFn | None = None  # set by fit; not part of the state_dict

    def _features(self, images: Tensor, imputation: Tensor | None) -> Tensor:
        # Raw counts span decades: a robust per-cutout, per-band scale (MAD) and asinh tame them.
        flat = images.flatten(2)
        centre = flat.median(dim=2, keepdim=True).values
        mad = (flat - centre).abs().median(dim=2, keepdim=True).values
        scale = torch.maximum(1.4826 * mad, 1e-6 * flat.abs().amax(dim=2, keepdim=True) + 1e-12)
        centre, scale = centre[..., None], scale[..., None]
        features = [torch.asinh((images - centre) / scale)]
        if self.use_imputation:
            if imputation is None:
                raise ValueError(
                    "LexSelector.explain: this selector reads the residual; pass imputation= "
                    "(the detector's impute_function() of the cutouts) or fit it first"
                )
            features.append(torch.asinh((images - imputation) / scale))
        return torch.cat(features, dim=1)

    def forward(self, images: Tensor, imputation: Tensor | None = None) -> Tensor:
        r"""Returns keep-logits ``(n, H, W)`` of NaN-free cutouts ``(n, B, H, W)``."""
        return self.net(self._features(images, imputation))[:, 0]

    def fit(
        self,
        score_fn: ScoreFn,
        impute_fn: ImputeFn,
        batches: Callable[[], Iterable[Tensor]],
        epochs: int = 10,
        lr: float = 3e-3,
        sparsity: float = 1.0,
        seed: int = 0,
        impute_noise: bool = True,
    ) -> list[float]:
        r"""Trains the selector; returns the mean loss per epoch.

        Arguments:
            score_fn: differentiable anomaly score ``(n, B, H, W) -> (n,)``; its parameters are
                left untouched (gradients go to the selector only).
            impute_fn: the generative model's imputation ``(n, B, H, W) -> (n, B, H, W)``.
            batches: called once per epoch, yields cutout batches ``(b, B, H, W)`` (NaN allowed).
            epochs: passes over ``batches()``.
            lr: Adam learning rate.
            sparsity: :math:`\lambda`, the price of keeping every pixel, in units of the mean
                squared score gap: near 1, a normal cutout (whose gap is noise) keeps nothing.
            seed: seeds the weight initialization, the mask and imputation noise (the global RNG
                is untouched).
            impute_noise: fill hidden pixels with a sample, :func:`sample_imputation`, rather than
                the noise-free reconstruction. A reconstruction has no pixel noise, and a score
                that sees noise (a pixel residual does) then drops wherever sky is hidden: the
                selector would keep scattered sky pixels everywhere instead of the anomaly.
        """
        self.impute_fn = impute_fn
        device = self.temperature.device
        history = []
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            for module in self.net:
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
            # Start nearly empty (keep-probability 0.12): pixels are added where losing them costs score.
            nn.init.constant_(self.net[-1].bias, -2.0)
            optimizer = torch.optim.Adam(self.net.parameters(), lr=lr)
            self.train()
            gaps: list[float] = []
            for _ in range(epochs):
                losses = []
                for batch in batches():
                    x, imputation = fill_missing(torch.as_tensor(batch).to(device, torch.float32), impute_fn)
                    filler = sample_imputation(x, imputation) if impute_noise else imputation
                    with torch.no_grad():
                        target = score_fn(x)
                        gaps.append(float((target - score_fn(filler)).pow(2).mean()))
                        # the mean over all batches so far: one batch without anomalies has a tiny gap
                        scale = max(float(np.mean(gaps)), 1e-12)
                    mask = self._sample_mask(self(x, imputation))[:, None]
                    kept = mask * x + (1 - mask) * filler
                    # One-sided: only score lost counts. A normal cutout scores like its imputation
                    # up to noise, and half of that noise now costs nothing, so its mask can go empty.
                    fidelity = (target - score_fn(kept)).clamp_min(0).pow(2).mean() / scale
                    loss = fidelity + sparsity * mask.mean()
                    optimizer.zero_grad()
                    loss.backward(inputs=list(self.net.parameters()))
                    optimizer.step()
                    losses.append(float(loss.detach()))
                history.append(float(np.mean(losses)) if losses else float("nan"))
        self.eval()
        return history

    def _sample_mask(self, logits: Tensor) -> Tensor:
        soft = torch.distributions.RelaxedBernoulli(self.temperature, logits=logits).rsample()
        if not self.straight_through:
            return soft
        hard = (soft > 0.5).to(soft)
        return hard + soft - soft.detach()

    @torch.no_grad()
    def explain(self, images: Tensor, imputation: Tensor | None = None) -> Tensor:
        r"""Returns keep-probabilities ``(n, H, W)`` in one forward pass.

        Arguments:
            images: cutouts ``(n, B, H, W)``, NaN = missing.
            imputation: the model's imputation ``(n, B, H, W)``; computed with the ``impute_fn``
                given to ``fit`` when omitted.
        """
        images = torch.as_tensor(images, dtype=torch.float32).to(self.temperature.device)
        if imputation is None and self.use_imputation and self.impute_fn is not None:
            images, imputation = fill_missing(images, self.impute_fn)
        elif imputation is not None:
            imputation = torch.as_tensor(imputation).to(images)
            images = torch.where(torch.isnan(images), imputation, images)
        else:
            images = torch.nan_to_num(images, nan=0.0)
        return torch.sigmoid(self(images, imputation))


def select_pixels(
    score_fn: ScoreFn,
    images: Tensor,
    filler: Tensor,
    *,
    sparsity: Iterable[float] = (0.1, 0.3, 1.0),
    steps: int = 60,
    lr: float = 0.2,
    two_sided: bool = True,
    init_logits: Tensor | None = None,
    temperature: float = 0.5,
    seed: int = 0,
) -> Tensor:
    r"""Returns the per-pixel importance ``(n, H, W)`` in ``[0, 1]`` of a selection optimised for each cutout.

    The LEX objective (Senetaire et al. 2023) solved per instance, not amortized: a keep-mask
    :math:`m \sim \text{RelaxedBernoulli}(\sigma(\ell))` over pixels (all bands together) with
    free logits :math:`\ell` per cutout, minimising

    .. math:: \frac{[s(x) - s(m \odot x + (1 - m) \odot \tilde x)]_+^2
              + [s((1 - m) \odot x + m \odot \tilde x) - s(\tilde x)]_+^2}{(s(x) - s(\tilde x))^2}
              + \lambda\, \overline{m}

    with :math:`\tilde x` the `filler` (a sample of the imputation for LEX, the counterfactual
    for DupLEX): the kept pixels alone carry the score (the first term, LEX's), and taking them
    away leaves a normal object (the second, DupLEX's "duplicate" the other way round; dropped
    with `two_sided=False`). Each object's error is in units of its own squared gap, so
    :math:`\lambda` compares to its whole departure. One :math:`\lambda` gives a set, not a
    ranking: the map is the mean keep-probability over the `sparsity` levels, so pixels needed
    even when pixels are expensive rank first (as the areas of extremal perturbations, Fong et
    al. 2019).

    Arguments:
        score_fn: Differentiable anomaly score ``(n, B, H, W) -> (n,)`` (its parameters untouched).
        images: NaN-free cutouts ``(n, B, H, W)``.
        filler: What hidden pixels become, same shape.
        sparsity: The levels :math:`\lambda`.
        steps: Adam steps per level.
        lr: Adam's learning rate on the logits.
        two_sided: Add the removal term.
        init_logits: Starting logits ``(n, H, W)`` (e.g. an amortized selector's); default
            :math:`-2` everywhere (keep-probability 0.12).
        temperature: Of the relaxed Bernoulli.
        seed: Seeds the masks (the global RNG is untouched).

    References:
        | Explainability as statistical inference (Senetaire et al., 2023) https://arxiv.org/abs/2212.03131
        | Understanding Deep Networks via Extremal Perturbations and Smooth Masks (Fong et al., 2019)
        | https://arxiv.org/abs/1910.08485

    Example:
        >>> f = lambda x: x[:, :, :2, :2].flatten(1).sum(1)  # only the top-left 2x2 matters
        >>> m = select_pixels(f, torch.ones(1, 1, 4, 4), torch.zeros(1, 1, 4, 4), steps=40)
        >>> bool(m[0, :2, :2].min() > m[0, 2:, 2:].max())
        True
    """
    images = torch.as_tensor(images, dtype=torch.float32)
    filler = torch.as_tensor(filler).to(images).detach()
    n, _, height, width = images.shape
    levels = [float(v) for v in sparsity]
    out = torch.zeros(n, height, width, device=images.device)
    with torch.random.fork_rng(devices=[images.device] if images.device.type == "cuda" else []):
        torch.manual_seed(seed)
        with torch.no_grad():
            s_x, s_f = score_fn(images).detach(), score_fn(filler).detach()
            gap2 = (s_x - s_f).square().clamp_min(1e-12)
        relaxed = torch.distributions.RelaxedBernoulli
        for level in levels:
            start = torch.full((n, height, width), -2.0, device=images.device) if init_logits is None else init_logits
            logits = start.detach().clone().to(images.device).requires_grad_(True)
            opt = torch.optim.Adam([logits], lr=lr)
            for _ in range(int(steps)):
                soft = relaxed(torch.tensor(temperature, device=images.device), logits=logits).rsample()
                m = ((soft > 0.5).to(soft) + soft - soft.detach())[:, None]  # straight-through
                kept = m * images + (1 - m) * filler
                loss = (s_x - score_fn(kept)).clamp_min(0).square() / gap2
                if two_sided:
                    removed = (1 - m) * images + m * filler
                    loss = loss + (score_fn(removed) - s_f).clamp_min(0).square() / gap2
                total = loss.mean() + level * m.mean()
                opt.zero_grad()
                total.backward(inputs=[logits])
                opt.step()
            out += torch.sigmoid(logits.detach())
    return out / max(len(levels), 1)


def latent_counterfactual(
    x: Tensor,
    mask: Tensor,
    encode: Callable[[Tensor, Tensor], Tensor],
    decode: Callable[[Tensor], Tensor],
    noise: Tensor,
    prior: Callable[[Tensor], Tensor] | None = None,
    scale: Tensor | None = None,
    steps: int = 100,
    lr: float = 0.05,
    dof: float = 2.0,
) -> Tensor:
    r"""Returns the normal object closest to each cutout in the generative model's eyes, ``(n, B, H, W)``.

    A maximum a posteriori latent, :math:`z^* = \arg\min_z \sum_{pixels} \rho_\nu((x - G(z)) / \sigma)
    + U(z)`, started from the encoder's :math:`z`, decoded: :math:`\rho_\nu` is the negative
    log-likelihood of a Student-t of :math:`\nu` degrees of freedom (pixels the model cannot make
    normal, the anomaly, cost little: they no longer pull :math:`z` as a squared error does) and
    :math:`U` the latent prior's energy (the EBM's, or :math:`-\log p` of a GMM). This is the
    counterfactual of DupLEX (Senetaire 2025): what the object would look like were it normal.
    Works in normalised units; the generator and the prior are frozen.

    Arguments:
        x: Normalised cutouts ``(n, B, H, W)``.
        mask: 1 = valid pixel, same shape.
        encode: ``(x, mask) -> z (n, D)``.
        decode: ``z -> (n, B, H, W)``.
        noise: The pixel noise :math:`\sigma` per band ``(B,)``, normalised units.
        prior: ``z -> (n,)`` energy :math:`U`, or None (a flat prior: a robust reconstruction).
        scale: Per-latent step scale ``(D,)`` (e.g. the latents' spread), or None.
        steps: Adam steps on :math:`z`.
        lr: Adam's learning rate, in units of `scale`.
        dof: :math:`\nu`.

    Example:
        >>> dec = lambda z: z[:, :, None, None].expand(-1, 1, 2, 2)
        >>> x = torch.full((1, 1, 2, 2), 1.0); x[0, 0, 0, 0] = 50.0  # one wild pixel
        >>> cf = latent_counterfactual(x, torch.ones_like(x), lambda x, m: torch.zeros(1, 1), dec, torch.ones(1), lr=0.1, steps=200)
        >>> round(float(cf[0, 0, 1, 1]), 1)  # the fit follows the three normal pixels
        1.0
    """
    with torch.no_grad():
        z0 = encode(x, mask).detach()
    s = torch.ones_like(z0[0]) if scale is None else torch.as_tensor(scale).to(z0)
    u = torch.zeros_like(z0, requires_grad=True)
    opt = torch.optim.Adam([u], lr=lr)
    sigma = torch.as_tensor(noise).to(x).view(1, -1, 1, 1)
    for _ in range(int(steps)):
        z = z0 + s * u
        r = (x - decode(z)) / sigma
        nll = (0.5 * (dof + 1) * torch.log1p(r.square() / dof) * mask).flatten(1).sum(1)
        if prior is not None:
            nll = nll + prior(z)
        opt.zero_grad()
        nll.sum().backward(inputs=[u])
        opt.step()
    with torch.no_grad():
        return decode(z0 + s * u)


def counterfactual_function(detector, steps: int = 100, lr: float = 0.05) -> ImputeFn:
    r"""Returns ``images -> counterfactual`` ``(n, B, H, W)`` in counts, for a fitted
    :class:`~gsafe_models.detector.Detector`: :func:`latent_counterfactual` with its normaliser,
    network and latent prior (its energy-based model if it has one, else its GMM or flow, else
    none), steps in units of the prior's latent spread when it has one.
    """
    bundle = detector._bundle
    norm, net, parts = bundle.normaliser, bundle.net, bundle.parts
    prior, scale = None, None
    if "ebm" in parts:
        prior, scale = (lambda z: parts["ebm"].energy(z)), parts["ebm"].std
    elif "gmm" in parts:
        prior = lambda z: -parts["gmm"].log_prob(z.double()).to(z.dtype)  # noqa: E731
    elif "flow" in parts:
        prior, scale = (lambda z: -parts["flow"].log_prob(z)), parts["flow"].std

    def fn(images: Tensor) -> Tensor:
        device = norm.sky.device
        images = torch.as_tensor(images, dtype=torch.float32).to(device)
        x, mask = norm(images)
        frozen = [p.requires_grad for p in bundle.parameters()]
        for p in bundle.parameters():
            p.requires_grad_(False)
        try:
            with torch.enable_grad():
                cf = latent_counterfactual(x, mask, net.encode, net.decode, norm.unit_noise, prior, scale, steps, lr)
        finally:
            for p, f in zip(bundle.parameters(), frozen):
                p.requires_grad_(f)
        return norm.inverse(cf).detach()

    return fn


def _selected_edit(score_fn: ScoreFn, images: Tensor, reference: Tensor, two_sided: bool, **kwargs) -> Tensor:
    r"""``p * (images - reference)`` ``(n, B, H, W)``: the part of each cutout's departure from
    `reference` that the selection of :func:`select_pixels` (against a noisy sample of
    `reference`, :func:`sample_imputation`) keeps; `p` its keep-probability per pixel."""
    seed = int(kwargs.pop("seed", 0))
    with torch.random.fork_rng(devices=[images.device] if images.device.type == "cuda" else []):
        torch.manual_seed(seed)
        filler = sample_imputation(images, reference)
    keep = select_pixels(score_fn, images, filler, two_sided=two_sided, seed=seed, **kwargs)
    return keep[:, None] * (images - reference)


def lex(score_fn: ScoreFn, images: Tensor, imputation: Tensor, **kwargs) -> Tensor:
    r"""LEX per instance: returns ``(n, B, H, W)``, the selected part of each cutout's departure from
    the generative model's imputation.

    The LEX objective (:func:`select_pixels`, one-sided: the kept pixels alone carry the score
    when every other pixel is a sample of the imputation) solved for each cutout, times
    ``images - imputation``: as integrated gradients multiply the input's departure from the
    baseline by the gradient, the map multiplies it by the selection, so the pixels no selection
    needed still rank by how far they depart, and a band's sign says excess or deficit.
    An amortized :class:`LexSelector` explains in one pass but ranks worse (BENCHMARKS.md: trained
    on a few hundred survey cutouts, mostly normal, it learns to keep the galaxy and ranks the
    outskirts, where trails, cosmic rays and neighbours lie, last).

    Arguments:
        score_fn: Differentiable anomaly score ``(n, B, H, W) -> (n,)``.
        images: NaN-free cutouts ``(n, B, H, W)``.
        imputation: The generative model's imputation, same shape.
        kwargs: Passed to :func:`select_pixels` (``sparsity``, ``steps``, ``seed``...).

    References:
        | Explainability as statistical inference (Senetaire et al., 2023) https://arxiv.org/abs/2212.03131

    Example:
        >>> f = lambda x: x[:, :, :2, :2].flatten(1).sum(1)
        >>> a = lex(f, torch.ones(1, 1, 4, 4), torch.zeros(1, 1, 4, 4), steps=40)
        >>> a.shape, bool(a[0, 0, :2, :2].min() > a[0, 0, 2:, 2:].max())
        (torch.Size([1, 1, 4, 4]), True)
    """
    images = torch.as_tensor(images, dtype=torch.float32)
    imputation = torch.as_tensor(imputation).to(images).detach()
    return _selected_edit(score_fn, images, imputation, two_sided=False, **kwargs)


def duplex(
    score_fn: ScoreFn,
    counterfactual_fn: ImputeFn,
    images: Tensor,
    **kwargs,
) -> tuple[Tensor, Tensor]:
    r"""DupLEX: returns ``(attribution (n, B, H, W), counterfactual (n, B, H, W))``.

    The counterfactual is what the object would look like were it normal
    (:func:`counterfactual_function`). The selection is two-sided (:func:`select_pixels` against
    a noisy sample of the counterfactual): the fewest pixels that carry the anomaly score into the
    counterfactual (the "duplicate"), and whose removal leaves the object normal. The attribution
    is the selected edit ``p * (images - counterfactual)``: what would have to change, and where,
    for the object to be normal.

    Arguments:
        score_fn: Differentiable anomaly score ``(n, B, H, W) -> (n,)``.
        counterfactual_fn: ``(n, B, H, W) -> (n, B, H, W)``, e.g. :func:`counterfactual_function`.
        images: Cutouts ``(n, B, H, W)``; NaN pixels are taken from the counterfactual.
        kwargs: Passed to :func:`select_pixels`.

    References:
        | Generative Models and Applications for Safety in Machine Learning (Senetaire, PhD thesis, DTU, 2025)

    Example:
        >>> f = lambda x: x[:, :, :2, :2].flatten(1).sum(1)
        >>> attr, cf = duplex(f, lambda x: torch.zeros_like(x), torch.ones(1, 1, 4, 4), steps=40)
        >>> attr.shape, cf.shape
        (torch.Size([1, 1, 4, 4]), torch.Size([1, 1, 4, 4]))
    """
    images = torch.as_tensor(images, dtype=torch.float32)
    counterfactual = counterfactual_fn(images).detach().to(images)
    images = torch.where(torch.isnan(images), counterfactual, images)
    return _selected_edit(score_fn, images, counterfactual, two_sided=True, **kwargs), counterfactual


def nearest_neighbours(z_query: Tensor, z_bank: Tensor, k: int, block: int = 4096) -> tuple[Tensor, Tensor]:
    r"""Returns ``(idx (m, k), dist (m, k))``: the ``k`` closest rows of ``z_bank`` to each query.

    Euclidean distance, ascending; ``torch.cdist`` in blocks of ``block`` rows of both sides, so
    memory stays ``O(block^2)`` for a bank of millions of latents.

    Arguments:
        z_query: latents ``(m, D)``.
        z_bank: latents ``(n, D)``, e.g. the training (normal) objects.
        k: neighbours per query (at most ``n``).

    Example:
        >>> idx, dist = nearest_neighbours(torch.zeros(1, 2), torch.tensor([[3.0, 4.0], [1.0, 0.0]]), k=1)
        >>> idx, dist
        (tensor([[1]]), tensor([[1.]]))
    """
    z_query = torch.as_tensor(z_query, dtype=torch.float32)
    z_bank = torch.as_tensor(z_bank, dtype=torch.float32).to(z_query.device)
    if not 0 < k <= len(z_bank):
        raise ValueError(f"nearest_neighbours: k={k} with a bank of {len(z_bank)} latents")
    all_idx, all_dist = [], []
    for q0 in range(0, len(z_query), block):
        q = z_query[q0 : q0 + block]
        best_dist = torch.full((len(q), 0), float("inf"), device=q.device)
        best_idx = torch.zeros((len(q), 0), dtype=torch.long, device=q.device)
        for b0 in range(0, len(z_bank), block):
            d = torch.cdist(q, z_bank[b0 : b0 + block])
            cand_dist = torch.cat([best_dist, d], dim=1)
            cand_idx = torch.cat([best_idx, torch.arange(b0, b0 + d.shape[1], device=q.device).expand(len(q), -1)], dim=1)
            best_dist, order = cand_dist.topk(min(k, cand_dist.shape[1]), dim=1, largest=False)
            best_idx = cand_idx.gather(1, order)
        all_idx.append(best_idx)
        all_dist.append(best_dist)
    return torch.cat(all_idx), torch.cat(all_dist)


#: The projections :func:`latent_map` draws.
LATENT_MAPS: tuple[str, ...] = ("tsne", "umap", "pca")


def whitening(z: np.ndarray, power: float = 0.25, floor: float = 1e-4) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r"""Returns `(mean, axes, divisors)`, the principal axes ``(k, D)`` of latents ``(n, D)`` and
    divisors ``(k,)`` such that ``((z - mean) @ axes.T) / divisors`` has spreads
    :math:`(s_i / s_0)^{power}` (:math:`s` the singular values; the first has unit spread;
    0: whitened, 1: as they are); components whose singular value is below `floor` times the
    largest are dropped as numerical noise (one is kept).

    Example:
        >>> mean, axes, div = whitening(np.random.default_rng(0).normal(size=(100, 3)))
        >>> axes.shape, div.shape
        ((3, 3), (3,))
    """

    z = np.asarray(z, np.float64)
    mean = z.mean(axis=0)
    _, s, vt = np.linalg.svd(z - mean, full_matrices=False)
    if not len(s) or s[0] <= 0:
        return mean, np.eye(z.shape[1])[:1], np.ones(1)
    keep = s > floor * s[0]
    # a score u_i s_i has spread s_i / sqrt(n); divided by this, its spread is (s_i / s_0) ** power
    return mean, vt[keep], s[keep] / np.sqrt(len(z)) / (s[keep] / s[0]) ** power


def whiten(z: np.ndarray, power: float = 0.25, floor: float = 1e-4) -> np.ndarray:
    r"""Latents ``(n, D)`` as principal-component scores whose spreads are the singular values to
    the `power` (see :func:`whitening`), float64, at least two columns.

    Example:
        >>> z = np.random.default_rng(0).normal(size=(500, 2)) * [100.0, 1.0]
        >>> w = whiten(z)
        >>> round(float(w[:, 1].std() / w[:, 0].std()), 1)  # (1 / 100) ** 0.25
        0.3
    """

    mean, axes, divisors = whitening(z, power, floor)
    out = ((np.asarray(z, np.float64) - mean) @ axes.T) / divisors
    return np.pad(out, ((0, 0), (0, max(0, 2 - out.shape[1]))))


def latent_map(z: Tensor, seed: int = 0, n_neighbors: int = 15, method: str = "tsne") -> Tensor:
    r"""Returns a 2-D map ``(n, 2)`` of latents ``(n, D)``: t-SNE (scikit-learn's Barnes-Hut,
    perplexity 30 or less for small `n`), UMAP, or PCA; PCA whatever `method` when ``n < 15``.

    t-SNE by default: ~5 s for 2 000 latents on 2 cores, where UMAP spends ~30 s compiling
    numba code in every new process (a gallery per hunt pays it each time); both keep local
    neighbourhoods, so candidates far from every normal object stand apart on either. Both see
    the latents partly whitened (:func:`whiten`: principal components with spreads the fourth
    roots of their singular values; those below :math:`10^{-4}` of the largest dropped as
    numerical noise): an autoencoder's latents can hold nearly all their variance along one
    direction (99.99 % for the demo's model), and as they are, either map draws the survey as a
    thin string ordered along it (with square roots, still a thick one); fully whitened, a
    direction that separates groups weighs no more than noise.

    References:
        | Visualizing Data using t-SNE (van der Maaten & Hinton, 2008)
        | https://jmlr.org/papers/v9/vandermaaten08a.html
        | UMAP: Uniform Manifold Approximation and Projection (McInnes et al., 2018)
        | https://arxiv.org/abs/1802.03426

    Arguments:
        z: Latents ``(n, D)``.
        seed: Seeds t-SNE's or UMAP's optimisation.
        n_neighbors: UMAP's neighbourhood size.
        method: One of :data:`LATENT_MAPS`.

    Example:
        >>> latent_map(torch.randn(10, 4)).shape
        torch.Size([10, 2])
    """

    if method not in LATENT_MAPS:
        raise ValueError(f"latent_map: method={method!r}, expected one of {LATENT_MAPS}")
    z = np.asarray(torch.as_tensor(z, dtype=torch.float32).cpu())
    n = len(z)
    if n < 15 or method == "pca":
        centred = z - z.mean(axis=0)
        _, _, vt = np.linalg.svd(centred, full_matrices=False) if n > 1 else (None, None, np.eye(z.shape[1]))
        xy = centred @ vt[:2].T
        if xy.shape[1] < 2:
            xy = np.pad(xy, ((0, 0), (0, 2 - xy.shape[1])))
        return torch.as_tensor(xy, dtype=torch.float32)
    z = whiten(z)
    if method == "tsne":
        from sklearn.manifold import TSNE

        xy = TSNE(2, perplexity=min(30.0, (n - 1) / 3), init="pca", random_state=seed).fit_transform(z)
        return torch.as_tensor(np.asarray(xy), dtype=torch.float32)
    import umap  # numba start-up costs seconds: only pay it when a map is drawn

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "n_jobs overridden by random_state" and numba chatter
        reducer = umap.UMAP(n_components=2, n_neighbors=min(n_neighbors, n - 1), random_state=seed)
        xy = reducer.fit_transform(z)
    return torch.as_tensor(np.asarray(xy), dtype=torch.float32)


def explain(
    method: str,
    score_fn: ScoreFn,
    impute_fn: ImputeFn,
    images: Tensor,
    selector: LexSelector | None = None,
    *,
    n_steps: int = 32,
    window: int = 8,
    stride: int = 4,
    counterfactual_fn: ImputeFn | None = None,
) -> Tensor:
    r"""One entry point to every method; returns ``(n, B, H, W)`` (``(n, H, W)`` for ``"lex"`` with an amortized `selector`).

    Arguments:
        method: one of ``"integrated_gradients"``, ``"occlusion"``, ``"lex"``, ``"residual"``, ``"duplex"``.
        score_fn: differentiable anomaly score ``(n, B, H, W) -> (n,)``.
        impute_fn: the generative model's imputation ``(n, B, H, W) -> (n, B, H, W)``.
        images: cutouts ``(n, B, H, W)``, NaN = missing (imputed first).
        selector: a fitted :class:`LexSelector`: ``"lex"`` then returns its amortized keep-probabilities
            (one forward pass, weaker; BENCHMARKS.md) instead of the per-instance :func:`lex`.
        n_steps: integrated-gradients path points.
        window, stride: occlusion patch side and step, pixels.
        counterfactual_fn: the generative model's counterfactual ``(n, B, H, W) -> (n, B, H, W)``,
            needed for ``"duplex"`` (:func:`counterfactual_function` of a detector).

    Example:
        >>> f = lambda x: x.flatten(1).sum(1)
        >>> explain("residual", f, torch.zeros_like, torch.ones(2, 3, 8, 8)).shape
        torch.Size([2, 3, 8, 8])
    """
    if method not in METHODS:
        raise ValueError(f"explain: unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if method == "duplex":
        if counterfactual_fn is None:
            raise ValueError("explain: method 'duplex' needs counterfactual_fn= (gsafe_models.explain.counterfactual_function(detector))")
        return duplex(score_fn, counterfactual_fn, images)[0]
    images, imputation = fill_missing(images, impute_fn)
    if method == "residual":
        return residual(images, imputation)
    if method == "integrated_gradients":
        return integrated_gradients(score_fn, images, imputation, n_steps=n_steps)
    if method == "occlusion":
        return occlusion(score_fn, images, imputation, window=window, stride=stride)
    if selector is None:
        return lex(score_fn, images, imputation)
    return selector.explain(images, imputation)
