"""``CentroidStore``: the in-process reference of the centroid-server protocol (DESIGN §4).

The Ray actor in :mod:`pipeline.distributed.centroid_server` wraps this exact class, so the
single-process reference and the distributed server share every line of the math. It holds
only k×d centroids, k weights, k recent counts, a bounded reservoir and the pending rounds:
memory does not grow with the data. No threads, no Ray; instances pickle.

Rounds. Each worker pushes the summed statistics (faiss ``contrib/clustering.py`` style
partial sums) of its last ``sync_every`` steps, tagged with a round id ``step``. When all
``num_workers`` workers have pushed a round, their statistics are summed and applied as one
update (:func:`~pipeline.kmeans.minibatch.minibatch_update`, then
:func:`~pipeline.kmeans.minibatch.apply_drift`, then every ``reseed_every`` rounds
:func:`~pipeline.kmeans.minibatch.reseed_starved`), and ``version`` increases by one.

* Order: rounds are applied in increasing ``step``. A complete round first applies every
  earlier pending round, complete or not: a worker that pushed the later round has moved
  past the earlier one (pushes from one caller arrive in order), so the missing share was
  skipped or lost. More than ``max_pending`` open rounds (a dead peer) likewise apply the
  oldest, so workers never wait on each other through the store.
* Late pushes: a push for a round that was already applied (a restarted or lagging worker)
  is applied on its own, as a round of its own, rather than lost.
* Equivalence: the update is a running mean, so 2 workers with batch B/2 give the centroids
  of 1 worker with batch B when both assigned against the same version (tested exactly).

Protocol v2 (what makes a push apply exactly once across crashes and restarts):

* De-duplication: the store remembers, per worker, the rounds it took (back to
  ``next_round − max_pending``, persisted with the state). A retried push, e.g. the one a
  server died in after persisting it, is dropped (``duplicates``); so is a push older than
  that window (``too_late``). Nothing relies on the arrival order of pushes.
* Incarnation: a random token, new at construction and at every :meth:`load_state` /
  :meth:`restart`. :meth:`delta` answers a caller holding another token with the full
  (k, d) copy, so a worker never keeps rows from before a crash or a reload.
* Generation: :meth:`restart` (rank 0, when a worker group starts) installs the stage's
  checkpointed state, or the initial one, under the group's generation number; pushes of
  an older generation (queued by a dead group) are dropped (``stale``).
* Waiting: :meth:`delta` reports ``next_round``, the round id below which everything was
  applied or skipped; a worker about to start round r waits, on the server's side, for
  ``next_round >= r − max_staleness`` (:meth:`pipeline.distributed.centroid_server.
  CentroidServer.wait`).
"""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from pipeline.kmeans.minibatch import Reservoir, apply_drift, minibatch_update, reseed_starved

if TYPE_CHECKING:
    from pipeline.config import Config

_STAT_KEYS = ("rows", "sums", "counts", "drift", "drift_counts", "workers")


class Delta(NamedTuple):
    """What a worker's copy of the centroids lacks (:meth:`CentroidStore.delta`).

    ``rows`` (m,) are the changed cluster ids and ``centroids`` (m, d) their values; when
    ``rows`` is None, ``centroids`` is the full (k, d) copy, which replaces the caller's.
    """

    version: int  # rounds applied
    next_round: int  # every round id below it was applied or skipped
    incarnation: str  # the store's identity: a new one means the caller's copy is void
    rows: np.ndarray | None
    centroids: np.ndarray
    durable: int = -1  # rounds below it survive a crash of the store (-1: not tracked)


