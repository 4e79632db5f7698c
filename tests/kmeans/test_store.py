"""CentroidStore: rounds, worker equivalence, late pushes, pull, state round trip."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from pipeline.kmeans.minibatch import apply_drift, minibatch_update
from pipeline.kmeans.state_io import pack_state, unpack_state
from pipeline.kmeans.stats import assign, drift_stats, partial_stats
from pipeline.kmeans.store import CentroidStore

K, D = 10, 8


def dyadic_blobs(n: int, seed: int) -> np.ndarray:
    """Blobs whose values are multiples of 1/4: float32 sums of them are exact."""
    rng = np.random.default_rng(seed)
    centers = rng.integers(-40, 40, (K, D)) * 4
    return ((centers[rng.integers(0, K, n)] + rng.integers(-12, 12, (n, D))) / 4).astype(
        np.float32)


def worker_stats(part: np.ndarray, shift: np.ndarray, centroids: np.ndarray
                 ) -> tuple[np.ndarray, ...]:
    """What a worker pushes: sums, counts of ``part`` and the drift of ``part + shift``."""
    x, c = torch.from_numpy(part), torch.from_numpy(centroids)
    labels, _, _ = assign(x, c)
    sums, counts = partial_stats(x, labels, K)
    drift, drift_counts = drift_stats(x, x + torch.from_numpy(shift), labels, K)
    return sums.numpy(), counts.numpy(), drift.numpy(), drift_counts.numpy()


def test_two_workers_half_batches_equal_one_worker_exactly():
    x = dyadic_blobs(4096, 0)
    rng = np.random.default_rng(1)
    shift = (rng.integers(-2, 3, x.shape) / 8).astype(np.float32)  # drift, also dyadic
    kw = {"reseed_every": 3, "reseed_ratio": 0.3, "reservoir_size": 4096, "seed": 5,
          "drift_smoothing": 0.5}
    one, two = CentroidStore(x[:K], **kw), CentroidStore(x[:K], num_workers=2, **kw)
    for step, (batch, sh) in enumerate(zip(np.split(x, 16), np.split(shift, 16), strict=True)):
        halves, half_shifts = np.split(batch, 2), np.split(sh, 2)
        # The 1-worker store gets the same reservoir rows, in the same order, as the pair.
        samples = np.concatenate([h[:4] for h in halves])
        centroids = one.centroids.copy()
        s, n, dr, dn = worker_stats(batch, sh, centroids)
        one.push(s, n, dr, dn, worker=0, step=step, samples=samples)
        for w in (0, 1):
            two.push(*worker_stats(halves[w], half_shifts[w], centroids), worker=w, step=step,
                     samples=halves[w][:4])
        np.testing.assert_array_equal(two.centroids, one.centroids)  # bit for bit
        np.testing.assert_array_equal(two.weights, one.weights)
    assert one.version == two.version == 16 and one.reseeded == two.reseeded > 0
    assert not two.pending


def test_two_workers_equal_one_worker_on_real_valued_features():
    rng = np.random.default_rng(2)
    x = (rng.normal(0, 5, (K, D))[rng.integers(0, K, 2048)] + rng.normal(size=(2048, D)))
    x = x.astype(np.float32)
    shift = (0.01 * rng.normal(size=x.shape)).astype(np.float32)
    one, two = CentroidStore(x[:K]), CentroidStore(x[:K], num_workers=2)
    for step, (batch, sh) in enumerate(zip(np.split(x, 8), np.split(shift, 8), strict=True)):
        centroids = one.centroids.copy()
        one.push(*worker_stats(batch, sh, centroids), step=step)
        for w, (part, part_sh) in enumerate(zip(np.split(batch, 2), np.split(sh, 2),
                                                strict=True)):
            two.push(*worker_stats(part, part_sh, centroids), worker=w, step=step)
    # Only float32 summation order differs (index_add_ over B vs two B/2 halves).
    np.testing.assert_allclose(two.centroids, one.centroids, rtol=1e-6, atol=1e-5)
    assert one.version == two.version == 8


def stats(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(K, D)), rng.integers(1, 5, K)


def manual(init: np.ndarray, rounds: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    c, w = init.copy(), np.zeros(K)
    for s, n in rounds:
        minibatch_update(c, w, s, n)
    return c


def test_rounds_wait_for_every_worker_and_apply_in_step_order():
    init = np.zeros((K, D), np.float32)
    store = CentroidStore(init, num_workers=2)
    (s0a, n0a), (s0b, n0b), (s1a, n1a), (s1b, n1b) = (stats(i) for i in range(4))
    assert store.push(s0a, n0a, worker=0, step=0) == 0
    assert store.push(s1a, n1a, worker=0, step=1) == 0  # worker 0 runs ahead
    assert store.push(s0b, n0b, worker=1, step=0) == 1  # round 0 complete
    assert store.push(s1b, n1b, worker=1, step=1) == 2
    want = manual(init, [(s0a + s0b, n0a + n0b), (s1a + s1b, n1a + n1b)])
    np.testing.assert_allclose(store.centroids, want, rtol=1e-6)
    assert not store.pending and store.next_round == 2


def test_complete_round_first_applies_earlier_incomplete_rounds_in_order():
    init = np.zeros((K, D), np.float32)
    store = CentroidStore(init, num_workers=2)
    (s0, n0), (s1a, n1a), (s1b, n1b), (late, nl) = (stats(i) for i in range(4))
    store.push(s0, n0, worker=0, step=0)  # worker 1's round-0 push never arrives ...
    store.push(s1a, n1a, worker=0, step=1)
    assert store.push(s1b, n1b, worker=1, step=1) == 2  # ... so round 0 goes first, alone
    np.testing.assert_allclose(store.centroids, manual(init, [(s0, n0), (s1a + s1b, n1a + n1b)]),
                               rtol=1e-6)
    # A late push for an applied round (a restarted worker) is applied on its own, not lost.
    assert store.push(late, nl, worker=1, step=0) == 3
    want = manual(init, [(s0, n0), (s1a + s1b, n1a + n1b), (late, nl)])
    np.testing.assert_allclose(store.centroids, want, rtol=1e-6)


def test_a_dead_peer_does_not_hold_rounds_forever():
    store = CentroidStore(np.zeros((K, D), np.float32), num_workers=2, max_pending=3)
    for step in range(3):
        assert store.push(*stats(step), worker=0, step=step) == 0
    assert store.push(*stats(3), worker=0, step=3) == 1  # 4 open rounds > 3: oldest applied
    assert sorted(store.pending) == [1, 2, 3] and store.next_round == 1


def test_drift_only_push_moves_centroids_by_smoothed_mean_displacement():
    init = np.arange(K * D, dtype=np.float32).reshape(K, D)
    store = CentroidStore(init, drift_smoothing=0.5)
    drift, drift_counts = np.ones((K, D)) * 4, np.full(K, 2)
    drift_counts[0] = 0
    store.push(np.zeros((K, D)), np.zeros(K, np.int64), drift, drift_counts)
    want = init.copy()
    apply_drift(want, drift, drift_counts, 0.5)
    np.testing.assert_array_equal(store.centroids, want)
    assert store.centroids[1, 0] == init[1, 0] + 1.0 and store.centroids[0, 0] == init[0, 0]


def test_pull_since_version():
    store = CentroidStore(np.zeros((2, 2), np.float32))
    version, c = store.pull(-1)
    assert version == 0 and store.pull(0) is None
    c[:] = 7  # a copy: the store is untouched
    assert (store.centroids == 0).all()
    store.push(np.ones((2, 2)), np.ones(2, np.int64))
    assert store.pull(0)[0] == 1 and store.pull(1) is None and store.version == 1
    np.testing.assert_array_equal(store.pull(0)[1], np.ones((2, 2)))


def busy_store(**kw) -> CentroidStore:
    x = dyadic_blobs(3000, 3)
    store = CentroidStore(x[:K], num_workers=2, reseed_every=4, reseed_ratio=0.2,
                          reservoir_size=64, seed=9, **kw)
    for step, batch in enumerate(np.split(x, 30)):
        for w, part in enumerate(np.split(batch, 2)):
            store.push(*worker_stats(part, np.zeros_like(part), store.centroids), worker=w,
                       step=step, samples=part[:8])
    store.push(*stats(0), worker=0, step=30)  # leave a round pending
    return store


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict):
            assert_same_state(a[key], b[key])
        elif isinstance(a[key], np.ndarray):
            assert a[key].dtype == b[key].dtype
            np.testing.assert_array_equal(a[key], b[key])
        else:
            assert a[key] == b[key], key


@pytest.mark.parametrize("codec", ["plain", "pack_state", "pickle"])
def test_state_round_trip_is_exact(codec):
    store = busy_store()
    assert store.reseeded > 0 and store.reservoir.seen > 64 and store.pending
    state = store.state()
    if codec == "pack_state":
        state = unpack_state(pack_state(state))
    copy = CentroidStore(np.zeros((K, D), np.float32), num_workers=2, reseed_every=4,
                         reseed_ratio=0.2, reservoir_size=64, seed=123)
    copy.load_state(state)
    if codec == "pickle":
        copy = pickle.loads(pickle.dumps(store))
    assert_same_state(copy.state(), store.state())
    rng = np.random.default_rng(0)
    for step in range(30, 42):  # identical futures, reseeding and reservoir draws included
        for w in (0, 1):
            s, n = stats(100 * step + w)
            samples = rng.normal(size=(8, D))
            assert copy.push(s, n, worker=w, step=step, samples=samples) == store.push(
                s, n, worker=w, step=step, samples=samples)
    assert_same_state(copy.state(), store.state())


def test_push_validates_shapes():
    store = CentroidStore(np.zeros((K, D), np.float32))
    with pytest.raises(ValueError, match="sums"):
        store.push(np.zeros((K, D + 1)), np.zeros(K))
    with pytest.raises(ValueError, match="together"):
        store.push(np.zeros((K, D)), np.zeros(K), drift=np.zeros((K, D)))
    with pytest.raises(ValueError, match="centroids"):
        CentroidStore(np.zeros(3, np.float32))


def sparse(sums: np.ndarray, counts: np.ndarray, drift: np.ndarray, drift_counts: np.ndarray
           ) -> dict:
    """The sparse form of a dense push: only the rows with a non-zero count."""
    rows = np.flatnonzero((counts != 0) | (drift_counts != 0))
    return {"sums": sums[rows], "counts": counts, "drift": drift[rows],
            "drift_counts": drift_counts, "rows": rows}


def test_sparse_pushes_equal_dense_pushes_and_row_pulls_track_every_change():
    """Two workers touching different clusters, drift, reseeding: identical states, and a
    copy patched only by ``delta`` stays equal to the centroids at every version."""
    x = dyadic_blobs(2048, 3)
    rng = np.random.default_rng(4)
    kw = {"num_workers": 2, "reseed_every": 3, "reseed_ratio": 0.5, "seed": 2,
          "drift_smoothing": 0.5}
    dense, rowwise = CentroidStore(x[:K], **kw), CentroidStore(x[:K], **kw)
    got = rowwise.delta(-1)
    version, incarnation, mirror = got.version, got.incarnation, got.centroids
    touched = []
    for step, batch in enumerate(np.split(x, 32)):
        for w, part in enumerate(np.split(batch, 2)):
            part = part[np.isin(assign(torch.from_numpy(part),
                                       torch.from_numpy(dense.centroids))[0].numpy(),
                                np.arange(w, K, 2))]  # worker w only sees clusters of its parity
            shift = (rng.integers(-2, 3, part.shape) / 8).astype(np.float32)
            stats = worker_stats(part, shift, dense.centroids)
            touched.append(int((stats[1] > 0).sum()))
            dense.push(*stats, worker=w, step=step, samples=part)
            rowwise.push(**sparse(*stats), worker=w, step=step, samples=part)
            got = rowwise.delta(version, incarnation)
            assert got.rows is not None and got.incarnation == incarnation
            version, mirror[got.rows] = got.version, got.centroids
            np.testing.assert_array_equal(mirror, rowwise.centroids)
    assert_same_state(rowwise.state(), dense.state())
    assert dense.reseeded > 0 and min(touched) < K  # partial pushes and reseeds were covered


def test_delta_after_reload_is_the_full_copy():
    store = CentroidStore(np.zeros((K, D), np.float32))
    first = store.delta(-1)
    store.push(np.ones((1, D)), np.eye(K, dtype=np.int64)[2], rows=np.array([2]))
    got = store.delta(0, first.incarnation)
    assert got.version == 1 and got.rows.tolist() == [2] and got.next_round == 1
    np.testing.assert_array_equal(got.centroids, np.ones((1, D)))
    assert store.delta(1, first.incarnation).rows.tolist() == []  # nothing newer
    copy = CentroidStore(np.zeros((K, D), np.float32))
    copy.load_state(store.state())
    for since in (0, 1, 5):  # a copy from another incarnation is void, whatever its version
        got = copy.delta(since, first.incarnation)
        assert got.rows is None and got.centroids.shape == (K, D) and got.version == 1
    assert copy.incarnation not in (first.incarnation, store.incarnation)


def one_push(store: CentroidStore, worker: int, step: int, generation: int = 0) -> int:
    """A push of one point (all ones) into cluster 1."""
    return store.push(np.ones((1, D)), np.eye(K, dtype=np.int64)[1], worker=worker, step=step,
                      rows=np.array([1]), generation=generation)


def test_a_retried_push_applies_once_in_any_order():
    """Pushes of 2 workers, each sent twice and out of order: every push applies once (4
    points). Worker 1's round 0 lands after its round 1 completed round 1 (and with it the
    incomplete round 0), so it is applied on its own: 3 updates."""
    store = CentroidStore(np.zeros((K, D), np.float32), num_workers=2)
    for worker, step in [(0, 0), (0, 1), (0, 0), (1, 1), (1, 0), (1, 1), (0, 1), (1, 0)]:
        one_push(store, worker, step)
    assert store.version == 3 and store.weights[1] == 4 and store.dropped["duplicates"] == 4
    # a server restarted from its saved state still knows the rounds it took
    again = CentroidStore(np.zeros((K, D), np.float32), num_workers=2)
    again.load_state(store.state())
    assert one_push(again, 1, 1) == 3 and again.weights[1] == 4


def test_restart_installs_a_state_under_a_new_generation_and_drops_older_pushes():
    store = CentroidStore(np.zeros((K, D), np.float32), num_workers=1)
    for step in range(3):
        one_push(store, 0, step)
    checkpoint = store.state()
    one_push(store, 0, 3)  # after the checkpoint: discarded by the restart
    assert store.restart(checkpoint, generation=1) == 3 and store.next_round == 3
    assert one_push(store, 0, 4, generation=0) == 3  # queued by the dead group: dropped
    assert store.dropped["stale"] == 1
    assert one_push(store, 0, 3, generation=1) == 4  # the new group replays round 3
    assert store.weights[1] == 4
    assert store.restart(None, generation=2) == 0  # no checkpoint: the initial state
    assert store.weights.sum() == 0 and store.generation == 2


def test_rounds_far_behind_the_window_are_dropped():
    store = CentroidStore(np.zeros((K, D), np.float32), num_workers=1, max_pending=4)
    for step in range(10):
        one_push(store, 0, step)
    assert one_push(store, 1, 2) == 10 and store.dropped["too_late"] == 1
    assert one_push(store, 1, 7) == 11  # within the window: applied on its own
    assert max(len(r) for r in store.seen.values()) <= 5  # the memory stays bounded


def test_sparse_push_validates_rows():
    store = CentroidStore(np.zeros((K, D), np.float32))
    counts = np.zeros(K, np.int64)
    counts[[1, 3]] = 1
    with pytest.raises(ValueError, match="sorted unique"):
        store.push(np.zeros((2, D)), counts, rows=np.array([3, 1]))
    with pytest.raises(ValueError, match="every cluster"):
        store.push(np.zeros((1, D)), counts, rows=np.array([1]))
    with pytest.raises(ValueError, match=r"sums \(2, 8\)"):
        store.push(np.zeros((3, D)), counts, rows=np.array([1, 3]))
