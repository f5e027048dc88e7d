"""Detection metrics on labelled surveys: AUROC, average precision, precision@k, realised FDR.

Arrays in, floats out; ``labels`` are 1 (or any true value) for anomalies, 0 for normal objects,
``scores`` larger = more anomalous. AUROC and average precision are scikit-learn's
(:func:`sklearn.metrics.roc_auc_score`, :func:`sklearn.metrics.average_precision_score`); this
module adds NaN where a class is empty instead of an exception, and the survey-side metrics.

Example:
    >>> auroc(np.array([0.1, 0.9, 0.3]), np.array([0, 1, 0]))
    1.0
"""

from __future__ import annotations

import numpy as np

from sklearn.metrics import average_precision_score, roc_auc_score

__all__ = ["auroc", "average_precision", "precision_at_k", "realised_fdr", "per_class_report"]


def _scores_and_labels(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).astype(bool).ravel()
    if s.shape != y.shape:
        raise ValueError(f"metrics: {s.size} scores but {y.size} labels; give one label per scored object")
    return s, y


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (ties count one half: the Mann-Whitney U); NaN if a class is empty
    or a score is NaN (an object not scored).

    Arguments:
        scores: Per-object scores, shape (N,), larger = more anomalous.
        labels: Per-object labels, shape (N,), true = anomaly.
    """
    s, y = _scores_and_labels(scores, labels)
    if y.all() or not y.any() or np.isnan(s).any():
        return float("nan")
    return float(roc_auc_score(y, s))


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Average precision: the mean, over the anomalies, of the precision of the list down to each
    one's score (tied scores enter the list together); NaN without anomalies or with a NaN score.

    Arguments:
        scores: Per-object scores, shape (N,), larger = more anomalous.
        labels: Per-object labels, shape (N,), true = anomaly.
    """
    s, y = _scores_and_labels(scores, labels)
    if not y.any() or np.isnan(s).any():
        return float("nan")
    return float(average_precision_score(y, s))


def precision_at_k(scores: np.ndarray, labels: np.ndarray, k: int = 50) -> float:
    """Share of true anomalies among the `k` highest scores (ties in index order); NaN without objects."""
    s = np.asarray(scores, float)
    k = min(k, len(s))
    if k == 0:
        return float("nan")
    top = np.argsort(-s, kind="stable")[:k]
    return float(np.asarray(labels)[top].astype(bool).mean())


def realised_fdr(q_values: np.ndarray, labels: np.ndarray, alpha: float = 0.1) -> tuple[float, int]:
    """(false discovery proportion, number of discoveries) of the list {q <= alpha}.

    The false discoveries are ``round(fdp * n)``: objects listed whose label is 0 (not anomalies).

    Example:
        >>> realised_fdr(np.array([0.01, 0.05, 0.5, 0.02]), np.array([1, 0, 1, 1]))
        (0.3333333333333333, 3)
    """
    sel = np.asarray(q_values) <= alpha
    n = int(sel.sum())
    if n == 0:
        return 0.0, 0
    return float((~np.asarray(labels)[sel].astype(bool)).mean()), n


def per_class_report(scores: np.ndarray, labels: np.ndarray, classes: np.ndarray, k: int = 50) -> dict[str, dict[str, float]]:
    """AUROC, AP and precision@k of each anomaly class against all normal objects, plus "all"."""
    labels = np.asarray(labels).astype(bool)
    classes = np.asarray(classes).astype(str)
    out = {"all": {"auroc": auroc(scores, labels), "ap": average_precision(scores, labels),
                   f"p@{k}": precision_at_k(scores, labels, k), "n": int(labels.sum())}}
    for c in sorted(set(classes[labels])):
        m = (~labels) | (classes == c)
        out[c] = {"auroc": auroc(scores[m], labels[m]), "ap": average_precision(scores[m], labels[m]),
                  f"p@{k}": precision_at_k(scores[m], labels[m], k), "n": int((classes == c).sum())}
    return out
