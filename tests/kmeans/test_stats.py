"""Batch statistics (torch): assignment, partial sums, drift sums, against brute force."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.kmeans.stats import assign, drift_stats, partial_stats, sq_distances

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def brute_force(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    return ((x[:, None, :].astype(np.float64) - c[None].astype(np.float64)) ** 2).sum(-1)


@pytest.mark.parametrize("device", DEVICES)
def test_assign_matches_brute_force(device):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 7)).astype(np.float32)
    c = rng.normal(size=(9, 7)).astype(np.float32)
    labels, best, second = assign(torch.from_numpy(x).to(device), torch.from_numpy(c))
    d = brute_force(x, c)
    order = np.sort(d, axis=1)
    assert labels.dtype == torch.int64 and labels.shape == (300,)
    np.testing.assert_array_equal(labels.cpu().numpy(), d.argmin(1))
    np.testing.assert_allclose(best.cpu().numpy(), order[:, 0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(second.cpu().numpy(), order[:, 1], rtol=1e-5, atol=1e-5)
    assert (second >= best).all()


def test_assign_with_one_centroid_has_infinite_second_distance():
    labels, best, second = assign(torch.ones(4, 3), torch.zeros(1, 3))
    assert labels.tolist() == [0, 0, 0, 0]
    np.testing.assert_allclose(best.numpy(), 3.0)
    assert torch.isinf(second).all()


def test_distances_are_clamped_non_negative_and_ties_go_to_lowest_index():
    x = torch.full((5, 16), 1e3) + torch.arange(5.0)[:, None]  # large norms, x == centroids
    d = sq_distances(x, x)
    assert (d >= 0).all()
    labels, best, _ = assign(x, torch.cat([x[:1], x[:1], x[1:]]))  # centroid 0 duplicated
    assert labels[0] == 0 and (best >= 0).all()


def test_assign_dtypes():
    x64 = torch.randn(10, 3, dtype=torch.float64)
    assert assign(x64, x64[:2])[1].dtype == torch.float64
    assert assign(x64.half(), x64[:2])[1].dtype == torch.float32  # half upcast


@pytest.mark.parametrize("device", DEVICES)
def test_partial_stats_matches_numpy(device):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(500, 6)).astype(np.float32)
    labels = rng.integers(0, 7, 500)
    labels[labels == 3] = 4  # cluster 3 is empty
    sums, counts = partial_stats(torch.from_numpy(x).to(device),
                                 torch.from_numpy(labels).to(device), 8)
    want = np.zeros((8, 6))
    np.add.at(want, labels, x)
    assert sums.dtype == torch.float32 and counts.dtype == torch.int64
    np.testing.assert_allclose(sums.cpu().numpy(), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(counts.cpu().numpy(), np.bincount(labels, minlength=8))
    assert counts[3] == 0 and counts[7] == 0 and (sums[3] == 0).all()


def test_drift_stats_sums_displacement_per_cluster():
    old = torch.zeros(4, 2)
    new = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, -2.0], [5.0, 5.0]])
    labels = torch.tensor([0, 0, 2, 2])
    drift, counts = drift_stats(old, new, labels, 3)
    np.testing.assert_array_equal(drift.numpy(), [[4, 0], [0, 0], [5, 3]])
    np.testing.assert_array_equal(counts.numpy(), [2, 0, 2])


def test_shape_errors_are_explicit():
    with pytest.raises(ValueError, match="dim"):
        assign(torch.zeros(3, 4), torch.zeros(2, 5))
    with pytest.raises(ValueError, match="labels"):
        partial_stats(torch.zeros(3, 4), torch.zeros(2, dtype=torch.int64), 2)
    with pytest.raises(ValueError, match="shape"):
        drift_stats(torch.zeros(3, 4), torch.zeros(3, 5), torch.zeros(3, dtype=torch.int64), 2)
