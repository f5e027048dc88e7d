r"""One robust location and scale: the median and the normal-consistent median absolute deviation."""

__all__ = [
    "MAD_TO_SIGMA",
    "robust_scale",
]

import numpy as np
import torch

from scipy import special, stats

# sigma of a Gaussian per unit MAD: 1 / Phi^{-1}(3/4) = 1.482602218505602 (scipy's scale="normal")
MAD_TO_SIGMA = float(1 / special.ndtri(0.75))


def robust_scale(x: np.ndarray | torch.Tensor, axis: int | None = None, *,
                 fallback: bool = True) -> tuple[np.ndarray | torch.Tensor, np.ndarray | torch.Tensor]:
    r"""Returns the median and :math:`1.4826 \times` MAD of `x` along `axis`: a location and a
    Gaussian-consistent scale that a minority of outliers (up to half) cannot drag away.

    The MAD is scipy's (:func:`scipy.stats.median_abs_deviation`, ``scale="normal"``). Where it
    is 0 (more than half of the values equal), the scale falls back on the standard deviation,
    then on 1, so dividing by it is always safe; `fallback=False` returns the raw 0 instead.

    References:
        | Alternatives to the Median Absolute Deviation (Rousseeuw & Croux, 1993)
        | https://doi.org/10.1080/01621459.1993.10476408

    Arguments:
        x: Finite values, a NumPy array or a torch tensor (computed in float64 NumPy, returned
            as a tensor of `x`'s dtype on its device).
        axis: The axis reduced (None: all values).
        fallback: Replace a zero scale by the standard deviation, then by 1.

    Returns:
        (center, scale), each of `x`'s shape without `axis` (scalars as 0-d arrays with `axis=None`).

    Example:
        >>> center, scale = robust_scale(np.array([1.0, 2.0, 3.0, 4.0, 100.0]))
        >>> float(center), round(float(scale), 4)
        (3.0, 1.4826)
    """

    if isinstance(x, torch.Tensor):
        center, scale = robust_scale(x.detach().cpu().numpy(), axis, fallback=fallback)
        return (torch.as_tensor(center, dtype=x.dtype, device=x.device),
                torch.as_tensor(scale, dtype=x.dtype, device=x.device))
    x = np.asarray(x, dtype=np.float64)
    if x.size == 0:
        raise ValueError("robust_scale: no values; give at least one")
    center = np.median(x, axis=axis)
    scale = stats.median_abs_deviation(x, axis=axis, center=np.median, scale="normal")
    if fallback:
        std = np.std(x, axis=axis)
        scale = np.where(scale > 0, scale, np.where(std > 0, std, 1.0))
    return np.asarray(center), np.asarray(scale)
