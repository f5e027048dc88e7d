r"""False discovery rate: Benjamini-Hochberg q-values over a survey's p-values."""

__all__ = [
    "bh_qvalues",
]

import numpy as np

from scipy import stats


def bh_qvalues(p: np.ndarray) -> np.ndarray:
    r"""Returns Benjamini-Hochberg adjusted p-values (q-values).

    :math:`q_{(i)} = \min_{j \geq i} \min(1, m\, p_{(j)} / j)`; rejecting every object
    with :math:`q \leq \alpha` controls the false discovery rate at :math:`\alpha` for
    independent or positively dependent p-values. The adjustment is scipy's
    (:func:`scipy.stats.false_discovery_control`); this adds what a survey needs: NaN
    p-values (objects not scored) are left out of :math:`m` and keep NaN.

    References:
        | Controlling the False Discovery Rate (Benjamini & Hochberg, 1995)
        | https://doi.org/10.1111/j.2517-6161.1995.tb02031.x

    Arguments:
        p: p-values in :math:`[0, 1]`, any shape; NaN entries are left out of :math:`m`
            and give NaN.

    Returns:
        q-values, shape of `p`.

    Raises:
        ValueError: a p-value outside :math:`[0, 1]`.

    Example:
        >>> bh_qvalues(np.array([0.01, 0.04, 0.03, 0.5]))
        array([0.04      , 0.05333333, 0.05333333, 0.5       ])
    """

    p = np.asarray(p, dtype=np.float64)
    flat = p.ravel()
    q = np.full(flat.shape, np.nan)
    finite = ~np.isnan(flat)
    outside = int((flat[finite] < 0).sum() + (flat[finite] > 1).sum())
    if outside:
        raise ValueError(f"bh_qvalues: {outside} of {flat.size} p-values lie outside [0, 1]; "
                         f"they are not p-values (check the statistic's calibration)")
    if finite.any():
        q[finite] = stats.false_discovery_control(flat[finite], method="bh")
    return q.reshape(p.shape)
