r"""Calibrated p-values for anomaly statistics, and their combination into one test.

A statistic is any per-object number where larger means more anomalous (reconstruction
residual, latent :math:`-\log p(z)`, typicality distance...). Each is turned into a
p-value against held-out normal data (conformal, with a continuous tail beyond the
calibration range), several p-values are combined into one (Fisher, Stouffer, Simes,
Bonferroni, Cauchy, or a DoSE density over the statistics), and the combined statistic is
itself conformalised, so the final p-value is valid however dependent the statistics are.

Combiners work on :math:`\log p` internally so that objects far beyond the calibration
range keep distinct, finite scores instead of underflowing to :math:`p = 0`.
"""

__all__ = [
    "COMBINERS",
    "CombinedTest",
    "JointDensity",
    "TailCalibrator",
    "bh_qvalues",
    "bonferroni",
    "cauchy",
    "conformal_pvalues",
    "fisher",
    "simes",
    "stouffer",
]

import math

from collections.abc import Callable, Sequence

import numpy as np
import torch

from scipy import optimize, special, stats

from .density import GaussianMixture

# Conformal p-values


def conformal_pvalues(calib: np.ndarray, s: np.ndarray) -> np.ndarray:
    r"""Returns conformal p-values :math:`p(s) = (1 + \#\{c_i \geq s\}) / (1 + n)`.

    Under the null (`s` exchangeable with the `n` calibration statistics) :math:`P(p \leq
    \alpha) \leq \alpha` for every :math:`\alpha`, with no model of the statistic.

    References:
        | Algorithmic Learning in a Random World (Vovk et al., 2005)
        | https://doi.org/10.1007/b106715
        | Testing for Outliers with Conformal p-values (Bates et al., 2023)
        | https://arxiv.org/abs/2104.08279

    Arguments:
        calib: Statistics of held-out normal objects, shape :math:`(n,)`.
        s: Statistics to test, any shape; larger is more anomalous.

    Returns:
        p-values, shape of `s`; NaN where `s` is NaN.

    Example:
        >>> conformal_pvalues(np.array([1.0, 2.0, 3.0]), np.array([0.0, 2.5, 9.0]))
        array([1.  , 0.5 , 0.25])
    """

    values = np.sort(np.asarray(calib, dtype=np.float64).ravel())
    s = np.asarray(s, dtype=np.float64)
    n = values.size
    ge = n - np.searchsorted(values, s, side="left")
    return np.where(np.isnan(s), np.nan, (1 + ge) / (1 + n))


def _check_calib(calib: np.ndarray, where: str) -> np.ndarray:
    calib = np.asarray(calib, dtype=np.float64).ravel()
    if calib.size == 0:
        raise ValueError(f"{where}: no calibration statistics")
    bad = int((~np.isfinite(calib)).sum())
    if bad:
        raise ValueError(f"{where}: {bad} of {calib.size} calibration statistics are NaN or infinite; drop them first")
    return calib


