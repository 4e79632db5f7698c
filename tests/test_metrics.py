"""Metrics against hand-computed cases and scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from pipeline.metrics import acc, ari, cluster_size_stats, contingency, nmi, score


def test_perfect_permuted_clustering_scores_one():
    truth = [0, 0, 1, 1, 2, 2]
    pred = [5, 5, 3, 3, 9, 9]
    assert score(truth, pred) == {"nmi": 1.0, "acc": 1.0, "ari": 1.0}


def test_hand_computed_acc():
    # classes a,a,a,b,b ; clusters 0,0,1,1,1 -> best map 0->a (2), 1->b (2): 4/5
    assert acc(list("aaabb"), [0, 0, 1, 1, 1]) == pytest.approx(0.8)


def test_acc_more_clusters_than_classes_counts_unmatched_as_errors():
    # 2 classes, 3 clusters: cluster 2 cannot be matched, its 2 points are errors
    assert acc([0, 0, 0, 1, 1, 1], [0, 0, 2, 1, 1, 2]) == pytest.approx(4 / 6)


def test_acc_fewer_clusters_than_classes():
    assert acc([0, 1, 2, 2], [0, 0, 1, 1]) == pytest.approx(3 / 4)


def test_hand_computed_ari_and_nmi_two_by_two():
    # table [[2, 0], [1, 1]]: pairs sum_ij = 1, a = 1 + 1 = 2, b = 3 + 0 = 3, n = 4 (6 pairs)
    truth, pred = [0, 0, 1, 1], [0, 0, 0, 1]
    expected = 2 * 3 / 6
    assert ari(truth, pred) == pytest.approx((1 - expected) / ((2 + 3) / 2 - expected))
    assert nmi(truth, pred) == pytest.approx(normalized_mutual_info_score(truth, pred))


@pytest.mark.parametrize("seed", range(6))
def test_random_labelings_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    n, c, k = 500, int(rng.integers(2, 12)), int(rng.integers(2, 15))
    truth = rng.integers(0, c, n)
    pred = np.where(rng.random(n) < 0.5, truth % k, rng.integers(0, k, n))
    assert nmi(truth, pred) == pytest.approx(normalized_mutual_info_score(truth, pred), abs=1e-10)
    assert ari(truth, pred) == pytest.approx(adjusted_rand_score(truth, pred), abs=1e-10)
    assert 0 <= acc(truth, pred) <= 1


def test_string_labels_and_degenerate_cases():
    assert score(["x", "y", "x"], [1, 2, 1])["acc"] == 1.0
    assert nmi([1, 1, 1], [2, 2, 2]) == 1.0
    assert ari([1, 1, 1], [2, 2, 2]) == 1.0
    assert nmi([0, 1], [0, 0]) == pytest.approx(normalized_mutual_info_score([0, 1], [0, 0]))


def test_contingency_and_cluster_sizes():
    table, classes, clusters = contingency(["a", "b", "a"], [1, 1, 0])
    assert table.tolist() == [[1, 1], [0, 1]] and list(classes) == ["a", "b"]
    stats = cluster_size_stats([0, 0, 0, 2], k=4)
    assert stats == {"k": 4, "min": 0, "median": 0.5, "max": 3, "mean": 1.0, "empty": 2}


def test_invalid_inputs():
    with pytest.raises(ValueError, match="length"):
        nmi([0, 1], [0])
    with pytest.raises(ValueError, match="empty"):
        acc([], [])
    with pytest.raises(ValueError, match="1-D"):
        ari([[0]], [[0]])
