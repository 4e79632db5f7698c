"""Uniform samples and orders that do not depend on how, or in what order, rows arrive.

Real inputs are often sorted by class (folder-per-class layouts, archives, buckets), and Ray
Data delivers blocks in a nondeterministic order. Both facts rule out "the first k rows" or a
sequential reservoir when a run must be random *and* reproducible. Instead every row gets a
key that depends only on ``(seed, id)`` (a keyed BLAKE2b hash, uniform on [0, 2^64)):

* **bottom-k sampling** keeps the k rows with the smallest keys. The keys are i.i.d. uniform,
  so the kept set is a uniform random k-subset of the whole input, in one streaming pass with
  O(k) state, and mergeable: the bottom-k of a union is the bottom-k of the parts' bottom-ks,
  so each Ray Data block reduces itself and the driver merges (Cohen & Kaplan 2007).
* **seeded permutations** of a list of ids (ingest's on-disk order) sort by the same keys.

No Ray here; the Ray wiring is :func:`pipeline.data.reader.sample_rows`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


def row_keys(ids: Iterable[Any], seed: int) -> np.ndarray:
    """(n,) uint64 keys, uniform and independent per id, fixed by ``seed``."""
    salt = int(seed).to_bytes(8, "little", signed=True)
    return np.fromiter(
        (int.from_bytes(hashlib.blake2b(str(i).encode(), digest_size=8, key=salt).digest(),
                        "little") for i in ids),
        dtype=np.uint64)


def seeded_order(ids: Sequence[Any], seed: int) -> np.ndarray:
    """Indices that put ``ids`` into a uniformly random order fixed by ``seed``."""
    return np.argsort(row_keys(ids, seed), kind="stable")


def bottom_k(keys: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k smallest ``keys`` (all of them when there are fewer), sorted by key."""
    if len(keys) > k:
        idx = np.argpartition(keys, k - 1)[:k]
    else:
        idx = np.arange(len(keys))
    return idx[np.argsort(keys[idx], kind="stable")]


@dataclass
class BottomK:
    """A mergeable uniform sample of at most ``k`` rows: (key, row dict) pairs, key-sorted."""

    k: int
    keys: np.ndarray = field(default_factory=lambda: np.empty(0, np.uint64))
    rows: list[dict[str, Any]] = field(default_factory=list)

    def add(self, keys: np.ndarray, rows: list[dict[str, Any]]) -> None:
        """Merge rows with their keys (e.g. one block's own bottom-k)."""
        all_keys = np.concatenate([self.keys, np.asarray(keys, np.uint64)])
        all_rows = self.rows + list(rows)
        keep = bottom_k(all_keys, self.k)
        self.keys, self.rows = all_keys[keep], [all_rows[i] for i in keep]