class TailCalibrator:
    r"""Turns one statistic into p-values: conformal inside the calibration range, a
    generalized Pareto tail beyond it.

    Inside the range of the `n` calibration statistics, :math:`p(s)` interpolates linearly
    between the conformal p-values at the calibration points. It is never below the
    conformal p-value and exceeds it by less than :math:`1/(n+1)`, so it stays valid and
    is strictly decreasing wherever the calibration points are distinct. Above the
    largest calibration statistic :math:`c_{(n)}`, where the conformal p-value is stuck
    at :math:`1/(n+1)`, a generalized Pareto distribution (GPD) fitted to the exceedances
    over the upper `tail_frac` quantile :math:`u` continues it:

    .. math:: p(s) = \frac{1}{n+1} \frac{\bar F_\text{GPD}(s - u)}{\bar F_\text{GPD}(c_{(n)} - u)}

    so the most extreme objects keep distinct, ordered p-values. The GPD shape is
    clipped at 0 (exponential tail): a fitted bounded tail would give :math:`p = 0` to
    everything past its endpoint, and a heavier tail model errs on the conservative side.
    Below :math:`1/(n+1)` the p-values rest on that tail model, not on exchangeability.

    Before that, the largest calibration values that are outliers of the rest (the anomalies
    every real "normal" set holds) are removed, at most `trim` of them (see
    :meth:`_outliers`); if any were, the tail is extrapolated no lighter than a GPD of shape
    0.25, so that a normal value cut by mistake cannot make extreme normal objects look like
    discoveries. `trimmed` says how many were removed.

    References:
        | Statistical Inference Using Extreme Order Statistics (Pickands, 1975)
        | https://doi.org/10.1214/aos/1176343003
        | Testing for Outliers with Conformal p-values (Bates et al., 2023)
        | https://arxiv.org/abs/2104.08279

    Arguments:
        tail_frac: The upper fraction of calibration statistics the GPD is fitted to.
        min_tail: The fewest exceedances the GPD is fitted to (if `n` allows).
        trim: The largest share of calibration values that may be removed as outliers; 0
            keeps them all.
        trim_alpha: The family-wise level of the outlier test on clean data.
        trim_max_shape: The heaviest GPD tail the outlier test assumes unless the data
            demand more (likelihood ratio, 1 %); 0: exponential, as maxima and -log p have.
        log_pvalue: The statistic is :math:`-\log` of a valid p-value (its tail is known).

    Example:
        >>> cal = TailCalibrator().fit(np.random.default_rng(0).normal(size=999))
        >>> p = cal.pvalues(np.array([0.0, 3.5, 4.0, 8.0]))
        >>> bool(p[0] > 0.4 and p[1] < 1e-3 and p[2] > p[3] > 0)
        True
    """

    def __init__(self, tail_frac: float = 0.1, min_tail: int = 10, trim: float = 0.05, trim_alpha: float = 0.01,
                 trim_max_shape: float = 0.0, log_pvalue: bool = False) -> None:
        if not 0 < tail_frac <= 1:
            raise ValueError(f"TailCalibrator: tail_frac={tail_frac} must be in (0, 1]")
        if not 0 <= trim < 0.5 or not 0 < trim_alpha < 1:
            raise ValueError(f"TailCalibrator: trim={trim} must be in [0, 0.5) and trim_alpha={trim_alpha} in (0, 1)")
        self.tail_frac = tail_frac
        self.min_tail = min_tail
        self.trim = trim
        self.trim_alpha = trim_alpha
        self.trim_max_shape = trim_max_shape
        self.log_pvalue = log_pvalue
        self.trimmed = 0

    def fit(self, calib: np.ndarray) -> "TailCalibrator":
        r"""Stores the calibration statistics, less the outliers among them, and fits the tail.

        Arguments:
            calib: Statistics of held-out normal objects, shape :math:`(n,)`, finite.
        """

        values = np.sort(_check_calib(calib, "TailCalibrator.fit"))
        self.trimmed = self._outliers(values)
        values = values[: values.size - self.trimmed]
        threshold, shape, scale = self._fit_tail(values)
        if self.trimmed and shape < _TRIMMED_MIN_SHAPE:
            # The outlier test assumed a light tail; if it cut normal values too, a light
            # tail fitted to the rest would make the most extreme normal objects look like
            # discoveries. Extrapolate no lighter than this shape (conservative).
            shape, scale = _TRIMMED_MIN_SHAPE, self._scale_given_shape(values, threshold, _TRIMMED_MIN_SHAPE, scale)
        self._set(values, threshold, shape, scale)
        return self

    def _fit_tail(self, values: np.ndarray) -> tuple[float, float, float]:
        r"""Returns (threshold, shape, scale) of the GPD fitted to the upper tail of sorted `values`."""

        n = values.size
        m = min(n - 1, max(self.min_tail, math.ceil(self.tail_frac * n)))
        if m >= 1:
            threshold = values[n - m - 1]
            exceed = values[n - m :] - threshold
        else:  # a single calibration value: only its own scale is known
            threshold = values[0] - max(abs(values[0]), 1.0)
            exceed = values - threshold

        shape, scale = 0.0, float(exceed.mean())
        if m >= self.min_tail and np.ptp(exceed) > 0:
            try:
                c, _, sigma = stats.genpareto.fit(exceed, floc=0)
                if np.isfinite(c) and np.isfinite(sigma) and c > 0 and sigma > 0:
                    shape, scale = float(c), float(sigma)
            except (RuntimeError, ValueError, FloatingPointError):
                pass  # keep the exponential fit
        if not scale > 0:  # all exceedances tied: any positive scale keeps p decreasing
            spread = float(values[-1] - values[0])
            scale = spread / n if spread > 0 else max(abs(float(values[-1])), 1.0)
        return float(threshold), shape, scale

    @staticmethod
    def _scale_given_shape(values: np.ndarray, threshold: float, shape: float, default: float) -> float:
        r"""Returns the maximum-likelihood GPD scale of the exceedances over `threshold` at `shape`
        (`default` if there are none)."""

        y = values[values > threshold] - threshold
        if y.size == 0:
            return default
        res = optimize.minimize_scalar(
            lambda ls: y.size * ls + (1 + 1 / shape) * np.log1p(shape * y / math.exp(ls)).sum(),
            bounds=(math.log(y.mean()) - 10, math.log(y.mean()) + 5), method="bounded")
        return float(math.exp(res.x))

    def _outliers(self, values: np.ndarray) -> int:
        r"""Returns how many of the largest sorted `values` are outliers of the rest.

        Real calibration sets are contaminated: a survey's "normal" objects hold ~1 % of
        anomalies, whose statistics lie far beyond the normal tail. Left in, one of them sets
        :math:`c_{(n)}` and fattens the fitted tail, so every anomaly below it gets
        :math:`p \geq 1/(n+1)` and nothing survives a false-discovery cut.

        The test: a GPD is fitted by maximum likelihood to the exceedances over the upper
        20 % quantile with the top :math:`k` = `trim` :math:`\cdot n` values *censored*
        (only known to lie above the :math:`k`-th largest), so contaminants cannot bend the
        fit; its shape is capped at `trim_max_shape` (exponential) unless a likelihood-ratio
        test (1 %) asks for a heavier tail. With `log_pvalue` the tail is known instead,
        :math:`P(T \geq x) \leq e^{-x}`. Under it, the :math:`r`-th largest value has tail probability
        :math:`q_r`, and :math:`1 - (1 - q_r)^{n - r + 1}` is the chance that the largest of the
        :math:`n - r + 1` values left, once those above it are out, reaches that far; the
        largest :math:`r \leq k` for which this is below
        `trim_alpha` / :math:`k` (a generalized ESD procedure, Rosner 1983, on a censored
        tail model) gives the outliers. On clean data this removes anything with probability
        about `trim_alpha`, and only extreme points, which moves p-values by at most
        :math:`r/n`.

        References:
            | Percentage Points for a Generalized ESD Many-Outlier Procedure (Rosner, 1983)
            | https://doi.org/10.1080/00401706.1983.10487848
        """

        n = values.size
        k = int(math.ceil(self.trim * n))
        if self.trim <= 0 or k < 1:
            return 0
        top = values[n - k :][::-1]  # the r-th largest at index r - 1
        if self.log_pvalue:
            # -log of a valid p-value: P(T >= x) <= exp(-x), the tail is known, nothing to fit
            log_q = -np.maximum(top, 0.0)
        else:
            m = min(n - 1, max(self.min_tail, math.ceil(_TRIM_TAIL * n)) + k)
            if m - k < self.min_tail:
                return 0
            threshold = values[n - m - 1]
            observed = values[n - m : n - k] - threshold
            censor = values[n - k] - threshold
            if censor <= 0 or np.ptp(observed) <= 0:
                return 0
            # Tails of maxima (most residual statistics) and of -log p-values are exponential,
            # and a shape fitted to a few dozen points swings wildly; a heavier tail is believed
            # only when the data demand it (likelihood ratio against the capped fit, 1 %).
            shape, scale, nll_capped = _censored_gpd(observed, censor, k, self.trim_max_shape)
            free = _censored_gpd(observed, censor, k)
            if 2 * (nll_capped - free[2]) > stats.chi2.ppf(0.99, 1):
                shape, scale = free[0], free[1]
            x = (top - threshold) / scale
            log_q = math.log(m / n) + (-np.log1p(shape * x) / shape if shape > 1e-9 else -x)
        # the r-th largest as the largest of the n - r + 1 values left once those above it are out
        r = np.arange(1, k + 1)
        significant = -np.expm1((n - r + 1) * np.log1p(-np.minimum(np.exp(log_q), 1.0))) < self.trim_alpha / k
        return int(r[significant].max()) if significant.any() else 0

    def _set(self, values: np.ndarray, threshold: float, shape: float, scale: float) -> None:
        self.values = values
        self.threshold, self.shape, self.scale = threshold, shape, scale
        # The trimmed values still count as calibration objects above every kept one: inside
        # the kept range the p-value is the untrimmed conformal one (valid whatever the outlier
        # test decided); trimming only changes the tail model beyond it, anchored at (1 + r)/(n + 1).
        n, r = values.size, self.trimmed
        self._xp = np.unique(values)
        self._fp = (1 + r + n - np.searchsorted(values, self._xp, side="left")) / (n + r + 1)
        self._log_tail0 = math.log((1 + r) / (n + r + 1)) - self._gpd_logsf(values[-1] - threshold)

    def _gpd_logsf(self, x: np.ndarray) -> np.ndarray:
        if self.shape > 0:
            return -np.log1p(self.shape * x / self.scale) / self.shape
        return -x / self.scale

    @property
    def n(self) -> int:
        return self.values.size

    def log_pvalues(self, s: np.ndarray) -> np.ndarray:
        r"""Returns :math:`\log p(s)`, finite for every finite `s` (no underflow).

        Arguments:
            s: Statistics, any shape; NaN gives NaN, :math:`+\infty` gives :math:`-\infty`.
        """

        s = np.asarray(s, dtype=np.float64)
        flat = s.reshape(-1)
        with np.errstate(divide="ignore"):
            out = np.log(np.interp(flat, self._xp, self._fp, left=1.0))
        beyond = flat > self._xp[-1]
        out[beyond] = self._log_tail0 + self._gpd_logsf(flat[beyond] - self.threshold)
        out[np.isnan(flat)] = np.nan
        return out.reshape(s.shape)

    def pvalues(self, s: np.ndarray) -> np.ndarray:
        r"""Returns p-values, shape of `s` (see :meth:`log_pvalues` for extreme objects)."""

        return np.exp(self.log_pvalues(s))

    def state(self) -> dict:
        r"""Returns the fitted calibrator as plain Python and NumPy values."""

        return {
            "tail_frac": self.tail_frac,
            "min_tail": self.min_tail,
            "trim": self.trim,
            "trim_alpha": self.trim_alpha,
            "trim_max_shape": self.trim_max_shape,
            "log_pvalue": self.log_pvalue,
            "trimmed": self.trimmed,
            "values": self.values.copy(),
            "threshold": self.threshold,
            "shape": self.shape,
            "scale": self.scale,
        }

    @classmethod
    def from_state(cls, state: dict) -> "TailCalibrator":
        r"""Rebuilds a calibrator from :meth:`state`."""

        self = cls(tail_frac=float(state["tail_frac"]), min_tail=int(state["min_tail"]),
                   trim=float(state.get("trim", 0.0)), trim_alpha=float(state.get("trim_alpha", 0.01)),
                   trim_max_shape=float(state.get("trim_max_shape", 0.0)),
                   log_pvalue=bool(state.get("log_pvalue", False)))
        self.trimmed = int(state.get("trimmed", 0))
        values = np.asarray(state["values"], dtype=np.float64)
        self._set(values, float(state["threshold"]), float(state["shape"]), float(state["scale"]))
        return self


