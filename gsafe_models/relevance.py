"""The scientist in the loop: what this scientist finds interesting, which candidates to show next, and
which candidates look alike.

Four small pieces, arrays in and arrays out:

- :class:`FeatureSpace`: the detector's own features of an object, its latents ``z`` (``Detector.encode``)
  and its raw statistics (the score table's ``stat_*``), robustly standardised, the two views given
  equal weight, and projected on their leading principal components;
- :func:`group_candidates`: groups of similar candidates (HDBSCAN clusters of what kind of departure
  they show, :func:`grouping_space`), so the review shows one representative per group before "n
  more like this";
- :class:`RelevanceModel`: a Gaussian process regression of the scientist's relevance (0..1) on
  the features, with a predictive uncertainty (as in Astronomaly: Protege);
- :func:`plan_review`: the review order of the candidate pool (the most anomalous objects by
  p-value), by the expected relevance and its uncertainty, with the groups; and
  :class:`KnownGroups`, the labelled artefact groups a later hunt recognises.

The query strategy (why it is what it is). The candidates are the review pool: the most anomalous
objects by p-value (the calibrated test decides who is a candidate). Within the pool, each
candidate's place is its *upper confidence bound* of relevance, weighted by its anomaly evidence::

    priority = max(mu + kappa * sigma, 0) * (1 - rank / N),    kappa = 1,   ties by p-value

with ``rank`` the candidate's place in the pool's p-value order (0 = most anomalous).

``mu`` (expected relevance) brings objects like those the scientist called interesting;
``sigma`` (the GP's uncertainty) brings objects unlike anything labelled yet, so that a scientist
who liked lenses early still meets the mergers nobody labelled: a pure ``mu`` ranking would show
more of the first kind forever. Upper-confidence-bound selection is the standard way to trade the
two (GP-UCB, Srinivas et al. 2010); ``kappa = 1`` is a one-sigma bound, not tuned. With no label
yet ``mu = 0`` and ``sigma`` is the same everywhere, so the order is the anomaly order. The
evidence weight keeps the anomaly test in the order once labels arrive, as Astronomaly multiplies
its anomaly score by the learned relevance: without it, after ten artefact labels (relevance 0
everywhere, the uncertainty largest far from them) the top 24 of `bench/active.py`'s surveys held
4 anomalies and 20 of the pool's least anomalous, normal objects; with it 24 and 23 anomalies of 8
and 7 classes (chosen on that count; the interesting classes were not used). (A first
version weighted the bound by ``1 - q``; BH q-values reach 1 a few dozen objects past the
discoveries, which froze the order into the p-value order: ranks do not saturate.)
Groups with no labelled member show their best member first and the rest after every first-shown
representative ("n more like this"); labelling a representative as artefact can suppress its whole
group.

What the p- and q-values still mean: nothing here changes them. The re-ranking re-orders what a
person looks at; the false-discovery statement is about the list ``q <= alpha``, which is the same
list whatever the order.

References:
    | Astronomaly: Personalised active anomaly detection in astronomical data (Lochner & Bassett, 2021)
    | https://arxiv.org/abs/2010.11202
    | Astronomaly Protege: Discovery through human-machine collaboration (Lochner & Rudnick, 2024)
    | https://arxiv.org/abs/2411.04188
    | Gaussian process optimization in the bandit setting (Srinivas et al., 2010)
    | https://arxiv.org/abs/0912.3995
    | Accelerated hierarchical density clustering, HDBSCAN (McInnes & Healy, 2017)
    | https://arxiv.org/abs/1705.07321
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import median_abs_deviation

__all__ = ["LABELS", "relevance_target", "FeatureSpace", "grouping_space", "grouping_fit", "grouping_transform", "group_candidates", "RelevanceModel",
           "ReviewPlan", "plan_review", "KnownGroups", "KAPPA", "MAX_GROUP"]

LABELS: tuple[str, ...] = ("interesting", "not_interesting", "artefact")
KAPPA = 1.0          # one-sigma upper confidence bound: exploration weight of the query strategy
MAX_COMPONENTS = 16  # principal components kept of the feature space
MAX_GROUP = 25       # most candidates in one group of look-alikes (see group_candidates)


def relevance_target(label: str, relevance: float | int | None = None) -> float:
    """The scientist's relevance of one labelled object on 0..1: Astronomaly's 0-5 score divided by 5
    when given (a negative or NaN relevance means "not given"), else 1 for interesting and 0 for
    not interesting or artefact.

    Example:
        >>> relevance_target("interesting"), relevance_target("interesting", 3), relevance_target("artefact")
        (1.0, 0.6, 0.0)
    """
    if label not in LABELS:
        raise ValueError(f"relevance: label {label!r} is not one of {', '.join(LABELS)}")
    if relevance is not None and np.isfinite(relevance) and relevance >= 0:
        if relevance > 5:
            raise ValueError(f"relevance: {relevance} is outside Astronomaly's 0-5 scale")
        return float(relevance) / 5.0
    return 1.0 if label == "interesting" else 0.0


def _robust(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    centre = np.nanmedian(x, axis=0)
    scale = median_abs_deviation(x, axis=0, scale="normal", nan_policy="omit")
    spread = np.nanstd(x, axis=0)
    # a column whose MAD is 0 (mostly one value) falls back to its standard deviation, then to 1
    scale = np.where(scale > 0, scale, np.where(spread > 0, spread, 1.0))
    return centre, scale


@dataclass
class FeatureSpace:
    """The detector's features of objects as one matrix ``(N, k)``, ``k <= 16``.

    Latents ``(N, D)`` are robustly standardised (median, normal-consistent MAD), then
    half-whitened: their principal components get spreads the square roots of their singular
    values (:func:`gsafe_models.explain.whiten` with power 0.5), because an autoencoder's
    latents can hold nearly all their variance along one direction (99.99 % for the demo's
    model), and an isotropic kernel would then see that direction alone. This was decided
    from that label-free measurement, before bench/active.py was run with it. Statistics
    ``(N, S)`` are robustly standardised too, then passed through ``asinh`` because their tails are
    the anomalies and would otherwise decide every distance alone. Each view is scaled to unit
    total variance, so latents and statistics weigh the same whatever ``D`` and ``S``; then the
    16 leading principal components are kept (all when fewer). Not "95 % of the variance": on bench/active.py's survey
    that rule kept 4 components, and what tells one anomaly class from another lives in the
    low-variance ones. Fitted on the candidates it will embed.

    The statistics view also holds the residual's descriptors when given (``Detector.describe``:
    what kind of departure the object shows, 16 columns in units of their null), beside the
    statistics. Chosen on how well the GP, given 50 random candidates' artefact labels, tells the
    artefacts among the other 450 of `bench/active.py`'s pools: AUROC 0.735 / 0.765 (two seeds)
    without them, 0.862 / 0.848 with them; the classes the scientist finds interesting were not
    used. A space fitted without descriptors (saved before) ignores them.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> fs = FeatureSpace.fit(rng.normal(size=(50, 8)), rng.normal(size=(50, 3)), rng.normal(size=(50, 16)))
        >>> fs.transform(rng.normal(size=(4, 8)), rng.normal(size=(4, 3)), rng.normal(size=(4, 16))).shape[0]
        4
    """

    z_centre: np.ndarray
    z_scale: np.ndarray
    s_centre: np.ndarray
    s_scale: np.ndarray
    mean: np.ndarray
    components: np.ndarray   # (k, D' + S)
    # the latents' half-whitening: their mean after standardisation, principal axes (D', D) and
    # the spreads the scores are divided by (D',); None in a space saved before it (latents as they are)
    z_mean: np.ndarray | None = None
    z_basis: np.ndarray | None = None
    z_spread: np.ndarray | None = None

    @classmethod
    def fit(cls, latents: np.ndarray, statistics: np.ndarray, descriptors: np.ndarray | None = None) -> "FeatureSpace":
        latents, statistics = _as_views(latents, statistics)
        statistics = _departures(statistics, descriptors)
        if len(latents) < 2:
            raise ValueError(f"FeatureSpace: needs at least 2 objects to fit, got {len(latents)}")
        zc, zs = _robust(latents)
        sc, ss = _robust(statistics)
        zm, zb, zsp = _half_whitening(np.nan_to_num((latents - zc) / zs))
        joined = _join(latents, statistics, zc, zs, sc, ss, zm, zb, zsp)
        mean = joined.mean(axis=0)
        _, sv, vt = np.linalg.svd(joined - mean, full_matrices=False)
        k = max(1, min(MAX_COMPONENTS, len(vt)))
        return cls(zc, zs, sc, ss, mean, vt[:k], zm, zb, zsp)

    def transform(self, latents: np.ndarray, statistics: np.ndarray, descriptors: np.ndarray | None = None) -> np.ndarray:
        """Features ``(N, k)`` of objects given their latents ``(N, D)``, statistics ``(N, S)`` and,
        if the space was fitted with them, descriptors ``(N, K)``."""
        latents, statistics = _as_views(latents, statistics)
        if descriptors is not None and statistics.shape[1] != len(self.s_centre):
            statistics = _departures(statistics, descriptors)
        if latents.shape[1] != len(self.z_centre) or statistics.shape[1] != len(self.s_centre):
            raise ValueError(f"FeatureSpace: fitted on {len(self.z_centre)} latents and {len(self.s_centre)} statistics "
                             f"(with any descriptors), got {latents.shape[1]} and {statistics.shape[1]}; "
                             f"refit it for this detector, or pass the descriptors it was fitted with")
        joined = _join(latents, statistics, self.z_centre, self.z_scale, self.s_centre, self.s_scale,
                       self.z_mean, self.z_basis, self.z_spread)
        return (joined - self.mean) @ self.components.T

    def state(self, prefix: str = "fs_") -> dict[str, np.ndarray]:
        return {f"{prefix}{k}": np.asarray(v) for k, v in self.__dict__.items() if v is not None}

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray], prefix: str = "fs_") -> "FeatureSpace":
        return cls(**{k[len(prefix):]: np.asarray(v, np.float64) for k, v in state.items() if k.startswith(prefix)})


def _as_views(latents, statistics) -> tuple[np.ndarray, np.ndarray]:
    latents = np.atleast_2d(np.asarray(latents, np.float64))
    statistics = np.asarray(statistics, np.float64)
    statistics = statistics.reshape(len(latents), -1) if statistics.size or len(latents) == 0 else np.zeros((len(latents), 0))
    if len(latents) != len(statistics):
        raise ValueError(f"FeatureSpace: {len(latents)} latents but {len(statistics)} rows of statistics")
    return latents, statistics


def _half_whitening(z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, principal axes, divisors) that half-whiten standardised latents ``(N, D)``
    (:func:`~gsafe_models.explain.whitening` with power 0.5): the scores ``(z - mean) @ axes.T /
    divisors`` have variances proportional to the singular values (not their squares), summing to 1."""
    from .explain import whitening

    mean, axes, divisors = whitening(z, power=0.5)
    total = np.sum((divisors / divisors[0]) ** 2)  # the variances before scaling: s_i / s_0
    return mean, axes, divisors * np.sqrt(total)


