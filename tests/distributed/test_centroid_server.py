"""The Ray centroid server against the in-process CentroidStore reference (STYLE lesson 2)."""

from __future__ import annotations

import numpy as np
import pytest
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
    w.base_round = w.version
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


@pytest.mark.parametrize("staleness", [0, 2])
def test_worker_rebases_when_the_store_stalls(staleness):
    store = CentroidStore(np.zeros((K, D), np.float32), num_workers=2)  # peer never pushes
    w = kmeans_worker(store, 0)
    w.max_staleness, w.stall_timeout_s = staleness, 0.05
    w.run_epoch((torch.from_numpy(b) for b in np.split(blobs(64, 2), 8)), train_cnn=False)
    assert w.step == 8  # finished instead of hanging


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