# Rules whose p-value is valid as it stands when each statistic's p-value is: Bonferroni under
# any dependence, Simes under positive dependence (PRDS; Sarkar 1998), which statistics of one
# cutout have. They need no second calibration fold.
_VALID_UNDER_DEPENDENCE = ("bonferroni", "simes")

_TRIM_TAIL = 0.2
_TRIMMED_MIN_SHAPE = 0.25


def _censored_gpd(y: np.ndarray, censor: float, k: int, max_shape: float = 2.0) -> tuple[float, float, float]:
    r"""Returns the maximum-likelihood GPD (shape in :math:`[0, ` `max_shape` :math:`]`, scale) of
    exceedances `y` plus `k` more known only to exceed `censor`, and its negative log-likelihood."""

    def nll(theta):
        log_sigma, c = theta
        sigma = math.exp(log_sigma)
        if c < 1e-9:
            return len(y) * log_sigma + (y.sum() + k * censor) / sigma
        return (len(y) * log_sigma + (1 + 1 / c) * np.log1p(c * y / sigma).sum()
                + k / c * math.log1p(c * censor / sigma))

    sigma0 = (y.sum() + k * censor) / len(y)
    best = optimize.minimize(nll, [math.log(sigma0), 0.1], method="L-BFGS-B",
                             bounds=[(math.log(sigma0) - 10, math.log(sigma0) + 10), (0.0, max_shape)])
    if not np.isfinite(best.fun):
        return 0.0, float(sigma0), float(nll([math.log(sigma0), 0.0]))
    log_sigma, c = best.x
    return float(c), float(math.exp(log_sigma)), float(best.fun)


