"""Ray tests of whole methods; :func:`assert_assigned_as` checks an assignment folder."""

from __future__ import annotations

import pyarrow.parquet as pq


def assert_assigned_as(folder: str, method: dict[str, int], tie: float = 1e-3) -> None:
    """Every image of an assignments folder is in ``method``'s cluster, save a near tie: an
    image whose two nearest centroids are within ``tie`` (its ``margin``) may fall either
    way, as the training's pass and the assign actor's batches round differently (one of
    1,797 digits flipped so in CI). Such images must stay rare (0.1 %)."""
    table = pq.read_table(folder, columns=["id", "cluster", "margin"])
    ids = table["id"].to_pylist()
    assert len(ids) == len(set(ids)) and set(ids) == set(method)  # each image once
    off = [(i, c, method[i], m) for i, c, m in zip(ids, table["cluster"].to_pylist(),
                                                    table["margin"].to_pylist(), strict=True)
           if c != method[i]]
    assert all(m <= tie for *_, m in off), off[:5]  # (id, assigned, method's, margin)
    assert len(off) <= max(1, len(ids) // 1000), off[:5]
