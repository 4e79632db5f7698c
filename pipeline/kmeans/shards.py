"""k-means over feature shards: the features of a full pass held in one place or spread over
several (Ray actors under the Ray runner's :data:`~pipeline.methods.base.Scatter`), in
faiss ``contrib/clustering.py``'s pattern: each shard computes partial sums, the caller
reduces them. Used by every method that clusters a pass (DeepCluster, DEPICT). No Ray.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, cast

import numpy as np
import torch

from pipeline.kmeans.minibatch import split_empty
from pipeline.kmeans.stats import assign, partial_stats


class FeatureShard(Protocol):
    """Features held in one place (this process, or a Ray actor): the k-means interface."""

    def count(self) -> int: ...

    def rows(self, idx: np.ndarray) -> np.ndarray: ...

    def stats(self, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]: ...

    def labels(self, centroids: np.ndarray) -> np.ndarray: ...


class LocalShard:
    """(n, d) features in this process. The single-process reference of a Ray feature shard."""

    def __init__(self, x: np.ndarray, chunk: int = 65536):
        self.x, self.chunk = np.ascontiguousarray(x, dtype=np.float32), chunk

    def count(self) -> int:
        return len(self.x)

    def rows(self, idx: np.ndarray) -> np.ndarray:
        return self.x[idx]

    def stats(self, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        """Per-cluster sums (k, d) float64, counts (k,) int64 and the inertia of this shard."""
        k, d = centroids.shape
        c = torch.from_numpy(np.asarray(centroids, np.float32))
        sums, counts, inertia = np.zeros((k, d)), np.zeros(k, np.int64), 0.0
        for start in range(0, len(self.x), self.chunk):
            x = torch.from_numpy(self.x[start:start + self.chunk])
            labels, sqdist, _ = assign(x, c)
            s, n = partial_stats(x, labels, k)
            sums += s.double().numpy()
            counts += n.numpy()
            inertia += float(sqdist.double().sum())
        return sums, counts, inertia

    def labels(self, centroids: np.ndarray) -> np.ndarray:
        c = torch.from_numpy(np.asarray(centroids, np.float32))
        return np.concatenate([assign(torch.from_numpy(self.x[i:i + self.chunk]), c)[0].numpy()
                               for i in range(0, len(self.x), self.chunk)]).astype(np.int64)


def sample_rows(shards: Sequence[Any], k: int, rng: np.random.Generator) -> np.ndarray:
    """k distinct rows drawn uniformly from the union of the shards: (k, d)."""
    sizes = np.array([s.count() for s in shards])
    if k > sizes.sum():
        raise ValueError(f"cluster.k={k} is larger than the number of images ({sizes.sum()})")
    picks = np.sort(rng.choice(sizes.sum(), size=k, replace=False))
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    parts = [shard.rows(picks[(picks >= lo) & (picks < hi)] - lo)
             for shard, lo, hi in zip(shards, bounds[:-1], bounds[1:], strict=True)]
    return np.concatenate([p for p in parts if len(p)]).astype(np.float32)


def lloyd(shards: Sequence[Any], k: int, niter: int = 20, seed: int = 0
          ) -> tuple[np.ndarray, list[float]]:
    """Lloyd's k-means over feature shards: centroids (k, d) and the inertia per iteration.

    Initialised with k random points; each iteration reduces the shards' partial sums
    (:func:`~pipeline.kmeans.stats.partial_stats`) into new means and splits every empty
    cluster off a donor (:func:`~pipeline.kmeans.minibatch.split_empty`), as faiss does.
    With ``shards`` on Ray actors (the Ray runner's :data:`~pipeline.methods.base.Scatter`)
    the calls run in parallel.
    """
    rng = np.random.default_rng(seed)
    centroids = sample_rows(shards, k, rng)
    history: list[float] = []
    for _ in range(niter):
        sums, counts, inertia = reduce_stats(shards, centroids)
        history.append(inertia)
        hit = counts > 0
        centroids[hit] = (sums[hit] / counts[hit, None]).astype(np.float32)
        split_empty(centroids, counts, rng)
    return centroids, history


def reduce_stats(shards: Sequence[Any], centroids: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray, float]:
    parts = gather(shards, "stats", centroids)
    return (sum(p[0] for p in parts), sum(p[1] for p in parts), float(sum(p[2] for p in parts)))


def gather(shards: Sequence[Any], method: str, *args: object) -> list:
    """``method(*args)`` on every shard; a shard list may run them concurrently."""
    run = getattr(shards, "call_all", None)
    if run is not None:
        return list(run(method, *args))
    return [getattr(s, method)(*args) for s in shards]


def fill_empty(labels: np.ndarray, k: int, rng: np.random.Generator) -> list[int]:
    """In place: every empty cluster takes a random half of the largest cluster's members.

    The last resort after :func:`split_empty`: points that are all identical cannot be
    separated by moving centroids, but a pseudo-label must still name every cluster (the
    paper: "never leave a cluster empty"). Returns the clusters filled.
    """
    filled = []
    counts = np.bincount(labels, minlength=k)
    for j in np.flatnonzero(counts == 0):
        donor = int(np.argmax(counts))
        if counts[donor] < 2:
            break
        members = np.flatnonzero(labels == donor)
        moved = rng.choice(members, size=len(members) // 2, replace=False)
        labels[moved] = j
        counts[j], counts[donor] = len(moved), counts[donor] - len(moved)
        filled.append(int(j))
    return filled


def cluster(shards: Sequence[Any], k: int, niter: int, seed: int,
            faiss_local: bool = True, gpu: bool = False, redo: int = 1
            ) -> tuple[np.ndarray, np.ndarray]:
    """Centroids (k, d) and labels (n,) of the concatenated shards, no cluster empty.

    ``faiss_local`` with a single shard runs ``faiss.Kmeans`` (GPU if asked) on it;
    otherwise :func:`lloyd` reduces partial sums across the shards. ``redo`` runs from
    that many seeds and keeps the one of lowest inertia.
    """
    if faiss_local and len(shards) == 1:
        from pipeline.kmeans.reference import faiss_kmeans

        x = shards[0].rows(np.arange(shards[0].count()))
        centroids = faiss_kmeans(x, k, niter=niter, seed=seed, gpu=gpu, redo=redo)
    else:
        runs = [lloyd(shards, k, niter, seed + r) for r in range(redo)]
        centroids = min(runs, key=lambda run: run[1][-1])[0]
    labels = np.concatenate(gather(shards, "labels", centroids))
    fill_empty(labels, k, np.random.default_rng((seed, 7)))
    return centroids, labels


def kmeans_features(z: np.ndarray, k: int, iters: int, seed: int, scatter: Any,
                    local_max_points: int, n_shards: int, gpu: bool = False, redo: int = 1
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Centroids (k, d) and labels (n,) of features ``z`` (n, d), no cluster empty:
    ``faiss.Kmeans`` here up to ``local_max_points`` rows, else Lloyd over ``n_shards``
    shards that ``scatter`` places (Ray actors under the Ray runner); best of ``redo``."""
    if len(z) <= local_max_points:
        return cluster([LocalShard(z)], k, iters, seed, gpu=gpu and faiss_gpu(), redo=redo)
    shards = scatter(LocalShard, np.array_split(z, n_shards))
    try:
        return cluster(cast(Sequence[Any], shards), k, iters, seed, faiss_local=False,
                       redo=redo)
    finally:
        shards.close()


def faiss_gpu() -> bool:
    import faiss

    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
