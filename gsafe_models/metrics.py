"""Detection metrics on labelled surveys: AUROC, average precision, precision@k, realised FDR.

Arrays in, floats out; ``labels`` are 1 for anomalies, 0 for normal objects, ``scores`` larger =
more anomalous.

Example:
    >>> auroc(np.array([0.1, 0.9, 0.3]), np.array([0, 1, 0]))
    1.0
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata

__all__ = ["auroc", "average_precision", "precision_at_k", "realised_fdr", "per_class_report"]


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann–Whitney U with mid-ranks for ties); NaN if one class is empty."""
    s = np.asarray(scores, float)
    y = np.asarray(labels).astype(bool)
    n1, n0 = int(y.sum()), int((~y).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    r = rankdata(s)
    return float((r[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Average precision (area under the precision–recall curve, step-wise, as scikit-learn)."""
    s = np.asarray(scores, float)
    y = np.asarray(labels).astype(bool)
    if not y.any():
        return float("nan")
    order = np.argsort(-s, kind="stable")
    hits = y[order]
    prec = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float(prec[hits].sum() / hits.sum())


def precision_at_k(scores: np.ndarray, labels: np.ndarray, k: int = 50) -> float:
    """Share of true anomalies among the `k` highest scores."""
    s = np.asarray(scores, float)
    k = min(k, len(s))
    if k == 0:
        return float("nan")
    top = np.argsort(-s, kind="stable")[:k]
    return float(np.asarray(labels)[top].astype(bool).mean())


def realised_fdr(q_values: np.ndarray, labels: np.ndarray, alpha: float = 0.1) -> tuple[float, int]:
    """(false discovery proportion, number of discoveries) of the list {q <= alpha}."""
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
