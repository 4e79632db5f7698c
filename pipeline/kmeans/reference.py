"""Reference k-means runs on fixed features, for parity tests and benchmarks.

* :func:`faiss_kmeans`: Lloyd's k-means by faiss (``faiss.Kmeans``), the "exact" baseline.
* :func:`minibatch_kmeans`: the "frozen model" online k-means. It drives a
  :class:`~pipeline.kmeans.store.CentroidStore` over shuffled mini-batches, exactly as the
  ``online`` method's workers do, minus the CNN (Sculley 2010; Hsu & Lin 2017 without drift).
* :func:`inertia`: the k-means objective, in bounded memory.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pipeline.kmeans.stats import assign, partial_stats
from pipeline.kmeans.store import CentroidStore

MAX_CHUNK = 65536


def faiss_kmeans(x: np.ndarray, k: int, niter: int = 20, seed: int = 0, gpu: bool = False,
                 max_points_per_centroid: int | None = None, redo: int = 1) -> np.ndarray:
    """Lloyd's k-means by ``faiss.Kmeans`` (L2, spherical=False): float32 centroids (k, d).

    Args:
        x: (n, d) features, converted to contiguous float32.
        k: clusters; niter: Lloyd iterations; seed: faiss's seed (random-row init).
        gpu: run on the GPU(s) (needs faiss-gpu).
        max_points_per_centroid: faiss subsamples the training set to k times this;
            ``None`` uses every point, as DeepCluster (Caron et al. 2018) does.
        redo: runs from different seeds; the one of lowest inertia is kept (faiss ``nredo``).

    faiss splits empty clusters off large ones itself (``Clustering::train``).
    """
    import faiss

    x = np.ascontiguousarray(x, dtype=np.float32)
    if not 1 <= k <= len(x):
        raise ValueError(f"k: must be in [1, {len(x)}] for {len(x)} points, got {k}")
    cap = max_points_per_centroid or -(-len(x) // k) + 1
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, gpu=gpu, verbose=False,
                      spherical=False, max_points_per_centroid=cap, nredo=redo)
    km.train(x)
    return np.asarray(km.centroids, dtype=np.float32).reshape(k, x.shape[1])


def inertia(x: np.ndarray, centroids: np.ndarray, chunk: int = MAX_CHUNK,
            device: str | torch.device = "cpu") -> float:
    """Sum over rows of x (n, d) of the squared distance to the nearest centroid (k, d).

    Computed in chunks of at most 65,536 rows (O(chunk · k) memory), accumulated in float64.
    """
    chunk = max(1, min(int(chunk), MAX_CHUNK))
    c = torch.as_tensor(np.ascontiguousarray(centroids, dtype=np.float32), device=device)
    total = 0.0
    for start in range(0, len(x), chunk):
        xb = torch.as_tensor(np.ascontiguousarray(x[start:start + chunk], dtype=np.float32),
                             device=device)
        total += float(assign(xb, c)[1].double().sum())
    return total


def minibatch_kmeans(x: np.ndarray, k: int, batch_size: int = 1024, epochs: int = 5,
                     seed: int = 0, store_kwargs: dict[str, Any] | None = None,
                     samples_per_batch: int = 64, init: np.ndarray | None = None
                     ) -> CentroidStore:
    """Online mini-batch k-means over fixed features x (n, d) through a ``CentroidStore``.

    Init: ``init`` (k, d) if given, else k distinct random rows. Each epoch visits the rows
    in a new random order; each mini-batch is assigned against the store's current centroids,
    its partial statistics are pushed as one round, and its first ``samples_per_batch`` rows
    (random, as the batch is shuffled) feed the reseeding reservoir. ``store_kwargs`` go to
    ``CentroidStore`` (``num_workers`` is forced to 1). Returns the store; its ``centroids``
    are the result.
    """
    rng = np.random.default_rng(seed)
    x = np.ascontiguousarray(x, dtype=np.float32)
    kwargs = {"seed": seed, **(store_kwargs or {}), "num_workers": 1}
    if init is None:
        init = x[rng.choice(len(x), size=k, replace=False)]
    if np.shape(init) != (k, x.shape[1]):
        raise ValueError(f"init: expected shape ({k}, {x.shape[1]}), got {np.shape(init)}")
    store = CentroidStore(init, **kwargs)
    round_id = 0
    for _ in range(epochs):
        order = rng.permutation(len(x))
        for start in range(0, len(x), batch_size):
            batch = torch.from_numpy(x[order[start:start + batch_size]])
            labels, _, _ = assign(batch, torch.from_numpy(store.centroids))
            sums, counts = partial_stats(batch, labels, k)
            store.push(sums.numpy(), counts.numpy(), step=round_id,
                       samples=batch[:samples_per_batch].numpy())
            round_id += 1
    return store
