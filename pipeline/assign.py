"""Per-shard, resumable assignment of images to a finished run's clusters (DESIGN §1, §3, §8).

Used by the main job's assign stage and by ``jobs/assign.py`` (the scheduled batch job).
Every input shard ``IN/<rel>.parquet`` gets its own output files::

    OUT/assignments/<rel>.parquet   id, cluster, distance, margin[, label][, outlier]
    OUT/rejects/<rel>.parquet       id, source, reason   (only when the shard had bad images)

A shard's assignment file is written atomically, after its rejects file, and only once every
row of the shard is accounted for (assigned or rejected). It is therefore the shard's
completion marker: a re-run skips shards whose file exists, redoes the others, and a killed
run never leaves a partial shard visible. New shards appended to ``IN`` later are the only
ones a re-run processes.

The Ray side (read -> decode -> embed -> assign on an actor pool) lives in
:mod:`pipeline.distributed.assign`; this module plans, collects rows per shard and writes.
"""

from __future__ import annotations

import io
import json
import logging
import os
import posixpath
import signal
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.data import fs as fsx
from pipeline.data.fs import Location
from pipeline.data.quarantine import REJECT_SCHEMA
from pipeline.data.reader import InputError, Shards, check_schema

log = logging.getLogger(__name__)

ASSIGNMENTS, REJECTS = "assignments", "rejects"
IO_THREADS = 8  # parallel footer reads and shard writes (S3 latency-bound)


@dataclass(frozen=True)
class ShardTask:
    """One input shard to assign: path relative to the input root, fs path, row count."""

    rel: str
    source: str
    rows: int


@dataclass
class ShardPlan:
    todo: list[ShardTask]
    done: list[str]  # rel paths already assigned

    @property
    def total(self) -> int:
        return len(self.todo) + len(self.done)


@dataclass
class AssignStats:
    shards: int = 0
    rows: int = 0
    assigned: int = 0
    rejects: int = 0
    outliers: int = 0
    seconds: float = 0.0
    first_shard_s: float = 0.0  # start-up: until the first shard was complete

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.__dict__)
        out["images_per_s"] = round(self.rows / max(self.seconds, 1e-9), 2)
        return out


# --------------------------------------------------------------------------------------------
# Planning (before any work starts).


def plan_shards(shards: Shards, out_root: Location) -> ShardPlan:
    """Split the input shards into done (output file exists) and todo (with row counts).

    Footers of the todo shards are read here, so a shard that breaks the data contract fails
    the job before any work starts.
    """
    rels = [_rel(shards, path) for path in shards.files]
    done_files = {posixpath.relpath(f.path, out_root.join(ASSIGNMENTS).path)
                  for f in _list_if_exists(out_root.join(ASSIGNMENTS))}
    todo_paths = [(rel, path) for rel, path in zip(rels, shards.files, strict=True)
                  if rel not in done_files]
    with ThreadPoolExecutor(IO_THREADS) as pool:
        rows = list(pool.map(lambda p: _footer_rows(shards, p[1]), todo_paths))
    todo = [ShardTask(rel, path, n) for (rel, path), n in zip(todo_paths, rows, strict=True)]
    return ShardPlan(todo, sorted(r for r in rels if r in done_files))


def _rel(shards: Shards, path: str) -> str:
    root = shards.location.path.rstrip("/")
    return posixpath.basename(path) if path == root else posixpath.relpath(path, root)


def _list_if_exists(loc: Location) -> list[Any]:
    return fsx.list_files(loc, (".parquet",)) if fsx.exists(loc) else []


def _footer_rows(shards: Shards, path: str) -> int:
    uri = f"{shards.location.uri.rstrip('/')}/{_rel(shards, path)}"
    try:
        meta = pq.read_metadata(path, filesystem=shards.location.fs)
    except (OSError, pa.ArrowInvalid) as exc:
        raise InputError(f"{uri}: not a readable Parquet shard ({exc})") from exc
    check_schema(meta.schema.to_arrow_schema(), uri)
    return int(meta.num_rows)


# --------------------------------------------------------------------------------------------
# Collecting streamed rows per shard.


