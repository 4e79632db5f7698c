"""DEPICT's math and network (no Ray): targets against hand-computed cases, global
frequencies over parts, layer-wise reconstruction, shapes for several inputs, the export
rule, empty clusters on adversarial data, and a run through the reference runner."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.config import Config, resolve
from pipeline.methods.base import PerId
from pipeline.methods.deepcluster import MomentStats, Whitening
from pipeline.methods.depict import (
    DepictNet,
    Pathways,
    conv_plan,
    depict_arch,
    head_from_centroids,
    initial_clusters,
    layerwise_loss,
    softmax,
    split_empty_heads,
    targets,
    whitened_head,
)
from pipeline.metrics import nmi
from tests.test_cluster_job import digits_shards  # noqa: F401  (fixture)

P = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7]])  # frequencies f = (2.0, 1.0)


def cfg_of(*extra: str) -> Config:
    cfg: Config = resolve(Config, overrides=["method=depict", "cluster.k=10", *extra])
    return cfg


def test_sqrt_targets_match_the_hand_computation():
    # row 0: (0.9 / sqrt 2, 0.1 / 1) = (0.63640, 0.1) -> normalised (0.86420, 0.13580)
    q = targets(P, "sqrt")
    np.testing.assert_allclose(q[0], [0.636396 / 0.736396, 0.1 / 0.736396], rtol=1e-5)
    # row 2: (0.3 / sqrt 2, 0.7) = (0.21213, 0.7) -> (0.23256, 0.76744)
    np.testing.assert_allclose(q[2], [0.212132 / 0.912132, 0.7 / 0.912132], rtol=1e-5)
    np.testing.assert_allclose(q.sum(axis=1), 1.0)


def test_dec_targets_match_the_hand_computation():
    # row 0: (0.81 / 2, 0.01 / 1) = (0.405, 0.01) -> (0.975904, 0.024096)
    q = targets(P, "dec")
    np.testing.assert_allclose(q[0], [0.405 / 0.415, 0.01 / 0.415], rtol=1e-6)
    # row 2: (0.09 / 2, 0.49) = (0.045, 0.49) -> (0.084112, 0.915888)
    np.testing.assert_allclose(q[2], [0.045 / 0.535, 0.49 / 0.535], rtol=1e-6)


def test_the_prior_pulls_targets_towards_the_rare_cluster():
    """Cluster 0 is twice as frequent: every target moves weight from it to cluster 1."""
    assert np.all(targets(P, "sqrt")[:, 1] > P[:, 1])


def test_targets_of_parts_with_the_global_frequencies_equal_the_whole():
    """What a worker computes for its share, given the frequencies summed over every
    share, equals the single-process targets: the frequencies are global."""
    rng = np.random.default_rng(0)
    p = softmax(rng.normal(size=(300, 7)) * 3)
    parts = np.array_split(p, 3)
    frequency = sum(part.sum(axis=0) for part in parts)
    for kind in ("sqrt", "dec"):
        joined = np.concatenate([targets(part, kind, frequency) for part in parts])
        np.testing.assert_allclose(joined, targets(p, kind), rtol=1e-12)
        assert not np.allclose(targets(parts[0], kind), targets(p, kind)[:100])


def test_layerwise_loss_weights_the_input_1_and_hidden_layers_the_hidden_weight():
    recs = [torch.zeros(2, 3), torch.zeros(2, 4)]
    tgts = [torch.ones(2, 3), torch.full((2, 4), 2.0, requires_grad=True)]
    assert layerwise_loss(recs, tgts, 0.1).item() == pytest.approx(1.0 + 0.1 * 4.0)
    assert layerwise_loss(recs, tgts, 0.0).item() == pytest.approx(1.0)
    recs[1].requires_grad_(True)
    layerwise_loss(recs, tgts, 0.1).backward()
    assert tgts[1].grad is None  # the clean pathway's activations are targets only


@pytest.mark.parametrize("size,channels", [(28, 1), (32, 3), (16, 1), (64, 3)])
def test_decoder_mirrors_the_encoder(size, channels):
    cfg = cfg_of(f"data.image_size={size}", f"data.channels={channels}")
    net = DepictNet(depict_arch(cfg))
    x = torch.rand(3, channels, size, size) * 2 - 1
    acts, z = net.encode(x, noisy=True)
    recs = net.decode(z)
    assert z.shape == (3, 10) and net(x).shape == (3, 10)
    assert [r.shape for r in recs] == [a.shape for a in acts]
    assert recs[0].min() >= -1 and recs[0].max() <= 1  # the normalised pixel range


def test_the_reference_layers_for_mnist_and_deeper_stacks_for_larger_images():
    assert conv_plan(28, [50, 50]) == [(50, 4, 2, 0), (50, 5, 2, 2)]  # 28 -> 13 -> 7
    assert [c for c, *_ in conv_plan(224, [50, 50])] == [50, 50, 100, 200, 400]  # -> 7 px


def test_clean_pathway_is_deterministic_and_the_noisy_one_is_not():
    net = DepictNet(depict_arch(cfg_of()))
    x = torch.rand(8, 1, 28, 28) * 2 - 1
    net.train()
    with torch.no_grad():
        assert torch.equal(net(x), net(x))
        net.eval()
        clean = net(x)
        net.train()
        assert torch.equal(net(x), clean)  # no BatchNorm: train and eval mode agree
        noisy = net.encode(x, noisy=True)[1]
    assert not torch.allclose(noisy, clean)
    loss, logits = Pathways(net, noisy=False, hidden_weight=0.1)(x)
    assert logits.shape == (8, 10) and loss.item() > 0


def test_exported_probabilities_nearest_one_hot_is_their_argmax():
    """The export rule: the nearest of the one-hot centroids to p is argmax p."""
    from pipeline.kmeans.stats import assign

    p = torch.from_numpy(softmax(np.random.default_rng(1).normal(size=(2000, 12)) * 2))
    labels, _, _ = assign(p.float(), torch.eye(12))
    assert torch.equal(labels, p.argmax(dim=1))


def test_head_starts_from_the_normalised_centroids():
    w, b = head_from_centroids(np.array([[3.0, 4.0], [0.0, 2.0]]))
    np.testing.assert_allclose(w, [[0.6, 0.8], [0.0, 1.0]])
    assert not b.any()


def test_the_whitened_head_is_the_normalised_centroids_on_whitened_embeddings():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(500, 4)) * [5.0, 1.0, 0.2, 0.05] + [1.0, 2.0, 3.0, 4.0]
    whitening = Whitening.fit(MomentStats.of(z), 4)
    centroids = rng.normal(size=(3, 4))
    w, b = whitened_head(centroids, whitening)
    unit, _ = head_from_centroids(centroids)
    logits = z @ w.T + b
    np.testing.assert_allclose(logits, ((z - whitening.mean) @ whitening.proj) @ unit.T,
                               rtol=1e-4, atol=1e-4)
    # the L2 normalisation scales each row: the head's argmax is the cosine-nearest centroid
    assert (logits.argmax(axis=1) == (whitening(z) @ unit.T).argmax(axis=1)).all()


def test_whitening_finds_clusters_that_a_high_variance_nuisance_hides_from_raw_kmeans():
    """Three clusters along a direction of small variance, two noise directions of 100x the
    variance: k-means on the raw embedding splits the noise, on the whitened one the
    clusters (``depict.whiten``)."""
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 200)
    z = np.c_[rng.normal(0, 10, (600, 2)), y + rng.normal(0, 0.1, 600),
              rng.normal(0, 0.1, 600)].astype(np.float32)
    found = PerId(np.arange(600).astype(str), {"feature": z}, y.astype(str))
    scores = {}
    for whiten in ("true", "false"):
        cfg = cfg_of("cluster.k=3", f"depict.whiten={whiten}")
        out = initial_clusters(cfg, 0)(found, None)
        head = z @ out.extra["head_w"].T + out.extra["head_b"]
        assert np.mean(head.argmax(axis=1) == out.arrays["cluster"]) > 0.95
        scores[whiten] = nmi(y, out.arrays["cluster"])
    assert scores["true"] > 0.4 > 0.05 > scores["false"], scores


def test_a_collapsed_head_is_split_until_no_cluster_is_empty():
    """Adversarial: every image in cluster 0 (its bias dominates). Splitting leaves all
    clusters non-empty, halving the donor along its principal direction."""
    rng = np.random.default_rng(0)
    z = rng.normal(size=(1000, 6)).astype(np.float32)
    w = rng.normal(size=(8, 6)).astype(np.float32) * 0.01
    b = np.zeros(8, np.float32)
    b[0] = 100.0
    assert np.bincount(np.argmax(z @ w.T + b, axis=1), minlength=8).tolist()[1:] == [0] * 7
    w2, b2, filled = split_empty_heads(z, w, b)
    counts = np.bincount(np.argmax(z @ w2.T + b2, axis=1), minlength=8)
    assert sorted(filled) == list(range(1, 8)) and counts.min() > 0
    assert counts.sum() == 1000 and counts.max() <= 500  # the first split halved cluster 0


def test_splitting_moves_no_image_between_other_clusters():
    rng = np.random.default_rng(2)
    z = rng.normal(size=(600, 4)).astype(np.float32)
    w, b = rng.normal(size=(5, 4)).astype(np.float32), np.zeros(5, np.float32)
    b[4] = -100.0  # cluster 4 never wins
    before = np.argmax(z @ w.T + b, axis=1)
    assert not np.any(before == 4)
    w2, b2, filled = split_empty_heads(z, w, b)
    after = np.argmax(z @ w2.T + b2, axis=1)
    donor = np.argmax(np.bincount(before))
    assert filled == [4] and set(after[before == donor]) == {donor, 4}
    np.testing.assert_array_equal(after[before != donor], before[before != donor])


def test_identical_embeddings_cannot_be_split_and_nothing_breaks():
    z = np.ones((50, 3), np.float32)
    w, b = np.eye(3, dtype=np.float32), np.array([1.0, 0.0, 0.0], np.float32)
    w2, b2, filled = split_empty_heads(z, w, b)
    assert filled == [] and np.array_equal(w2, w)


def test_depict_runs_in_the_reference_runner(digits_shards, tmp_path):  # noqa: F811
    """Pretraining, k-means, two joint rounds on the digits: every stage runs in one
    process, the export assigns by argmax p, and joint training keeps the clusters at
    least as good as the k-means start (measured: NMI 0.5x -> 0.6x)."""
    from pipeline.methods.base import Embed
    from pipeline.methods.reference import LocalRunner, run_reference

    cfg: Config = resolve(Config, overrides=[
        "method=depict", "cluster.k=10", "data.image_size=16", "train.epochs=2",
        "depict.pretrain_epochs=3", "train.batch_size=64"],
        flags={"data.input": digits_shards, "data.output": str(tmp_path / "run")})
    trained = run_reference(cfg, digits_shards)
    assert trained.arch["kind"] == "depict" and trained.arch["output"] == "probs"
    np.testing.assert_array_equal(trained.centroids, np.eye(10, dtype=np.float32))
    stages = [row["stage"] for row in trained.history]
    assert stages == ["pretrain", "initial-clustering", "joint", "joint"]
    start, end = trained.history[1]["nmi"], trained.history[-1]["nmi"]
    p = LocalRunner(cfg, digits_shards).embed(Embed("p", trained.model_bytes, trained.arch))
    probs = p.arrays["feature"]
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    from pipeline.metrics import nmi

    assert nmi(p.labels, probs.argmax(axis=1)) == pytest.approx(end, abs=1e-6)
    assert end >= start - 0.02 and start > 0.3
