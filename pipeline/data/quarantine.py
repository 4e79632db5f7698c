"""Quarantine of unusable inputs: ``id``, ``source`` and ``reason`` rows in a Parquet folder.

Decode and ingest tasks write their rejects here as a side effect and drop the rows from the
stream, so one bad image never fails a block and nothing is lost. File names are a hash of the
rejected ids, so a retried task overwrites its own file instead of duplicating it; readers also
de-duplicate by id.
"""

from __future__ import annotations

import hashlib
import io

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data import fs as fsx
from pipeline.data.fs import Location

REJECT_SCHEMA = pa.schema([("id", pa.string()), ("source", pa.string()), ("reason", pa.string())])


def write_rejects(folder: Location, ids: list[str], sources: list[str], reasons: list[str]) -> None:
    """Write one small Parquet file of rejects into ``folder`` (no-op when empty)."""
    if not ids:
        return
    table = pa.table({"id": ids, "source": sources, "reason": reasons}, schema=REJECT_SCHEMA)
    digest = hashlib.sha1("\0".join(ids).encode()).hexdigest()[:16]
    buf = io.BytesIO()
    pq.write_table(table, buf)
    fsx.make_dirs(folder)
    fsx.write_bytes_atomic(folder.join(f"part-{digest}.parquet"), buf.getvalue())


def read_rejects(folder: Location) -> pa.Table:
    """All rejects under ``folder``, one row per id; an absent folder gives an empty table."""
    if not fsx.exists(folder):
        return REJECT_SCHEMA.empty_table()
    files = [f.path for f in fsx.list_files(folder, (".parquet",))]
    if not files:
        return REJECT_SCHEMA.empty_table()
    tables = [pq.read_table(path, filesystem=folder.fs, schema=REJECT_SCHEMA) for path in files]
    table = pa.concat_tables(tables)
    _, first = _unique_first(table.column("id").to_pylist())
    return table.take(first)


def _unique_first(ids: list[str]) -> tuple[list[str], list[int]]:
    seen: dict[str, int] = {}
    for i, value in enumerate(ids):
        seen.setdefault(value, i)
    return list(seen), sorted(seen.values())