class ShardCollector:
    """Buffers streamed result rows per input shard; hands out each shard once complete.

    Rows carry the shard's fs path in ``path``. A shard is complete when its rows (assigned
    plus rejected) reach the count in its footer; more rows than that is a bug and raises.
    """

    def __init__(self, tasks: Iterable[ShardTask]):
        self.tasks = {t.source: t for t in tasks}
        self.parts: dict[str, list[pa.Table]] = {}
        self.seen: dict[str, int] = {}

    def add(self, table: pa.Table) -> list[tuple[ShardTask, pa.Table]]:
        complete = []
        paths = table.column("path")
        for path in pc.unique(paths).to_pylist():
            task = self.tasks.get(path)
            if task is None:
                raise RuntimeError(f"assignment row from unexpected shard {path!r}")
            part = table.filter(pc.equal(paths, path))
            self.parts.setdefault(path, []).append(part)
            self.seen[path] = self.seen.get(path, 0) + part.num_rows
            if self.seen[path] > task.rows:
                raise RuntimeError(f"{path}: {self.seen[path]} rows for a {task.rows}-row shard")
            if self.seen[path] == task.rows:
                complete.append((task, pa.concat_tables(self.parts.pop(path))))
        return complete

    def empty_shards(self) -> list[ShardTask]:
        """Zero-row shards never produce a row; they complete trivially."""
        return [t for t in self.tasks.values() if t.rows == 0]

    def missing(self) -> list[str]:
        return [t.rel for p, t in self.tasks.items() if t.rows and self.seen.get(p) != t.rows]


# --------------------------------------------------------------------------------------------
# Writing one shard.


def split_shard(task: ShardTask, table: pa.Table | None,
                thresholds: np.ndarray | None) -> tuple[pa.Table, pa.Table]:
    """Result rows of one shard -> (assignment table, rejects table)."""
    if table is None:
        return _empty_assignments(thresholds is not None), REJECT_SCHEMA.empty_table()
    bad = pc.not_equal(table.column("reason"), "")
    rejected = table.filter(bad)
    rejects = pa.table({"id": rejected.column("id").cast(pa.string()),
                        "source": pa.array([task.rel] * rejected.num_rows, pa.string()),
                        "reason": rejected.column("reason").cast(pa.string())},
                       schema=REJECT_SCHEMA)
    good = table.filter(pc.invert(bad))
    cols = ["id", "cluster", "distance", "margin"] + (["label"] if "label" in good.schema.names
                                                      else [])
    out = good.select(cols)
    if thresholds is not None:
        out = out.append_column("outlier", pa.array(outlier_flags(
            out.column("cluster").to_numpy(), out.column("distance").to_numpy(), thresholds)))
    return out, rejects


def _empty_assignments(with_outlier: bool) -> pa.Table:
    fields = [("id", pa.string()), ("cluster", pa.int32()), ("distance", pa.float32()),
              ("margin", pa.float32())] + ([("outlier", pa.bool_())] if with_outlier else [])
    return pa.schema(fields).empty_table()


def outlier_flags(clusters: np.ndarray, distances: np.ndarray,
                  thresholds: np.ndarray) -> np.ndarray:
    """True where an image is farther from its centroid than its cluster's threshold (n,)."""
    return np.asarray(distances > thresholds[clusters.astype(np.int64)], dtype=bool)


def write_table_atomic(loc: Location, table: pa.Table) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    fsx.write_bytes_atomic(loc, buf.getvalue())


def write_shard(out_root: Location, task: ShardTask, assigned: pa.Table,
                rejects: pa.Table) -> None:
    """Rejects first, then the assignment file, whose appearance marks the shard done."""
    if rejects.num_rows:
        write_table_atomic(out_root.join(REJECTS, task.rel), rejects)
    write_table_atomic(out_root.join(ASSIGNMENTS, task.rel), assigned)


# --------------------------------------------------------------------------------------------
# The engine.


