"""DriftProbe: held-out per-cluster samples whose displacement telescopes to the whole drift."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.kmeans.drift import DriftProbe, probe_size
from pipeline.kmeans.minibatch import apply_drift


def embed(items: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """A 'network' whose weights are a translation: feature = first 2 pixels + shift."""
    return items.reshape(len(items), -1)[:, :2] + shift


def test_the_first_embedding_is_a_baseline_and_later_ones_measure_the_displacement():
    probe = DriftProbe(k=2, per_cluster=3, item_shape=(1, 2, 2), dim=2)
    items = np.arange(5 * 4, dtype=np.float32).reshape(5, 1, 2, 2)
    probe.offer(items, np.array([0, 0, 1, 1, 1]))
    assert len(probe) == 5
    slots = probe.next_chunk(10)
    sums, counts = probe.measure(slots, embed(probe.items[slots], np.zeros(2)))
    assert counts.sum() == 0 and not sums.any()  # baselines only
    shift = np.array([0.5, -1.0])
    sums, counts = probe.measure(slots, embed(probe.items[slots], shift))
    assert counts.tolist() == [2, 3]
    np.testing.assert_allclose(sums / counts[:, None], [shift, shift])


@pytest.mark.parametrize("chunk", [1, 2, 7, 100])
def test_round_robin_chunks_telescope_to_the_total_drift_once(chunk):
    """However the probe is chunked and however often it is measured, the displacements a
    cluster receives sum to the total drift of its images, each counted once."""
    rng = np.random.default_rng(0)
    k, m = 4, 3
    probe = DriftProbe(k, m, item_shape=(2,), dim=2, seed=1)
    probe.offer(rng.normal(size=(40, 2)).astype(np.float32), rng.integers(0, k, 40))
    shift = np.zeros(2)
    # a baseline for every image, then drift in 9 random steps, then a final full sweep
    for _ in range(-(-len(probe) // chunk)):
        slots = probe.next_chunk(chunk)
        probe.measure(slots, embed(probe.items[slots], shift))
    total = np.zeros((k, 2))
    for _ in range(9):
        shift = shift + rng.normal(size=2)
        slots = probe.next_chunk(chunk)
        sums, _ = probe.measure(slots, embed(probe.items[slots], shift))
        total += sums
    for _ in range(-(-len(probe) // chunk)):
        slots = probe.next_chunk(chunk)
        sums, _ = probe.measure(slots, embed(probe.items[slots], shift))
        total += sums
    per_cluster = np.bincount(np.flatnonzero(probe.filled) // m, minlength=k)
    np.testing.assert_allclose(total, per_cluster[:, None] * shift[None], atol=1e-5)


def test_compensation_maps_an_old_centroid_into_the_new_feature_space():
    """A centroid of old features, shifted by its probe's mean displacement, is the mean of
    the same images' new features (a translation, measured exactly)."""
    rng = np.random.default_rng(2)
    old_items = rng.normal(size=(30, 2)).astype(np.float32)
    centroid = embed(old_items, np.zeros(2)).mean(0, keepdims=True).astype(np.float32)
    probe = DriftProbe(1, 8, item_shape=(2,), dim=2, seed=3)
    probe.offer(rng.normal(size=(20, 2)).astype(np.float32), np.zeros(20, np.int64))
    slots = probe.next_chunk(8)
    probe.measure(slots, embed(probe.items[slots], np.zeros(2)))
    shift = np.array([2.0, -3.0])
    sums, counts = probe.measure(slots, embed(probe.items[slots], shift))
    apply_drift(centroid, sums, counts, smoothing=1.0)
    np.testing.assert_allclose(centroid[0], embed(old_items, shift).mean(0), atol=1e-5)


def test_each_cluster_keeps_a_uniform_sample_of_what_it_was_offered():
    """Algorithm R per cluster: of 1,000 images offered to a cluster with 4 slots, each is
    kept with probability 4/1000 (checked over 400 seeds on the first and last 100)."""
    first = last = 0
    for seed in range(400):
        probe = DriftProbe(2, 4, item_shape=(1,), dim=1, seed=seed)
        probe.offer(np.arange(1000, dtype=np.float32)[:, None], np.zeros(1000, np.int64))
        kept = probe.items[:4, 0]
        first += int((kept < 100).sum())
        last += int((kept >= 900).sum())
        assert not probe.filled[4:].any()  # nothing was offered to cluster 1
    # expected 400 * 4 * 100/1000 = 160 each; binomial sd ~ 12.4
    assert 110 < first < 210 and 110 < last < 210


def test_probe_size_caps_the_probe():
    assert probe_size(10, 4, 4096) == 4
    assert probe_size(2000, 4, 4096) == 2
    assert probe_size(100_000, 4, 4096) == 1
    with pytest.raises(ValueError):
        DriftProbe(0, 1, (1,), 1)


def test_toward_centroid_is_the_mean_cosine_of_displacement_and_pull():
    from pipeline.kmeans.drift import toward_centroid

    old = np.zeros((3, 2))
    centroids = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 0.0]])
    new = np.array([[0.5, 0.0], [0.0, -1.0], [0.0, 3.0]])  # toward, away, orthogonal
    assert toward_centroid(old, new, centroids) == pytest.approx((1 - 1 + 0) / 3)
    assert toward_centroid(old, old, centroids) == 0.0  # nothing moved


def test_drift_counts_for_the_cluster_an_image_is_nearest_now():
    """An image offered to cluster 0 whose last feature now lies nearest centroid 1 moves
    centroid 1: a cluster drifts with its present members, not with those it had when the
    reservoir drew them (early in training, nearly at random)."""
    probe = DriftProbe(k=2, per_cluster=2, item_shape=(2,), dim=2, seed=0)
    probe.offer(np.array([[0.0, 0.0], [5.0, 5.0]]), np.array([0, 0]))
    slots = probe.next_chunk(8)
    probe.measure(slots, np.array([[0.0, 0.0], [5.0, 5.0]]))  # baselines
    centroids = np.array([[0.0, 0.0], [5.0, 5.0]])
    assert list(probe.clusters_of(slots, centroids)) == [0, 1]
    assert list(probe.clusters_of(slots, None)) == [0, 0]  # as offered
    sums, counts = probe.measure(slots, np.array([[1.0, 0.0], [5.0, 7.0]]), centroids)
    np.testing.assert_allclose(sums, [[1.0, 0.0], [0.0, 2.0]])
    assert list(counts) == [1, 1]
