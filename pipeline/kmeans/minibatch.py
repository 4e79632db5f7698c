"""Mini-batch k-means on summable statistics: update, drift, reseeding, splitting (numpy).

* Update (Sculley 2010, "Web-scale k-means clustering"; scikit-learn's ``MiniBatchKMeans``,
  ``_minibatch_update_dense``, with unit sample weights): a per-centroid learning rate of
  1/count, ``c ← c + (Σx − n·c)/(W + n)``, ``W ← W + n``. This is a running mean, so it is
  associative: applying the sum of two workers' statistics at once equals applying the
  statistics of one worker with their union.
* Window (``window`` = m > 0): the count W is capped at m before each update, so the rate
  never falls below n/(m + n) and a centroid is an exponential moving mean over about its
  last m points (the forgetful streaming k-means of Spark MLlib's ``StreamingKMeans``
  ``decayFactor``). Features of a network in training move; an unbounded W averages over
  every past feature space, and the centroids then lag further behind their members each
  epoch.
* Drift compensation (Hsu & Lin 2017): each centroid moves by the mean displacement of its
  members' features between the old and the new network weights, measured on a held-out
  probe (:mod:`pipeline.kmeans.drift`).
* Starved clusters are moved to reservoir samples chosen k-means++ style (the idea of
  scikit-learn's ``reassignment_ratio``); empty clusters of a full pass are split off a large
  donor with a small symmetric perturbation (faiss ``Clustering::train`` / ``split_clusters``,
  DeepCluster, Caron et al. 2018).

Conventions: centroids float32 (k, d); weights float64 (k,); counts int (k,). Everything
updates its arguments in place, so the same code runs inside the Ray centroid server.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def minibatch_update(centroids: np.ndarray, weights: np.ndarray, sums: np.ndarray,
                     counts: np.ndarray, window: float = 0.0) -> None:
    """In place: ``c_j ← c_j + (S_j − n_j c_j)/(W_j + n_j)``, ``W_j ← W_j + n_j`` if n_j > 0,
    with ``W_j`` first capped at ``window`` when it is > 0 (0: Sculley's unbounded count).

    Args:
        centroids: float32 (k, d), updated in place.
        weights: float64 (k,), the number of points each centroid has absorbed so far (W).
        sums: (k, d) per-cluster sums S of the new points (any float dtype).
        counts: (k,) per-cluster counts n of the new points.
        window: the cap m on W (points); a round then moves c_j by n_j / (min(W_j, m) + n_j)
            of the way to its points' mean.

    Sculley 2010; identical to scikit-learn's ``MiniBatchKMeans`` with unit sample weights,
    whose counts also start at 0 (the first batch replaces the init by its cluster means).
    Computed in float64 and stored back in the centroids' dtype.
    """
    k, d = centroids.shape
    if sums.shape != (k, d) or counts.shape != (k,):
        raise ValueError(f"expected sums ({k}, {d}) and counts ({k},), "
                         f"got {sums.shape} and {counts.shape}")
    hit = np.flatnonzero(counts > 0)
    if hit.size == 0:
        return
    n = counts[hit].astype(np.float64)
    total = (np.minimum(weights[hit], window) if window > 0 else weights[hit]) + n
    c = centroids[hit].astype(np.float64)
    c += (sums[hit].astype(np.float64) - n[:, None] * c) / total[:, None]
    centroids[hit] = c
    weights[hit] = total


def apply_drift(centroids: np.ndarray, drift_sums: np.ndarray, drift_counts: np.ndarray,
                smoothing: float) -> None:
    """In place: ``c_j ← c_j + smoothing · drift_sums_j / drift_counts_j`` where count > 0.

    Feature drift compensation (Hsu & Lin 2017): ``drift_sums`` (k, d) are per-cluster sums
    of ``new − old`` features of the same images, ``drift_counts`` (k,) their counts
    (:meth:`pipeline.kmeans.drift.DriftProbe.measure`, summed over workers). ``smoothing``
    in [0, 1] damps the shift (1 = follow the measured mean displacement, 0 = off).
    """
    k, d = centroids.shape
    if drift_sums.shape != (k, d) or drift_counts.shape != (k,):
        raise ValueError(f"expected drift ({k}, {d}) and drift_counts ({k},), "
                         f"got {drift_sums.shape} and {drift_counts.shape}")
    hit = np.flatnonzero(drift_counts > 0)
    if smoothing == 0 or hit.size == 0:
        return
    mean = drift_sums[hit].astype(np.float64) / drift_counts[hit, None].astype(np.float64)
    centroids[hit] = centroids[hit].astype(np.float64) + smoothing * mean


class Reservoir:
    """A uniform sample of at most ``capacity`` of all feature rows seen so far.

    Vitter's Algorithm R ("Random sampling with a reservoir", 1985): row number t (0-based)
    enters while the reservoir is not full, then replaces slot j ~ U{0..t} when j < capacity.
    Rows are float32 (capacity, dim); the random stream is the reservoir's own (``seed``).
    """

    def __init__(self, capacity: int, dim: int, seed: int = 0):
        if capacity < 1 or dim < 1:
            raise ValueError(f"capacity and dim must be >= 1, got {capacity}, {dim}")
        self.rows = np.zeros((capacity, dim), dtype=np.float32)
        self.seen = 0
        self.rng = np.random.default_rng(seed)

    @property
    def capacity(self) -> int:
        return int(self.rows.shape[0])

    @property
    def dim(self) -> int:
        return int(self.rows.shape[1])

    def __len__(self) -> int:
        return min(self.seen, self.capacity)

    def add(self, rows: np.ndarray) -> None:
        """Offer rows (m, dim) to the reservoir, in order (vectorised Algorithm R)."""
        rows = np.asarray(rows, dtype=np.float32).reshape(-1, self.dim)
        fill = min(max(self.capacity - self.seen, 0), len(rows))
        self.rows[self.seen:self.seen + fill] = rows[:fill]
        rest = rows[fill:]
        if len(rest):
            t = self.seen + fill + np.arange(len(rest))
            slot = self.rng.integers(0, t + 1)
            src = np.flatnonzero(slot < self.capacity)
            # When two rows of this call hit the same slot, the later one must win.
            last_slot, first_in_reversed = np.unique(slot[src][::-1], return_index=True)
            self.rows[last_slot] = rest[src[::-1][first_in_reversed]]
        self.seen += len(rows)

    def filled(self) -> np.ndarray:
        """View of the rows held, float32 (len(self), dim)."""
        return self.rows[:len(self)]

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """n rows (n, dim), without replacement when the reservoir holds at least n."""
        if len(self) == 0:
            raise ValueError("the reservoir is empty")
        return self.filled()[rng.choice(len(self), size=n, replace=len(self) < n)].copy()

    def state(self) -> dict[str, Any]:
        """Plain numpy/ints/str: the rows held, capacity, dim, rows seen and the rng state."""
        return {"rows": self.filled().copy(), "capacity": self.capacity, "dim": self.dim,
                "seen": int(self.seen), "rng": self.rng.bit_generator.state}

    def load_state(self, state: dict[str, Any]) -> None:
        """Exact inverse of :meth:`state`."""
        rows = np.asarray(state["rows"], dtype=np.float32)
        self.rows = np.zeros((int(state["capacity"]), int(state["dim"])), dtype=np.float32)
        self.rows[:len(rows)] = rows
        self.seen = int(state["seen"])
        self.rng = np.random.default_rng()
        self.rng.bit_generator.state = state["rng"]


def sq_dist_to_nearest(x: np.ndarray, centroids: np.ndarray, chunk: int = 1024,
                       dtype: Any = np.float64) -> np.ndarray:
    """float64 (n,) squared distance of each row of x (n, d) to its nearest centroid (k, d).

    Chunked over rows so memory stays O(chunk · k); +inf for every row when k == 0.
    ``dtype`` is the arithmetic (float32 is about twice as fast, for sampling weights).
    """
    out = np.full(len(x), np.inf)
    if len(centroids) == 0:
        return out
    c: np.ndarray = centroids.astype(dtype)
    c2 = (c**2).sum(1)
    for start in range(0, len(x), chunk):
        xb: np.ndarray = x[start:start + chunk].astype(dtype)
        d = (xb**2).sum(1)[:, None] - 2.0 * xb @ c.T + c2[None]
        out[start:start + chunk] = np.maximum(d.min(1), 0.0)
    return out


def starved_clusters(recent_counts: np.ndarray, ratio: float) -> np.ndarray:
    """Sorted ids with recent count < ratio · max (or == 0), at most k // 2, neediest first.

    scikit-learn's ``reassignment_ratio`` rule (``_mini_batch_step``), applied to recent
    rather than lifetime counts. Nothing is starved before any point was counted.
    """
    r = np.asarray(recent_counts, dtype=np.float64)
    if r.size == 0 or r.max() <= 0:
        return np.zeros(0, dtype=np.int64)
    ids = np.flatnonzero((r < ratio * r.max()) | (r == 0))
    ids = ids[np.argsort(r[ids], kind="stable")][:len(r) // 2]
    return np.sort(ids)


def reseed_starved(centroids: np.ndarray, weights: np.ndarray, recent_counts: np.ndarray,
                   reservoir: Reservoir, ratio: float, rng: np.random.Generator,
                   limit: int | None = None, candidates: int = 1024) -> list[int]:
    """Move starved clusters to reservoir rows in under-served regions; returns their ids.

    Starved: recent count < ``ratio`` · max or 0 (:func:`starved_clusters`; never more than
    half the clusters). Each new position is drawn from the reservoir with probability ∝ the
    squared distance to the nearest kept or already-reseeded centroid (k-means++, Arthur &
    Vassilvitskii 2007), so reseeds spread out. As in scikit-learn, a reseeded cluster's
    weight becomes the minimum weight of the clusters that were not reseeded, so it is
    neither frozen (huge W) nor erased by its next batch (W = 0).

    Args:
        centroids: float32 (k, d), weights: float64 (k,), both updated in place.
        recent_counts: (k,) recent assignment counts (e.g. an exponential moving count).
        reservoir: recent feature rows; nothing happens while it is empty.
        ratio: the reassignment ratio; 0 reseeds only clusters with no recent member.
        rng: the random stream for the draws.
        limit: reseed at most this many, the neediest (lowest recent count) first.
        candidates: reservoir rows drawn (uniformly) as the k-means++ candidates.
    """
    ids = starved_clusters(recent_counts, ratio)
    if limit is not None and ids.size > limit:
        ids = np.sort(ids[np.argsort(np.asarray(recent_counts)[ids], kind="stable")][:limit])
    if ids.size == 0 or len(reservoir) == 0:
        return []
    pool = reservoir.filled()
    if len(pool) > candidates:  # bound the O(pool · k · d) distance pass
        pool = pool[np.sort(rng.choice(len(pool), size=candidates, replace=False))]
    kept = np.ones(len(centroids), dtype=bool)
    kept[ids] = False
    d2 = sq_dist_to_nearest(pool, centroids[kept], dtype=np.float32)
    pool64 = pool.astype(np.float64)
    norms = (pool64**2).sum(1)
    moved: list[int] = []
    for j in ids:
        total = d2.sum()
        if not total > 0:  # every reservoir row already sits on a centroid
            break
        pick = int(rng.choice(len(pool), p=d2 / total))
        centroids[j] = pool[pick]
        to_pick = np.maximum(norms - 2.0 * pool64 @ pool64[pick] + norms[pick], 0.0)
        d2 = np.minimum(d2, to_pick)
        moved.append(int(j))
    if moved:
        rest = np.ones(len(centroids), dtype=bool)
        rest[moved] = False
        weights[moved] = weights[rest].min()
    return moved


def _perturbation(base: np.ndarray, centroids: np.ndarray, eps: float,
                  rng: np.random.Generator) -> np.ndarray:
    """eps · s ⊙ base, s a random ±1 vector (faiss's symmetric split perturbation).

    Coordinates that are exactly 0 (where ``c·(1 ± eps)`` would not move) use the mean
    |coordinate| of ``base`` instead, or of all centroids when ``base`` is all zeros.
    """
    nonzero = np.abs(base[base != 0])
    fallback = float(nonzero.mean()) if nonzero.size else float(np.abs(centroids).mean())
    sign = rng.choice(np.array([-1.0, 1.0]), size=base.shape)
    return eps * sign * np.where(base != 0, base, fallback or 1.0)


def split_empty(centroids: np.ndarray, counts: np.ndarray, rng: np.random.Generator,
                eps: float = 1.0 / 1024) -> list[int]:
    """Give every empty cluster half of a donor cluster (faiss / DeepCluster); returns its ids.

    For each empty cluster j, a donor i is drawn with probability ∝ (count_i − 1) among
    clusters with count > 1, then ``c_j = c_i (1 + eps·s)``, ``c_i ← c_i (1 − eps·s)`` with
    s a random ±1 vector: faiss's symmetric perturbation (``Clustering::train``,
    ``contrib/clustering.py: reassign_centroids``), used by DeepCluster (Caron et al. 2018).
    Coordinates that are exactly 0 are perturbed by eps times a typical magnitude instead, so
    centroids at the origin (e.g. half the points identical to 0) still separate.
    ``counts`` is updated in place as if the donor's members split evenly.

    Args:
        centroids: float32 (k, d), updated in place.
        counts: int (or float) (k,) cluster sizes of the last full assignment, in place.
        rng: the random stream.
        eps: relative size of the perturbation (faiss: 1/1024).
    """
    fixed: list[int] = []
    for j in np.flatnonzero(counts == 0):
        p = np.maximum(counts.astype(np.float64) - 1.0, 0.0)
        if p.sum() <= 0:  # fewer points than clusters: nothing left to split
            break
        donor = int(rng.choice(len(counts), p=p / p.sum()))
        base = centroids[donor].astype(np.float64)
        delta = _perturbation(base, centroids, eps, rng)
        centroids[j] = base + delta
        centroids[donor] = base - delta
        counts[j] = counts[donor] // 2
        counts[donor] -= counts[j]
        fixed.append(int(j))
    return fixed
