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


def shard_bounds(k: int, shards: int) -> np.ndarray:
    """(shards + 1,) boundaries: shard s owns cluster ids [b[s], b[s + 1])."""
    if not 1 <= shards <= k:
        raise ValueError(f"scale.centroid_shards: must be in [1, k={k}], got {shards}")
    sizes = [len(part) for part in np.array_split(np.arange(k), shards)]
    return np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)


class ShardedStore:
    """The :class:`~pipeline.methods.online.CentroidClient` protocol over ``stores``, store s
    owning the clusters ``bounds[s]:bounds[s+1]`` (see :func:`shard_bounds`)."""

    def __init__(self, stores: list[Any], bounds: np.ndarray):
        if len(bounds) != len(stores) + 1:
            raise ValueError("need one more bound than stores")
        self.stores, self.bounds = stores, np.asarray(bounds)
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

    def pull_rows(self, since_version: int) -> tuple[int, np.ndarray | None, np.ndarray] | None:
        """Rows changed in any shard, with global ids; version = the least shard version.

        Each shard is asked from the version it last answered with (so a remote shard's
        prefetched answer is used), or from ``since_version`` when the caller re-based.
        Rows from shards that moved on are returned even while another shard lags (the
        version then stays at ``since_version``), so no change is ever dropped.
        """
        since = (self.seen if self.seen is not None and since_version == self.answered
                 else [since_version] * len(self.stores))
        answers = [store.pull_rows(s) for store, s in zip(self.stores, since, strict=True)]
        self.seen = [a[0] if a is not None else s for a, s in zip(answers, since, strict=True)]
        idx, rows = [], []
        for answer, part in zip(answers, self._parts(), strict=True):
            if answer is not None:
                ids = answer[1]
                idx.append(np.arange(part.start, part.stop) if ids is None else ids + part.start)
                rows.append(answer[2])
        if not idx:
            self.answered = since_version
            return None
        self.answered = max(min(self.seen), since_version)
        return self.answered, np.concatenate(idx), np.concatenate(rows)

    def drain(self) -> None:
        for store in self.stores:
            if hasattr(store, "drain"):
                store.drain()

    def state(self) -> dict[str, Any]:
        return {f"shard_{i}": store.state() for i, store in enumerate(self.stores)}

    def load_state(self, state: dict[str, Any]) -> int:
        versions = [store.load_state(state[f"shard_{i}"]) for i, store in
                    enumerate(self.stores)]
        self.seen, self.answered = None, -1
        return min(v if v is not None else store.version  # CentroidStore returns None
                   for v, store in zip(versions, self.stores, strict=True))


def centroids_of(state: dict[str, Any]) -> np.ndarray:
    """(k, d) centroids of a store's or a sharded store's :meth:`state`."""
    if "centroids" in state:
        return np.asarray(state["centroids"], dtype=np.float32)
    shards = sorted((k for k in state if k.startswith("shard_")), key=lambda k: int(k[6:]))
    return np.concatenate([np.asarray(state[k]["centroids"], np.float32) for k in shards])