# Combination rules. Each `_log_*` maps log p-values (m, k) to combined log p-values (m,),
# not clipped at 0: CombinedTest ranks objects by them, and Bonferroni's k min p above 1
# still orders objects (clipped, a third of normal objects would tie at p = 1).


def _log_fisher(logP: np.ndarray) -> np.ndarray:
    # -2 sum log p ~ chi2(2k); its survival function for even degrees of freedom is
    # exp(-y) sum_{j<k} y^j / j! with y = -sum log p, summed here in log space.
    k = logP.shape[1]
    y = -logP.sum(1)
    j = np.arange(k)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = j * np.log(y)[:, None] - special.gammaln(j + 1)
    terms[:, 0] = 0.0  # y^0 = 1, also at y = 0
    out = -y + special.logsumexp(terms, axis=1)
    out[np.isposinf(y)] = -np.inf
    return out


def _log_stouffer(logP: np.ndarray) -> np.ndarray:
    z = -special.ndtri_exp(logP)  # Phi^{-1}(1 - p), accurate for tiny p
    return special.log_ndtr(-z.sum(1) / math.sqrt(logP.shape[1]))


def _log_simes(logP: np.ndarray) -> np.ndarray:
    k = logP.shape[1]
    ordered = np.sort(logP, axis=1)
    return (ordered + math.log(k) - np.log(np.arange(1, k + 1))).min(1)


def _log_bonferroni(logP: np.ndarray) -> np.ndarray:
    return logP.min(1) + math.log(logP.shape[1])


def _log_cauchy(logP: np.ndarray) -> np.ndarray:
    # T = mean tan((1/2 - p) pi) = mean cot(p pi); for tiny p, cot(p pi) = 1 / (p pi) to
    # double precision, so log T comes from log p without overflow.
    k = logP.shape[1]
    p = np.exp(logP)
    tiny = logP < -30
    with np.errstate(divide="ignore", over="ignore"):
        t = np.where(tiny, 0.0, 1 / np.tan(np.pi * p))
        log_t_tiny = np.where(tiny, -logP - math.log(math.pi), -np.inf)

    out = np.empty(logP.shape[0])
    huge = log_t_tiny.max(1, initial=-np.inf) > 600
    # Where some term is astronomically large, the moderate terms cannot change log T.
    log_T = special.logsumexp(log_t_tiny[huge], axis=1) - math.log(k)
    out[huge] = -math.log(math.pi) - log_T  # p = arctan(1/T) / pi ~ 1 / (pi T)

    with np.errstate(over="ignore", divide="ignore"):
        T = (t[~huge] + np.exp(log_t_tiny[~huge])).sum(1) / k
        out[~huge] = np.where(
            T > 0,
            np.log(np.arctan(1 / np.where(T > 0, T, 1.0)) / np.pi),
            np.log(0.5 - np.arctan(T) / np.pi),
        )
    out[np.isnan(logP).any(1)] = np.nan
    return out


