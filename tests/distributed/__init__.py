"""Ray tests of whole methods; :func:`clusters_by_id` reads an assignment folder."""

from __future__ import annotations

import pyarrow.parquet as pq


def clusters_by_id(folder: str) -> dict[str, int]:
    """id -> cluster of every row of an assignments folder, each image exactly once."""
    table = pq.read_table(folder, columns=["id", "cluster"])
    ids, clusters = table["id"].to_pylist(), table["cluster"].to_pylist()
    assert len(ids) == len(set(ids))  # each image once
    return dict(zip(ids, clusters, strict=True))
