"""Per-batch k-means statistics in torch (CPU or GPU): assignment and summable partial sums.

These are the partial statistics of faiss's ``contrib/clustering.py`` pattern
(``DatasetAssign.assign_to -> (I, D, sum_per_centroid)``): everything a k-means update needs
from a batch, in a form that can be summed across steps and workers before it is applied
(:func:`pipeline.kmeans.minibatch.minibatch_update`, :class:`pipeline.kmeans.store.CentroidStore`).

Nothing here holds more than one batch: memory is O(n·k + k·d) per call.
"""

from __future__ import annotations

import torch


def _check_rows(x: torch.Tensor, name: str) -> None:
    if x.dim() != 2:
        raise ValueError(f"{name}: expected a 2-d (rows, dim) tensor, got shape {tuple(x.shape)}")


def _distance_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 stays float64; everything else (half, bfloat16, ints) is computed in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def sq_distances(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """All squared euclidean distances: x (n, d), centroids (k, d) -> (n, k), clamped at 0.

    Uses the expansion ||x||² − 2 x·c + ||c||² (one matmul, as faiss's ``IndexFlatL2`` and
    scikit-learn's ``euclidean_distances`` do); rounding can make it slightly negative, hence
    the clamp. float16/bfloat16 inputs are upcast to float32 (the expansion cancels badly).
    """
    _check_rows(x, "x")
    _check_rows(centroids, "centroids")
    if x.shape[1] != centroids.shape[1]:
        raise ValueError(f"x has dim {x.shape[1]} but centroids have dim {centroids.shape[1]}")
    dtype = _distance_dtype(x)
    x = x.to(dtype)
    c = centroids.to(x.device, dtype)
    d = x.pow(2).sum(1, keepdim=True) - 2.0 * (x @ c.T) + c.pow(2).sum(1)
    return d.clamp_min_(0.0)


def assign(x: torch.Tensor, centroids: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Nearest centroid of every row.

    Args:
        x: (n, d) float features, any device.
        centroids: (k, d) float; moved to ``x``'s device.

    Returns:
        ``(labels, sqdist, second_sqdist)``: labels int64 (n,); the squared distance to the
        nearest centroid, float (n,); the squared distance to the second nearest, float (n,),
        for margins (``inf`` when k == 1). Ties go to the lower centroid index.
    """
    d = sq_distances(x, centroids)
    if d.shape[1] == 1:
        return (torch.zeros(d.shape[0], dtype=torch.int64, device=d.device), d[:, 0],
                torch.full_like(d[:, 0], float("inf")))
    sqdist, labels = d.min(dim=1)  # min: ties resolve to the first index
    second = d.topk(2, dim=1, largest=False).values[:, 1]  # values only: tie order is moot
    return labels, sqdist, second


def partial_stats(x: torch.Tensor, labels: torch.Tensor, k: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Summable k-means statistics of one batch (faiss ``sum_per_centroid`` plus counts).

    Args:
        x: (n, d) features.
        labels: (n,) int64 cluster ids in [0, k), same device as ``x``.
        k: number of clusters.

    Returns:
        ``(sums, counts)``: float32 (k, d) per-cluster sums of the rows (``index_add_``) and
        int64 (k,) member counts (``bincount``), on ``x``'s device.
    """
    _check_rows(x, "x")
    labels = labels.to(x.device, torch.int64)
    if labels.shape != (x.shape[0],):
        raise ValueError(f"labels: expected shape ({x.shape[0]},), got {tuple(labels.shape)}")
    sums = torch.zeros(k, x.shape[1], dtype=torch.float32, device=x.device)
    sums.index_add_(0, labels, x.to(torch.float32))
    return sums, torch.bincount(labels, minlength=k)


def drift_stats(old: torch.Tensor, new: torch.Tensor, labels: torch.Tensor, k: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cluster sums of the feature displacement ``new − old``: float32 (k, d), int64 (k,).

    Feature drift compensation (Hsu & Lin 2017, arXiv:1705.07091): the same images embedded
    before (``old``, (n, d)) and after (``new``, (n, d)) a weight update show how each
    cluster's region of feature space moved; ``labels`` (n,) are the assignments of ``old``.
    Dividing the sums by the counts gives each centroid's mean shift
    (:func:`pipeline.kmeans.minibatch.apply_drift`).
    """
    if old.shape != new.shape:
        raise ValueError(f"old {tuple(old.shape)} and new {tuple(new.shape)} differ in shape")
    return partial_stats(new.to(torch.float32) - old.to(torch.float32), labels, k)
