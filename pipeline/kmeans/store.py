"""``CentroidStore``: the in-process reference of the centroid-server protocol (DESIGN §4).

The Ray actor in :mod:`pipeline.distributed.centroid_server` wraps this exact class, so the
single-process reference and the distributed server share every line of the math.

Rounds: each worker pushes the summed statistics of its last ``sync_every`` steps, tagged with
a round id (``step``). When all ``num_workers`` have pushed a round, their statistics are
summed and applied at once, and ``version`` increases by one. Because the update is a running
mean, two workers with batch B/2 give exactly the centroids of one worker with batch B, when
both assign against the same version (tested). A push for a round that was already applied
(a restarted worker) is applied on its own rather than lost.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.kmeans.minibatch import Reservoir, apply_drift, minibatch_update, reseed_starved


class CentroidStore:
    """Owns k x d centroids, per-centroid weights and a version counter."""

    def __init__(self, centroids: np.ndarray, *, num_workers: int = 1,
                 drift_smoothing: float = 1.0, reseed_every: int = 50,
                 reseed_ratio: float = 0.01, reservoir_size: int = 4096, seed: int = 0,
                 recent_decay: float = 0.9):
        self.centroids = np.array(centroids, dtype=np.float32, copy=True)
        k, d = self.centroids.shape
        self.weights = np.zeros(k, dtype=np.float64)
        self.recent = np.zeros(k, dtype=np.float64)  # EMA of per-round counts
        self.num_workers, self.drift_smoothing = num_workers, drift_smoothing
        self.reseed_every, self.reseed_ratio = reseed_every, reseed_ratio
        self.recent_decay = recent_decay
        self.reservoir = Reservoir(reservoir_size, d, seed)
        self.rng = np.random.default_rng(seed + 1)
        self.version = 0
        self.applied_rounds: set[int] = set()
        self.pending: dict[int, dict[str, Any]] = {}
        self.reseeded = 0

    @property
    def k(self) -> int:
        return int(self.centroids.shape[0])

    @property
    def dim(self) -> int:
        return int(self.centroids.shape[1])

    def push(self, sums: np.ndarray, counts: np.ndarray, drift: np.ndarray | None = None,
             drift_counts: np.ndarray | None = None, worker: int = 0, step: int = 0,
             samples: np.ndarray | None = None) -> int:
        """Add one worker's statistics for round ``step``; apply the round when complete."""
        if samples is not None and len(samples):
            self.reservoir.add(samples)
        entry = {"sums": np.asarray(sums, np.float64), "counts": np.asarray(counts, np.int64),
                 "drift": None if drift is None else np.asarray(drift, np.float64),
                 "drift_counts": None if drift_counts is None else np.asarray(drift_counts),
                 "workers": [worker]}
        if step in self.applied_rounds or self.num_workers == 1:
            self._apply(entry)
            self.applied_rounds.add(step)
            return self.version
        self._merge(step, entry)
        if len(set(self.pending[step]["workers"])) >= self.num_workers:
            self._apply(self.pending.pop(step))
            self.applied_rounds.add(step)
        return self.version

    def _merge(self, step: int, entry: dict[str, Any]) -> None:
        have = self.pending.get(step)
        if have is None:
            self.pending[step] = entry
            return
        have["sums"] = have["sums"] + entry["sums"]
        have["counts"] = have["counts"] + entry["counts"]
        for key in ("drift", "drift_counts"):
            if entry[key] is not None:
                have[key] = entry[key] if have[key] is None else have[key] + entry[key]
        have["workers"] = have["workers"] + entry["workers"]

    def _apply(self, entry: dict[str, Any]) -> None:
        counts = entry["counts"]
        minibatch_update(self.centroids, self.weights, entry["sums"], counts)
        if entry["drift"] is not None and entry["drift_counts"] is not None:
            apply_drift(self.centroids, entry["drift"], entry["drift_counts"],
                        self.drift_smoothing)
        self.recent = self.recent_decay * self.recent + (1 - self.recent_decay) * counts
        self.version += 1
        if self.version % self.reseed_every == 0:
            self.reseeded += len(reseed_starved(self.centroids, self.weights, self.recent,
                                                self.reservoir, self.reseed_ratio, self.rng))

    def pull(self, since_version: int = -1) -> tuple[int, np.ndarray] | None:
        """(version, copy of centroids) if newer than ``since_version``, else None."""
        if self.version <= since_version:
            return None
        return self.version, self.centroids.copy()

    def state(self) -> dict[str, Any]:
        return {"centroids": self.centroids.copy(), "weights": self.weights.copy(),
                "recent": self.recent.copy(), "version": self.version,
                "applied_rounds": sorted(self.applied_rounds)[-1024:],
                "pending": {int(s): dict(e) for s, e in self.pending.items()},
                "reservoir": self.reservoir.state(), "rng": self.rng.bit_generator.state,
                "reseeded": self.reseeded}

    def load_state(self, state: dict[str, Any]) -> None:
        self.centroids = np.array(state["centroids"], dtype=np.float32, copy=True)
        self.weights = np.array(state["weights"], dtype=np.float64, copy=True)
        self.recent = np.array(state["recent"], dtype=np.float64, copy=True)
        self.version = int(state["version"])
        self.applied_rounds = {int(s) for s in state["applied_rounds"]}
        self.pending = {int(s): dict(e) for s, e in state["pending"].items()}
        self.reservoir.load_state(state["reservoir"])
        self.rng.bit_generator.state = state["rng"]
        self.reseeded = int(state["reseeded"])
