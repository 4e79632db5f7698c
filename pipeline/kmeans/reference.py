"""Reference k-means implementations for parity tests and benchmarks."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pipeline.kmeans.stats import assign, partial_stats
from pipeline.kmeans.store import CentroidStore


def faiss_kmeans(x: np.ndarray, k: int, niter: int = 20, seed: int = 0,
                 gpu: bool = False) -> np.ndarray:
    """Lloyd's k-means by faiss (k-means++-free random init, as faiss does): (k, d) float32."""
    import faiss

    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, gpu=gpu, verbose=False,
                      spherical=False)
    km.train(np.ascontiguousarray(x, dtype=np.float32))
    return np.asarray(km.centroids, dtype=np.float32)


def inertia(x: np.ndarray, centroids: np.ndarray, chunk: int = 65536) -> float:
    """Sum of squared distances to the nearest centroid, in bounded chunks."""
    c = torch.from_numpy(np.ascontiguousarray(centroids, dtype=np.float32))
    total = 0.0
    for start in range(0, len(x), chunk):
        _, d2, _ = assign(torch.from_numpy(np.ascontiguousarray(x[start:start + chunk],
                                                                dtype=np.float32)), c)
        total += float(d2.double().sum())
    return total


def minibatch_kmeans(x: np.ndarray, k: int, batch_size: int = 1024, epochs: int = 5,
                     seed: int = 0, store_kwargs: dict[str, Any] | None = None) -> CentroidStore:
    """Online k-means on fixed features ("frozen model") driving a CentroidStore."""
    rng = np.random.default_rng(seed)
    store = CentroidStore(x[rng.choice(len(x), k, replace=False)], seed=seed,
                          **(store_kwargs or {}))
    for _ in range(epochs):
        order = rng.permutation(len(x))
        for start in range(0, len(x), batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(x[order[start:start + batch_size]],
                                                          dtype=np.float32))
            c = torch.from_numpy(store.centroids)
            labels, _, _ = assign(batch, c)
            sums, counts = partial_stats(batch, labels, k)
            store.push(sums.numpy(), counts.numpy(), samples=batch[:64].numpy(),
                       step=store.version)
    return store
