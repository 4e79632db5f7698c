"""Mini-batch k-means updates over summable statistics, reseeding, splitting, drift.

* Update (Sculley 2010; scikit-learn's MiniBatchKMeans with unit weights): per-centroid
  learning rate 1/count, ``c <- c + (S - n c) / (W + n)``, ``W <- W + n``. It is a running
  mean, hence associative: applying the sum of two workers' statistics at once equals
  applying them one after the other.
* Starved clusters are moved to reservoir samples chosen k-means++ style (scikit-learn's
  ``reassignment_ratio``); empty clusters of a full pass are split from a large donor with a
  symmetric perturbation (faiss, DeepCluster).
* Drift compensation (Hsu & Lin 2017): each centroid moves by the mean displacement of its
  members' features between the old and the new network weights.

numpy only; float32 centroids (k, d), float64 weights (k,).
"""

from __future__ import annotations

from typing import Any

import numpy as np


def minibatch_update(centroids: np.ndarray, weights: np.ndarray, sums: np.ndarray,
                     counts: np.ndarray) -> None:
    """In place: c_j += (S_j - n_j c_j) / (W_j + n_j); W_j += n_j, for clusters with n_j > 0."""
    hit = counts > 0
    n = counts[hit].astype(np.float64)
    total = weights[hit] + n
    c = centroids[hit].astype(np.float64)
    centroids[hit] = (c + (sums[hit] - n[:, None] * c) / total[:, None]).astype(centroids.dtype)
    weights[hit] = total


def apply_drift(centroids: np.ndarray, drift_sums: np.ndarray, drift_counts: np.ndarray,
                smoothing: float) -> None:
    """In place: c_j += smoothing * drift_sums_j / drift_counts_j where drift_counts_j > 0."""
    hit = drift_counts > 0
    if smoothing and hit.any():
        mean = drift_sums[hit] / drift_counts[hit, None].astype(np.float64)
        centroids[hit] += (smoothing * mean).astype(centroids.dtype)


class Reservoir:
    """Uniform sample of at most ``capacity`` feature rows seen so far (Vitter's Algorithm R)."""

    def __init__(self, capacity: int, dim: int, seed: int = 0):
        self.rows = np.zeros((capacity, dim), dtype=np.float32)
        self.seen = 0
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return min(self.seen, len(self.rows))

    def add(self, rows: np.ndarray) -> None:
        for row in np.asarray(rows, dtype=np.float32):
            if self.seen < len(self.rows):
                self.rows[self.seen] = row
            else:
                j = int(self.rng.integers(0, self.seen + 1))
                if j < len(self.rows):
                    self.rows[j] = row
            self.seen += 1

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return self.rows[rng.choice(len(self), size=n, replace=len(self) < n)]

    def state(self) -> dict[str, Any]:
        return {"rows": self.rows[: len(self)].copy(), "capacity": len(self.rows),
                "seen": self.seen, "rng": self.rng.bit_generator.state}

    def load_state(self, state: dict[str, Any]) -> None:
        self.rows = np.zeros((state["capacity"], self.rows.shape[1]), dtype=np.float32)
        self.rows[: len(state["rows"])] = state["rows"]
        self.seen = int(state["seen"])
        self.rng.bit_generator.state = state["rng"]


def _sq_dist_to_nearest(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    d = (x**2).sum(1)[:, None] - 2 * x @ centroids.T + (centroids**2).sum(1)[None]
    return np.maximum(d.min(1), 0)


def reseed_starved(centroids: np.ndarray, weights: np.ndarray, recent_counts: np.ndarray,
                   reservoir: Reservoir, ratio: float, rng: np.random.Generator) -> list[int]:
    """Move clusters with recent count < ratio * max (or 0) to far-away reservoir samples."""
    if len(reservoir) == 0:
        return []
    starved = np.flatnonzero((recent_counts < ratio * recent_counts.max()) | (recent_counts == 0))
    starved = starved[: len(centroids) // 2]
    if len(starved) == 0:
        return []
    pool = reservoir.rows[: len(reservoir)]
    d2 = _sq_dist_to_nearest(pool, centroids).astype(np.float64)
    p = d2 / d2.sum() if d2.sum() > 0 else None
    picks = rng.choice(len(pool), size=len(starved), replace=len(pool) < len(starved), p=p)
    centroids[starved] = pool[picks]
    keep = np.setdiff1d(np.arange(len(centroids)), starved)
    weights[starved] = weights[keep].min() if len(keep) else 0.0
    return starved.tolist()


def split_empty(centroids: np.ndarray, counts: np.ndarray, rng: np.random.Generator,
                eps: float = 1.0 / 1024) -> list[int]:
    """faiss/DeepCluster: give each empty cluster half of a donor chosen ∝ (count - 1)."""
    counts = counts.astype(np.float64).copy()
    fixed = []
    for j in np.flatnonzero(counts == 0):
        p = np.maximum(counts - 1, 0)
        if p.sum() <= 0:
            break
        donor = int(rng.choice(len(counts), p=p / p.sum()))
        sign = rng.choice([-1.0, 1.0], size=centroids.shape[1])
        centroids[j] = centroids[donor] * (1 + eps * sign)
        centroids[donor] = centroids[donor] * (1 - eps * sign)
        counts[j] = counts[donor] / 2
        counts[donor] -= counts[j]
        fixed.append(int(j))
    return fixed
