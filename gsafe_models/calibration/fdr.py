r"""False discovery rate: Benjamini-Hochberg q-values over a survey's p-values."""

__all__ = [
    "bh_qvalues",
]

import numpy as np

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