_LOG_COMBINERS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "fisher": _log_fisher,
    "stouffer": _log_stouffer,
    "simes": _log_simes,
    "bonferroni": _log_bonferroni,
    "cauchy": _log_cauchy,
}


def _on_pvalues(log_combiner: Callable[[np.ndarray], np.ndarray], P: np.ndarray) -> np.ndarray:
    P = np.asarray(P, dtype=np.float64)
    if P.ndim != 2:
        raise ValueError(f"combiners take P of shape (m, k), got {P.shape}")
    with np.errstate(divide="ignore"):
        return np.minimum(np.exp(log_combiner(np.log(P))), 1.0)


def fisher(P: np.ndarray) -> np.ndarray:
    r"""Returns Fisher's combined p-values, :math:`-2 \sum_i \log p_i \sim \chi^2_{2k}`.

    Exact for independent p-values; most powerful when several are moderately small.

    References:
        | Statistical Methods for Research Workers (Fisher, 1925)

    Arguments:
        P: p-values, shape :math:`(m, k)`.

    Returns:
        Combined p-values, shape :math:`(m,)`.

    Example:
        >>> fisher(np.array([[0.01, 0.2], [0.5, 0.5]])).round(4)
        array([0.0144, 0.5966])
    """

    return _on_pvalues(_log_fisher, P)


def stouffer(P: np.ndarray) -> np.ndarray:
    r"""Returns Stouffer's combined p-values, :math:`\sum_i \Phi^{-1}(1 - p_i) / \sqrt{k} \sim
    \mathcal{N}(0, 1)`.

    References:
        | The American Soldier, Vol. 1 (Stouffer et al., 1949)

    Example:
        >>> stouffer(np.array([[0.01, 0.2], [0.5, 0.5]])).round(4)
        array([0.0125, 0.5   ])
    """

    return _on_pvalues(_log_stouffer, P)


def simes(P: np.ndarray) -> np.ndarray:
    r"""Returns Simes' combined p-values, :math:`\min_i k\, p_{(i)} / i`.

    Valid for independent and positively dependent p-values; never above Bonferroni.

    References:
        | An Improved Bonferroni Procedure for Multiple Tests of Significance (Simes, 1986)
        | https://doi.org/10.1093/biomet/73.3.751

    Example:
        >>> simes(np.array([[0.01, 0.02], [0.5, 0.5]]))
        array([0.02, 0.5 ])
    """

    return _on_pvalues(_log_simes, P)


def bonferroni(P: np.ndarray) -> np.ndarray:
    r"""Returns Bonferroni combined p-values, :math:`\min(1, k \min_i p_i)`.

    Valid under any dependence; best when a single statistic carries the signal.

    Example:
        >>> bonferroni(np.array([[0.01, 0.02], [0.5, 0.9]]))
        array([0.02, 1.  ])
    """

    return _on_pvalues(_log_bonferroni, P)


def cauchy(P: np.ndarray) -> np.ndarray:
    r"""Returns Cauchy combination (ACAT) p-values: :math:`T = \frac{1}{k} \sum_i
    \tan((\frac12 - p_i) \pi)` is standard Cauchy under the null.

    The tail of :math:`T` is nearly insensitive to dependence between the p-values.
    A p-value of exactly 1 sends its term to :math:`-\infty`; CombinedTest keeps
    p-values below 1 before combining.

    References:
        | Cauchy Combination Test: A Powerful Test with Analytic p-Value Calculation under
          Arbitrary Dependency Structures (Liu & Xie, 2020)
        | https://arxiv.org/abs/1808.09011

    Example:
        >>> cauchy(np.array([[0.01, 0.2], [0.5, 0.5]])).round(4)
        array([0.0192, 0.5   ])
    """

    return _on_pvalues(_log_cauchy, P)


COMBINERS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "fisher": fisher,
    "stouffer": stouffer,
    "simes": simes,
    "bonferroni": bonferroni,
    "cauchy": cauchy,
}


# DoSE: a density over the statistics themselves