def _join(latents, statistics, zc, zs, sc, ss, zm=None, zb=None, zsp=None) -> np.ndarray:
    z = np.nan_to_num((latents - zc) / zs)
    z = z / np.sqrt(max(latents.shape[1], 1)) if zb is None else ((z - zm) @ zb.T) / zsp
    s = np.arcsinh(np.nan_to_num((statistics - sc) / ss)) / np.sqrt(max(statistics.shape[1], 1))
    return np.concatenate([z, s], axis=1)


def grouping_space(statistics: np.ndarray, descriptors: np.ndarray | None = None) -> np.ndarray:
    """Features ``(N, k)`` that :func:`group_candidates` groups on: what kind of departure each
    candidate shows, its statistics ``(N, S)`` and its residual's multi-scale descriptors ``(N, K)``
    (``Detector.describe``), the latents left out.

    Why not the relevance model's :class:`FeatureSpace`: its latents describe the galaxy more than
    its defect, so an artefact's look-alikes there were other objects. On `bench/active.py`'s two
    surveys (500 candidates each, 15 % and 11 % artefacts) an artefact's five nearest candidates
    were 51 % / 61 % artefacts in the latents + statistics space, 72 % / 72 % here; the groups that
    hold an artefact were 12 % / 22 % artefacts there, 74 % / 100 % here (latents + statistics +
    descriptors: 67 % / 64 %; descriptors alone: 62 % / 58 %). Chosen on those artefact shares; the
    interesting classes were not used. The same robust standardisation and ``asinh`` as the
    statistics view of :class:`FeatureSpace`, fitted on the candidates themselves.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> grouping_space(rng.normal(size=(30, 3)), rng.normal(size=(30, 16))).shape
        (30, 16)
    """

    joined = _departures(statistics, descriptors)
    if len(joined) < 2 or joined.shape[1] == 0:
        return np.zeros((len(joined), 1))
    return grouping_fit(statistics, descriptors).transform(np.zeros((len(joined), 0)), joined)


