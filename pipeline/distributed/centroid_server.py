"""The centroid server: one named Ray actor per run, wrapping :class:`CentroidStore`.

It speaks the same protocol as the in-process store (DESIGN §4, protocol v2 in
:mod:`pipeline.kmeans.store`): ``push`` (asynchronous from the workers' side), ``delta`` /
``wait``, ``state()`` / ``restart()``. The math is the store's; this module only adds Ray,
the blocking wait and durability:

* created by the driver with ``num_cpus=0`` and ``max_restarts=-1`` (RAY_NOTES: Actors);
* every ``persist_every`` rounds, and on every ``restart``, its state is written atomically
  to ``state_uri``; a restarted actor reloads it there, and the workers push again the
  rounds it lost (:class:`RemoteStore` keeps every push the server has not yet persisted:
  upstream backup), so a crash of the server loses nothing, and with one worker or
  ``train.deterministic`` the run goes on exactly as if it had not crashed;
* its state also goes into every Ray Train checkpoint and is re-seeded on resume.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
from typing import Any

import numpy as np
import ray

from pipeline.config import S3Config
from pipeline.data import fs as fsx
from pipeline.data.fs import Location
from pipeline.kmeans.state_io import pack_state, unpack_state
from pipeline.kmeans.store import CentroidStore, Delta, touched_rows

log = logging.getLogger(__name__)

WAIT_THREADS = 64  # blocked waits at once: one per worker of the run is enough


class CentroidServer:
    """Actor body. ``init_centroids`` (k, d) seeds it unless ``state_uri`` holds a saved state.

    A threaded actor: :meth:`wait` runs in its own concurrency group (``wait``), blocking on
    a condition that every applied push notifies, while pushes and pulls run one at a time
    in the default group; every method holds the one lock around the store. Nothing in the
    store depends on the order in which pushes arrive (Ray does not keep it for threaded
    actors, nor across retries).
    """

    def __init__(self, init_centroids: np.ndarray, store_kwargs: dict[str, Any],
                 state_uri: str | None = None, s3: S3Config | None = None,
                 persist_every: int = 20, crash_at_round: int = -1):
        self.store = CentroidStore(init_centroids, **store_kwargs)
        self.state_loc = fsx.locate(state_uri, s3) if state_uri else None
        self.persist_every = persist_every
        self.crash_at_round = crash_at_round
        self.restored = False
        self.changed = threading.Condition()
        if self.state_loc is not None and fsx.exists(self.state_loc):
            self.store.load_state(unpack_state(fsx.read_bytes(self.state_loc)))
            self.restored = True
        self.durable = self.store.next_round if self.state_loc is not None else -1

    @ray.method(max_task_retries=0)  # a push lost in a crash is pushed again by its worker
    def push(self, sums: np.ndarray, counts: np.ndarray, drift: np.ndarray | None = None,
             drift_counts: np.ndarray | None = None, worker: int = 0, step: int = 0,
             samples: np.ndarray | None = None, rows: np.ndarray | None = None,
             generation: int = 0, incarnation: str | None = None) -> int:
        """:meth:`CentroidStore.push` (dense or sparse ``rows``), then persist when due.

        A push addressed to another ``incarnation`` (sent before its worker learnt of a
        crash) is dropped (``misaddressed``): applied now it would skip the rounds the crash
        lost, which its worker pushes again, in order, followed by this one."""
        with self.changed:
            if incarnation is not None and incarnation != self.store.incarnation:
                dropped = self.store.dropped
                dropped["misaddressed"] = dropped.get("misaddressed", 0) + 1
                return self.store.version
            before = self.store.version
            version = self.store.push(sums, counts, drift, drift_counts, worker, step, samples,
                                      rows, generation)
            if version != before:
                self.changed.notify_all()
                if version // self.persist_every != before // self.persist_every:
                    self.persist()
        if version != before and version == self.crash_at_round and self.state_loc is not None:
            loc = self.state_loc
            fault_once(Location(loc.fs, loc.path + ".fault", loc.uri + ".fault"))
        return version

    def pull(self, since_version: int = -1) -> tuple[int, np.ndarray] | None:
        with self.changed:
            return self.store.pull(since_version)

    def delta(self, since_version: int = -1, incarnation: str | None = None) -> Delta:
        with self.changed:
            return self.store.delta(since_version, incarnation)._replace(durable=self.durable)

    @ray.method(concurrency_group="wait")
    def wait(self, since_version: int, incarnation: str | None, until_round: int,
             timeout_s: float) -> Delta:
        """:meth:`CentroidStore.delta` once ``next_round >= until_round``, or at once when
        the caller's copy is from another incarnation, or after ``timeout_s``."""
        with self.changed:
            self.changed.wait_for(lambda: self.store.next_round >= until_round
                                  or incarnation != self.store.incarnation, timeout_s)
            return self.store.delta(since_version, incarnation)._replace(durable=self.durable)

    def state(self) -> dict[str, Any]:
        with self.changed:
            return self.store.state()

    def restart(self, state: dict[str, Any] | None, generation: int) -> int:
        """:meth:`CentroidStore.restart`, persisted; wakes every waiting worker."""
        with self.changed:
            version = self.store.restart(state, generation)
            self.persist()
            self.changed.notify_all()
            return version

    def persist(self) -> None:
        """The state to ``state_uri``; every round below ``next_round`` is then durable (and
        the pending ones, with the de-duplication record)."""
        if self.state_loc is not None:
            fsx.write_bytes_atomic(self.state_loc, pack_state(self.store.state()))
            self.durable = self.store.next_round

    def info(self) -> dict[str, Any]:
        with self.changed:
            return {"version": self.store.version, "k": self.store.k, "dim": self.store.dim,
                    "restored": self.restored, "incarnation": self.store.incarnation,
                    "generation": self.store.generation, "next_round": self.store.next_round,
                    "durable": self.durable, "dropped": dict(self.store.dropped)}

    @ray.method(max_task_retries=0)
    def crash(self) -> None:
        """Fault injection for tests: kill this actor process (once: never retried on the
        restarted actor)."""
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

    actor = ray.remote(concurrency_groups={"wait": WAIT_THREADS})(  # type: ignore[call-overload]
        CentroidServer).options(
        name=name, namespace=namespace, num_cpus=0, max_restarts=-1, max_task_retries=-1,
        get_if_exists=False,
    )
    return actor.remote(init_centroids, store_kwargs, state_uri, s3, persist_every,
                        crash_at_round)


