"""Clustering metrics: NMI, ACC (Hungarian), ARI and cluster-size statistics.

* NMI with arithmetic normalisation (Strehl & Ghosh 2002), as scikit-learn's default.
* ACC: best one-to-one matching of clusters to classes (Kuhn 1955; Yang et al. 2010, the
  DEC/DEPICT evaluation). With more clusters than classes only min(k, c) clusters are matched
  and the rest count as errors, the standard and conservative definition.
* ARI (Hubert & Arabie 1985) from pair counts.

No Ray, no torch: numpy and scipy only.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment


def _check(labels_true: Any, labels_pred: Any) -> tuple[np.ndarray, np.ndarray]:
    t, p = np.asarray(labels_true), np.asarray(labels_pred)
    if t.ndim != 1 or p.ndim != 1:
        raise ValueError(f"labels must be 1-D; got shapes {t.shape} and {p.shape}")
    if len(t) != len(p):
        raise ValueError(f"labels differ in length: {len(t)} true vs {len(p)} predicted")
    if len(t) == 0:
        raise ValueError("labels are empty")
    return t, p


def contingency(labels_true: Any, labels_pred: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> (table int64 (n_classes, n_clusters), classes, clusters)."""
    t, p = _check(labels_true, labels_pred)
    classes, ti = np.unique(t, return_inverse=True)
    clusters, pi = np.unique(p, return_inverse=True)
    table = np.zeros((len(classes), len(clusters)), dtype=np.int64)
    np.add.at(table, (ti, pi), 1)
    return table, classes, clusters


def _entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def nmi(labels_true: Any, labels_pred: Any) -> float:
    """Normalised mutual information, I(T; P) / mean(H(T), H(P))."""
    table, _, _ = contingency(labels_true, labels_pred)
    if table.shape[0] == table.shape[1] == 1 or table.shape[0] == table.shape[1] == table.sum():
        return 1.0
    n = table.sum()
    rows, cols = table.sum(1), table.sum(0)
    nz = table > 0
    pij = table[nz] / n
    mi = float((pij * np.log(table[nz] * n / np.outer(rows, cols)[nz])).sum())
    denom = (_entropy(rows) + _entropy(cols)) / 2
    return max(0.0, mi / denom) if denom > 0 else 1.0


def acc(labels_true: Any, labels_pred: Any) -> float:
    """Accuracy under the best one-to-one cluster-to-class matching (Hungarian)."""
    table, _, _ = contingency(labels_true, labels_pred)
    rows, cols = linear_sum_assignment(table, maximize=True)
    return float(table[rows, cols].sum() / table.sum())


def _pairs(x: np.ndarray) -> float:
    return float((x * (x - 1) / 2).sum())


def ari(labels_true: Any, labels_pred: Any) -> float:
    """Adjusted Rand index from the contingency table."""
    table, _, _ = contingency(labels_true, labels_pred)
    n = table.sum()
    if table.shape[0] == table.shape[1] == 1 or table.shape[0] == table.shape[1] == n:
        return 1.0
    sum_ij = _pairs(table.astype(np.float64))
    sum_a, sum_b = _pairs(table.sum(1).astype(np.float64)), _pairs(table.sum(0).astype(np.float64))
    expected = sum_a * sum_b / (n * (n - 1) / 2)
    maximum = (sum_a + sum_b) / 2
    if maximum == expected:
        return 1.0
    return float((sum_ij - expected) / (maximum - expected))


def cluster_size_stats(assignments: Any, k: int) -> dict[str, Any]:
    """Sizes of clusters 0..k-1 (empty ones included): min, median, max, mean, empty, k."""
    a = np.asarray(assignments, dtype=np.int64)
    sizes = np.bincount(a, minlength=k)[:k] if len(a) else np.zeros(k, dtype=np.int64)
    return {"k": int(k), "min": int(sizes.min()), "median": float(np.median(sizes)),
            "max": int(sizes.max()), "mean": float(sizes.mean()), "empty": int((sizes == 0).sum())}


def score(labels_true: Any, labels_pred: Any) -> dict[str, float]:
    """{"nmi", "acc", "ari"} as Python floats."""
    return {"nmi": nmi(labels_true, labels_pred), "acc": acc(labels_true, labels_pred),
            "ari": ari(labels_true, labels_pred)}
