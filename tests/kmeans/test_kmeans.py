"""k-means math against scikit-learn and faiss on fixed features; no Ray."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.cluster import MiniBatchKMeans
from sklearn.datasets import make_blobs

from pipeline.kmeans import CentroidStore, Reservoir, apply_drift, assign, partial_stats
from pipeline.kmeans.minibatch import minibatch_update, split_empty
from pipeline.kmeans.reference import faiss_kmeans, inertia, minibatch_kmeans
from pipeline.kmeans.state_io import pack_state, unpack_state


def blobs(n=20_000, d=32, centers=50, seed=0):
    x, _ = make_blobs(n, d, centers=centers, cluster_std=2.0, random_state=seed)
    return x.astype(np.float32)


def test_update_matches_sklearn_minibatch_kmeans():
    x = blobs(4096, 8, 10)
    k, init = 10, x[:10].copy()
    sk = MiniBatchKMeans(n_clusters=k, init=init, n_init=1, batch_size=256,
                         reassignment_ratio=0.0, random_state=0)
    centroids, weights = init.copy(), np.zeros(k)
    for batch in np.split(x, 16):
        sk.partial_fit(batch)
        labels, _, _ = assign(torch.from_numpy(batch), torch.from_numpy(centroids))
        sums, counts = partial_stats(torch.from_numpy(batch), labels, k)
        minibatch_update(centroids, weights, sums.numpy(), counts.numpy())
    np.testing.assert_allclose(centroids, sk.cluster_centers_, rtol=1e-4, atol=1e-4)


def test_online_kmeans_inertia_within_5_percent_of_faiss():
    x = blobs()
    exact = inertia(x, faiss_kmeans(x, 50, niter=25))
    store = minibatch_kmeans(x, 50, batch_size=1024, epochs=5,
                             store_kwargs={"reseed_every": 10, "reseed_ratio": 0.2})
    ratio = inertia(x, store.centroids) / exact
    assert ratio <= 1.05, ratio


@pytest.mark.parametrize("case", ["far_init", "half_identical"])
def test_no_empty_clusters_after_passes(case):
    rng = np.random.default_rng(0)
    x = blobs(6000, 8, 20)
    k = 20
    if case == "half_identical":
        x[: len(x) // 2] = x[0]
    store = minibatch_kmeans(x, k, batch_size=256, epochs=3,
                             store_kwargs={"reseed_every": 5, "reseed_ratio": 0.02})
    if case == "far_init":  # all centroids start at one far-away point
        store = CentroidStore(np.full((k, 8), 1e3, np.float32), reseed_every=5,
                              reseed_ratio=0.02)
        for _ in range(3):
            for batch in np.split(x[rng.permutation(len(x))], 24):
                b = torch.from_numpy(batch)
                labels, _, _ = assign(b, torch.from_numpy(store.centroids))
                sums, counts = partial_stats(b, labels, k)
                store.push(sums.numpy(), counts.numpy(), samples=batch[:64], step=store.version)
    labels, _, _ = assign(torch.from_numpy(x), torch.from_numpy(store.centroids))
    assert (np.bincount(labels.numpy(), minlength=k) > 0).all()


def test_split_empty_fixes_every_empty_cluster_on_adversarial_data():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1000, 4)).astype(np.float32)
    x[:500] = 3.0  # half the points identical
    centroids = np.concatenate([x[:5], rng.normal(size=(5, 4)) + 100]).astype(np.float32)
    labels, _, _ = assign(torch.from_numpy(x), torch.from_numpy(centroids))
    counts = np.bincount(labels.numpy(), minlength=10)
    assert (counts == 0).sum() >= 5
    fixed = split_empty(centroids, counts, rng)
    assert sorted(fixed) == sorted(np.flatnonzero(counts == 0).tolist())
    assert len(np.unique(centroids, axis=0)) == 10  # every split moved off its donor


def test_drift_moves_centroids_by_mean_displacement():
    c = np.zeros((3, 2), np.float32)
    drift = np.array([[2, 2], [0, 0], [3, -3]], np.float32)
    apply_drift(c, drift, np.array([2, 0, 1]), smoothing=1.0)
    np.testing.assert_allclose(c, [[1, 1], [0, 0], [3, -3]])
    apply_drift(c, drift, np.array([2, 0, 1]), smoothing=0.5)
    np.testing.assert_allclose(c, [[1.5, 1.5], [0, 0], [4.5, -4.5]])


def test_two_workers_half_batches_equal_one_worker():
    x = blobs(2048, 8, 10)
    init = x[:10].copy()
    one, two = CentroidStore(init), CentroidStore(init, num_workers=2)
    for step, batch in enumerate(np.split(x, 8)):
        c = torch.from_numpy(one.centroids.copy())
        for store, parts in ((one, [batch]), (two, np.split(batch, 2))):
            for w, part in enumerate(parts):
                p = torch.from_numpy(part)
                labels, _, _ = assign(p, c)
                sums, counts = partial_stats(p, labels, 10)
                store.push(sums.numpy(), counts.numpy(), sums.numpy() * 0.01, counts.numpy(),
                           worker=w, step=step)
        np.testing.assert_allclose(two.centroids, one.centroids, rtol=1e-5, atol=1e-5)
    assert one.version == two.version == 8


def test_store_state_round_trips_exactly_through_pack():
    store = minibatch_kmeans(blobs(3000, 8, 10), 10, batch_size=100, epochs=1)
    store.push(np.ones((10, 8)), np.ones(10, np.int64), step=999, worker=0)
    copy = CentroidStore(np.zeros((10, 8), np.float32))
    copy.load_state(unpack_state(pack_state(store.state())))
    assert copy.version == store.version
    np.testing.assert_array_equal(copy.centroids, store.centroids)
    np.testing.assert_array_equal(copy.weights, store.weights)
    args = (np.full((10, 8), 2.0), np.full(10, 3, np.int64), None, None, 0, 1000)
    assert copy.push(*args) == store.push(*args)
    np.testing.assert_array_equal(copy.centroids, store.centroids)


def test_pull_since_version_and_reservoir_uniformity():
    store = CentroidStore(np.zeros((2, 2), np.float32))
    assert store.pull(-1)[0] == 0 and store.pull(0) is None
    store.push(np.ones((2, 2)), np.ones(2, np.int64))
    assert store.pull(0)[0] == 1
    res = Reservoir(100, 1, seed=0)
    for start in range(0, 10_000, 50):
        res.add(np.arange(start, start + 50, dtype=np.float32)[:, None])
    hist = np.histogram(res.rows[:, 0], bins=10, range=(0, 10_000))[0]
    assert len(res) == 100 and hist.min() >= 2  # every tenth of the stream is represented
