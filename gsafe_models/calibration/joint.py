r"""DoSE: a density over the vector of statistics of normal objects, one joint statistic."""

__all__ = [
    "JointDensity",
]

from collections.abc import Sequence

import numpy as np
import torch

from scipy import stats

from ..density import GaussianMixture
from ..robust import robust_scale
from .tail import _check_calib

class JointDensity:
    r"""Creates a density over the vector of statistics of normal objects (DoSE); its
    :math:`-\log` density is one joint statistic.

    Unlike combining one-sided p-values, the joint density also flags objects whose
    statistics are atypically *small* or whose combination is unusual (typicality).
    Each statistic is mapped to a roughly Gaussian scale by a robust standardisation
    (median and MAD, :func:`~gsafe_models.robust.robust_scale`) and a Yeo-Johnson transform
    with :math:`\lambda \in [0, 2]` (the range where the transform is unbounded on both sides, so extreme objects stay ordered),
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

        self.center, self.scale = robust_scale(S, axis=0)

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
