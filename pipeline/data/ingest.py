"""Ingest: images from any source -> Parquet shards under the data contract (DESIGN §3).

A Ray Data job: the driver enumerates the source, tasks fetch the original encoded bytes and
check that each image decodes, good rows are written as Parquet shards with bounded row groups,
bad ones go to ``_rejects/`` with their source path and reason, and ``_SUCCESS`` is written
last. Rows go out in a seeded random order across shards (:func:`seeded_order` over the
ids, ``--keep-order`` keeps the source's), since folder and zip sources list in path order,
which is class order; the same seed gives the same shards, named ``part-NNNNN.parquet`` in
stream order. The output is staged and published whole, so a reader never sees a half-written
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


class FetchAndCheck:
    """Ray Data UDF: refs -> (id, image bytes, label) rows; bad rows go to quarantine."""

    def __init__(self, source: Source, rejects: Location, max_pixels: int):
        self.source, self.rejects, self.max_pixels = source, rejects, max_pixels

    def __call__(self, batch: dict[str, Any]) -> pa.Table:
        ids = [str(i) for i in batch["id"]]
        payloads = self.source.fetch(list(batch["ref"]))
        good, bad_ids, bad_src, bad_reason = [], [], [], []
        for row, (image_id, payload) in enumerate(zip(ids, payloads, strict=True)):
            reason = payload if isinstance(payload, str) else self._check(payload)
            if reason is None:
                good.append(row)
            else:
                bad_ids.append(image_id)
                bad_src.append(f"{self.source.uri}::{batch['ref'][row]}")
                bad_reason.append(reason)
        write_rejects(self.rejects, bad_ids, bad_src, bad_reason)
        columns: dict[str, Any] = {
            "id": pa.array([ids[r] for r in good], pa.string()),
            "image": pa.array([payloads[r] for r in good], pa.binary()),
        }
        if "label" in batch:
            columns["label"] = pa.array([batch["label"][r] for r in good])
        return pa.table(columns)

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
    import ray.data

    batch = 256
    blocks = max(1, min(200, len(items) // batch))
    context = ray.data.DataContext.get_current()
    keep, context.execution_options.preserve_order = \
        context.execution_options.preserve_order, True  # the same seed -> the same shards
    try:
        ds: Any = ray.data.from_items(items, override_num_blocks=blocks)
        ds = ds.map_batches(FetchAndCheck(source, staging.join(REJECTS), cfg.max_pixels),
                            batch_size=batch, batch_format="numpy", num_cpus=1)
        ds.write_parquet(staging.path, filesystem=staging.fs,
                         min_rows_per_file=cfg.row_group_size,
                         max_rows_per_file=cfg.rows_per_file, row_group_size=cfg.row_group_size)
    finally:
        context.execution_options.preserve_order = keep
    _name_in_order(staging, {it["id"]: i for i, it in enumerate(items)})


def _name_in_order(staging: Location, position: dict[str, int]) -> None:
    """Rename Ray's uuid-named shards to ``part-NNNNN.parquet`` by where their first row
    stands in the written order, so re-runs give the same names."""
    import pyarrow.parquet as pq

    first = {}
    for f in (info.path for info in fsx.list_files(staging, (".parquet",))):
        shard = pq.ParquetFile(f, filesystem=staging.fs)
        if shard.metadata.num_rows == 0:
            staging.fs.delete_file(f)
            continue
        first[f] = position[shard.read_row_group(0, columns=["id"]).column("id")[0].as_py()]
    for n, path in enumerate(sorted(first, key=first.__getitem__)):
        staging.fs.move(path, staging.join(f"part-{n:05d}.parquet").path)


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