def grouping_fit(statistics: np.ndarray, descriptors: np.ndarray | None = None) -> FeatureSpace:
    """The fitted transform behind :func:`grouping_space` (a :class:`FeatureSpace` without latents),
    to place new objects, given as :func:`grouping_transform` arguments, in the candidates' space."""
    joined = _departures(statistics, descriptors)
    return FeatureSpace.fit(np.zeros((len(joined), 0)), joined)


def grouping_transform(space: FeatureSpace, statistics: np.ndarray, descriptors: np.ndarray | None = None) -> np.ndarray:
    """New objects ``(N, k)`` in a fitted grouping space (:func:`grouping_fit`)."""
    joined = _departures(statistics, descriptors)
    return space.transform(np.zeros((len(joined), 0)), joined)


def _departures(statistics, descriptors) -> np.ndarray:
    statistics = np.asarray(statistics, np.float64)
    statistics = statistics.reshape(len(statistics), -1)
    if descriptors is not None:
        descriptors = np.asarray(descriptors, np.float64).reshape(len(statistics), -1)
        statistics = np.concatenate([statistics, descriptors], axis=1)
    return statistics


def group_candidates(features: np.ndarray, min_cluster_size: int = 5, max_group: int | None = MAX_GROUP) -> np.ndarray:
    """Groups of similar candidates: ``(N,)`` int, one id per group, ids ``0..G-1``.

    HDBSCAN (scikit-learn, its default ``min_cluster_size=5``) finds dense groups without being told
    how many; a candidate in no dense group (HDBSCAN's noise) is a group of its own. It runs on the
    leading principal components of `features` that hold 95 % of their variance: densities are
    not estimable in many dimensions (distances concentrate), so density clustering is done after
    a reduction, as its authors advise; the relevance model keeps every component.

    No group holds more than `max_group` candidates (HDBSCAN's ``max_cluster_size``: a larger cluster
    is split into its children). A group is a set of look-alikes a scientist can set aside from one
    card ("n more like this", Shift+A); without the bound, HDBSCAN's most persistent cluster on a pool
    that is mostly one continuum is the continuum itself: on `bench/active.py`'s seed 0 one group held
    423 of the 500 candidates, so one artefact label set aside 414 objects of which 12 % were
    artefacts (the pool's base rate). The bound, 25 (5 % of the default pool), was chosen on the
    artefact share of what an artefact label sets aside, over caps of 2, 5, 10 and 20 % of the pool
    and no cap, on both seeds (0.12 / 0.22 at 5 %, the best of those with any group left to set
    aside; the interesting classes were not used). ``None`` lifts it.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> X = np.concatenate([rng.normal(0, 0.1, (20, 2)), rng.normal(5, 0.1, (20, 2))])
        >>> g = group_candidates(X)
        >>> len(set(g[:20])), len(set(g[20:])), bool(g[0] != g[20])
        (1, 1, True)
    """
    from sklearn.cluster import HDBSCAN

    features = np.asarray(features, np.float64)
    n = len(features)
    if n < max(min_cluster_size, 2):
        return np.arange(n)
    centred = features - features.mean(axis=0)
    _, sv, vt = np.linalg.svd(centred, full_matrices=False)
    k = int(np.searchsorted(np.cumsum(sv**2) / max(float((sv**2).sum()), 1e-300), 0.95) + 1)
    cap = None if max_group is None else max(int(max_group), min_cluster_size + 1)
    raw = HDBSCAN(min_cluster_size=min_cluster_size, max_cluster_size=cap, copy=True).fit(centred @ vt[:k].T).labels_
    out = raw.copy()
    noise = np.nonzero(raw < 0)[0]
    out[noise] = raw.max() + 1 + np.arange(len(noise))
    return np.unique(out, return_inverse=True)[1]


