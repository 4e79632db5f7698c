"""Centroid-server overhead: train-step time with server sync against a local store.

    python -m bench centroid_server            # k in {100,1000,10000} x d in {128,512,2048} x 1-2 workers
    python -m bench centroid_server --quick    # k in {100,1000} x d in {128,512} x 1-2 workers
    python -m bench centroid_server --headline # k=1000, d=512 x 1-2 workers, 7 repeats of 48

Each worker is a Ray actor (one CPU, one torch thread) running the ``online`` method's real
train step (:class:`pipeline.methods.online.OnlineWorker`: small CNN forward/backward on 64
images at 32 px, assignment, statistics). As in production the model is wrapped in DDP over
a gloo process group, so every step already ends in a gradient all-reduce across workers;
"local" gives every worker its own in-process ``CentroidStore``, "server" gives them one
centroid-server actor (``RemoteStore``: asynchronous sparse pushes, prefetched row deltas,
a blocking server-side wait when a round is not applied yet, the default ``max_staleness=1``). The two modes alternate on the same actors, ``REPEATS`` times,
and the medians are compared: overhead = (server - local) / local.

Headline: overhead at k=1000, d=512 with the most workers; target <= 10 %.
"""

from __future__ import annotations

import argparse
import itertools
import socket
import time
from typing import Any

import numpy as np

from bench.common import write_result

BATCH, STEPS, WARMUP, REPEATS = 64, 24, 3, 3


def unit_rows(k: int, d: int) -> np.ndarray:
    """(k, d) random unit-norm float32 initial centroids, the same for every run."""
    init = np.random.default_rng(0).normal(size=(k, d)).astype(np.float32)
    return init / np.linalg.norm(init, axis=1, keepdims=True)


class BenchWorker:
    """A Ray actor: one rank of a gloo process group; times train steps of OnlineWorker."""

    def __init__(self, rank: int, workers: int, port: int):
        import torch.distributed as dist

        from pipeline.distributed.runtime import pin_threads

        pin_threads(1)
        self.rank = rank
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=workers)

    def setup(self, k: int, d: int, server: Any | None) -> None:
        import torch
        from torch.nn.parallel import DistributedDataParallel

        from pipeline.distributed.centroid_server import RemoteStore
        from pipeline.kmeans.store import CentroidStore
        from pipeline.methods.online import OnlineLossSpec, OnlineWorker, make_optimizer
        from pipeline.models.backbones import build_embedder

        torch.manual_seed(0)
        model = DistributedDataParallel(build_embedder("small_cnn", 3, d, normalize=True,
                                                       width=16))
        store = RemoteStore(server) if server is not None else CentroidStore(unit_rows(k, d))
        self.worker = OnlineWorker(
            model=model, optimizer=make_optimizer(model, "adam", 1e-3, 0.9, 0.0), store=store,
            loss_spec=OnlineLossSpec(0.1, 0.1, 0.0, 1.0, True), augment_spec=None,
            device=torch.device("cpu"), drift_compensation=False, worker=self.rank,
            max_staleness=1 if server is not None else 10**9)
        self.x = torch.randn(BATCH, 3, 32, 32, generator=torch.Generator().manual_seed(self.rank))

    def run(self, steps: int, warmup: int) -> tuple[float, float]:
        """(seconds per step, of which seconds spent in the store's push and pull calls)."""
        for _ in range(warmup):
            self.worker.train_step(self.x, train_cnn=True)
        store, spent = self.worker.store, [0.0]

        def timed(call: Any) -> Any:
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                t = time.perf_counter()
                try:
                    return call(*args, **kwargs)
                finally:
                    spent[0] += time.perf_counter() - t
            return wrapper

        for name in ("push", "pull", "sync"):
            setattr(store, name, timed(getattr(store, name)))
        start = time.perf_counter()
        for _ in range(steps):
            self.worker.train_step(self.x, train_cnn=True)
        self.worker.flush()
        return (time.perf_counter() - start) / steps, spent[0] / steps


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def step_time(pool: list[Any], k: int, d: int, remote: bool, steps: int
              ) -> tuple[float, float]:
    """Mean seconds per train step over the pool's concurrent ranks, one fresh run, and the
    mean seconds per step spent inside store calls (the worker-side sync cost)."""
    import ray

    from pipeline.distributed.centroid_server import create_server

    server = None
    if remote:
        server = create_server(f"bench-{k}-{d}-{len(pool)}-{time.monotonic_ns()}", None,
                               unit_rows(k, d), {"num_workers": len(pool)}, None, None)
        ray.get(server.info.remote())
    ray.get([w.setup.remote(k, d, server) for w in pool])
    times = np.array(ray.get([w.run.remote(steps, WARMUP) for w in pool]))
    if server is not None:
        ray.kill(server)
    return float(times[:, 0].mean()), float(times[:, 1].mean())


