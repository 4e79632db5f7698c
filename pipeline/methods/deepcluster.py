"""``deepcluster``: Caron, Bojanowski, Joulin & Douze, "Deep Clustering for Unsupervised
Learning of Visual Features", ECCV 2018 (DESIGN §5.2).

Every epoch alternates two steps:

1. **Cluster.** Embed every image with the current CNN; PCA-reduce the features with
   whitening, L2-normalise them (:class:`Whitening`), and run k-means (:func:`lloyd` over
   feature shards, or ``faiss.Kmeans`` on one node). Empty clusters are split off a donor
   (:func:`pipeline.kmeans.minibatch.split_empty`) and, should identical points still leave
   one empty, :func:`fill_empty` hands it half of the largest cluster: no cluster is empty.
2. **Train.** The cluster ids are pseudo-labels. A fresh linear head (feature → k) is
   created (:func:`new_head`) and the CNN plus head are trained with cross-entropy, each
   sample weighted by the inverse size of its cluster (:func:`class_weights`), which in
   expectation equals the paper's uniform sampling over clusters.

Optional Sobel input (:class:`~pipeline.models.layers.Sobel`): fixed greyscale then horizontal and vertical Sobel
filters, which the paper uses to stop the CNN from clustering by colour.

Everything here is plain numpy/PyTorch: no Ray. The Ray wiring (the feature pass through a
Ray Data actor pool, shards held by Ray actors, per-epoch Ray Train) is in
:mod:`pipeline.distributed.deepcluster`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.kmeans.minibatch import split_empty
from pipeline.kmeans.stats import assign, partial_stats

# ------------------------------------------------------------------------------------------
# Input and model pieces.


def adapt_arch(cfg: Any, arch: dict[str, Any]) -> dict[str, Any]:
    """Raw (unnormalised) features, optionally behind Sobel filters: PCA-whitening and L2
    come after training (:func:`whitened_arch`)."""
    return {**arch, "normalize": False, "sobel": cfg.deepcluster.sobel}


def whitened_arch(arch: dict[str, Any], pca_dim: int) -> dict[str, Any]:
    """The finished model's record: the embedder, then a whitening to ``pca_dim``."""
    return {**arch, "kind": "whitened_embedder", "whiten_from": arch["feature_dim"],
            "feature_dim": pca_dim}


def new_head(feature_dim: int, k: int, seed: int) -> nn.Linear:
    """The epoch's fresh classifier (feature_dim -> k): N(0, 0.01) weights, zero bias, as in
    the reference implementation's ``top_layer`` re-initialisation."""
    gen = torch.Generator().manual_seed(seed)
    head = nn.Linear(feature_dim, k)
    with torch.no_grad():
        head.weight.copy_(torch.randn(k, feature_dim, generator=gen) * 0.01)
        head.bias.zero_()
    return head


def class_weights(labels: np.ndarray, k: int) -> np.ndarray:
    """(k,) float32 weights n / (k · n_c), 0 for empty clusters: each cluster contributes
    equally to the loss, the expectation of uniform sampling over clusters."""
    counts = np.bincount(labels, minlength=k).astype(np.float64)
    w = np.zeros(k)
    np.divide(len(labels), k * counts, out=w, where=counts > 0)
    return w.astype(np.float32)


def pseudo_label_loss(logits: torch.Tensor, labels: torch.Tensor,
                      weights: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of logits (n, k) against pseudo-labels (n,), per-cluster ``weights`` (k,),
    normalised by the batch's total weight."""
    return F.cross_entropy(logits, labels, weight=weights)


# ------------------------------------------------------------------------------------------
# PCA-whitening from summable statistics.


@dataclass
class MomentStats:
    """Summable first and second moments of features: n, Σx (d,), Σxxᵀ (d, d), float64.

    Sums from any split of the data add up to the sums of the whole, so each Ray actor
    (or batch) contributes its part and the driver fits the PCA once.
    """

    n: int
    s: np.ndarray
    ss: np.ndarray

    @classmethod
    def of(cls, x: np.ndarray) -> MomentStats:
        x64 = np.asarray(x, np.float64)
        return cls(len(x64), x64.sum(axis=0), x64.T @ x64)

    def __add__(self, other: MomentStats) -> MomentStats:
        return MomentStats(self.n + other.n, self.s + other.s, self.ss + other.ss)


@dataclass
class Whitening:
    """x -> normalize((x − mean) · proj): PCA to p dims, each scaled to unit variance.

    ``mean`` (d,), ``proj`` (d, p) float32 with ``proj = V_p / sqrt(λ_p + eps)``: the top p
    eigenvectors of the covariance, as ``faiss.PCAMatrix(d, p, eigen_power=-0.5)`` that the
    reference implementation uses.
    """

    mean: np.ndarray
    proj: np.ndarray

    @classmethod
    def fit(cls, stats: MomentStats, dim: int, eps: float = 1e-5) -> Whitening:
        d = len(stats.s)
        if not 1 <= dim <= d or stats.n < 2:
            raise ValueError(f"deepcluster.pca_dim: need 1 <= pca_dim <= {d} and >= 2 "
                             f"points, got pca_dim={dim} with {stats.n} points")
        mean = stats.s / stats.n
        cov = stats.ss / stats.n - np.outer(mean, mean)
        values, vectors = np.linalg.eigh((cov + cov.T) / 2)  # ascending
        top = np.argsort(values)[::-1][:dim]
        proj = vectors[:, top] / np.sqrt(np.maximum(values[top], 0.0) + eps)
        return cls(mean.astype(np.float32), proj.astype(np.float32))

    @property
    def dim(self) -> int:
        return int(self.proj.shape[1])

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """(n, d) -> (n, p) float32, whitened and L2-normalised."""
        z = (np.asarray(x, np.float32) - self.mean) @ self.proj
        norms = np.linalg.norm(z, axis=1, keepdims=True)
        return z / np.maximum(norms, 1e-12)

    def load_into(self, layer: nn.Linear) -> None:
        """Set ``layer`` (d -> p) to this map before the normalisation: W = projᵀ, b = −mean·proj."""
        with torch.no_grad():
            layer.weight.copy_(torch.from_numpy(self.proj.T.copy()))
            layer.bias.copy_(torch.from_numpy(-(self.mean @ self.proj)))


# ------------------------------------------------------------------------------------------
# k-means over feature shards (faiss contrib/clustering.py's pattern: each shard computes
# partial sums, the caller reduces them).


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
    With ``shards`` on Ray actors the calls run in parallel (they return futures' values via
    :class:`pipeline.distributed.deepcluster.RemoteShards`).
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
            faiss_local: bool = True, gpu: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Centroids (k, d) and labels (n,) of the concatenated shards, no cluster empty.

    ``faiss_local`` with a single shard runs ``faiss.Kmeans`` (GPU if asked) on it;
    otherwise :func:`lloyd` reduces partial sums across the shards.
    """
    if faiss_local and len(shards) == 1:
        from pipeline.kmeans.reference import faiss_kmeans

        x = shards[0].rows(np.arange(shards[0].count()))
        centroids = faiss_kmeans(x, k, niter=niter, seed=seed, gpu=gpu)
    else:
        centroids, _ = lloyd(shards, k, niter, seed)
    labels = np.concatenate(gather(shards, "labels", centroids))
    fill_empty(labels, k, np.random.default_rng((seed, 7)))
    return centroids, labels
