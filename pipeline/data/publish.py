"""Atomic publication of output folders: stage the whole folder, then swap it in.

* Local: the folder is written to a hidden sibling, then swapped in with two renames.
* S3 (no renames): it is staged under ``TARGET/_staging-*/`` (ignored by Parquet readers, which
  skip ``_``-prefixed paths); publishing removes the old ``_SUCCESS``, deletes the old objects,
  copies the staged ones in and writes ``_SUCCESS`` last. Readers that wait for ``_SUCCESS``
  never see a mix of old and new files.
"""

from __future__ import annotations

import os
import uuid

from pipeline.data import fs as fsx
from pipeline.data.fs import Location

SUCCESS = "_SUCCESS"


def staging_for(target: Location) -> Location:
    """A fresh, empty place to build ``target`` in."""
    tag = uuid.uuid4().hex[:8]
    if target.is_s3:
        return target.join(f"_staging-{tag}")
    parent, name = os.path.split(target.path.rstrip("/"))
    path = os.path.join(parent, f".{name}.staging-{tag}")
    return Location(target.fs, path, path)


def publish(staging: Location, target: Location, success: bytes | None = None) -> None:
    """Replace ``target`` by ``staging`` whole; ``success`` becomes ``_SUCCESS`` (written last)."""
    if success is not None:
        fsx.write_bytes_atomic(staging.join(SUCCESS), success)
    if target.is_s3:
        _publish_s3(staging, target)
        fsx.remove_tree(staging)
        return
    old = f"{target.path.rstrip('/')}.old-{uuid.uuid4().hex[:8]}"
    if os.path.exists(target.path):
        os.replace(target.path, old)
    os.makedirs(os.path.dirname(target.path) or ".", exist_ok=True)
    os.replace(staging.path, target.path)
    if os.path.exists(old):
        fsx.remove_tree(Location(target.fs, old, old))


def _publish_s3(staging: Location, target: Location) -> None:
    marker = target.join(SUCCESS)
    if fsx.exists(marker):
        target.fs.delete_file(marker.path)
    staged = fsx.walk(staging)
    for path in fsx.walk(target):
        if not path.startswith(staging.path + "/"):
            target.fs.delete_file(path)
    for path in staged:
        if not path.endswith("/" + SUCCESS):
            rel = os.path.relpath(path, staging.path)
            target.fs.copy_file(path, target.join(rel).path)
    if fsx.exists(staging.join(SUCCESS)):
        target.fs.copy_file(staging.join(SUCCESS).path, marker.path)


def is_complete(target: Location) -> bool:
    return fsx.exists(target.join(SUCCESS))