class RelevanceModel:
    """Gaussian process regression of relevance (0..1) on features, with its uncertainty.

    Kernel ``C * Matern(nu=1.5) + White`` (Protege's Matern + White, with an amplitude), prior mean 0:
    an object is presumed uninteresting until it resembles something the scientist liked, and the
    predictive standard deviation says where the model has seen nothing. Hyperparameters by
    maximum marginal likelihood (scikit-learn), from fixed starting values: the same labels give the
    same model. :meth:`state` and :meth:`from_state` carry it as plain arrays (no pickle).

    Example:
        >>> X = np.array([[0.0], [0.1], [3.0], [3.1]]); t = np.array([1.0, 1.0, 0.0, 0.0])
        >>> mu, sd = RelevanceModel().fit(X, t).predict(np.array([[0.05], [3.05], [9.0]]))
        >>> bool(mu[0] > 0.8 and mu[1] < 0.2 and sd[2] > sd[0])
        True
    """

    def __init__(self) -> None:
        self.gp = None
        self.X = np.zeros((0, 0))
        self.t = np.zeros(0)

    @staticmethod
    def _kernel():
        from sklearn.gaussian_process.kernels import ConstantKernel, Matern, WhiteKernel

        return (ConstantKernel(0.25, (1e-3, 1e2)) * Matern(length_scale=1.0, length_scale_bounds=(1e-2, 1e3), nu=1.5)
                + WhiteKernel(0.01, (1e-5, 1.0)))

    def fit(self, X: np.ndarray, t: np.ndarray, theta: np.ndarray | None = None) -> "RelevanceModel":
        """Fit on labelled features ``X (n, k)`` and relevances ``t (n,)`` in 0..1; with `theta`
        (log hyperparameters from :meth:`state`) the kernel is fixed, not optimised."""
        import warnings

        from sklearn.exceptions import ConvergenceWarning
        from sklearn.gaussian_process import GaussianProcessRegressor

        X, t = np.asarray(X, np.float64), np.asarray(t, np.float64)
        if len(X) != len(t) or len(t) == 0:
            raise ValueError(f"RelevanceModel: needs as many relevances as labelled objects (> 0), got {len(X)} and {len(t)}")
        if np.any((t < 0) | (t > 1)) or not np.all(np.isfinite(t)):
            raise ValueError("RelevanceModel: relevances must be finite and in 0..1 (see relevance_target)")
        kernel = self._kernel()
        if theta is not None:
            kernel = kernel.clone_with_theta(np.asarray(theta, np.float64))
        gp = GaussianProcessRegressor(kernel=kernel, normalize_y=False, optimizer=None if theta is not None else "fmin_l_bfgs_b",
                                      n_restarts_optimizer=0, random_state=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)   # a bound reached is an answer, not an error
            self.gp = gp.fit(X, t)
        self.X, self.t = X, t
        return self

    @property
    def fitted(self) -> bool:
        return self.gp is not None

    def predict(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Expected relevance ``mu (N,)`` and its predictive standard deviation ``sigma (N,)``
        (without the label noise: the uncertainty of the relevance itself)."""
        X = np.asarray(X, np.float64)
        if self.gp is None:
            raise RuntimeError("RelevanceModel: fit it on labels first")
        from scipy.linalg import solve_triangular

        kernel = self.gp.kernel_
        mean = self.gp.predict(X)
        # uncertainty of the latent relevance: the fitted kernel without its white-noise term
        k_star = kernel.k1(X, self.X)
        v = solve_triangular(self.gp.L_, k_star.T, lower=True)
        var = np.clip(kernel.k1.diag(X) - np.einsum("ij,ij->j", v, v), 0, None)
        return mean, np.sqrt(var)

    def state(self) -> dict[str, np.ndarray]:
        if self.gp is None:
            raise RuntimeError("RelevanceModel: nothing to save before fit")
        return {"rm_X": self.X, "rm_t": self.t, "rm_theta": self.gp.kernel_.theta}

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray]) -> "RelevanceModel":
        return cls().fit(state["rm_X"], state["rm_t"], theta=state["rm_theta"])


@dataclass
class ReviewPlan:
    """A review order over N candidates.

    Attributes:
        order: indices of the candidates to show, first first ``(M,)``: unlabelled, not suppressed.
        first_pass: ``(M,)`` bool along `order`: shown as its group's representative (or its group
            is already labelled); False = one of "n more like this", shown after the first pass.
        more_like_this: ``(N,)`` int, for each candidate the unlabelled members of its group besides it.
        suppressed: indices of unlabelled candidates in suppressed (known-artefact) groups, listed apart.
        mu, sigma, priority: ``(N,)`` expected relevance, its uncertainty, the order's key.
    """

    order: np.ndarray
    first_pass: np.ndarray
    more_like_this: np.ndarray
    suppressed: np.ndarray
    mu: np.ndarray
    sigma: np.ndarray
    priority: np.ndarray


def plan_review(
    p_value: np.ndarray,
    groups: np.ndarray,
    labelled: np.ndarray,
    *,
    features: np.ndarray | None = None,
    targets: np.ndarray | None = None,
    suppressed_groups: np.ndarray | None = None,
    model: RelevanceModel | None = None,
    kappa: float = KAPPA,
) -> ReviewPlan:
    """The next review order of N candidates, the review pool (see the module's docstring).

    Arguments:
        p_value: ``(N,)`` p-values of the candidates: the cold-start order and the tie-break (NaN last).
        groups: ``(N,)`` group ids (:func:`group_candidates`).
        labelled: ``(N,)`` bool, candidates the scientist has labelled (they leave the order).
        features: ``(N, k)`` candidate features; needed with labels.
        targets: ``(N,)`` relevance in 0..1 where `labelled` (:func:`relevance_target`), else ignored.
        suppressed_groups: group ids the scientist suppressed (labelled artefact as a group).
        model: a fitted relevance model to use instead of fitting one on (features, targets).
        kappa: weight of the uncertainty (exploration); default one sigma.
    """
    p = np.asarray(p_value, np.float64)
    n = len(p)
    groups = np.asarray(groups)
    labelled = np.asarray(labelled, bool)
    if len(groups) != n or len(labelled) != n:
        raise ValueError(f"plan_review: p_value, groups and labelled must have one entry per candidate ({n})")
    if model is None and labelled.any():
        if features is None or targets is None:
            raise ValueError("plan_review: labelled candidates need features and targets to learn from")
        model = RelevanceModel().fit(np.asarray(features)[labelled], np.asarray(targets, np.float64)[labelled])
    if model is not None and model.fitted:
        if features is None:
            raise ValueError("plan_review: a relevance model needs the candidates' features")
        mu, sigma = model.predict(np.asarray(features))
    else:
        mu, sigma = np.zeros(n), np.ones(n)
    # the upper confidence bound of relevance, weighted by the anomaly evidence: 1 for the pool's
    # most anomalous candidate down to 1/n for its least (ranks of the p-value)
    rank = np.argsort(np.argsort(np.nan_to_num(p, nan=np.inf), kind="stable"), kind="stable")
    priority = np.clip(mu + kappa * sigma, 0, None) * (1.0 - rank / max(n, 1))
    sup = np.isin(groups, np.asarray(suppressed_groups if suppressed_groups is not None else [], dtype=groups.dtype))
    open_ = ~labelled & ~sup
    # best first; ties (e.g. before any label) by p-value, then by position
    ranked = np.lexsort((np.arange(n), np.nan_to_num(p, nan=np.inf), -priority))
    ranked = ranked[open_[ranked]]
    group_has_label = np.isin(groups, groups[labelled])
    seen: set = set()
    first = np.zeros(len(ranked), bool)
    for j, i in enumerate(ranked):
        g = groups[i]
        if group_has_label[i] or g not in seen:
            first[j] = True
            seen.add(g)
    order = np.concatenate([ranked[first], ranked[~first]])
    first_pass = np.concatenate([np.ones(first.sum(), bool), np.zeros((~first).sum(), bool)])
    open_count = np.bincount(np.unique(groups, return_inverse=True)[1], weights=open_.astype(float)).astype(int)
    more = np.maximum(open_count[np.unique(groups, return_inverse=True)[1]] - open_.astype(int), 0)
    return ReviewPlan(order=order, first_pass=first_pass, more_like_this=more,
                      suppressed=np.nonzero(sup & ~labelled)[0], mu=mu, sigma=sigma, priority=priority)


@dataclass
class KnownGroups:
    """Labelled artefact groups, recognised among new objects by a later hunt.

    A new object belongs to a known group when its nearest labelled member of that group is closer
    than the group's own linkage scale: the largest distance from a member to its nearest fellow
    member (single linkage at the group's scale; a lone member's scale is the median of all groups'
    scales). Objects closer to another labelled object of a different kind are not claimed.

    Example:
        >>> kg = KnownGroups.fit(np.array([[0.0], [0.2], [0.4], [5.0]]), np.array([0, 0, 0, -1]))
        >>> kg.assign(np.array([[0.3], [0.9], [5.1]])).tolist()
        [0, -1, -1]
    """

    members: np.ndarray     # (m, k) features of labelled objects
    group: np.ndarray       # (m,) group id, -1 = labelled but in no artefact group
    scale: np.ndarray       # (G,) linkage scale per group id 0..G-1

    @classmethod
    def fit(cls, features: np.ndarray, group: np.ndarray) -> "KnownGroups":
        from scipy.spatial.distance import cdist

        X = np.asarray(features, np.float64)
        group = np.asarray(group, np.int64)
        n_groups = int(group.max()) + 1 if len(group) and group.max() >= 0 else 0
        scale = np.full(n_groups, np.nan)
        for g in range(n_groups):
            m = X[group == g]
            if len(m) >= 2:
                d = cdist(m, m)
                np.fill_diagonal(d, np.inf)
                scale[g] = d.min(axis=1).max()
        fallback = np.nanmedian(scale) if np.isfinite(scale).any() else 0.0
        return cls(X, group, np.where(np.isfinite(scale), scale, fallback))

    def assign(self, features: np.ndarray) -> np.ndarray:
        """``(N,)`` the known group each object falls in, -1 for none."""
        from scipy.spatial.distance import cdist

        X = np.asarray(features, np.float64)
        if len(self.members) == 0 or len(X) == 0:
            return np.full(len(X), -1)
        d = cdist(X, self.members)
        nearest = d.argmin(axis=1)
        g = self.group[nearest]
        ok = (g >= 0) & (d[np.arange(len(X)), nearest] <= np.where(g >= 0, self.scale[np.maximum(g, 0)], -1))
        return np.where(ok, g, -1)

    def state(self) -> dict[str, np.ndarray]:
        return {"kg_members": self.members, "kg_group": self.group, "kg_scale": self.scale}

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray]) -> "KnownGroups":
        return cls(np.asarray(state["kg_members"], np.float64), np.asarray(state["kg_group"], np.int64),
                   np.asarray(state["kg_scale"], np.float64))
