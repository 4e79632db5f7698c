"""Mini-batch update vs scikit-learn, drift, reservoir sampling, reseeding, splitting."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.cluster import MiniBatchKMeans
from sklearn.datasets import make_blobs

from pipeline.kmeans import CentroidStore
from pipeline.kmeans.minibatch import (
    Reservoir,
    apply_drift,
    minibatch_update,
    reseed_starved,
    split_empty,
    starved_clusters,
)
from pipeline.kmeans.stats import assign, partial_stats

K = 12


def sklearn_setup(dtype: type) -> tuple[np.ndarray, np.ndarray, MiniBatchKMeans]:
    x, _ = make_blobs(4096, 16, centers=K, cluster_std=3.0, random_state=0)
    x = x.astype(dtype)
    init = x[np.random.default_rng(0).choice(len(x), K, replace=False)].copy()
    # sklearn's first partial_fit sets cluster_centers_ = init and _counts = 0 (dtype of X),
    # then runs the same mini-batch step on that first batch; reassignment_ratio=0 disables
    # its random reassignment, so the two algorithms see identical inputs.
    sk = MiniBatchKMeans(n_clusters=K, init=init, n_init=1, batch_size=256,
                         reassignment_ratio=0.0, random_state=0)
    return x, init, sk


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_update_matches_sklearn_minibatch_kmeans(dtype):
    x, init, sk = sklearn_setup(dtype)
    centroids, weights = init.astype(np.float32), np.zeros(K)
    max_diff = 0.0
    for step, batch in enumerate(np.split(x, 16)):
        b = torch.from_numpy(batch)
        labels, _, _ = assign(b, torch.from_numpy(centroids))
        if step:  # same assignments as sklearn's against its current centres
            np.testing.assert_array_equal(labels.numpy(), sk.predict(batch))
        sk.partial_fit(batch)
        sums, counts = partial_stats(b, labels, K)
        minibatch_update(centroids, weights, sums.numpy(), counts.numpy())
        np.testing.assert_array_equal(weights, sk._counts)  # points absorbed, exactly
        max_diff = max(max_diff, float(np.abs(centroids - sk.cluster_centers_).max()))
    assert max_diff < 1e-4, max_diff  # measured: 7.6e-6 (float32 X), 2.0e-6 (float64 X)


def test_store_without_reseeding_matches_sklearn():
    x, init, sk = sklearn_setup(np.float32)
    store = CentroidStore(init, reseed_every=10**9)
    for step, batch in enumerate(np.split(x, 16)):
        sk.partial_fit(batch)
        b = torch.from_numpy(batch)
        sums, counts = partial_stats(b, assign(b, torch.from_numpy(store.centroids))[0], K)
        store.push(sums.numpy(), counts.numpy(), step=step)
    np.testing.assert_allclose(store.centroids, sk.cluster_centers_, rtol=1e-4, atol=1e-4)
    assert store.version == 16


def test_update_is_a_running_mean_and_skips_empty_clusters():
    c = np.array([[0.0, 0.0], [5.0, 5.0]], np.float32)
    w = np.zeros(2)
    minibatch_update(c, w, np.array([[2.0, 4.0], [0, 0]]), np.array([2, 0]))
    np.testing.assert_array_equal(c, [[1, 2], [5, 5]])  # W = 0: the batch mean replaces init
    minibatch_update(c, w, np.array([[4.0, 1.0], [0, 0]]), np.array([1, 0]))
    np.testing.assert_allclose(c, [[2, 5 / 3], [5, 5]], rtol=1e-6)  # mean of all 3 points
    np.testing.assert_array_equal(w, [3, 0])


def test_window_caps_the_count_so_the_rate_stays_at_least_n_over_window_plus_n():
    c = np.array([[0.0, 0.0], [5.0, 5.0]], np.float32)
    w = np.array([1000.0, 3.0])
    minibatch_update(c, w, np.array([[10.0, 30.0], [8.0, 8.0]]), np.array([10, 1]), window=10)
    # row 0: W capped 1000 -> 10, so 10 new points move it half way to their mean (1, 3);
    # row 1: W = 3 is under the cap, the plain running mean (3 * 5 + 8) / 4
    np.testing.assert_allclose(c, [[0.5, 1.5], [5.75, 5.75]], rtol=1e-6)
    np.testing.assert_array_equal(w, [20, 4])


def test_window_tracks_moving_points_where_the_unbounded_count_lags_further_each_round():
    """Points drifting at constant speed: with the unbounded count a centroid averages all
    past positions (its lag grows like t/2); capped at m points its lag stays near the
    distance moved over ~m points."""
    lags: dict[float, list[float]] = {}
    for window in (0.0, 50.0):
        c, w, lag = np.zeros((1, 1), np.float32), np.zeros(1), []
        for t in range(200):
            centre = 0.1 * t
            minibatch_update(c, w, np.array([[10 * centre]]), np.array([10]), window)
            lag.append(centre - float(c[0, 0]))
        lags[window] = lag
    assert lags[0.0][-1] > 9.0 and lags[0.0][-1] > lags[0.0][99] + 4.0  # ~t/20, growing
    assert lags[50.0][-1] < 0.6 and abs(lags[50.0][-1] - lags[50.0][99]) < 1e-3  # steady


def test_drift_moves_centroids_by_mean_displacement():
    c = np.zeros((3, 2), np.float32)
    drift = np.array([[2, 2], [7, 7], [3, -3]], np.float32)
    counts = np.array([2, 0, 1])
    apply_drift(c, drift, counts, smoothing=1.0)
    np.testing.assert_array_equal(c, [[1, 1], [0, 0], [3, -3]])  # exact; no-count untouched
    apply_drift(c, drift, counts, smoothing=0.5)  # half of the displacement
    np.testing.assert_array_equal(c, [[1.5, 1.5], [0, 0], [4.5, -4.5]])
    apply_drift(c, drift, counts, smoothing=0.0)
    np.testing.assert_array_equal(c, [[1.5, 1.5], [0, 0], [4.5, -4.5]])


def chi_square(observed: np.ndarray) -> float:
    expected = observed.sum() / len(observed)
    return float(((observed - expected) ** 2 / expected).sum())


def test_reservoir_is_uniform_over_the_stream():
    res, rng = Reservoir(1000, 2, seed=0), np.random.default_rng(1)
    start = 0
    while start < 20_000:  # uneven chunks exercise both the fill and the replace paths
        m = int(rng.integers(1, 700))
        ids = np.arange(start, min(start + m, 20_000), dtype=np.float32)
        res.add(np.stack([ids, -ids], 1))
        start += m
    assert len(res) == 1000 and res.seen == 20_000
    ids = res.filled()[:, 0]
    assert len(np.unique(ids)) == 1000 and (res.filled()[:, 1] == -ids).all()
    hist = np.histogram(ids, bins=20, range=(0, 20_000))[0]
    assert chi_square(hist) < 43.8, hist  # chi2(19 dof) 99.9% quantile


def test_reservoir_later_rows_of_one_call_win_their_slot():
    # Capacity 1: Algorithm R leaves each of the 10 rows with probability 1/10; if an earlier
    # row of the same call won a contested slot, late rows would be under-represented.
    wins = np.zeros(10)
    for seed in range(2000):
        res = Reservoir(1, 1, seed=seed)
        res.add(np.arange(10, dtype=np.float32)[:, None])
        wins[int(res.rows[0, 0])] += 1
    assert chi_square(wins) < 27.9, wins  # chi2(9 dof) 99.9% quantile


def test_reservoir_state_round_trip_and_sampling():
    res = Reservoir(50, 3, seed=2)
    res.add(np.random.default_rng(0).normal(size=(80, 3)))
    copy = Reservoir(1, 1)
    copy.load_state(res.state())
    more = np.random.default_rng(1).normal(size=(40, 3))
    res.add(more)
    copy.add(more)
    np.testing.assert_array_equal(copy.filled(), res.filled())
    assert (len(copy), copy.seen, copy.capacity) == (50, 120, 50)
    s = res.sample(50, np.random.default_rng(0))
    assert len(np.unique(s, axis=0)) == 50  # without replacement when possible
    assert res.sample(80, np.random.default_rng(0)).shape == (80, 3)
    with pytest.raises(ValueError, match="empty"):
        Reservoir(5, 3).sample(1, np.random.default_rng(0))


def test_starved_clusters_rule_and_half_cap():
    np.testing.assert_array_equal(starved_clusters(np.array([100, 0.5, 50, 0, 2.0]), 0.01),
                                  [1, 3])
    assert starved_clusters(np.zeros(4), 0.5).size == 0  # nothing counted yet
    ids = starved_clusters(np.array([9.0, 0, 0, 0, 0, 0, 0.1, 0.2]), 0.5)
    assert len(ids) == 4 and set(ids) <= {1, 2, 3, 4, 5}  # at most k // 2, neediest first


def test_reseed_moves_starved_clusters_to_under_served_regions():
    rng = np.random.default_rng(0)
    centroids = np.array([[0, 0], [10, 0], [0, 10], [0.1, 0], [0.2, 0]], np.float32)
    res = Reservoir(2000, 2, seed=0)
    res.add(centroids[:3][rng.integers(0, 3, 1900)] + rng.normal(0, 0.1, (1900, 2)))
    res.add(np.repeat([[50.0, 50.0], [-50.0, 50.0]], 50, axis=0) + rng.normal(0, 0.1, (100, 2)))
    weights = np.array([500.0, 300.0, 200.0, 7.0, 3.0])
    recent = np.array([100.0, 80.0, 90.0, 0.0, 0.5])
    moved = reseed_starved(centroids, weights, recent, res, 0.01, rng)
    assert moved == [3, 4]
    assert (np.abs(centroids[moved]) > 40).all()  # both far away ...
    assert centroids[3, 0] * centroids[4, 0] < 0  # ... and in different regions (k-means++)
    assert any((res.filled() == centroids[3]).all(1))  # a reservoir row
    np.testing.assert_array_equal(weights, [500, 300, 200, 200, 200])  # min of the others


def test_reseed_is_a_no_op_without_reservoir_or_starvation():
    c, w = np.zeros((4, 2), np.float32), np.ones(4)
    assert reseed_starved(c, w, np.array([5.0, 0, 0, 5]), Reservoir(8, 2), 0.1,
                          np.random.default_rng(0)) == []
    res = Reservoir(8, 2)
    res.add(np.ones((8, 2)))
    assert reseed_starved(c, w, np.array([5.0, 5, 5, 5]), res, 0.1,
                          np.random.default_rng(0)) == []


@pytest.mark.parametrize("point", [3.0, 0.0])
def test_split_empty_fixes_every_empty_cluster_on_half_identical_data(point):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1000, 4)).astype(np.float32)
    x[:500] = point  # half the points identical (0.0: at the origin, where c·(1±eps) == c)
    centroids = np.concatenate([x[:1], x[500:504], rng.normal(size=(15, 4)) + 100])
    centroids = centroids.astype(np.float32)
    labels, _, _ = assign(torch.from_numpy(x), torch.from_numpy(centroids))
    counts = np.bincount(labels.numpy(), minlength=20)
    empty = np.flatnonzero(counts == 0).tolist()
    assert len(empty) >= 15
    before = centroids.copy()
    fixed = split_empty(centroids, counts, rng)
    assert fixed == empty
    assert (counts > 0).all() and counts.sum() == 1000  # counts split, none lost
    assert len(np.unique(centroids, axis=0)) == 20  # every split moved off its donor
    donors = [i for i in range(20) if i not in empty and (centroids[i] != before[i]).any()]
    moves = [np.abs(centroids[i] - before[i]).max() for i in donors]
    assert donors and max(moves) < 0.5, moves  # small next to the data's spread (std 1)


def test_split_empty_stops_when_nothing_can_be_split():
    c = np.arange(6, dtype=np.float32).reshape(3, 2)
    counts = np.array([1, 1, 0])
    assert split_empty(c, counts, np.random.default_rng(0)) == []
    np.testing.assert_array_equal(c, np.arange(6).reshape(3, 2))