def measure(pool: list[Any], k: int, d: int, steps: int, repeats: int) -> dict[str, Any]:
    """Alternate local and server runs ``repeats`` times; medians and the overhead."""
    local, server, in_calls = [], [], []
    for _ in range(repeats):
        local.append(step_time(pool, k, d, False, steps)[0])
        step, calls = step_time(pool, k, d, True, steps)
        server.append(step)
        in_calls.append(calls)
    lo, se = float(np.median(local)), float(np.median(server))
    return {"k": k, "d": d, "workers": len(pool), "kd": k * d, "local_step_s": round(lo, 4),
            "server_step_s": round(se, 4), "overhead": round((se - lo) / lo, 4),
            "server_calls_s": round(float(np.median(in_calls)), 5),
            "local_runs_s": [round(t, 4) for t in local],
            "server_runs_s": [round(t, 4) for t in server]}


def server_capacity(k: int, d: int, batch: int, calls: int) -> dict[str, Any]:
    """What one server actor sustains when flooded from the driver: sparse pushes of a
    ``batch``-image step (its touched rows), then row-delta pulls one version back.

    These feed the scale estimate in bench/README.md: a worker costs the server one push
    and one pull per ``sync_every`` steps. Counts are uniform random, so many clusters look
    starved and every reseeding check (every 20 rounds, the ``cluster.reseed_every``
    default) moves the maximum 64: a worst case for the server's time per round.
    """
    import ray

    from pipeline.distributed.centroid_server import create_server
    from pipeline.kmeans.store import touched_rows

    rng = np.random.default_rng(0)
    server = create_server(f"bench-cap-{k}-{d}-{time.monotonic_ns()}", None, unit_rows(k, d),
                           {"num_workers": 1, "reseed_every": 20}, None, None)
    ray.get(server.info.remote())
    payloads = []
    for _ in range(8):
        counts = np.bincount(rng.integers(0, k, batch), minlength=k)
        rows = touched_rows(counts, None)
        payloads.append((rng.normal(size=(rows.size, d)).astype(np.float32), counts,
                         rng.normal(size=(32, d)).astype(np.float32), rows))
    start, refs = time.perf_counter(), []
    for i in range(calls):
        sums, counts, samples, rows = payloads[i % len(payloads)]
        refs.append(server.push.remote(sums, counts, None, None, 0, i, samples, rows))
    ray.get(refs)
    push_s = (time.perf_counter() - start) / calls
    info = ray.get(server.info.remote())
    start = time.perf_counter()
    ray.get([server.delta.remote(info["version"] - 1, info["incarnation"])
             for _ in range(calls)])
    pull_s = (time.perf_counter() - start) / calls
    ray.kill(server)
    return {"k": k, "d": d, "batch": batch, "touched_rows": int(np.mean(
        [p[3].size for p in payloads])), "push_ms": round(push_s * 1e3, 3),
        "pull_ms": round(pull_s * 1e3, 3),
        "worker_steps_per_s_capacity": round(1.0 / (push_s + pull_s), 1)}


