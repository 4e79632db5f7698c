"""The Ray centroid server against the in-process CentroidStore reference (STYLE lesson 2)."""

from __future__ import annotations

import time

import numpy as np
import torch

from pipeline.distributed.centroid_server import RemoteStore, create_server
from pipeline.kmeans.store import CentroidStore
from pipeline.methods.online import OnlineLossSpec, OnlineWorker

K, D = 8, 6


def blobs(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 4, (K, D))
    return (centers[rng.integers(0, K, n)] + rng.normal(0, 1, (n, D))).astype(np.float32)


class Frozen(torch.nn.Module):
    """A fixed linear map: the 'frozen model' whose features never drift."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(D, D, generator=gen), requires_grad=False)

    def forward(self, x):
        return x @ self.w


def kmeans_worker(store, worker: int) -> OnlineWorker:
    model = Frozen()
    return OnlineWorker(model=model, optimizer=torch.optim.SGD([torch.zeros(1)], lr=0.1),
                        store=store, loss_spec=OnlineLossSpec(), augment_spec=None,
                        device=torch.device("cpu"), drift_compensation=False, sync_every=1,
                        max_staleness=0, worker=worker)


def run_worker(store, worker: int, batches: list[np.ndarray]) -> None:
    w = kmeans_worker(store, worker)
    w.refresh()
    w.run_epoch((torch.from_numpy(b) for b in batches), train_cnn=False)


def init_centroids(x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return Frozen()(torch.from_numpy(x[:K])).numpy()


def test_two_workers_half_batch_equal_one_worker_full_batch(ray_cluster):
    ray = ray_cluster
    x = blobs(1024, 1)
    batches = np.split(x, 16)  # 16 steps of B = 64
    init = init_centroids(x)
    reference = CentroidStore(init.copy(), num_workers=1, reseed_every=10**9)
    run_worker(reference, 0, batches)

    handle = create_server("test-server-2w", None, init.copy(),
                           {"num_workers": 2, "reseed_every": 10**9}, None, None)
    remote_run = ray.remote(num_cpus=0.5)(lambda w, bs: run_worker(RemoteStore(handle), w, bs))
    halves = [[b[:32] for b in batches], [b[32:] for b in batches]]
    ray.get([remote_run.remote(w, halves[w]) for w in (0, 1)])
    version, centroids = ray.get(handle.pull.remote(-1))
    assert version == reference.version == 16
    np.testing.assert_allclose(centroids, reference.pull(-1)[1], rtol=1e-5, atol=1e-5)
    ray.kill(handle)


def test_server_matches_store_push_for_push(ray_cluster):
    ray = ray_cluster
    rng = np.random.default_rng(0)
    init = rng.normal(size=(K, D)).astype(np.float32)
    store = CentroidStore(init.copy())
    handle = create_server("test-server-pp", None, init.copy(), {}, None, None)
    for step in range(5):
        sums = rng.normal(size=(K, D)).astype(np.float32)
        counts = rng.integers(0, 5, K)
        drift = rng.normal(size=(K, D)).astype(np.float32) * 0.01
        args = (sums, counts, drift, counts.copy(), 0, step)
        assert store.push(*args) == ray.get(handle.push.remote(*args))
    np.testing.assert_allclose(ray.get(handle.pull.remote(-1))[1], store.pull(-1)[1], atol=1e-6)
    assert ray.get(handle.pull.remote(store.version)) is None
    ray.kill(handle)


def test_restarted_server_reloads_its_last_state(ray_cluster, tmp_path):
    ray = ray_cluster
    rng = np.random.default_rng(3)
    init = rng.normal(size=(K, D)).astype(np.float32)
    state_uri = str(tmp_path / "server_state.npz")
    handle = create_server("test-server-restart", None, init, {}, state_uri, None,
                           persist_every=2)
    for step in range(4):
        ray.get(handle.push.remote(rng.normal(size=(K, D)).astype(np.float32),
                                   np.ones(K, dtype=np.int64), None, None, 0, step))
    before = ray.get(handle.pull.remote(-1))
    handle.crash.remote()
    after = ray.get(handle.pull.remote(-1))  # retried on the restarted actor
    assert after[0] == before[0] == 4
    np.testing.assert_array_equal(after[1], before[1])
    assert ray.get(handle.info.remote())["restored"] is True
    ray.kill(handle)


def one_point(rng: np.random.Generator) -> tuple:
    """A push's (sums, counts, drift, drift_counts): one point in cluster 0."""
    counts = np.eye(K, dtype=np.int64)[0]
    return rng.normal(size=(K, D)).astype(np.float32) * counts[:, None], counts, None, None


