"""Ingest: images from any source -> Parquet shards under the data contract (DESIGN §3).

A Ray Data job: the driver enumerates the source, tasks fetch the original encoded bytes and
check that each image decodes, good rows are written as Parquet shards with bounded row groups,
bad ones go to ``_rejects/`` with their source path and reason, and ``_SUCCESS`` is written
last. Rows go out in a seeded random order across shards (:func:`seeded_order` over the
ids, ``--keep-order`` keeps the source's), since folder and zip sources list in path order,
which is class order; the same seed gives the same shards. Each shard is planned in the driver
as a run of consecutive items and written by one task as ``part-NNNNN.parquet``, so the files
hold the stream order by construction. The output is staged and published whole, so a reader never sees a half-written
ingest:

* local output: staged in a hidden sibling folder, then swapped in with renames;
* ``s3://`` output: staged under ``PREFIX/_staging-*/`` (ignored by Parquet readers), then
  ``_SUCCESS`` is removed, the shards are copied in and ``_SUCCESS`` is written last.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from pipeline.config import IngestConfig
from pipeline.data import fs as fsx
from pipeline.data.decode import DecodeError, decode_to_uint8
from pipeline.data.fs import Location
from pipeline.data.publish import SUCCESS, publish, staging_for
from pipeline.data.quarantine import read_rejects, write_rejects
from pipeline.data.sampling import seeded_order
from pipeline.data.sources import Source, open_source

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
REJECTS = "_rejects"


@dataclass
class IngestResult:
    """What an ingest produced (or found already complete)."""

    output: str
    rows: int
    rejects: int
    label_counts: dict[str, int]
    skipped: bool
    seconds: float

    @property
    def images_per_s(self) -> float:
        return (self.rows + self.rejects) / self.seconds if self.seconds > 0 else 0.0


class WriteShard:
    """Ray Data UDF: one planned shard -> its good rows in ``part-NNNNN.parquet``.

    A shard is a contiguous run of the chosen order, so the files hold the stream order by
    construction, whatever order Ray runs the tasks in. Rows are fetched, checked and written
    one row group at a time (bounded memory); bad rows go to quarantine, as do items the
    source refused at listing (their ``reason``), which are never fetched.
    """

    def __init__(self, source: Source, staging: Location, schema: pa.Schema, cfg: IngestConfig):
        self.source, self.staging, self.schema = source, staging, schema
        self.rejects, self.max_pixels = staging.join(REJECTS), cfg.max_pixels
        self.group = cfg.row_group_size

    def __call__(self, batch: pa.Table) -> pa.Table:
        (plan,) = batch.to_pylist()
        labels = plan.get("labels") or [None] * len(plan["ids"])
        rows = list(zip(plan["ids"], plan["refs"], labels, plan["reasons"], strict=True))
        path = self.staging.join(f"part-{plan['shard']:05d}.parquet").path
        kept = 0
        with pq.ParquetWriter(self.staging.fs.open_output_stream(path), self.schema) as writer:
            for start in range(0, len(rows), self.group):
                table = self._checked(rows[start:start + self.group])
                writer.write_table(table, row_group_size=self.group)
                kept += table.num_rows
        if kept == 0:
            self.staging.fs.delete_file(path)
        return pa.table({"shard": [plan["shard"]], "rows": [kept]})

    def _checked(self, rows: list[tuple[str, Any, Any, str]]) -> pa.Table:
        """``rows``: (id, ref, label, listing reason or "") -> the good rows as a table."""
        payloads = iter(self.source.fetch([ref for _, ref, _, refused in rows if not refused]))
        good: list[tuple[str, bytes | str, Any]] = []
        bad: list[tuple[str, str, str]] = []  # (id, source, reason)
        for image_id, ref, label, refused in rows:
            payload = refused or next(payloads)
            reason = payload if isinstance(payload, str) else self._check(payload)
            if reason is None:
                good.append((image_id, payload, label))
            else:
                bad.append((image_id, f"{self.source.uri}::{ref}", reason))
        if bad:
            write_rejects(self.rejects, *(list(column) for column in zip(*bad, strict=True)))
        ids, images, labels = (list(c) for c in zip(*good, strict=True)) if good else ([], [], [])
        columns = {"id": ids, "image": images, "label": labels}
        return pa.table({name: columns[name] for name in self.schema.names}, schema=self.schema)

    def _check(self, data: bytes) -> str | None:
        try:
            decode_to_uint8(data, 3, self.max_pixels)
            return None
        except DecodeError as exc:
            return str(exc)
        except Exception as exc:  # noqa: BLE001 - any decoder failure is a reject
            return f"decode failed: {type(exc).__name__}: {exc}"


def read_manifest(output: Location) -> dict[str, Any] | None:
    """The ``_SUCCESS`` manifest of a complete ingest, or None."""
    marker = output.join(SUCCESS)
    if not fsx.exists(marker):
        return None
    return json.loads(fsx.read_bytes(marker))


def ingest(cfg: IngestConfig) -> IngestResult:
    """Run the ingest described by ``cfg``; a complete output is left alone unless overwrite."""
    start = time.perf_counter()
    output = fsx.locate(cfg.output, cfg.s3)
    existing = _check_output(output, cfg.overwrite)
    if existing is not None:
        log.info("%s is already a complete ingest (%d rows); nothing to do "
                 "(pass --overwrite to replace it)", cfg.output, existing["rows"])
        return IngestResult(cfg.output, existing["rows"], existing["rejects"],
                            existing["label_counts"], True, 0.0)
    source = open_source(cfg.source, cfg.s3, cfg.labels_from_folders)
    items = source.items()
    if not cfg.keep_order:
        items = [items[i] for i in seeded_order([it["id"] for it in items], cfg.seed)]
    log.info("ingesting %d images from %s into %s (%s order)", len(items), cfg.source,
             cfg.output, "source" if cfg.keep_order else f"random, seed {cfg.seed}")
    staging = staging_for(output)
    try:
        _write_shards(source, items, staging, cfg)
        manifest = _manifest(staging, cfg, time.perf_counter() - start)
        publish(staging, output, json.dumps(manifest, indent=2).encode())
    finally:
        fsx.remove_tree(staging)
    return IngestResult(cfg.output, manifest["rows"], manifest["rejects"],
                        manifest["label_counts"], False, time.perf_counter() - start)


def _check_output(output: Location, overwrite: bool) -> dict[str, Any] | None:
    manifest = read_manifest(output)
    if manifest is not None and not overwrite:
        return manifest
    if manifest is None and not overwrite and fsx.walk(output):
        raise fsx.StorageError(f"{output.uri} exists and is not a complete ingest (no {SUCCESS}); "
                               "pass --overwrite to replace it")
    return None


def _write_shards(source: Source, items: list[dict[str, Any]], staging: Location,
                  cfg: IngestConfig) -> None:
    """Plan shards of ``rows_per_file`` consecutive items and write them in parallel."""
    import ray.data

    fields = [pa.field("id", pa.string()), pa.field("image", pa.binary())]
    labelled = bool(items) and "label" in items[0]
    if labelled:
        fields.append(pa.field("label", pa.array([items[0]["label"]]).type))
    plans = [_plan(n, items[start:start + cfg.rows_per_file], labelled)
             for n, start in enumerate(range(0, len(items), cfg.rows_per_file))]
    fsx.make_dirs(staging)
    writer = WriteShard(source, staging, pa.schema(fields), cfg)
    ray.data.from_items(plans, override_num_blocks=len(plans)).map_batches(
        writer, batch_size=1, batch_format="pyarrow", num_cpus=1).take_all()


def _plan(shard: int, chunk: list[dict[str, Any]], labelled: bool) -> dict[str, Any]:
    """One shard's work: its number and its items' ids, refs, listing reasons ("" for none)
    and labels, as columns."""
    plan = {"shard": shard, "ids": [it["id"] for it in chunk], "refs": [it["ref"] for it in chunk],
            "reasons": [it.get("reason", "") for it in chunk]}
    if labelled:
        plan["labels"] = [it["label"] for it in chunk]
    return plan


def _manifest(staging: Location, cfg: IngestConfig, seconds: float) -> dict[str, Any]:
    files = [f.path for f in fsx.list_files(staging, (".parquet",))]
    labels: Counter[str] = Counter()
    rows = 0
    if files:
        dataset = pads.dataset(files, filesystem=staging.fs, format="parquet")
        rows = dataset.count_rows()
        if "label" in dataset.schema.names:
            counts = pc.value_counts(dataset.to_table(columns=["label"]).column("label"))
            labels.update({str(c["values"]): int(c["counts"]) for c in counts.to_pylist()})
    rejects = read_rejects(staging.join(REJECTS)).num_rows
    return {"schema_version": SCHEMA_VERSION, "rows": rows, "rejects": rejects,
            "label_counts": dict(sorted(labels.items())), "source": cfg.source,
            "files": len(files), "row_group_size": cfg.row_group_size,
            "created_unix": time.time(), "ingest_seconds": round(seconds, 3)}
