"""Exports of methods whose cluster is the argmax of a softmax head (``depict``, ``imc``).

The seam (DESIGN §5) wants a model and centroids whose nearest-centroid rule is the
method's own. For a head with probabilities p (n, k), the model outputs p and the centroids
are the k one-hot vectors e_j: ‖p − e_j‖² = ‖p‖² + 1 − 2·p_j, so the nearest centroid is
argmax p exactly, the distance falls as the confidence p_j rises (an outlier is an image of
low confidence) and the margin is 2·(p_best − p_second). :func:`probs_export` writes that
export; :func:`split_empty_heads` first gives a cluster that no image's argmax picks half of
the largest one. Plain numpy/PyTorch: no Ray.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from pipeline.outputs import TrainedModel


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of (n, k) logits (float64 inputs stay float64)."""
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)  # type: ignore[no-any-return]


def one_hot_centroids(k: int) -> np.ndarray:
    """The k one-hot centroids (k, k) float32: nearest of them to p (n, k) is argmax p."""
    return np.eye(k, dtype=np.float32)


def probs_export(model_bytes: bytes, arch: dict[str, Any], history: list[dict[str, Any]]
                 ) -> TrainedModel:
    """The export of a model whose ``forward`` gives probabilities (n, k), ``arch``'s
    ``feature_dim`` being k: with the one-hot centroids, assignment is their argmax."""
    from pipeline.outputs import TrainedModel

    k = int(arch["feature_dim"])
    return TrainedModel(model_bytes, arch, one_hot_centroids(k), history)


def cluster_scores(labels: np.ndarray | None, found: np.ndarray) -> dict[str, float]:
    """NMI, ACC and ARI of the clusters ``found`` (n,) against ``labels`` (n,), if any."""
    if labels is None:
        return {}
    from pipeline.metrics import acc, ari, nmi

    return {"nmi": nmi(labels, found), "acc": acc(labels, found), "ari": ari(labels, found)}


def split_empty_heads(z: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float = 1e-3
                      ) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Heads with no empty cluster under argmax(z Wᵀ + b), as DeepCluster splits centroids.

    Each empty cluster e takes a copy of the largest cluster d's row, moved by ±s·u with u
    the principal direction of d's inputs and the biases set so that l_e − l_d =
    2s(u·z − t), t their median projection: d's members split in half along u. s keeps
    every other logit within ``eps`` of where it was. z (n, d), w (k, d), b (k,); returns
    new (w, b) and the clusters filled. A donor whose members are all equal cannot split.
    """
    w, b = w.astype(np.float64).copy(), b.astype(np.float64).copy()
    filled: list[int] = []
    labels = np.argmax(z @ w.T + b, axis=1)
    for e in np.flatnonzero(np.bincount(labels, minlength=len(w)) == 0):
        donor = int(np.argmax(np.bincount(labels, minlength=len(w))))
        members = z[labels == donor].astype(np.float64)
        centred = members - members.mean(axis=0)
        if len(members) < 2 or not np.any(centred):
            break
        u = np.linalg.svd(centred, full_matrices=False)[2][0]
        t = float(np.median(members @ u))
        s = eps / max(1e-12, float(np.abs(z @ u - t).max()))
        w[e], b[e] = w[donor] + s * u, b[donor] - s * t
        w[donor], b[donor] = w[donor] - s * u, b[donor] + s * t
        labels = np.argmax(z @ w.T + b, axis=1)
        filled.append(int(e))
    return w.astype(np.float32), b.astype(np.float32), filled
