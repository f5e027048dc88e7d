r"""The combined test: per-statistic calibrators and a combination rule, conformalised as a whole."""

__all__ = [
    "CombinedTest",
]

import math

from collections.abc import Sequence

import numpy as np

from .combine import _LOG_COMBINERS, _VALID_UNDER_DEPENDENCE, COMBINERS
from .exposure import ExposureScore
from .joint import JointDensity
from .tail import TailCalibrator, _check_calib

#: The rules whose combined statistic is a model fitted to normal objects' statistics.
_LEARNED = ("dose", "exposure")


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

    `"exposure"` is the same with an :class:`ExposureScore` (monotone trees) trained on
    `S_fit`, normal objects held out from every fit and from the calibration, against
    `S_perturbed`, their generically perturbed copies (outlier exposure).

    References:
        | Combining Multiple Statistical Tests for Out-of-Distribution Detection
          (Bergamin et al., 2022) https://arxiv.org/abs/2203.01097
        | Testing for Outliers with Conformal p-values (Bates et al., 2023)
        | https://arxiv.org/abs/2104.08279

    Arguments:
        method: One of :data:`COMBINERS`, `"dose"` or `"exposure"`.
        split: The fraction of calibration objects in fold A.
        tail_frac: Passed to every :class:`TailCalibrator`.
        seed: Seeds the fold split and the DoSE mixture.
        trim: Passed to every :class:`TailCalibrator`: the largest share of calibration
            values removed as outliers (the anomalies a "normal" set holds).
        two_stage: Conformalise the combined statistic on a second fold; by default only
            for the rules that need it.
        trimmed_are_normal: Passed to every :class:`TailCalibrator`: whether the removed
            outliers still count as normal calibration objects (conservative) or leave the set.

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
                 trim: float = 0.05, two_stage: bool | None = None, trimmed_are_normal: bool = True) -> None:
        if method not in COMBINERS and method not in _LEARNED:
            raise ValueError(f"CombinedTest: method={method!r}, expected one of {[*COMBINERS, *_LEARNED]}")
        if not 0 < split < 1:
            raise ValueError(f"CombinedTest: split={split} must be in (0, 1)")
        self.method = method
        self.split = split
        self.tail_frac = tail_frac
        self.seed = seed
        self.trim = trim
        self.trimmed_are_normal = bool(trimmed_are_normal)
        self.two_stage = method not in _VALID_UNDER_DEPENDENCE if two_stage is None else bool(two_stage)

    def fit(self, S_fit: np.ndarray | None, S_calib: np.ndarray, names: Sequence[str],
            S_perturbed: np.ndarray | None = None) -> "CombinedTest":
        r"""Fits calibrators (and the DoSE density or the exposure trees) to statistics of normal objects.

        Arguments:
            S_fit: Statistics of normal training objects, shape :math:`(n_1, k)`; used by
                `"dose"` and `"exposure"` only (may be :py:`None` otherwise). For `"exposure"`,
                objects held out from the statistics' fits and from `S_calib`.
            S_calib: Statistics of held-out normal objects, shape :math:`(n_2, k)`, finite.
            names: The statistic names, :math:`k` of them; p-values come back as `p_<name>`.
            S_perturbed: `"exposure"` only: statistics of perturbed copies of `S_fit`'s objects.
        """

        S_calib = np.asarray(S_calib, dtype=np.float64)
        names = list(names)
        if S_calib.ndim != 2 or S_calib.shape[1] != len(names):
            raise ValueError(f"CombinedTest.fit: S_calib has shape {S_calib.shape}, expected (n, {len(names)}) for {names}")
        if len(set(names)) != len(names):
            raise ValueError(f"CombinedTest.fit: statistic names repeat: {names}")
        _check_calib(S_calib, "CombinedTest.fit: S_calib")
        self.names = names

        if self.method in _LEARNED:
            if S_fit is None:
                raise ValueError(f"CombinedTest.fit: method {self.method!r} needs S_fit, statistics of normal training objects")
            S_fit = np.asarray(S_fit, dtype=np.float64)
            if S_fit.ndim != 2 or S_fit.shape[1] != len(names):
                raise ValueError(f"CombinedTest.fit: S_fit has shape {S_fit.shape}, expected (n, {len(names)})")
            if self.method == "dose":
                self.joint = JointDensity(seed=self.seed).fit(S_fit)
            elif S_perturbed is None:
                raise ValueError("CombinedTest.fit: method 'exposure' needs S_perturbed, statistics of perturbed copies of "
                                 "S_fit's objects (gsafe_models.perturb)")
            else:
                self.joint = ExposureScore(seed=self.seed).fit(S_fit, S_perturbed)
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

        self.calibrators = [TailCalibrator(self.tail_frac, trim=self.trim, trimmed_are_normal=self.trimmed_are_normal).fit(fold_a[:, j])
                            for j in range(len(names))]
        # Bonferroni's and Simes' p-values are valid as they stand, so for them the tail of
        # T = -log p_comb is even known: P(T >= x) <= exp(-x).
        self.combined = None if fold_b is None else TailCalibrator(
            self.tail_frac, trim=self.trim, log_pvalue=self.method in _VALID_UNDER_DEPENDENCE,
            trimmed_are_normal=self.trimmed_are_normal,
        ).fit(self._statistic(fold_b, self._log_pvalues(fold_b)))
        return self

    def _log_pvalues(self, S: np.ndarray) -> np.ndarray:
        return np.stack([cal.log_pvalues(S[:, j]) for j, cal in enumerate(self.calibrators)], axis=1)

    def _statistic(self, S: np.ndarray, logP: np.ndarray) -> np.ndarray:
        r"""Returns the combined statistic, larger is more anomalous."""

        if self.method in _LEARNED:
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
            "trimmed_are_normal": self.trimmed_are_normal,
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
            trimmed_are_normal=bool(state.get("trimmed_are_normal", True)),
        )
        self.names = [str(n) for n in state["names"]]
        self.calibrators = [TailCalibrator.from_state(s) for s in state["calibrators"]]
        self.combined = None if state["combined"] is None else TailCalibrator.from_state(state["combined"])
        joint = state["joint"]
        self.joint = None if joint is None else (ExposureScore if joint.get("kind") == "exposure" else JointDensity).from_state(joint)
        return self