def run_assignment(tasks: list[ShardTask], batches: Iterator[pa.Table], out_root: Location,
                   thresholds: np.ndarray | None, kill_after_shards: int = -1) -> AssignStats:
    """Consume streamed result batches and write each shard as soon as it is complete."""
    stats, start = AssignStats(), time.perf_counter()
    collector = ShardCollector(tasks)
    pending: list[Future[None]] = []
    with ThreadPoolExecutor(IO_THREADS) as pool:

        def finish(task: ShardTask, table: pa.Table | None) -> None:
            assigned, rejects = split_shard(task, table, thresholds)
            pending.append(pool.submit(write_shard, out_root, task, assigned, rejects))
            _count(stats, task, assigned, rejects)
            if stats.shards == 1:
                stats.first_shard_s = time.perf_counter() - start
            if stats.shards == kill_after_shards:
                _die_after(pending)

        for task in collector.empty_shards():
            finish(task, None)
        for batch in batches:
            for task, table in collector.add(batch):
                finish(task, table)
        for future in pending:
            future.result()
    if collector.missing():
        raise RuntimeError(f"assignment stream ended early; incomplete: {collector.missing()}")
    stats.seconds = time.perf_counter() - start
    return stats


def _count(stats: AssignStats, task: ShardTask, assigned: pa.Table, rejects: pa.Table) -> None:
    stats.shards += 1
    stats.rows += task.rows
    stats.assigned += assigned.num_rows
    stats.rejects += rejects.num_rows
    if "outlier" in assigned.schema.names:
        stats.outliers += int(pc.sum(assigned.column("outlier")).as_py() or 0)
    log.debug("shard %s: %d assigned, %d rejected", task.rel, assigned.num_rows,
              rejects.num_rows)


def _die_after(pending: list[Future[None]]) -> None:
    """Fault injection (``debug.kill_assign_after_shards``): a real SIGKILL of this driver."""
    for future in pending:
        future.result()
    log.warning("debug: killing the assign driver (pid %d) now", os.getpid())
    os.kill(os.getpid(), signal.SIGKILL)


# --------------------------------------------------------------------------------------------
# Per-cluster outlier thresholds, derived from the training run's own assignments.


def cluster_thresholds(clusters: np.ndarray, distances: np.ndarray, k: int, quantile: float,
                       min_members: int = 20) -> np.ndarray:
    """Per-cluster ``quantile`` of the distance to the centroid: (k,) float32.

    Clusters with fewer than ``min_members`` members use the quantile over all images, since
    a 99th percentile of five distances is just their maximum.
    """
    overall = float(np.quantile(distances, quantile)) if len(distances) else np.inf
    out = np.full(k, overall, dtype=np.float32)
    order = np.argsort(clusters, kind="stable")
    bounds = np.searchsorted(clusters[order], np.arange(k + 1))
    for c in range(k):
        members = distances[order[bounds[c]:bounds[c + 1]]]
        if len(members) >= min_members:
            out[c] = np.quantile(members, quantile)
    return out


def thresholds_json(thresholds: np.ndarray, quantile: float, min_members: int) -> bytes:
    return json.dumps({"quantile": quantile, "min_members": min_members,
                       "thresholds": [float(t) for t in thresholds]}, indent=1).encode()


def assign_shards(tasks: list[ShardTask], shards: Shards, out_root: Location, trained: Any,
                  settings: Any, thresholds: np.ndarray | None,
                  kill_after_shards: int = -1) -> AssignStats:
    """Assign ``tasks`` (from :func:`plan_shards`) with a trained model on Ray Data."""
    from pipeline.distributed.assign import assignment_batches

    files = [t.source for t in tasks if t.rows]
    batches: Iterator[pa.Table] = iter(())
    if files:
        batches = assignment_batches(files, shards.location.fs, shards.has_label,
                                     trained.model_bytes, trained.arch, trained.centroids,
                                     settings)
    try:
        return run_assignment(tasks, batches, out_root, thresholds, kill_after_shards)
    except Exception as exc:  # an S3 outage in a read task: one line naming the URI
        error = fsx.s3_error(exc)
        if error is None or isinstance(exc, fsx.StorageError):
            raise
        raise error from exc
