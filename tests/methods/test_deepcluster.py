"""DeepCluster's math (no Ray): whitening, parity with a direct faiss pipeline, no empty
cluster on adversarial data, Sobel, class weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.kmeans.shards import LocalShard, cluster, fill_empty, lloyd
from pipeline.methods.deepcluster import (
    MomentStats,
    Whitening,
    class_weights,
    pseudo_label_loss,
)
from pipeline.metrics import nmi
from pipeline.models.layers import Sobel, WhitenedEmbedder
from tests.test_cluster_job import digits_shards  # noqa: F401  (fixture)


def blobs(n: int, k: int, d: int, seed: int, spread: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """Well-separated Gaussian blobs, anisotropic (a random linear map): x (n, d), y (n,)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 3, (k, d))
    y = rng.integers(0, k, n)
    x = centers[y] + rng.normal(0, spread, (n, d))
    return (x @ rng.normal(size=(d, d))).astype(np.float32), y


def test_moments_add_up_and_whitening_gives_unit_covariance():
    x, _ = blobs(3000, 5, 12, 0)
    parts = np.array_split(x, 3)
    total = MomentStats.of(parts[0]) + MomentStats.of(parts[1]) + MomentStats.of(parts[2])
    whole = MomentStats.of(x)
    np.testing.assert_allclose(total.ss, whole.ss, rtol=1e-10)
    w = Whitening.fit(total, 6)
    z = (x - w.mean) @ w.proj  # before the L2 normalisation
    np.testing.assert_allclose(np.cov(z.T, bias=True), np.eye(6), atol=1e-3)
    assert np.allclose(np.linalg.norm(w(x), axis=1), 1.0, atol=1e-5)


def test_whitening_folds_into_the_model_exactly():
    x, _ = blobs(500, 4, 8, 1)
    w = Whitening.fit(MomentStats.of(x), 5)
    model = WhitenedEmbedder(torch.nn.Identity(), 8, 5)
    w.load_into(model.whiten)
    with torch.no_grad():
        np.testing.assert_allclose(model(torch.from_numpy(x)).numpy(), w(x), atol=1e-5)


def faiss_reference(x: np.ndarray, dim: int, k: int) -> np.ndarray:
    """The reference implementation's pipeline, straight from faiss: PCAMatrix with
    eigen_power -0.5, L2 normalisation, faiss.Kmeans; labels (n,)."""
    import faiss

    pca = faiss.PCAMatrix(x.shape[1], dim, -0.5)
    pca.train(x)
    z = pca.apply_py(x)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    km = faiss.Kmeans(dim, k, niter=20, seed=3)
    km.train(z)
    return km.index.search(z, 1)[1].ravel()


@pytest.mark.parametrize("sharded", [False, True])
def test_pca_whitening_kmeans_matches_a_direct_faiss_reference(sharded):
    x, y = blobs(4000, 8, 32, 2)
    w = Whitening.fit(MomentStats.of(x), 16)
    z = w(x)
    shards = [LocalShard(part) for part in np.array_split(z, 3)] if sharded else [LocalShard(z)]
    centroids, labels = cluster(shards, 8, 20, seed=0, faiss_local=not sharded)
    reference = faiss_reference(x, 16, 8)
    assert centroids.shape == (8, 16)
    assert nmi(reference, labels) >= 0.95
    assert nmi(y, labels) >= 0.95  # and both find the planted blobs


def test_no_cluster_is_left_empty_when_half_the_points_are_identical():
    rng = np.random.default_rng(4)
    x = np.concatenate([np.zeros((1000, 8)), rng.normal(size=(1000, 8))]).astype(np.float32)
    for shards, faiss_local in (([LocalShard(x)], True), ([LocalShard(x[::2]),
                                                           LocalShard(x[1::2])], False)):
        _, labels = cluster(shards, 50, 10, seed=1, faiss_local=faiss_local)
        sizes = np.bincount(labels, minlength=50)
        assert sizes.min() > 0, sizes
        assert len(labels) == 2000


def test_lloyd_splits_empty_clusters_every_iteration():
    x = np.concatenate([np.zeros((300, 4)), np.ones((10, 4))]).astype(np.float32)
    centroids, history = lloyd([LocalShard(x)], 6, niter=5, seed=0)
    assert len(history) == 5 and np.isfinite(centroids).all()
    labels = np.concatenate([LocalShard(x).labels(centroids)])
    fill_empty(labels, 6, np.random.default_rng(0))
    assert np.bincount(labels, minlength=6).min() > 0


def test_fill_empty_moves_half_of_the_largest_cluster():
    labels = np.array([0] * 10 + [1] * 4)
    filled = fill_empty(labels, 3, np.random.default_rng(0))
    assert filled == [2] and np.bincount(labels).tolist() == [5, 4, 5]


def test_class_weights_make_every_cluster_count_equally():
    labels = np.array([0] * 90 + [1] * 10)
    w = class_weights(labels, 3)
    assert w[2] == 0
    per_cluster = np.bincount(labels, weights=w[labels], minlength=3)
    assert np.isclose(per_cluster[0], per_cluster[1]) and per_cluster[2] == 0
    logits = torch.zeros(4, 3)
    loss = pseudo_label_loss(logits, torch.tensor([0, 0, 0, 1]), torch.from_numpy(w))
    assert torch.isclose(loss, torch.log(torch.tensor(3.0)))


def test_sobel_sees_edges_not_colour():
    x = torch.zeros(2, 3, 8, 8)
    x[0, :, :, 4:] = 1.0  # a vertical edge
    x[1] = 0.7  # flat colour
    out = Sobel(3)(x)
    assert out.shape == (2, 2, 8, 8)
    assert out[0, 0, 2:6, 3:5].abs().min() > 1 and out[0, 1, 2:6].abs().max() < 1e-6
    assert out[1, :, 1:-1, 1:-1].abs().max() < 1e-6


def test_deepcluster_runs_in_the_reference_runner(digits_shards, tmp_path):  # noqa: F811
    """The whole method in one process, no Ray in the loop: per-epoch clustering (its Lloyd
    spread over 2 in-process shards, as over Ray actors), pseudo-label epochs of 2 passes,
    the whitened export."""
    from pipeline.config import Config, resolve
    from pipeline.methods.reference import run_reference

    cfg = resolve(Config, None, ["method=deepcluster", "cluster.k=10", "train.epochs=2",
                                 "data.image_size=16", "model.feature_dim=16",
                                 "deepcluster.pca_dim=8", "deepcluster.passes=2",
                                 "deepcluster.local_max_points=100",
                                 "deepcluster.kmeans_shards=2", "train.lr_schedule=cosine"],
                  {"data.input": digits_shards, "data.output": str(tmp_path / "run")})
    trained = run_reference(cfg, digits_shards)
    assert trained.centroids.shape == (10, 8) and trained.arch["feature_dim"] == 8
    assert [row["epoch"] for row in trained.history] == [0, 1]
    for row in trained.history:
        assert row["empty_clusters"] == 0 and np.isfinite(row["loss"]) and row["nmi"] > 0.2
    # Each epoch trains a fresh head on a new clustering, so mean losses of two epochs are
    # not comparable (2.2472 then 2.2489 on this VM, where earlier CI VMs saw a fall); within
    # an epoch, learning shows as a loss below chance, ln k, on uniformly sampled clusters.
    assert all(row["loss"] < np.log(10) - 0.02 for row in trained.history), trained.history
