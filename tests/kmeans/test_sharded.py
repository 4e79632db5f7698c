"""ShardedStore: k rows split over several stores give one store's centroids exactly."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.kmeans.sharded import ShardedStore, centroids_of, shard_bounds
from pipeline.kmeans.store import CentroidStore
from tests.kmeans.test_store import K, dyadic_blobs, worker_stats

KW = {"num_workers": 2, "reseed_every": 10**9, "drift_smoothing": 0.5}


def sharded(init: np.ndarray, shards: int) -> ShardedStore:
    bounds = shard_bounds(len(init), shards)
    parts = zip(bounds[:-1], bounds[1:], strict=True)
    return ShardedStore([CentroidStore(init[a:b], **KW) for a, b in parts], bounds)


@pytest.mark.parametrize("shards", [1, 3, K])
def test_sharded_rounds_equal_one_store_and_row_pulls_track_them(shards):
    x = dyadic_blobs(2048, 7)
    rng = np.random.default_rng(8)
    one, many = CentroidStore(x[:K], **KW), sharded(x[:K], shards)
    got = many.sync(-1)
    version, incarnation, mirror = got.version, got.incarnation, got.centroids.copy()
    assert got.rows is None and incarnation.count("|") == shards - 1
    for step, batch in enumerate(np.split(x, 16)):
        for w, part in enumerate(np.split(batch, 2)):
            shift = (rng.integers(-2, 3, part.shape) / 8).astype(np.float32)
            stats = worker_stats(part, shift, one.centroids)
            one.push(*stats, worker=w, step=step)
            many.push(*stats, worker=w, step=step)
        got = many.sync(version, incarnation, until_round=step + 1)
        assert got.next_round == step + 1 and got.incarnation == incarnation
        version, mirror[got.rows] = got.version, got.centroids
        np.testing.assert_array_equal(mirror, one.centroids)
    assert version == one.version == 16
    np.testing.assert_array_equal(many.pull(-1)[1], one.centroids)
    np.testing.assert_array_equal(centroids_of(many.state()), one.centroids)


def test_sharded_state_round_trip():
    x = dyadic_blobs(512, 1)
    store = sharded(x[:K], 3)
    for step in range(4):
        for w in (0, 1):
            store.push(*worker_stats(x[step * 64 + w * 32:][:32], np.zeros((32, 8), np.float32),
                                     x[:K]), worker=w, step=step)
    copy = sharded(np.zeros((K, 8), np.float32), 3)
    assert copy.restart(store.state(), generation=1) == 4
    np.testing.assert_array_equal(copy.pull(-1)[1], store.pull(-1)[1])
    # a copy from before the restart is void: every row comes back
    assert copy.sync(4, store.sync(-1).incarnation).rows is None


def test_shard_bounds_cover_every_cluster_once():
    assert shard_bounds(10, 3).tolist() == [0, 4, 7, 10]
    with pytest.raises(ValueError, match="centroid_shards"):
        shard_bounds(4, 5)
