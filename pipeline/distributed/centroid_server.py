"""The centroid server: one named Ray actor per run, wrapping :class:`CentroidStore`.

It speaks the same protocol as the in-process store (DESIGN §4): ``push`` (asynchronous from
the workers' side), ``pull(since_version)``, ``state()`` / ``load_state()``. The math is the
store's; this module only adds Ray and durability:

* created by the driver with ``num_cpus=0`` and ``max_restarts=-1`` (RAY_NOTES: Actors);
* every ``persist_every`` rounds, and on every ``load_state``, its state is written atomically
  to ``state_uri``; a restarted actor reloads it there, so a crash loses at most a few rounds;
* its state also goes into every Ray Train checkpoint and is re-seeded on resume.
"""

from __future__ import annotations

import collections
import logging
import os
from typing import Any

import numpy as np

from pipeline.config import S3Config
from pipeline.data import fs as fsx
from pipeline.data.fs import Location
from pipeline.kmeans.state_io import pack_state, unpack_state
from pipeline.kmeans.store import CentroidStore, touched_rows

log = logging.getLogger(__name__)


class CentroidServer:
    """Actor body. ``init_centroids`` (k, d) seeds it unless ``state_uri`` holds a saved state."""

    def __init__(self, init_centroids: np.ndarray, store_kwargs: dict[str, Any],
                 state_uri: str | None = None, s3: S3Config | None = None,
                 persist_every: int = 20, crash_at_round: int = -1):
        self.store = CentroidStore(init_centroids, **store_kwargs)
        self.state_loc = fsx.locate(state_uri, s3) if state_uri else None
        self.persist_every = persist_every
        self.crash_at_round = crash_at_round
        self.restored = False
        if self.state_loc is not None and fsx.exists(self.state_loc):
            self.store.load_state(unpack_state(fsx.read_bytes(self.state_loc)))
            self.restored = True

    def push(self, sums: np.ndarray, counts: np.ndarray, drift: np.ndarray | None = None,
             drift_counts: np.ndarray | None = None, worker: int = 0, step: int = 0,
             samples: np.ndarray | None = None, rows: np.ndarray | None = None) -> int:
        """:meth:`CentroidStore.push` (dense or sparse ``rows``), then persist when due."""
        before = self.store.version
        version = self.store.push(sums, counts, drift, drift_counts, worker, step, samples, rows)
        if version != before and version % self.persist_every == 0:
            self.persist()
        if version == self.crash_at_round and self.state_loc is not None:
            loc = self.state_loc
            fault_once(Location(loc.fs, loc.path + ".fault", loc.uri + ".fault"))
        return version

    def pull(self, since_version: int = -1) -> tuple[int, np.ndarray] | None:
        return self.store.pull(since_version)

    def pull_rows(self, since_version: int) -> tuple[int, np.ndarray | None, np.ndarray] | None:
        return self.store.pull_rows(since_version)

    def state(self) -> dict[str, Any]:
        return self.store.state()

    def load_state(self, state: dict[str, Any]) -> int:
        self.store.load_state(state)
        self.persist()
        return self.store.version

    def persist(self) -> None:
        if self.state_loc is not None:
            fsx.write_bytes_atomic(self.state_loc, pack_state(self.store.state()))

    def info(self) -> dict[str, Any]:
        return {"version": self.store.version, "k": self.store.k, "dim": self.store.dim,
                "restored": self.restored}

    def crash(self) -> None:
        """Fault injection for tests: kill this actor process."""
        os._exit(1)


def fault_once(marker: Location) -> None:
    """Exit this process abruptly unless ``marker`` exists (debug.* fault injection)."""
    if fsx.exists(marker):
        return
    fsx.write_bytes_atomic(marker, b"injected")
    log.warning("fault injection: exiting process %d", os.getpid())
    os._exit(1)


def create_server(name: str, namespace: str | None, init_centroids: np.ndarray,
                  store_kwargs: dict[str, Any], state_uri: str | None,
                  s3: S3Config | None, persist_every: int = 20, crash_at_round: int = -1) -> Any:
    """Start the named actor (``num_cpus=0``, restarts forever) and return its handle."""
    import ray

    actor = ray.remote(CentroidServer).options(
        name=name, namespace=namespace, num_cpus=0, max_restarts=-1, max_task_retries=-1,
        get_if_exists=False,
    )
    return actor.remote(init_centroids, store_kwargs, state_uri, s3, persist_every,
                        crash_at_round)


class RemoteStore:
    """Client a train worker uses: the :class:`CentroidClient` protocol over the actor.

    Pushes are fire-and-forget; at most ``max_inflight`` stay unacknowledged, which bounds
    memory and surfaces server errors within a few steps. Both directions carry only what
    changed: a push sends the rows of the clusters its batch touched (at most the batch
    size, of k) and no drift when there is none; :meth:`pull_rows` fetches only the rows
    changed since the worker's version, which the worker patches into its copy. A round's
    traffic and server work are O(touched rows · d), not O(k · d) (bench/centroid_server.py).

    Pulls are prefetched: every :meth:`pull_rows` answer also requests the next delta, which
    the server computes while the worker trains, so in steady state a step's pull costs no
    round trip. A prefetched answer is used only when it starts from the caller's version
    (deltas then compose exactly); it may be one round older than a fresh pull, which the
    worker's ``max_staleness`` check accepts, or rejects and polls again (then fresh).
    """

    def __init__(self, handle: Any, max_inflight: int = 8):
        self.handle, self.max_inflight = handle, max_inflight
        self.inflight: collections.deque[Any] = collections.deque()
        self.prefetch: tuple[int, Any] | None = None  # (since_version, pending pull_rows)

    @classmethod
    def connect(cls, name: str, namespace: str | None) -> RemoteStore:
        import ray

        return cls(ray.get_actor(name, namespace=namespace))

    def push(self, sums: np.ndarray, counts: np.ndarray, drift: np.ndarray | None = None,
             drift_counts: np.ndarray | None = None, worker: int = 0, step: int = 0,
             samples: np.ndarray | None = None) -> None:
        import ray

        if drift_counts is not None and not np.any(drift_counts):
            drift, drift_counts = None, None
        rows = touched_rows(counts, drift_counts)
        self.inflight.append(self.handle.push.remote(
            np.ascontiguousarray(sums[rows]), counts,
            None if drift is None else np.ascontiguousarray(drift[rows]), drift_counts,
            worker, step, samples, rows))
        while len(self.inflight) > self.max_inflight:
            ray.get(self.inflight.popleft())

    def pull(self, since_version: int = -1) -> tuple[int, np.ndarray] | None:
        import ray

        return ray.get(self.handle.pull.remote(since_version))

    def pull_rows(self, since_version: int) -> tuple[int, np.ndarray | None, np.ndarray] | None:
        import ray

        ahead, self.prefetch = self.prefetch, None
        if ahead is None or ahead[0] != since_version:
            ahead = since_version, self.handle.pull_rows.remote(since_version)
        got = ray.get(ahead[1])
        following = since_version if got is None else got[0]
        self.prefetch = following, self.handle.pull_rows.remote(following)
        return got

    def drain(self) -> None:
        import ray

        while self.inflight:
            ray.get(self.inflight.popleft())

    def state(self) -> dict[str, Any]:
        import ray

        self.drain()
        return ray.get(self.handle.state.remote())

    def load_state(self, state: dict[str, Any]) -> int:
        import ray

        self.prefetch = None  # a delta of the state being replaced
        return ray.get(self.handle.load_state.remote(state))