def test_wait_blocks_on_the_server_until_the_round_is_applied(ray_cluster):
    """Protocol v2: a waiting worker makes one call, answered when the round it needs is
    applied (pushes go on meanwhile), or when its timeout ends."""
    ray = ray_cluster
    rng = np.random.default_rng(5)
    handle = create_server("test-server-wait", None, np.zeros((K, D), np.float32),
                           {"num_workers": 1}, None, None)
    first = ray.get(handle.delta.remote(-1))
    waiting = handle.wait.remote(first.version, first.incarnation, 2, 60.0)
    ready, _ = ray.wait([waiting], timeout=1.0)
    assert not ready  # blocked on the server: round 1 is not applied yet
    for step in range(2):
        ray.get(handle.push.remote(*one_point(rng), 0, step))
    got = ray.get(waiting, timeout=10)
    assert got.next_round == 2 and got.version == 2 and got.rows.tolist() == [0]
    started = time.monotonic()
    late = ray.get(handle.wait.remote(got.version, got.incarnation, 5, 0.5))
    assert late.next_round == 2 and 0.4 < time.monotonic() - started < 5  # timed out
    ray.kill(handle)


def test_a_push_whose_answer_a_server_crash_lost_applies_once(ray_cluster, tmp_path):
    """The server persists version 2, then dies before it answers that push (a real
    process exit): Ray does not retry it, and the client, seeing the restarted actor's
    reloaded state already past that round, does not push it again."""
    ray = ray_cluster
    rng = np.random.default_rng(6)
    handle = create_server("test-server-dedup", None, np.zeros((K, D), np.float32), {},
                           str(tmp_path / "state.npz"), None, persist_every=2,
                           crash_at_round=2)
    client = RemoteStore(handle)
    for step in range(3):
        client.push(*one_point(rng), 0, step)
        client.drain()
    info = ray.get(handle.info.remote())
    assert info["restored"] and info["dropped"]["duplicates"] == 0
    assert info["version"] == info["next_round"] == 3
    assert ray.get(handle.state.remote())["weights"].sum() == 3  # three points, once each
    ray.kill(handle)


def test_rounds_a_crashed_server_lost_are_pushed_again_in_order(ray_cluster, tmp_path):
    """Upstream backup: the server persisted version 4 of 7 and crashed; the restarted
    actor reloads version 4, and the worker's next sync pushes rounds 4-6 again before it
    answers, so the centroids are those of a server that never crashed (the in-process
    store fed the same pushes), not an older copy."""
    ray = ray_cluster
    rng = np.random.default_rng(7)
    pushes = [one_point(rng) for _ in range(7)]
    reference = CentroidStore(np.zeros((K, D), np.float32))
    for step, push in enumerate(pushes):
        reference.push(*push, 0, step)
    handle = create_server("test-server-replay", None, np.zeros((K, D), np.float32), {},
                           str(tmp_path / "state.npz"), None, persist_every=4)
    client = RemoteStore(handle)
    for step, push in enumerate(pushes):
        client.push(*push, 0, step)
    client.drain()
    mine = client.sync(-1)
    assert mine.version == 7 and mine.durable == 4 and sorted(client.kept) == [4, 5, 6]
    handle.crash.remote()
    got = client.sync(mine.version, mine.incarnation, until_round=7, timeout_s=60.0)
    if got.incarnation == mine.incarnation:  # the answer prefetched before the crash
        got = client.sync(got.version, got.incarnation, until_round=7, timeout_s=60.0)
    assert got.incarnation != mine.incarnation and got.rows is None
    assert got.version == got.next_round == 7
    np.testing.assert_array_equal(got.centroids, reference.centroids)
    assert ray.get(handle.info.remote())["restored"] is True
    # and the dead worker group's pushes are dropped once a new generation restarted it
    client.restart(ray.get(handle.state.remote()), generation=1)
    stale = RemoteStore(handle, generation=0)
    stale.push(*one_point(rng), 0, 7)
    stale.drain()
    assert ray.get(handle.info.remote())["dropped"]["stale"] == 1
    ray.kill(handle)


def test_sharded_servers_match_the_single_store_reference(ray_cluster):
    """k rows split over 2 server actors, 2 workers pushing half batches: the centroids of
    one in-process store fed the full batches (reseeding off)."""
    from pipeline.kmeans.sharded import ShardedStore, shard_bounds

    ray = ray_cluster
    x = blobs(1024, 3)
    batches = np.split(x, 16)
    init = init_centroids(x)
    reference = CentroidStore(init.copy(), num_workers=1, reseed_every=10**9)
    run_worker(reference, 0, batches)

    bounds = shard_bounds(K, 2)
    handles = [create_server(f"test-shard-{s}", None, init[lo:hi].copy(),
                             {"num_workers": 2, "reseed_every": 10**9}, None, None)
               for s, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True))]

    def shard_run(w, bs):
        run_worker(ShardedStore([RemoteStore(h) for h in handles], bounds), w, bs)

    remote_run = ray.remote(num_cpus=0.5)(shard_run)
    halves = [[b[:32] for b in batches], [b[32:] for b in batches]]
    ray.get([remote_run.remote(w, halves[w]) for w in (0, 1)])
    parts = [ray.get(h.pull.remote(-1)) for h in handles]
    assert [v for v, _ in parts] == [16, 16]
    np.testing.assert_allclose(np.concatenate([c for _, c in parts]), reference.pull(-1)[1],
                               rtol=1e-5, atol=1e-5)
    for h in handles:
        ray.kill(h)
