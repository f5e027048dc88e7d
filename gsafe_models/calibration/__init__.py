r"""Calibrated p-values for anomaly statistics, and their combination into one test.

A statistic is any per-object number where larger means more anomalous (reconstruction
residual, latent :math:`-\log p(z)`, typicality distance...). Each is turned into a
p-value against held-out normal data (conformal, with a continuous tail beyond the
calibration range), several p-values are combined into one (Fisher, Stouffer, Simes,
Bonferroni, Cauchy, a DoSE density over the statistics, or trees trained on perturbed copies), and the combined statistic is
itself conformalised, so the final p-value is valid however dependent the statistics are.

Combiners work on :math:`\log p` internally so that objects far beyond the calibration
range keep distinct, finite scores instead of underflowing to :math:`p = 0`.

One idea per module:

- :mod:`.tail`: :func:`conformal_pvalues` and the :class:`TailCalibrator` (conformal inside
  the calibration range, a censored-GPD outlier trim and a GPD tail beyond it);
- :mod:`.combine`: the combination rules, :data:`COMBINERS` (a new rule goes there: its
  ``_log_<name>`` on log p-values in ``_LOG_COMBINERS``, its p-value form in ``COMBINERS``);
- :mod:`.joint`: the DoSE :class:`JointDensity` over the statistics;
- :mod:`.exposure`: the :class:`ExposureScore`, monotone trees over the statistics trained on
  normal objects against their generically perturbed copies (outlier exposure);
- :mod:`.combined`: the :class:`CombinedTest` that ties calibrators and a rule together;
- :mod:`.fdr`: Benjamini-Hochberg :func:`bh_qvalues`.
"""

__all__ = [
    "COMBINERS",
    "CombinedTest",
    "ExposureScore",
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

from .combine import COMBINERS, bonferroni, cauchy, fisher, simes, stouffer
from .combined import CombinedTest
from .exposure import ExposureScore
from .fdr import bh_qvalues
from .joint import JointDensity
from .tail import TailCalibrator, conformal_pvalues
