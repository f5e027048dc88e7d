r"""Outlier exposure: a monotone classifier over the statistics, trained on held-out normal objects
against their generically perturbed copies; its log-odds are one combined statistic."""

__all__ = [
    "ExposureScore",
]

import warnings

import numpy as np

from ..robust import robust_scale


class ExposureScore:
    r"""Creates a combined statistic *learned* from self-made outliers: boosted trees over the
    statistics, trained to tell normal objects (held out from every fit) from copies of them
    perturbed by the generic kinds of :mod:`gsafe_models.perturb` (outlier exposure with
    synthetic outliers, Hendrycks et al. 2019). No anomaly class and no label is seen.

    Every statistic says "larger is more anomalous", and the trees are held to it: each
    feature enters with a monotone increasing constraint (scikit-learn's
    :class:`~sklearn.ensemble.HistGradientBoostingClassifier`, `monotonic_cst` +1), so a
    larger statistic can never make an object look more normal, and a statistic at chance
    cannot flip an anomaly's rank. Each statistic is first put in robust-z units of the
    normal objects (median and MAD, :func:`~gsafe_models.robust.robust_scale`). The fitted
    trees are kept as plain arrays (no pickled code) and evaluated in NumPy.

    The statistic is the trees' log-odds; :class:`~gsafe_models.calibration.CombinedTest`
    conformalises it on calibration objects the trees never saw, so its p-value is valid
    whatever the trees learned.

    Trees cannot extrapolate: every object beyond each tree's last split in the direction of
    "anomalous" gets the same, largest log-odds :math:`F_\max`, whether it departs by 5 or by
    500 MADs. There (and only there) the statistic continues with the largest robust z of the
    object's statistics, :math:`F_\max + \max(0, \max_j z_j)`, so the most extreme objects keep
    distinct, ordered values, and those beyond every calibration object reach the small p-values
    of the calibration's tail model, as each statistic's own extremes do under the other rules.
    The set :math:`\{F = F_\max\}` is an upper set of the monotone trees and the term grows
    with each statistic, so the statistic stays monotone. `saturation=False` gives the plain
    log-odds (and is what a state saved before this term reads back as).

    References:
        | Deep Anomaly Detection with Outlier Exposure (Hendrycks et al., 2019)
        | https://arxiv.org/abs/1812.04606
        | Greedy Function Approximation: A Gradient Boosting Machine (Friedman, 2001)
        | https://doi.org/10.1214/aos/1013203451

    Arguments:
        max_iter: Boosting iterations (trees).
        max_depth: Depth of each tree.
        learning_rate: Shrinkage of each tree.
        seed: Seeds the trees' fit.
        saturation: Orders the objects at the trees' largest log-odds by their largest robust z.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> normal = rng.normal(size=(400, 3))
        >>> perturbed = normal + np.where(rng.random((400, 1)) < 0.5, [3.0, 0.0, 0.0], [0.0, 3.0, 0.0])
        >>> t = ExposureScore().fit(normal, perturbed).statistic(np.array([[0.0, 0.0, 0.0], [4.0, 0.0, 0.0]]))
        >>> bool(t[1] > t[0])
        True
    """

    def __init__(self, max_iter: int = 100, max_depth: int = 3, learning_rate: float = 0.1, seed: int = 0,
                 saturation: bool = True) -> None:
        self.saturation = bool(saturation)
        self.max_iter = int(max_iter)
        self.max_depth = int(max_depth)
        self.learning_rate = float(learning_rate)
        self.seed = int(seed)

    def fit(self, S_normal: np.ndarray, S_perturbed: np.ndarray) -> "ExposureScore":
        r"""Fits the trees: `S_normal` (class 0) against `S_perturbed` (class 1), balanced.

        Arguments:
            S_normal: Statistics of normal objects held out from the statistics' fits and from
                the calibration, shape :math:`(n, k)`.
            S_perturbed: Statistics of their perturbed copies, shape :math:`(m, k)`. Rows with a
                non-finite value are left out of both (a cutout with too many missing pixels).
        """

        from sklearn.ensemble import HistGradientBoostingClassifier

        S_normal = np.asarray(S_normal, np.float64)
        S_perturbed = np.asarray(S_perturbed, np.float64)
        if S_normal.ndim != 2 or S_perturbed.ndim != 2 or S_normal.shape[1] != S_perturbed.shape[1]:
            raise ValueError(f"ExposureScore.fit: statistics of shapes {S_normal.shape} and {S_perturbed.shape}, "
                             "expected (n, k) and (m, k)")
        S_normal = S_normal[np.isfinite(S_normal).all(axis=1)]
        S_perturbed = S_perturbed[np.isfinite(S_perturbed).all(axis=1)]
        if len(S_normal) < 2 or len(S_perturbed) < 2:
            raise ValueError(f"ExposureScore.fit: {len(S_normal)} normal and {len(S_perturbed)} perturbed objects with "
                             "finite statistics; it needs at least 2 of each")
        self.loc, scale = robust_scale(S_normal, axis=0, fallback=True)
        self.scale = np.asarray(scale, np.float64)
        self.loc = np.asarray(self.loc, np.float64)
        X = self._units(np.concatenate([S_normal, S_perturbed]))
        y = np.r_[np.zeros(len(S_normal)), np.ones(len(S_perturbed))]
        model = HistGradientBoostingClassifier(
            max_iter=self.max_iter, max_depth=self.max_depth, learning_rate=self.learning_rate, class_weight="balanced",
            monotonic_cst=[1] * X.shape[1], early_stopping=False, random_state=self.seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.fit(X, y)
        self._export(model)
        self.n_normal, self.n_perturbed = len(S_normal), len(S_perturbed)
        return self

    def _units(self, S: np.ndarray) -> np.ndarray:
        return (S - self.loc) / self.scale

    def _export(self, model) -> None:
        """The trees as padded arrays (T, M): split feature, threshold, children, leaf values. Reads the
        fitted model's predictor nodes (scikit-learn's own layout, pinned in pyproject.toml; a test checks
        the arrays against `decision_function`, so a change of layout fails there, not in a hunt)."""
        nodes = [tree.nodes for trees in model._predictors for tree in trees]
        M = max(len(n) for n in nodes)
        pad = lambda field, dtype: np.stack([np.pad(np.asarray(n[field], dtype), (0, M - len(n))) for n in nodes])  # noqa: E731
        self.baseline = float(np.ravel(model._baseline_prediction)[0])
        self.feature, self.threshold = pad("feature_idx", np.int64), pad("num_threshold", np.float64)
        self.left, self.right = pad("left", np.int64), pad("right", np.int64)
        self.leaf, self.value = pad("is_leaf", bool), pad("value", np.float64)
        self.missing_left = pad("missing_go_to_left", bool)

    @property
    def log_odds_max(self) -> float:
        """The trees' largest log-odds :math:`F_\\max` (each monotone tree's largest leaf, reached beyond
        all of its splits)."""
        return float(self.baseline + np.where(self.leaf, self.value, -np.inf).max(axis=1).sum())

    def statistic(self, S: np.ndarray) -> np.ndarray:
        r"""Returns the statistic, :math:`(m,)`: the trees' log-odds that each object is perturbed,
        continued at their maximum by the largest robust z (see the class); larger is more anomalous,
        and never smaller where a statistic grows. NaN where a statistic is NaN."""

        out, X = self._log_odds(S)
        if self.saturation:
            top = out >= self.log_odds_max - 1e-9 * max(1.0, abs(self.log_odds_max))
            out = np.where(top, out + np.maximum(np.max(X, axis=1), 0.0), out)
        return out

    def log_odds(self, S: np.ndarray) -> np.ndarray:
        r"""Returns the trees' log-odds alone, :math:`(m,)` (scikit-learn's `decision_function`); NaN
        where a statistic is NaN."""

        return self._log_odds(S)[0]

    def _log_odds(self, S: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        S = np.asarray(S, np.float64)
        if S.ndim != 2 or S.shape[1] != self.loc.shape[0]:
            raise ValueError(f"ExposureScore.statistic: S has shape {S.shape}, expected (m, {self.loc.shape[0]})")
        X = self._units(S)
        T, m = self.feature.shape[0], len(X)
        node = np.zeros((m, T), np.int64)
        trees = np.arange(T)[None, :]
        for _ in range(self.feature.shape[1]):  # no tree is deeper than it has nodes
            inner = ~self.leaf[trees, node]
            if not inner.any():
                break
            x = np.take_along_axis(X, self.feature[trees, node], axis=1)
            go_left = np.where(np.isnan(x), self.missing_left[trees, node], x <= self.threshold[trees, node])
            node = np.where(inner, np.where(go_left, self.left[trees, node], self.right[trees, node]), node)
        out = self.baseline + self.value[trees, node].sum(axis=1)
        out[np.isnan(S).any(axis=1)] = np.nan
        return out, X

    def state(self) -> dict:
        r"""Returns the fitted statistic as plain Python and NumPy values (picklable, no code)."""

        return {"kind": "exposure", "saturation": self.saturation, "max_iter": self.max_iter, "max_depth": self.max_depth,
                "learning_rate": self.learning_rate, "seed": self.seed, "loc": self.loc, "scale": self.scale,
                "baseline": self.baseline, "feature": self.feature, "threshold": self.threshold, "left": self.left,
                "right": self.right, "leaf": self.leaf, "value": self.value, "missing_left": self.missing_left,
                "n_normal": self.n_normal, "n_perturbed": self.n_perturbed}

    @classmethod
    def from_state(cls, state: dict) -> "ExposureScore":
        r"""Rebuilds the statistic from :meth:`state`."""

        self = cls(state["max_iter"], state["max_depth"], state["learning_rate"], state["seed"],
                   saturation=bool(state.get("saturation", False)))
        for k in ("loc", "scale", "threshold", "value"):
            setattr(self, k, np.asarray(state[k], np.float64))
        for k in ("feature", "left", "right"):
            setattr(self, k, np.asarray(state[k], np.int64))
        for k in ("leaf", "missing_left"):
            setattr(self, k, np.asarray(state[k], bool))
        self.baseline = float(state["baseline"])
        self.n_normal, self.n_perturbed = int(state["n_normal"]), int(state["n_perturbed"])
        return self