class CentroidStore:
    """Owns k×d float32 centroids, float64 weights (points absorbed) and a version counter.

    Args:
        centroids: (k, d) initial centroids (copied, stored as float32).
        num_workers: pushes that complete a round.
        window: caps each centroid's count before an update (points; 0 = unbounded): a
            centroid is then a moving mean over about its last ``window`` points
            (:func:`~pipeline.kmeans.minibatch.minibatch_update`).
        drift_smoothing: factor on the mean feature drift (Hsu & Lin 2017); 0 disables it.
        reseed_every: rounds between starved-cluster checks.
        reseed_ratio: starved = recent count < ratio · the largest recent count (or 0).
        reservoir_size: recent feature rows kept (Algorithm R) as reseeding candidates.
        seed: seeds the reservoir and the reseeding draws.
        recent_decay: per-round decay of the exponential moving count of assignments; None
            (the default) decays by points instead, exp(−n / (recent_window · k)) for a
            round of n points, so the count spans about ``recent_window`` points per
            cluster whatever the ratio of batch size to k (a fixed per-round decay with
            k ≫ batch left most clusters at a recent count near 0: starved, and reseeded).
        recent_window: points per cluster the moving count spans when recent_decay is None.
        reseed_max: clusters reseeded per check at most, neediest first (scikit-learn caps
            a step's reassignments at half its batch); bounds the server's time per round.
        max_pending: open rounds kept before the oldest is applied without its stragglers.
    """

    def __init__(self, centroids: np.ndarray, *, num_workers: int = 1, window: float = 0.0,
                 drift_smoothing: float = 1.0, reseed_every: int = 50,
                 reseed_ratio: float = 0.01, reservoir_size: int = 4096, seed: int = 0,
                 recent_decay: float | None = None, recent_window: float = 20.0,
                 max_pending: int = 64, reseed_max: int = 64):
        self.centroids = np.array(centroids, dtype=np.float32, copy=True)
        if self.centroids.ndim != 2 or self.centroids.shape[0] < 1:
            raise ValueError(f"centroids: expected (k, d) with k >= 1, got {self.centroids.shape}")
        if num_workers < 1 or reseed_every < 1 or max_pending < 1:
            raise ValueError("num_workers, reseed_every and max_pending must be >= 1")
        if recent_decay is not None and not 0.0 <= recent_decay < 1.0:
            raise ValueError(f"recent_decay: must be in [0, 1), got {recent_decay}")
        if window < 0:
            raise ValueError(f"window: must be >= 0, got {window}")
        if recent_window <= 0:
            raise ValueError(f"recent_window: must be > 0, got {recent_window}")
        k, d = self.centroids.shape
        self.num_workers, self.drift_smoothing = int(num_workers), float(drift_smoothing)
        self.window = float(window)
        self.reseed_every, self.reseed_ratio = int(reseed_every), float(reseed_ratio)
        self.recent_decay, self.max_pending = recent_decay, int(max_pending)
        self.recent_window, self.reseed_max = float(recent_window), int(reseed_max)
        self.weights = np.zeros(k, dtype=np.float64)
        self.recent = np.zeros(k, dtype=np.float64)  # exponential moving count per round
        self.reservoir = Reservoir(reservoir_size, d, seed)
        self.rng = np.random.default_rng((seed, 1))
        self._version = 0
        self.next_round = 0  # every round below this was applied (or skipped)
        self.pending: dict[int, dict[str, Any]] = {}
        self.reseeded = 0  # clusters reseeded so far
        self.generation = 0  # of the worker group whose pushes count (see restart)
        self.seen: dict[int, set[int]] = {}  # rounds taken per worker, for de-duplication
        self.dropped = {"duplicates": 0, "too_late": 0, "stale": 0}
        self._initial = self.state()
        self._track_rows()

    def _track_rows(self) -> None:
        """A new incarnation; per-row change tracking (for :meth:`delta`) from this version."""
        self.incarnation = secrets.token_hex(8)
        self._tracked_from = self._version
        self._row_version = np.full(self.k, self._version, dtype=np.int64)

    @property
    def version(self) -> int:
        """Number of applied rounds (updates) so far."""
        return self._version

    @property
    def k(self) -> int:
        return int(self.centroids.shape[0])

    @property
    def dim(self) -> int:
        return int(self.centroids.shape[1])

    def push(self, sums: np.ndarray, counts: np.ndarray, drift: np.ndarray | None = None,
             drift_counts: np.ndarray | None = None, worker: int = 0, step: int = 0,
             samples: np.ndarray | None = None, rows: np.ndarray | None = None,
             generation: int = 0) -> int:
        """Add one worker's statistics for round ``step``; apply rounds that are ready.

        A push is taken once: a repeat of (worker, round), a round older than the
        de-duplication window, or a push of an older ``generation`` is counted in
        ``dropped`` and changes nothing.

        Args:
            sums: (k, d) per-cluster feature sums; counts: (k,) member counts
                (:func:`~pipeline.kmeans.stats.partial_stats`, possibly summed over steps).
            drift: (k, d) per-cluster sums of new − old features; drift_counts: (k,)
                (:func:`~pipeline.kmeans.stats.drift_stats`); both or neither.
            worker: the pushing worker's rank; step: its round counter at the push.
            samples: (m, d) recent feature rows for the reseeding reservoir.
            rows: optional sparse form: sorted unique cluster ids (r,), and then ``sums`` and
                ``drift`` are (r, d), holding only those rows (every row with a non-zero
                count must be listed). The dense form is reduced to this internally, so a
                round costs O(touched rows · d), not O(k · d).

            generation: the pushing worker group's (:meth:`restart`).

        Returns:
            The current version.
        """
        entry = self._entry(sums, counts, drift, drift_counts, worker, rows)
        step = int(step)
        if not self._take(int(worker), step, int(generation)):
            return self._version
        if samples is not None and len(samples):
            self.reservoir.add(np.asarray(samples, dtype=np.float32))
        if step < self.next_round:  # its round is gone: apply it on its own
            self._apply(entry)
            return self._version
        self._merge(step, entry)
        self._apply_ready()
        return self._version

    def _take(self, worker: int, step: int, generation: int) -> bool:
        """Whether a push of ``worker`` for round ``step`` counts (see :meth:`push`)."""
        if generation < self.generation:
            self.dropped["stale"] += 1
            return False
        if generation > self.generation:  # a new group that skipped restart(): its rounds
            self.generation, self.seen = generation, {}
        seen = self.seen.setdefault(worker, set())
        if step in seen:
            self.dropped["duplicates"] += 1
            return False
        if step < self.next_round - self.max_pending:
            self.dropped["too_late"] += 1
            return False
        seen.add(step)
        return True

    def _forget_old_rounds(self) -> None:
        floor = self.next_round - self.max_pending
        for worker, rounds in self.seen.items():
            self.seen[worker] = {r for r in rounds if r >= floor}

    def delta(self, since_version: int = -1, incarnation: str | None = None) -> Delta:
        """The changes after ``since_version`` for a caller whose copy came from
        ``incarnation``: the changed rows, or every row when the caller's copy is from
        another incarnation (a restarted or reloaded store) or predates row tracking."""
        if incarnation != self.incarnation or since_version < self._tracked_from:
            return Delta(self._version, self.next_round, self.incarnation, None,
                         self.centroids.copy())
        idx = np.flatnonzero(self._row_version > since_version)
        return Delta(self._version, self.next_round, self.incarnation, idx,
                     self.centroids[idx].copy())

    def sync(self, since_version: int = -1, incarnation: str | None = None,
             until_round: int = -1, timeout_s: float = 0.0) -> Delta:
        """:meth:`delta`. In one process nothing else can advance the store, so this never
        waits for ``until_round`` (the Ray server does, for up to ``timeout_s``)."""
        return self.delta(since_version, incarnation)

    def drain(self) -> None:
        """Every push has landed (always true in one process)."""

    def restart(self, state: dict[str, Any] | None, generation: int) -> int:
        """A worker group of ``generation`` starts: install ``state`` (its stage's last
        checkpoint) or, without one, the initial state; pushes of older generations are
        dropped from now on. Returns the version."""
        self.load_state(self._initial if state is None else state)
        self.generation = int(generation)
        return self._version

    def pull(self, since_version: int = -1) -> tuple[int, np.ndarray] | None:
        """``(version, copy of centroids (k, d) float32)`` if version > since_version, else None."""
        if self._version <= since_version:
            return None
        return self._version, self.centroids.copy()

    def _entry(self, sums: Any, counts: Any, drift: Any, drift_counts: Any, worker: int,
               rows: Any) -> dict[str, Any]:
        """Validated sparse float64/int64 copies of one push (see :meth:`push`)."""
        k, d = self.centroids.shape
        counts = np.array(counts, dtype=np.int64)
        drift_counts = None if drift_counts is None else np.array(drift_counts, np.int64)
        if counts.shape != (k,) or (drift_counts is not None and drift_counts.shape != (k,)):
            raise ValueError(f"push: expected counts and drift_counts ({k},)")
        if (drift is None) != (drift_counts is None):
            raise ValueError("push: drift and drift_counts go together")
        if rows is None:
            rows = touched_rows(counts, drift_counts)
            sums, drift = _rows_of(sums, rows, k, d, "sums"), _rows_of(drift, rows, k, d, "drift")
        else:
            rows = np.asarray(rows, dtype=np.int64)
            if rows.ndim != 1 or (rows.size and (rows[0] < 0 or rows[-1] >= k
                                                 or np.any(np.diff(rows) <= 0))):
                raise ValueError(f"push: rows must be sorted unique ids in [0, {k})")
            if np.setdiff1d(touched_rows(counts, drift_counts), rows).size:
                raise ValueError("push: rows must list every cluster with a non-zero count")
        entry = {"rows": rows, "sums": np.array(sums, dtype=np.float64), "counts": counts,
                 "drift": None if drift is None else np.array(drift, dtype=np.float64),
                 "drift_counts": drift_counts, "workers": np.array([worker], dtype=np.int64)}
        for key in ("sums", "drift"):
            if entry[key] is not None and entry[key].shape != (rows.size, d):
                raise ValueError(f"push: expected {key} ({rows.size}, {d}) for {rows.size} "
                                 f"rows, got {entry[key].shape}")
        return entry

    def _merge(self, step: int, entry: dict[str, Any]) -> None:
        have = self.pending.get(step)
        if have is None:
            self.pending[step] = entry
            return
        rows = np.union1d(have["rows"], entry["rows"])
        d = self.dim
        for key in ("sums", "drift"):
            if have[key] is None and entry[key] is None:
                continue
            out = np.zeros((rows.size, d), dtype=np.float64)
            for part in (have, entry):
                if part[key] is not None:
                    out[np.searchsorted(rows, part["rows"])] += part[key]
            have[key] = out
        have["rows"] = rows
        have["counts"] = have["counts"] + entry["counts"]
        if entry["drift_counts"] is not None:
            have["drift_counts"] = (entry["drift_counts"] if have["drift_counts"] is None
                                    else have["drift_counts"] + entry["drift_counts"])
        have["workers"] = np.concatenate([have["workers"], entry["workers"]])

    def _apply_ready(self) -> None:
        """Apply, in step order, every pending round up to the last complete one."""
        steps = sorted(self.pending)
        complete = [s for s in steps
                    if len(np.unique(self.pending[s]["workers"])) >= self.num_workers]
        upto = complete[-1] if complete else None
        overflow = len(steps) - self.max_pending
        if overflow > 0:
            upto = max(steps[overflow - 1], upto if upto is not None else steps[0])
        if upto is None:
            return
        for s in steps:
            if s > upto:
                break
            self._apply(self.pending.pop(s))
            self.next_round = s + 1
        self._forget_old_rounds()

    def _apply(self, entry: dict[str, Any]) -> None:
        """One round: mini-batch update, drift, moving counts, version, periodic reseed.

        Only the entry's rows are read and written: (r, d) work for r touched clusters.
        """
        rows = entry["rows"]
        c, w = self.centroids[rows], self.weights[rows]
        minibatch_update(c, w, entry["sums"], entry["counts"][rows], self.window)
        if entry["drift"] is not None and self.drift_smoothing:
            apply_drift(c, entry["drift"], entry["drift_counts"][rows], self.drift_smoothing)
        self.centroids[rows], self.weights[rows] = c, w
        decay = self.recent_decay
        if decay is None:
            decay = float(np.exp(-entry["counts"].sum() / (self.recent_window * self.k)))
        self.recent *= decay
        self.recent += (1.0 - decay) * entry["counts"]
        self._version += 1
        self._row_version[rows] = self._version
        if self._version % self.reseed_every == 0:
            self._reseed()

    def _reseed(self) -> None:
        moved = reseed_starved(self.centroids, self.weights, self.recent, self.reservoir,
                               self.reseed_ratio, self.rng, limit=self.reseed_max)
        if moved:
            rest = np.ones(self.k, dtype=bool)
            rest[moved] = False
            self.recent[moved] = self.recent[rest].min()  # a grace period, like the weights
            self._row_version[moved] = self._version
            self.reseeded += len(moved)

    def state(self) -> dict[str, Any]:
        """Everything :meth:`load_state` needs, as numpy arrays, ints, str and dicts."""
        pending = {int(s): {key: None if r[key] is None else r[key].copy() for key in _STAT_KEYS}
                   for s, r in self.pending.items()}
        return {"centroids": self.centroids.copy(), "weights": self.weights.copy(),
                "recent": self.recent.copy(), "version": self._version,
                "next_round": self.next_round, "pending": pending,
                "reservoir": self.reservoir.state(), "rng": self.rng.bit_generator.state,
                "reseeded": self.reseeded, "generation": self.generation,
                "seen": {w: np.array(sorted(r), np.int64) for w, r in self.seen.items()}}

    def load_state(self, state: dict[str, Any]) -> None:
        """Exact inverse of :meth:`state` (constructor settings are kept)."""
        self.centroids = np.array(state["centroids"], dtype=np.float32, copy=True)
        self.weights = np.array(state["weights"], dtype=np.float64, copy=True)
        self.recent = np.array(state["recent"], dtype=np.float64, copy=True)
        self._version = int(state["version"])
        self.next_round = int(state["next_round"])
        self.pending = {int(s): {key: None if r.get(key) is None else np.array(r[key], copy=True)
                                 for key in _STAT_KEYS}
                        for s, r in state["pending"].items()}
        self.reservoir.load_state(state["reservoir"])
        self.rng = np.random.default_rng()
        self.rng.bit_generator.state = state["rng"]
        self.reseeded = int(state["reseeded"])
        self.generation = int(state.get("generation", 0))
        self.seen = {int(w): {int(r) for r in np.asarray(rounds).tolist()}
                     for w, rounds in state.get("seen", {}).items()}
        for entry in self.pending.values():
            if entry.get("rows") is None:  # saved by a version with dense rounds
                entry["rows"] = np.arange(self.k, dtype=np.int64)
        self._track_rows()


def touched_rows(counts: np.ndarray, drift_counts: np.ndarray | None) -> np.ndarray:
    """Sorted ids (r,) of the clusters with a non-zero count or drift count."""
    hit = counts != 0
    if drift_counts is not None:
        hit |= drift_counts != 0
    return np.flatnonzero(hit)


def _rows_of(dense: Any, rows: np.ndarray, k: int, d: int, name: str) -> np.ndarray | None:
    """``dense[rows]`` after checking that ``dense`` is (k, d); None stays None."""
    if dense is None:
        return None
    dense = np.asarray(dense)
    if dense.shape != (k, d):
        raise ValueError(f"push: expected {name} ({k}, {d}), got {dense.shape}")
    return dense[rows]


def store_kwargs(cfg: Config) -> dict[str, Any]:
    """:class:`CentroidStore` settings of a run (``cluster.*``, one push per worker a round)."""
    c = cfg.cluster
    return {"num_workers": cfg.scale.workers, "window": c.centroid_window,
            "drift_smoothing": c.drift_smoothing,
            "reseed_every": c.reseed_every, "reseed_ratio": c.reseed_ratio,
            "reservoir_size": c.reservoir_size, "seed": cfg.train.seed}
