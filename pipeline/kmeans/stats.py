"""Per-batch k-means statistics in torch (CPU or GPU): assignment, summable sums and counts.

These are the partial statistics of faiss's ``contrib/clustering.py`` pattern: everything a
k-means update needs from a batch, in a form that can be summed across batches and workers.
"""

from __future__ import annotations

import torch


def assign(x: torch.Tensor, centroids: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (n, d), centroids (k, d) -> labels int64 (n,), best and second-best squared distances.

    Uses ||x||² - 2 x·c + ||c||², clamped at 0. With k == 1 the second distance is inf.
    """
    x = x.float()
    c = centroids.to(x.device, x.dtype)
    d = (x.pow(2).sum(1, keepdim=True) - 2 * x @ c.T + c.pow(2).sum(1)).clamp_min_(0)
    if d.shape[1] == 1:
        return torch.zeros(len(x), dtype=torch.int64, device=x.device), d[:, 0], \
            torch.full_like(d[:, 0], float("inf"))
    best = d.topk(2, dim=1, largest=False)
    return best.indices[:, 0], best.values[:, 0], best.values[:, 1]


def partial_stats(x: torch.Tensor, labels: torch.Tensor, k: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """x (n, d), labels (n,) -> per-cluster sums float32 (k, d) and counts int64 (k,)."""
    sums = torch.zeros(k, x.shape[1], dtype=torch.float32, device=x.device)
    sums.index_add_(0, labels, x.float())
    return sums, torch.bincount(labels, minlength=k)


def drift_stats(old: torch.Tensor, new: torch.Tensor, labels: torch.Tensor, k: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cluster sums of feature displacement (new - old), (k, d), and counts (k,).

    Feature drift compensation, Hsu & Lin 2017: the same images embedded before and after a
    weight update tell how each cluster's region of feature space moved.
    """
    return partial_stats(new.float() - old.float(), labels, k)
