r"""Per-statistic p-values: conformal inside the calibration range, a generalized Pareto tail beyond it."""

__all__ = [
    "TailCalibrator",
    "conformal_pvalues",
]

import math

import numpy as np

from scipy import optimize, stats

# The outlier test fits the tail above this upper quantile; after trimming, the tail is
# extrapolated no lighter than a GPD of this shape (see TailCalibrator).
_TRIM_TAIL = 0.2
_TRIMMED_MIN_SHAPE = 0.25

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

    That is the conservative reading, `trimmed_are_normal`: the removed values may have been
    normal, so they still count as calibration objects above every kept one (the p-value just
    past the kept range is :math:`(1 + r)/(n + 1)`) and the tail is kept heavy. On a dirty set
    it costs the list: with 3 % anomalies among the calibration objects nearly nothing reaches
    BH's threshold (`tests/models/test_calibration.py`). Without it the outlier test is
    believed: the removed values leave the calibration set (:math:`p = 1/(n - r + 1)` just past
    the kept range) and the tail is the one fitted to the kept values. That is exact when the
    removed values are anomalies and the kept tail is exponential-like. On gsafe's statistics it
    is not (`bench/quality.py --trimmed-are-normal 0`: Simes' realised FDR 0.19 / 0.16 at q = 0.1
    on two seeds, against 0.03 / 0.02 conservatively): real tails are heavier than the kept
    values show, so the conservative reading is the default everywhere and this one is kept for
    tests and for that measurement.

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
        trimmed_are_normal: The removed outliers still count as calibration objects above every
            kept one and the tail is extrapolated no lighter than shape 0.25 (conservative);
            False: they leave the calibration set and the tail is the kept values' own.

    Example:
        >>> cal = TailCalibrator().fit(np.random.default_rng(0).normal(size=999))
        >>> p = cal.pvalues(np.array([0.0, 3.5, 4.0, 8.0]))
        >>> bool(p[0] > 0.4 and p[1] < 1e-3 and p[2] > p[3] > 0)
        True
    """

    def __init__(self, tail_frac: float = 0.1, min_tail: int = 10, trim: float = 0.05, trim_alpha: float = 0.01,
                 trim_max_shape: float = 0.0, log_pvalue: bool = False, trimmed_are_normal: bool = True) -> None:
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
        self.trimmed_are_normal = bool(trimmed_are_normal)
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
        if self.trimmed and self.trimmed_are_normal and shape < _TRIMMED_MIN_SHAPE:
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
        # scipy's fit with the shape and location fixed; its default optimizer stops at ~1e-5,
        # a tighter one gives the maximum to double precision
        return float(stats.genpareto.fit(y, fc=shape, floc=0, optimizer=_tight_fmin)[2])

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
            log_q = math.log(m / n) + stats.genpareto.logsf(top - threshold, shape, scale=scale)
        # the r-th largest as the largest of the n - r + 1 values left once those above it are out
        r = np.arange(1, k + 1)
        significant = -np.expm1((n - r + 1) * np.log1p(-np.minimum(np.exp(log_q), 1.0))) < self.trim_alpha / k
        return int(r[significant].max()) if significant.any() else 0

    def _set(self, values: np.ndarray, threshold: float, shape: float, scale: float) -> None:
        self.values = values
        self.threshold, self.shape, self.scale = threshold, shape, scale
        # trimmed_are_normal: the trimmed values still count as calibration objects above every
        # kept one: inside the kept range the p-value is the untrimmed conformal one (valid
        # whatever the outlier test decided); trimming only changes the tail model beyond it,
        # anchored at (1 + r)/(n + 1). Otherwise they left the calibration set (r = 0 here).
        n, r = values.size, (self.trimmed if self.trimmed_are_normal else 0)
        self._xp = np.unique(values)
        self._fp = (1 + r + n - np.searchsorted(values, self._xp, side="left")) / (n + r + 1)
        self._log_tail0 = math.log((1 + r) / (n + r + 1)) - self._gpd_logsf(values[-1] - threshold)

    def _gpd_logsf(self, x: np.ndarray) -> np.ndarray:
        return stats.genpareto.logsf(x, self.shape, scale=self.scale)

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
            "trimmed_are_normal": self.trimmed_are_normal,
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
                   log_pvalue=bool(state.get("log_pvalue", False)),
                   trimmed_are_normal=bool(state.get("trimmed_are_normal", True)))
        self.trimmed = int(state.get("trimmed", 0))
        values = np.asarray(state["values"], dtype=np.float64)
        self._set(values, float(state["threshold"]), float(state["shape"]), float(state["scale"]))
        return self




def _tight_fmin(func, x0, args=(), disp=0):
    return optimize.fmin(func, x0, args=args, xtol=1e-12, ftol=1e-14, maxiter=2000, disp=disp)


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
