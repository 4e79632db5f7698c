"""Uniform, order-free samples and seeded permutations (pipeline.data.sampling; no Ray)."""

from __future__ import annotations

import numpy as np

from pipeline.data.sampling import BottomK, bottom_k, row_keys, seeded_order
from pipeline.kmeans.init import pool_size, seed_centroids


def test_keys_depend_only_on_seed_and_id():
    ids = [f"img/{i}" for i in range(50)]
    assert np.array_equal(row_keys(ids, 3), row_keys(list(reversed(ids)), 3)[::-1])
    assert not np.array_equal(row_keys(ids, 3), row_keys(ids, 4))


def test_merged_block_samples_equal_the_global_bottom_k():
    ids = [f"x{i}" for i in range(1000)]
    keys = row_keys(ids, 7)
    want = {ids[i] for i in bottom_k(keys, 25)}
    merged = BottomK(25)
    rng = np.random.default_rng(0)
    for block in np.array_split(rng.permutation(1000), 13):  # any block order and split
        local = block[bottom_k(keys[block], 25)]
        merged.add(keys[local], [{"id": ids[i]} for i in local])
    assert {r["id"] for r in merged.rows} == want
    assert np.all(np.diff(merged.keys.astype(np.float64)) >= 0)


def test_bottom_k_is_uniform_over_ids():
    """Over 2,000 seeds each of 100 ids is drawn into a 10-sample 200 times on average; a
    biased rule (e.g. first rows) would put some at 0 and others at 2,000."""
    ids = [f"c{i // 10}/{i}" for i in range(100)]  # class-sorted ids
    counts = np.zeros(100)
    for seed in range(2000):
        counts[bottom_k(row_keys(ids, seed), 10)] += 1
    assert counts.sum() == 20_000
    assert np.abs(counts - 200).max() < 5 * np.sqrt(200 * 0.9)  # binomial sd, 5 sigma


def test_seeded_order_is_a_reproducible_permutation():
    ids = [f"c{i // 100}/{i}" for i in range(1000)]
    order = seeded_order(ids, 0)
    assert sorted(order.tolist()) == list(range(1000))
    assert np.array_equal(order, seeded_order(ids, 0))
    assert not np.array_equal(order, seeded_order(ids, 1))
    classes = np.array([i // 100 for i in order])
    assert (np.diff(classes) != 0).mean() > 0.8  # class runs are broken up


def test_kmeans_plus_plus_seeds_cover_separated_groups():
    rng = np.random.default_rng(0)
    means = rng.normal(size=(10, 8)) * 10
    labels = rng.integers(0, 10, 500)
    pool = means[labels] + rng.normal(size=(500, 8))
    seeds = seed_centroids(pool, 10, seed=0)
    nearest = np.argmin(((seeds[:, None] - means[None]) ** 2).sum(-1), axis=1)
    assert len(set(nearest.tolist())) >= 9
    assert np.array_equal(seeds, seed_centroids(pool, 10, seed=0))
    assert np.array_equal(seed_centroids(pool, 10, 0, "random"), pool[:10].astype(np.float32))
    assert pool_size(10, 10, 20_000) == 100 and pool_size(1000, 10, 2000) == 2000
    assert pool_size(5000, 10, 2000) == 5000