class JointDensity:
    r"""Creates a density over the vector of statistics of normal objects (DoSE); its
    :math:`-\log` density is one joint statistic.

    Unlike combining one-sided p-values, the joint density also flags objects whose
    statistics are atypically *small* or whose combination is unusual (typicality).
    Each statistic is mapped to a roughly Gaussian scale by a robust standardisation
    (median, IQR) and a Yeo-Johnson transform with :math:`\lambda \in [0, 2]` (the range
    where the transform is unbounded on both sides, so extreme objects stay ordered),
    then a full-covariance :class:`GaussianMixture` is fitted with its number of
    components chosen by BIC. The statistic is :math:`-\log p` in that transformed space.

    References:
        | Density of States Estimation for Out-of-Distribution Detection (Morningstar et al., 2021)
        | https://arxiv.org/abs/2006.09273
        | A New Family of Power Transformations to Improve Normality or Symmetry (Yeo & Johnson, 2000)
        | https://doi.org/10.1093/biomet/87.4.954

    Arguments:
        components: The candidate numbers of mixture components.
        max_fit: At most this many objects (drawn at random) fit the density: a few
            statistics need no more, and EM on a whole survey would take minutes.
        seed: Seeds the subsample and the mixture fit.

    Example:
        >>> S = np.random.default_rng(0).lognormal(size=(500, 3))
        >>> dose = JointDensity().fit(S)
        >>> t = dose.statistic(np.array([[1.0, 1.0, 1.0], [50.0, 1.0, 1.0]]))
        >>> bool(t[1] > t[0])
        True
    """

    def __init__(self, components: Sequence[int] = (1, 2, 4, 8), max_fit: int = 20000, seed: int = 0) -> None:
        self.components = tuple(components)
        self.max_fit = max_fit
        self.seed = seed

    def fit(self, S: np.ndarray) -> "JointDensity":
        r"""Fits the transforms and the mixture to statistics of normal objects.

        Arguments:
            S: Statistics, shape :math:`(n, k)`, finite.
        """

        S = np.asarray(S, dtype=np.float64)
        if S.ndim != 2 or S.shape[0] < 2:
            raise ValueError(f"JointDensity.fit: S has shape {S.shape}, expected (n >= 2, k)")
        _check_calib(S, "JointDensity.fit")
        if S.shape[0] > self.max_fit:
            S = S[np.random.default_rng(self.seed).choice(S.shape[0], self.max_fit, replace=False)]

        self.center = np.median(S, axis=0)
        q75, q25 = np.percentile(S, [75, 25], axis=0)
        scale = (q75 - q25) / 1.349  # IQR of a standard normal
        fallback = S.std(0)
        scale = np.where(scale > 0, scale, np.where(fallback > 0, fallback, 1.0))
        self.scale = scale

        X = (S - self.center) / self.scale
        self.lmbda = np.array([np.clip(stats.yeojohnson_normmax(x), 0.0, 2.0) for x in X.T])
        Y = self._yeojohnson(X)
        self.mean = Y.mean(0)
        std = Y.std(0)
        self.std = np.where(std > 0, std, 1.0)

        Y = torch.from_numpy((Y - self.mean) / self.std)
        components = tuple(c for c in self.components if c <= max(1, S.shape[0] // 10)) or (1,)
        self.gmm = GaussianMixture.fit_bic(Y, components=components, seed=self.seed, reg=1e-4)
        return self

    def _yeojohnson(self, X: np.ndarray) -> np.ndarray:
        return np.stack([stats.yeojohnson(x, lmbda=l) for x, l in zip(X.T, self.lmbda)], axis=1)

    def statistic(self, S: np.ndarray) -> np.ndarray:
        r"""Returns :math:`-\log p` of each object's statistics, shape :math:`(m,)`; larger is
        more anomalous."""

        S = np.asarray(S, dtype=np.float64)
        if S.ndim != 2 or S.shape[1] != self.center.size:
            raise ValueError(f"JointDensity.statistic: S has shape {S.shape}, expected (m, {self.center.size})")
        Y = (self._yeojohnson((S - self.center) / self.scale) - self.mean) / self.std
        return -self.gmm.log_prob(torch.from_numpy(Y)).numpy()

    def state(self) -> dict:
        r"""Returns the fitted density as plain Python and NumPy values."""

        return {
            "components": self.components,
            "max_fit": self.max_fit,
            "seed": self.seed,
            "center": self.center.copy(),
            "scale": self.scale.copy(),
            "lmbda": self.lmbda.copy(),
            "mean": self.mean.copy(),
            "std": self.std.copy(),
            "gmm_config": self.gmm.config(),
            "gmm_state": {k: v.cpu().numpy().copy() for k, v in self.gmm.state_dict().items()},
        }

    @classmethod
    def from_state(cls, state: dict) -> "JointDensity":
        r"""Rebuilds a density from :meth:`state`."""

        self = cls(
            components=tuple(int(c) for c in state["components"]),
            max_fit=int(state["max_fit"]),
            seed=int(state["seed"]),
        )
        for key in ("center", "scale", "lmbda", "mean", "std"):
            setattr(self, key, np.asarray(state[key], dtype=np.float64))
        self.gmm = GaussianMixture(**state["gmm_config"])
        self.gmm.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in state["gmm_state"].items()})
        return self


# The combined test


