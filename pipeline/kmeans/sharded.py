"""``ShardedStore``: the centroid-server protocol over several stores that each own a
contiguous range of cluster ids (DESIGN §4; bench/README.md, "where one server saturates").

Every per-cluster quantity of a round (sums, counts, drift, the mini-batch update, the drift
shift) touches only that cluster's row, so splitting the k rows over S stores and sending
each the rows it owns gives exactly the centroids of one store holding all k, as long as no
reseeding happens (tested). Reseeding is per shard: each shard watches its own clusters'
recent counts and keeps its own reservoir, fed the same samples. A round's work and bytes
per shard drop by S; the number of calls per shard does not (every worker still sends
each shard one push and one pull per round), so sharding helps where a round's compute and
payload dominate (large k·d), and ``cluster.sync_every`` where the per-call cost does.

The shards are anything with the store protocol: in-process :class:`CentroidStore` (the
single-process reference) or :class:`pipeline.distributed.centroid_server.RemoteStore`
clients of separate Ray actors. No Ray here.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.kmeans.store import Delta


def shard_bounds(k: int, shards: int) -> np.ndarray:
    """(shards + 1,) boundaries: shard s owns cluster ids [b[s], b[s + 1])."""
    if not 1 <= shards <= k:
        raise ValueError(f"scale.centroid_shards: must be in [1, k={k}], got {shards}")
    sizes = [len(part) for part in np.array_split(np.arange(k), shards)]
    return np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)


class ShardedStore:
    """The :class:`~pipeline.methods.online.CentroidClient` protocol over ``stores``, store s
    owning the clusters ``bounds[s]:bounds[s+1]`` (see :func:`shard_bounds`)."""

    def __init__(self, stores: list[Any], bounds: np.ndarray, generation: int = 0):
        if len(bounds) != len(stores) + 1:
            raise ValueError("need one more bound than stores")
        self.stores, self.bounds, self.generation = stores, np.asarray(bounds), generation
        self.seen: list[int] | None = None  # per-shard versions behind the last answer
        self.answered = -1  # the global version of the last answer

    @property
    def k(self) -> int:
        return int(self.bounds[-1])

    def _parts(self) -> list[slice]:
        return [slice(int(a), int(b)) for a, b in zip(self.bounds[:-1], self.bounds[1:],
                                                      strict=True)]

    def push(self, sums: np.ndarray, counts: np.ndarray, drift: np.ndarray | None = None,
             drift_counts: np.ndarray | None = None, worker: int = 0, step: int = 0,
             samples: np.ndarray | None = None) -> Any:
        """Each store gets its own rows (k_s, d) and counts (k_s,); samples go to all."""
        for store, part in zip(self.stores, self._parts(), strict=True):
            store.push(sums[part], counts[part], None if drift is None else drift[part],
                       None if drift_counts is None else drift_counts[part], worker, step,
                       samples)

    def pull(self, since_version: int = -1) -> tuple[int, np.ndarray] | None:
        """(min shard version, all k rows) when every shard is past ``since_version``."""
        got = [store.pull(-1) for store in self.stores]
        version = min(v for v, _ in got)
        if version <= since_version:
            return None
        self.seen, self.answered = [v for v, _ in got], version
        return version, np.concatenate([c for _, c in got])

    def sync(self, since_version: int = -1, incarnation: str | None = None,
             until_round: int = -1, timeout_s: float = 10.0) -> Delta:
        """The rows changed in any shard, with global ids. ``version`` and ``next_round`` are
        the least over the shards; the incarnation joins the shards' (``a|b|…``), so a
        restart of any one shard gives that shard's full rows.

        Each shard is asked from the version it last answered with (so a remote shard's
        prefetched answer is used), or from ``since_version`` when the caller re-based.
        Rows from shards that moved on are returned even while another shard lags (the
        version then stays at ``since_version``), so no change is ever dropped.
        """
        n = len(self.stores)
        mine = incarnation.split("|") if incarnation and incarnation.count("|") == n - 1 else [
            None] * n
        since = (self.seen if self.seen is not None and since_version == self.answered
                 else [since_version] * n)
        answers = [store.sync(v, inc, until_round, timeout_s)
                   for store, v, inc in zip(self.stores, since, mine, strict=True)]
        self.seen = [a.version for a in answers]
        idx, rows = [], []
        for a, part in zip(answers, self._parts(), strict=True):
            idx.append(np.arange(part.start, part.stop) if a.rows is None else a.rows + part.start)
            rows.append(a.centroids)
        full = all(a.rows is None for a in answers)
        self.answered = min(self.seen)
        return Delta(self.answered, min(a.next_round for a in answers),
                     "|".join(a.incarnation for a in answers), None if full else
                     np.concatenate(idx), np.concatenate(rows))

    def drain(self) -> None:
        for store in self.stores:
            store.drain()

    def state(self) -> dict[str, Any]:
        return {f"shard_{i}": store.state() for i, store in enumerate(self.stores)}

    def restart(self, state: dict[str, Any] | None, generation: int) -> int:
        """Every shard restarts from its part of ``state`` (or its initial state)."""
        versions = [store.restart(None if state is None else state[f"shard_{i}"], generation)
                    for i, store in enumerate(self.stores)]
        self.seen, self.answered = None, -1
        return min(versions)


def centroids_of(state: dict[str, Any]) -> np.ndarray:
    """(k, d) centroids of a store's or a sharded store's :meth:`state`."""
    if "centroids" in state:
        return np.asarray(state["centroids"], dtype=np.float32)
    shards = sorted((k for k in state if k.startswith("shard_")), key=lambda k: int(k[6:]))
    return np.concatenate([np.asarray(state[k]["centroids"], np.float32) for k in shards])
