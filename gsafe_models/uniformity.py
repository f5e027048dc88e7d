r"""Are these p-values uniform? The one-sided Kolmogorov–Smirnov check behind promotion and drift alarms.

What breaks a false-discovery list is too many *small* p-values on objects that are not
anomalous, so the check is one-sided: :math:`D^+ = \sup_t (F_n(t) - t)` of the p-values'
empirical law against the uniform. A conservative test (Simes, Bonferroni: p-values above the
uniform) passes; data unlike the calibration data (more sky noise, a wider PSF, another
instrument) pushes many p-values down and fails.

Conformal p-values are uniform on average over calibration sets, but given *one* calibration set
of size :math:`m` their law is off by :math:`O(1/\sqrt m)` (Bates et al., 2023), so the yardstick
is the two-sample one: reject at level :math:`\alpha` when

.. math:: D^+ > \sqrt{-\ln(\alpha)/2}\,\sqrt{1/n + 1/m},

Smirnov's (1939) asymptotic one-sided bound, :math:`1.52\sqrt{1/n + 1/m}` at :math:`\alpha = 0.01`;
the one-sample :math:`1.52/\sqrt n` refuses every honest model once :math:`n \gg m`.

References:
    | Estimate of deviation between empirical distribution functions in two independent samples
    | (Smirnov, 1939), Bulletin Moscow University 2(2), 3-16
    | Testing for outliers with conformal p-values (Bates, Candès, Lei, Romano, Sesia, 2023)
    | https://arxiv.org/abs/2104.08279
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy.stats import kstest

__all__ = ["ks_critical", "calibration_ks", "drift_check"]


def ks_critical(n: int, m: float | None = None, alpha: float = 0.01) -> float:
    r"""The one-sided KS critical value :math:`\sqrt{-\ln(\alpha)/2}\sqrt{1/n + 1/m}`.

    Arguments:
        n: The number of p-values tested.
        m: The calibration size they were computed against; None for the one-sample bound.
        alpha: The level.

    Example:
        >>> round(ks_critical(100, 400), 4)
        0.1697
    """
    extra = 1.0 / m if m else 0.0
    return math.sqrt(-math.log(alpha) / 2.0) * math.sqrt(1.0 / n + extra)


def calibration_ks(p_values, n_calib: float | None = None, n_min: int = 50,
                   alpha: float = 0.01) -> tuple[float, float]:
    r"""(:math:`D^+`, its critical value at `alpha`) of p-values against the uniform law.

    Arguments:
        p_values: `(n,)` p-values; non-finite ones are ignored.
        n_calib: The calibration size :math:`m` behind them (None: the one-sample bound).
        n_min: Fewer finite p-values than this: no test, (nan, nan).
        alpha: The level of the critical value.

    Example:
        >>> p = np.linspace(0.005, 0.995, 100)       # as uniform as 100 values get
        >>> d, crit = calibration_ks(p, n_calib=400)
        >>> d <= crit
        True
        >>> d, crit = calibration_ks(p ** 3, n_calib=400)   # piled up near 0
        >>> d > crit
        True
    """
    p = np.asarray(p_values, float)
    p = p[np.isfinite(p)]
    if len(p) < n_min:
        return float("nan"), float("nan")
    d_plus = float(kstest(p, "uniform", alternative="greater").statistic)
    return d_plus, ks_critical(len(p), n_calib, alpha)


def _tests(p: np.ndarray, statistics: Mapping[str, np.ndarray], sel: np.ndarray | slice) -> list[tuple[str, np.ndarray]]:
    """(name, values) of every one-sided check of one subset of objects."""
    tests = [("combined p-value", p[sel])]
    for name, ps in statistics.items():
        ps = np.asarray(ps, float)[sel]
        tests += [(f"{name} small", ps), (f"{name} large", 1.0 - ps)]
    return tests


def drift_check(p_values, groups: Sequence[str] | None = None, n_calib: float | None = None,
                alpha: float = 0.01, n_min: int = 50, statistics: Mapping[str, np.ndarray] | None = None) -> dict:
    r"""The drift alarm: are new objects unlike the calibration data?

    Two kinds of one-sided check (:func:`calibration_ks`), all Bonferroni-corrected together:

    - the combined p-values pile up near 0 (what breaks the false-discovery list);
    - a statistic's own p-values pile up near 0 *or near 1* (its values larger or smaller than
      on calibration data: the latter is tested as :math:`1 - p`). Each statistic's p-value is
      conformal on its own and so uniform on data like the calibration data; a wider PSF makes
      galaxies *more* regular (asymmetry p-values near 1), which the combined p-value alone
      never shows.

    All objects are tested at level `alpha`, and each group (an input tile, a batch) with at
    least `n_min` objects at `alpha / k` for `k` such groups, so that a survey of many tiles
    does not cry wolf, while one odd tile too small to move the whole still raises the alarm.

    Arguments:
        p_values: `(n,)` combined p-values of the new objects.
        groups: `(n,)` group key of each object (e.g. its source tile), or None.
        n_calib: The calibration size of the p-values.
        alpha: The family-wise level of the alarm.
        n_min: The smallest group (and the smallest whole) that is tested.
        statistics: {name: `(n,)` p-values of that statistic}, or None for the combined only.

    Returns:
        ``{"alarm": bool, "alarms": [str], "overall": {...}, "groups": {key: {...}}}``, each
        subset as ``{"n", "alarm", "d_plus", "critical", "worst"}`` for its worst check (the one
        with the largest ``d_plus - critical``; NaN when the subset is too small to test).

    Example:
        >>> rng = np.random.default_rng(0)
        >>> p = np.concatenate([rng.uniform(size=300), rng.uniform(size=100) ** 4])
        >>> r = drift_check(p, ["a"] * 300 + ["b"] * 100, n_calib=500)
        >>> r["groups"]["a"]["alarm"], r["groups"]["b"]["alarm"], r["alarm"]
        (False, True, True)
        >>> r["alarms"][-1]
        'b (100 objects): combined p-value: KS D+ 0.489 > 0.178'
    """
    p = np.asarray(p_values, float)
    stats = dict(statistics or {})
    n_tests = 1 + 2 * len(stats)
    out: dict = {"alarm": False, "alarms": [], "groups": {}}

    def subset(sel, level: float, label: str) -> dict:
        worst = {"n": int(np.isfinite(p[sel]).sum()), "alarm": False, "d_plus": float("nan"),
                 "critical": float("nan"), "worst": ""}
        for name, values in _tests(p, stats, sel):
            d, crit = calibration_ks(values, n_calib, n_min, level / n_tests)
            if d == d and (worst["worst"] == "" or d - crit > worst["d_plus"] - worst["critical"]):
                worst.update(d_plus=d, critical=crit, worst=name)
            if d > crit:
                worst["alarm"] = True
                out["alarms"].append(f"{label}: {name}: KS D+ {d:.3f} > {crit:.3f}")
        return worst

    out["overall"] = subset(slice(None), alpha, f"all {len(p)} new objects")
    if groups is not None:
        keys = np.asarray([str(g) for g in groups], dtype=object)
        if len(keys) != len(p):
            raise ValueError(f"drift_check: {len(keys)} group keys for {len(p)} p-values")
        names, counts = np.unique(keys, return_counts=True)
        k = max(1, int((counts >= n_min).sum()))
        for name, c in zip(names, counts):
            out["groups"][str(name)] = subset(keys == name, alpha / k, f"{name} ({c} objects)")
    out["alarm"] = bool(out["alarms"])
    return out