class CombinedTest:
    r"""Per-statistic calibrators and a combination rule, with the combined statistic
    itself conformalised so the final p-value is valid under any dependence between the
    statistics (which are always dependent: they are computed from the same cutout).

    `"bonferroni"` and `"simes"` need no second stage: their p-value is valid as it stands
    when each statistic's is (Bonferroni under any dependence; Simes under positive
    dependence, Sarkar 1998), so every calibration object goes to the per-statistic
    calibrators, which then resolve p-values twice as small. `two_stage=True` forces the
    split for them too.

    The other rules (`"fisher"`, `"stouffer"`, `"cauchy"`) assume independence, so they
    split the calibration statistics at random into two disjoint folds. Fold A (`split`
    of them) fits one :class:`TailCalibrator` per statistic; fold B gets p-values from
    those calibrators, combined into :math:`T = -\log p_\text{comb}`, and a last
    :class:`TailCalibrator` fitted to fold B's :math:`T` gives the final p-value. Fold B
    is independent of fold A, so a new normal object's :math:`T` is exchangeable with
    fold B's and the final p-value is conformal whatever the combiner's own assumptions
    (Bates et al., 2023; the split-conformal recipe of Papadopoulos et al., 2002).
    A per-statistic p-value of 1 (below all of fold A) is set to :math:`n_A / (n_A + 1)`
    before combining, so that Stouffer's and Cauchy's terms stay finite.

    `"dose"` needs no split: the :class:`JointDensity` is fitted to `S_fit` (normal
    training objects), its statistic is conformalised on all of `S_calib`, and the
    per-statistic p-values (reported, not combined) use all of `S_calib` too.

    References:
        | Combining Multiple Statistical Tests for Out-of-Distribution Detection
          (Bergamin et al., 2022) https://arxiv.org/abs/2203.01097
        | Testing for Outliers with Conformal p-values (Bates et al., 2023)
        | https://arxiv.org/abs/2104.08279

    Arguments:
        method: One of :data:`COMBINERS` or `"dose"`.
        split: The fraction of calibration objects in fold A.
        tail_frac: Passed to every :class:`TailCalibrator`.
        seed: Seeds the fold split and the DoSE mixture.
        trim: Passed to every :class:`TailCalibrator`: the largest share of calibration
            values removed as outliers (the anomalies a "normal" set holds).
        two_stage: Conformalise the combined statistic on a second fold; by default only
            for the rules that need it.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> test = CombinedTest("fisher").fit(None, rng.normal(size=(2000, 3)), ["a", "b", "c"])
        >>> out = test.pvalues(np.array([[0.0, 0.0, 0.0], [6.0, 0.0, 0.0]]))
        >>> sorted(out)
        ['p_a', 'p_b', 'p_c', 'p_value', 'score']
        >>> bool(out["p_value"][1] < 1e-3 < out["p_value"][0])
        True
    """

    def __init__(self, method: str = "fisher", split: float = 0.5, tail_frac: float = 0.1, seed: int = 0,
                 trim: float = 0.05, two_stage: bool | None = None) -> None:
        if method not in COMBINERS and method != "dose":
            raise ValueError(f"CombinedTest: method={method!r}, expected one of {[*COMBINERS, 'dose']}")
        if not 0 < split < 1:
            raise ValueError(f"CombinedTest: split={split} must be in (0, 1)")
        self.method = method
        self.split = split
        self.tail_frac = tail_frac
        self.seed = seed
        self.trim = trim
        self.two_stage = method not in _VALID_UNDER_DEPENDENCE if two_stage is None else bool(two_stage)

    def fit(self, S_fit: np.ndarray | None, S_calib: np.ndarray, names: Sequence[str]) -> "CombinedTest":
        r"""Fits calibrators (and the DoSE density) to statistics of normal objects.

        Arguments:
            S_fit: Statistics of normal training objects, shape :math:`(n_1, k)`; used by
                `"dose"` only (may be :py:`None` otherwise).
            S_calib: Statistics of held-out normal objects, shape :math:`(n_2, k)`, finite.
            names: The statistic names, :math:`k` of them; p-values come back as `p_<name>`.
        """

        S_calib = np.asarray(S_calib, dtype=np.float64)
        names = list(names)
        if S_calib.ndim != 2 or S_calib.shape[1] != len(names):
            raise ValueError(f"CombinedTest.fit: S_calib has shape {S_calib.shape}, expected (n, {len(names)}) for {names}")
        if len(set(names)) != len(names):
            raise ValueError(f"CombinedTest.fit: statistic names repeat: {names}")
        _check_calib(S_calib, "CombinedTest.fit: S_calib")
        self.names = names

        if self.method == "dose":
            if S_fit is None:
                raise ValueError("CombinedTest.fit: method 'dose' needs S_fit, statistics of normal training objects")
            S_fit = np.asarray(S_fit, dtype=np.float64)
            if S_fit.ndim != 2 or S_fit.shape[1] != len(names):
                raise ValueError(f"CombinedTest.fit: S_fit has shape {S_fit.shape}, expected (n, {len(names)})")
            self.joint = JointDensity(seed=self.seed).fit(S_fit)
            fold_a = fold_b = S_calib
        elif not self.two_stage:
            fold_a, fold_b = S_calib, None
            self.joint = None
        else:
            n = S_calib.shape[0]
            n_a = round(self.split * n)
            if n_a < 1 or n - n_a < 1:
                raise ValueError(f"CombinedTest.fit: {n} calibration objects cannot be split into two folds")
            perm = np.random.default_rng(self.seed).permutation(n)
            fold_a, fold_b = S_calib[perm[:n_a]], S_calib[perm[n_a:]]
            self.joint = None

        self.calibrators = [TailCalibrator(self.tail_frac, trim=self.trim).fit(fold_a[:, j]) for j in range(len(names))]
        # Bonferroni's and Simes' p-values are valid as they stand, so for them the tail of
        # T = -log p_comb is even known: P(T >= x) <= exp(-x).
        self.combined = None if fold_b is None else TailCalibrator(
            self.tail_frac, trim=self.trim, log_pvalue=self.method in _VALID_UNDER_DEPENDENCE,
        ).fit(self._statistic(fold_b, self._log_pvalues(fold_b)))
        return self

    def _log_pvalues(self, S: np.ndarray) -> np.ndarray:
        return np.stack([cal.log_pvalues(S[:, j]) for j, cal in enumerate(self.calibrators)], axis=1)

    def _statistic(self, S: np.ndarray, logP: np.ndarray) -> np.ndarray:
        r"""Returns the combined statistic, larger is more anomalous."""

        if self.method == "dose":
            return self.joint.statistic(S)
        log_max = np.array([math.log1p(-1 / (cal.n + 1)) for cal in self.calibrators])
        return -_LOG_COMBINERS[self.method](np.minimum(logP, log_max))

    def pvalues(self, S: np.ndarray) -> dict[str, np.ndarray]:
        r"""Returns per-statistic and combined p-values of objects.

        Arguments:
            S: Statistics, shape :math:`(m, k)`, columns in the order of `names`.

        Returns:
            `p_<name>` (one per statistic), `p_value` (combined) and `score`
            (:math:`-\log_{10}` `p_value`, computed in log space so it stays finite and
            distinct where `p_value` underflows to 0; larger is more anomalous), each
            shape :math:`(m,)`. Above the smallest combined statistic of the calibration
            objects, `p_value` strictly decreases with it, so distinct objects in the
            tail never tie. An object with a NaN statistic gets NaN for it and for the
            combined values.
        """

        S = np.asarray(S, dtype=np.float64)
        if S.ndim != 2 or S.shape[1] != len(self.names):
            raise ValueError(f"CombinedTest.pvalues: S has shape {S.shape}, expected (m, {len(self.names)}) for {self.names}")

        logP = self._log_pvalues(S)
        if self.combined is None:  # the rule's own p-value, valid as it stands
            log_p = np.minimum(_LOG_COMBINERS[self.method](logP), 0.0)
        else:
            log_p = self.combined.log_pvalues(self._statistic(S, logP))

        out = {f"p_{name}": np.exp(logP[:, j]) for j, name in enumerate(self.names)}
        out["p_value"] = np.exp(log_p)
        out["score"] = -log_p / math.log(10) + 0.0  # + 0.0 turns -0.0 into 0.0
        return out

    def state(self) -> dict:
        r"""Returns the fitted test as plain Python and NumPy values (picklable, no torch)."""

        return {
            "method": self.method,
            "split": self.split,
            "tail_frac": self.tail_frac,
            "seed": self.seed,
            "trim": self.trim,
            "two_stage": self.two_stage,
            "names": list(self.names),
            "calibrators": [cal.state() for cal in self.calibrators],
            "combined": None if self.combined is None else self.combined.state(),
            "joint": None if self.joint is None else self.joint.state(),
        }

    @classmethod
    def from_state(cls, state: dict) -> "CombinedTest":
        r"""Rebuilds a test from :meth:`state`."""

        self = cls(
            str(state["method"]),
            split=float(state["split"]),
            tail_frac=float(state["tail_frac"]),
            seed=int(state["seed"]),
            trim=float(state.get("trim", 0.0)),
            two_stage=bool(state.get("two_stage", True)),
        )
        self.names = [str(n) for n in state["names"]]
        self.calibrators = [TailCalibrator.from_state(s) for s in state["calibrators"]]
        self.combined = None if state["combined"] is None else TailCalibrator.from_state(state["combined"])
        self.joint = None if state["joint"] is None else JointDensity.from_state(state["joint"])
        return self