def sharded_push_capacity(k: int, d: int, batch: int, calls: int, shards: int) -> dict[str, Any]:
    """Pushes/s that ``shards`` server actors (``scale.centroid_shards``) absorb when one
    client floods them through :class:`ShardedStore` (asynchronous pushes, drained)."""
    import ray

    from pipeline.distributed.centroid_server import RemoteStore, create_server
    from pipeline.kmeans.sharded import ShardedStore, shard_bounds

    rng = np.random.default_rng(0)
    init, bounds = unit_rows(k, d), shard_bounds(k, shards)
    handles = [create_server(f"bench-shard-{s}-{time.monotonic_ns()}", None, init[lo:hi],
                             {"num_workers": 1, "reseed_every": 20}, None, None)
               for s, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True))]
    ray.get([h.info.remote() for h in handles])
    store = ShardedStore([RemoteStore(h) for h in handles], bounds)
    payloads = []
    for _ in range(8):
        counts = np.bincount(rng.integers(0, k, batch), minlength=k)
        sums = np.zeros((k, d), np.float32)
        sums[counts > 0] = rng.normal(size=(int((counts > 0).sum()), d))
        payloads.append((sums, counts, rng.normal(size=(32, d)).astype(np.float32)))
    start = time.perf_counter()
    for i in range(calls):
        sums, counts, samples = payloads[i % len(payloads)]
        store.push(sums, counts, None, None, 0, i, samples)
    store.drain()
    per_push = (time.perf_counter() - start) / calls
    for h in handles:
        ray.kill(h)
    return {"k": k, "d": d, "batch": batch, "shards": shards,
            "push_ms": round(per_push * 1e3, 3), "pushes_per_s": round(1.0 / per_push, 1)}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench centroid_server")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--sharding", action="store_true",
                   help="only the sharded-server capacity (centroid_server-sharding.json)")
    p.add_argument("--headline", action="store_true",
                   help="only k=1000, d=512, with 7 repeats of 48 steps for a tighter median "
                        "(centroid_server-headline.json)")
    args = p.parse_args(argv)
    from pipeline.distributed.runtime import init_ray

    init_ray(num_cpus=2)
    if args.sharding:
        return sharding_main(args.quick)
    ks, ds = ([100, 1000], [128, 512]) if args.quick else ([100, 1000, 10000], [128, 512, 2048])
    steps, repeats = (STEPS // 2, 2) if args.quick else (STEPS, REPEATS)
    if args.headline:
        ks, ds, steps, repeats = [1000], [512], 2 * STEPS, 7
    rows = []
    import ray

    for workers in (1, 2):
        port = free_port()
        pool = [ray.remote(num_cpus=1)(BenchWorker).remote(r, workers, port)
                for r in range(workers)]
        for k, d in itertools.product(ks, ds):
            row = measure(pool, k, d, steps, repeats)
            rows.append(row)
            print(f"  k={k:>5} d={d:>4} workers={workers}: local "
                  f"{row['local_step_s'] * 1e3:7.1f} ms, server {row['server_step_s'] * 1e3:7.1f}"
                  f" ms (in store calls {row['server_calls_s'] * 1e3:.1f} ms), overhead "
                  f"{row['overhead']:+.1%}", flush=True)
        for w in pool:
            ray.kill(w)
    capacity = []
    for (k, d), batch in itertools.product(itertools.product(ks, ds),
                                           () if args.headline else (64, 256)):
        cap = server_capacity(k, d, batch, 100 if args.quick else 300)
        capacity.append(cap)
        print(f"  capacity k={k:>5} d={d:>4} batch={batch}: push {cap['push_ms']:.2f} ms, pull "
              f"{cap['pull_ms']:.2f} ms -> {cap['worker_steps_per_s_capacity']:,.0f} worker "
              "steps/s", flush=True)
    target = [r for r in rows if r["k"] == 1000 and r["d"] == 512]
    value = max(r["overhead"] for r in target)
    headline = {"name": "sync_overhead_k1000_d512", "value": value, "target": 0.10,
                "meets": value <= 0.10}
    suffix = "-headline" if args.headline else "-quick" if args.quick else ""
    path = write_result("centroid_server" + suffix, headline,
                        {"rows": rows, "server_capacity": capacity,
                         "batch_per_worker": BATCH, "steps": steps,
                         "repeats": repeats, "ddp": "gloo, both modes",
                         "model": "small_cnn width 16, 32 px, 1 thread per worker",
                         "quick": args.quick})
    print(f"centroid_server: overhead at k=1000, d=512 = {value:+.1%} (target <= 10%) -> {path}")
    return 0


def sharding_main(quick: bool) -> int:
    """Push capacity of 1, 2 and 4 shards at the largest k·d, one run, side by side."""
    k, d = (1000, 512) if quick else (10000, 2048)
    rows = [sharded_push_capacity(k, d, 256, 60 if quick else 200, s) for s in (1, 2, 4)]
    for r in rows:
        print(f"  k={k} d={d} shards={r['shards']}: {r['push_ms']:.2f} ms per push -> "
              f"{r['pushes_per_s']:,.0f} pushes/s", flush=True)
    gain = rows[-1]["pushes_per_s"] / rows[0]["pushes_per_s"]
    headline = {"name": f"push_capacity_4_shards_over_1_k{k}_d{d}", "value": round(gain, 3),
                "target": None, "meets": gain > 1.0}
    path = write_result("centroid_server-sharding" + ("-quick" if quick else ""), headline,
                        {"rows": rows, "quick": quick})
    print(f"centroid_server --sharding: 4 shards absorb {gain:.2f}x the pushes of 1 -> {path}")
    return 0
