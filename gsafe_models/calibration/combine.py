r"""Combination rules: several p-values of one object into one (Fisher, Stouffer, Simes, Bonferroni, Cauchy).

Each rule works on :math:`\log p` internally so that objects far beyond the calibration range keep
distinct, finite scores instead of underflowing to :math:`p = 0`.
"""

__all__ = [
    "COMBINERS",
    "bonferroni",
    "cauchy",
    "fisher",
    "simes",
    "stouffer",
]

import math

from collections.abc import Callable

import numpy as np

from scipy import special

# Rules whose p-value is valid as it stands when each statistic's p-value is: Bonferroni under
# any dependence, Simes under positive dependence (PRDS; Sarkar 1998), which statistics of one
# cutout have. They need no second calibration fold.
_VALID_UNDER_DEPENDENCE = ("bonferroni", "simes")


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