# False discovery rate


def bh_qvalues(p: np.ndarray) -> np.ndarray:
    r"""Returns Benjamini-Hochberg adjusted p-values (q-values).

    :math:`q_{(i)} = \min_{j \geq i} \min(1, m\, p_{(j)} / j)`; rejecting every object
    with :math:`q \leq \alpha` controls the false discovery rate at :math:`\alpha` for
    independent or positively dependent p-values.

    References:
        | Controlling the False Discovery Rate (Benjamini & Hochberg, 1995)
        | https://doi.org/10.1111/j.2517-6161.1995.tb02031.x

    Arguments:
        p: p-values, any shape; NaN entries are left out of :math:`m` and give NaN.

    Returns:
        q-values, shape of `p`.

    Example:
        >>> bh_qvalues(np.array([0.01, 0.04, 0.03, 0.5]))
        array([0.04      , 0.05333333, 0.05333333, 0.5       ])
    """

    p = np.asarray(p, dtype=np.float64)
    flat = p.ravel()
    q = np.full(flat.shape, np.nan)
    finite = ~np.isnan(flat)
    pf = flat[finite]
    m = pf.size
    if m:
        order = np.argsort(pf, kind="stable")
        ranked = pf[order] * m / np.arange(1, m + 1)
        ranked = np.minimum(np.minimum.accumulate(ranked[::-1])[::-1], 1.0)
        qf = np.empty(m)
        qf[order] = ranked
        q[finite] = qf
    return q.reshape(p.shape)