class RemoteStore:
    """Client a train worker uses: the :class:`CentroidClient` protocol over the actor.

    Pushes are fire-and-forget, tagged with the worker group's ``generation``; at most
    ``max_inflight`` stay unacknowledged, which bounds memory and surfaces server errors
    within a few steps. Both directions carry only what changed: a push sends the rows of
    the clusters its batch touched (at most the batch size, of k) and no drift when there is
    none; :meth:`sync` fetches only the rows changed since the worker's version, which the
    worker patches into its copy. A round's traffic and server work are O(touched rows · d),
    not O(k · d) (bench/centroid_server.py).

    Deltas are prefetched: every :meth:`sync` answer also requests the next one, which the
    server computes while the worker trains, so in steady state a step's pull costs no
    round trip. A prefetched answer is used when it starts from the caller's version and
    incarnation and already reaches ``until_round``; otherwise the call blocks on the
    server's :meth:`CentroidServer.wait` (no polling), for up to ``timeout_s``.

    Upstream backup: every push is kept until the server reports its round durable
    (persisted, ``Delta.durable``). When the server comes back as a new incarnation (it
    crashed and reloaded its last persisted state), the client pushes again, in round order,
    every kept round the reloaded state lacks, before answering; the store drops the ones it
    has (de-duplication). Pushes are addressed to the incarnation the client knows, and are
    not retried by Ray: a push that reaches the new incarnation before its worker noticed
    the crash, or a retried one, would apply before the rounds the crash lost and skip them
    (measured: MNIST NMI 0.563 against 0.600); it is dropped, and replayed in order.
    """

    def __init__(self, handle: Any, max_inflight: int = 8, generation: int = 0):
        self.handle, self.max_inflight, self.generation = handle, max_inflight, generation
        self.inflight: collections.deque[Any] = collections.deque()
        self.prefetch: tuple[int, str | None, Any] | None = None  # (since, incarnation, ref)
        self.kept: dict[int, tuple[Any, ...]] = {}  # round -> push arguments, until durable
        self.known: str | None = None  # the server incarnation the kept rounds went to

    @classmethod
    def connect(cls, name: str, namespace: str | None, generation: int = 0) -> RemoteStore:
        return cls(ray.get_actor(name, namespace=namespace), generation=generation)

    def push(self, sums: np.ndarray, counts: np.ndarray, drift: np.ndarray | None = None,
             drift_counts: np.ndarray | None = None, worker: int = 0, step: int = 0,
             samples: np.ndarray | None = None) -> None:
        if drift_counts is not None and not np.any(drift_counts):
            drift, drift_counts = None, None
        rows = touched_rows(counts, drift_counts)
        args = (np.ascontiguousarray(sums[rows]), counts,
                None if drift is None else np.ascontiguousarray(drift[rows]), drift_counts,
                worker, step, samples, rows, self.generation)
        self.kept[int(step)] = args
        self._send(args)

    def _send(self, args: tuple[Any, ...]) -> None:
        """One push, addressed to the incarnation this client knows (see CentroidServer.push)."""
        self.inflight.append(self.handle.push.remote(*args, self.known))
        while len(self.inflight) > self.max_inflight:
            self._settle(self.inflight.popleft())

    @staticmethod
    def _settle(ref: Any) -> None:
        """Wait for one push; one that died with the server is replayed (:meth:`_observe`)."""
        try:
            ray.get(ref)
        except ray.exceptions.RayActorError:
            pass

    def _observe(self, incarnation: str, next_round: int, durable: int) -> bool:
        """Forget durable rounds; after a crash (a new incarnation, not one of our group's
        :meth:`restart`), push again the kept rounds from ``next_round`` on. -> replayed?"""
        replay = self.known is not None and incarnation != self.known
        self.known = incarnation
        if replay:
            for step in sorted(s for s in self.kept if s >= next_round):
                self._send(self.kept[step])
            log.info("centroid server restarted at round %d: pushed %d rounds again",
                     next_round, sum(1 for s in self.kept if s >= next_round))
        self.kept = {s: a for s, a in self.kept.items() if s >= durable} if durable >= 0 else {}
        return replay

    def pull(self, since_version: int = -1) -> tuple[int, np.ndarray] | None:
        return ray.get(self.handle.pull.remote(since_version))

    def sync(self, since_version: int = -1, incarnation: str | None = None,
             until_round: int = -1, timeout_s: float = 10.0) -> Delta:
        ahead, self.prefetch = self.prefetch, None
        got: Delta | None = None
        if ahead is not None and ahead[:2] == (since_version, incarnation):
            got = ray.get(ahead[2])
            if got.next_round < until_round and got.incarnation == incarnation:
                got = None  # not far enough: wait for it, from the same version
        if got is None:
            got = self._wait(since_version, incarnation, until_round, timeout_s)
        if self._observe(got.incarnation, got.next_round, got.durable):
            got = self._wait(-1, got.incarnation, until_round, timeout_s)  # full copy
        self.prefetch = (got.version, got.incarnation,
                         self.handle.delta.remote(got.version, got.incarnation))
        return got

    def _wait(self, since_version: int, incarnation: str | None, until_round: int,
              timeout_s: float) -> Delta:
        got: Delta = ray.get(self.handle.wait.remote(since_version, incarnation, until_round,
                                                     timeout_s))
        if got.next_round < until_round and got.incarnation == incarnation:
            log.warning("centroid server at round %d after %.0f s (wanted %d); going on",
                        got.next_round, timeout_s, until_round)
        return got

    def drain(self) -> None:
        """Every push landed in the server's current incarnation (replayed after a crash)."""
        while True:
            while self.inflight:
                self._settle(self.inflight.popleft())
            info = ray.get(self.handle.info.remote())
            if not self._observe(info["incarnation"], info["next_round"], info["durable"]):
                return

    def state(self) -> dict[str, Any]:
        self.drain()
        return ray.get(self.handle.state.remote())

    def restart(self, state: dict[str, Any] | None, generation: int) -> int:
        self.prefetch = None  # a delta of the state being replaced
        self.kept, self.known = {}, None  # rounds of the state being replaced
        return ray.get(self.handle.restart.remote(state, generation))
