"""The ``online`` method's math and worker (no Ray): loss terms against hand-computed values,
balance weights, drift compensation through a real in-process ``CentroidStore``, and the
round ids a worker pushes when ``sync_every`` > 1."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.kmeans.minibatch import minibatch_update
from pipeline.kmeans.stats import assign
from pipeline.kmeans.store import CentroidStore
from pipeline.methods.base import best_start, start_seed
from pipeline.methods.online import (
    OnlineLossSpec,
    OnlineWorker,
    balance_weights,
    make_optimizer,
    online_loss,
    running_stats_frozen,
)
from tests.test_cluster_job import digits_shards  # noqa: F401  (fixture)

NO_RESEED = 10**9  # reseed_every: no starved-cluster check, so centroids follow the math only


def log1pexp(a: float) -> float:
    """log(1 + e^a): the cross-entropy of two logits whose gap to the true one is ``a``."""
    return math.log1p(math.exp(a))


# ------------------------------------------------------------------------------------------
# balance_weights


def test_balance_weights_are_inverse_cluster_size_with_mean_one():
    labels = torch.tensor([0, 0, 0, 1])  # cluster 0 has 3 members, 1 has 1, 2 is empty
    w = balance_weights(labels, 3, on=True)
    # 1/size = [1/3, 1/3, 1/3, 1], mean 1/2 -> [2/3, 2/3, 2/3, 2]
    torch.testing.assert_close(w, torch.tensor([2 / 3, 2 / 3, 2 / 3, 2.0]))
    assert float(w[:3].sum()) == pytest.approx(float(w[3]))  # each cluster weighs the same
    assert w.dtype == torch.float32


def test_balance_weights_off_are_ones():
    w = balance_weights(torch.tensor([0, 0, 0, 1]), 3, on=False)
    torch.testing.assert_close(w, torch.ones(4))


# ------------------------------------------------------------------------------------------
# online_loss on a tiny 1-d case computed by hand

# f = 0, 1, 3 and centroids 0, 3: squared distances [0, 9], [1, 4], [9, 0]; labels 0, 0, 1;
# cluster sizes 2, 1 -> balance weights [3/4, 3/4, 3/2] (1/size = [1/2, 1/2, 1], mean 2/3).
F_1D = torch.tensor([[0.0], [1.0], [3.0]], dtype=torch.float64)
C_1D = torch.tensor([[0.0], [3.0]], dtype=torch.float64)
W_1D = (0.75, 0.75, 1.5)


def softmax2(a: float, b: float) -> tuple[float, float]:
    m = max(a, b)
    ea, eb = math.exp(a - m), math.exp(b - m)
    return ea / (ea + eb), eb / (ea + eb)


def test_online_loss_terms_match_the_hand_computation():
    spec = OnlineLossSpec(temperature=1.0, compactness_weight=0.1, consistency_weight=1.0,
                          entropy_weight=1.0, balance=True)
    loss, labels, parts = online_loss(F_1D, None, C_1D, spec)
    assert labels.tolist() == [0, 0, 1]
    # per-row CE of logits -d (tau = 1): the true logit leads by 9, 3 and 9
    ce_rows = (log1pexp(-9.0), log1pexp(-3.0), log1pexp(-9.0))
    ce = sum(w * c for w, c in zip(W_1D, ce_rows, strict=True)) / 3
    compact = (0.75 * 0 + 0.75 * 1 + 1.5 * 0) / 3  # distance to the assigned centroid
    p = [softmax2(-0.0, -9.0), softmax2(-1.0, -4.0), softmax2(-9.0, -0.0)]
    mean_p = [sum(row[j] for row in p) / 3 for j in range(2)]
    balance = math.log(2) + sum(m * math.log(m) for m in mean_p)
    assert parts["ce"] == pytest.approx(ce, rel=1e-9)
    assert parts["compact"] == pytest.approx(0.25, rel=1e-12) and compact == 0.25
    assert parts["balance"] == pytest.approx(balance, rel=1e-9)
    assert balance > 0.01  # the marginal (about 0.64 / 0.36) is not uniform: a real penalty
    assert "consistency" not in parts
    expected = ce + 0.1 * 0.25 + 1.0 * balance
    assert float(loss) == pytest.approx(expected, rel=1e-9)
    assert parts["loss"] == pytest.approx(expected, rel=1e-9)


def test_online_loss_without_balance_weights_is_the_plain_mean():
    spec = OnlineLossSpec(temperature=1.0, compactness_weight=0.1, entropy_weight=0.0,
                          balance=False)
    _, _, parts = online_loss(F_1D, None, C_1D, spec)
    assert parts["ce"] == pytest.approx((2 * log1pexp(-9.0) + log1pexp(-3.0)) / 3, rel=1e-9)
    assert parts["compact"] == pytest.approx(1 / 3, rel=1e-12)


def test_online_loss_consistency_uses_the_clean_views_labels():
    # The augmented view of each image lands at 3, 1, 0: images 0 and 2 swap sides, so
    # their augmented logits disagree with the clean assignments 0, 0, 1 by 9.
    f_aug = torch.tensor([[3.0], [1.0], [0.0]], dtype=torch.float64)
    spec = OnlineLossSpec(temperature=1.0, compactness_weight=0.0, consistency_weight=0.5,
                          entropy_weight=0.0, balance=True)
    loss, labels, parts = online_loss(F_1D, f_aug, C_1D, spec)
    assert labels.tolist() == [0, 0, 1]
    rows = (log1pexp(9.0), log1pexp(-3.0), log1pexp(9.0))
    consistency = sum(w * c for w, c in zip(W_1D, rows, strict=True)) / 3
    assert parts["consistency"] == pytest.approx(consistency, rel=1e-9)
    assert float(loss) == pytest.approx(parts["ce"] + 0.5 * consistency, rel=1e-9)


def test_online_loss_temperature_scales_the_logits():
    spec = OnlineLossSpec(temperature=2.0, compactness_weight=0.0, entropy_weight=0.0,
                          balance=False)
    _, _, parts = online_loss(F_1D, None, C_1D, spec)  # leads of 9/2, 3/2, 9/2
    assert parts["ce"] == pytest.approx((2 * log1pexp(-4.5) + log1pexp(-1.5)) / 3, rel=1e-9)


def test_balance_term_is_log_k_when_collapsed_and_zero_when_uniform():
    spec = OnlineLossSpec(temperature=0.01, compactness_weight=0.0, entropy_weight=1.0)
    centroids = torch.tensor([[0.0], [10.0], [20.0]], dtype=torch.float64)
    collapsed = torch.zeros(6, 1, dtype=torch.float64)  # every image at centroid 0
    _, _, parts = online_loss(collapsed, None, centroids, spec)
    assert parts["balance"] == pytest.approx(math.log(3), abs=1e-9)
    uniform = torch.tensor([[0.0], [10.0], [20.0]] * 2, dtype=torch.float64)
    _, _, parts = online_loss(uniform, None, centroids, spec)
    assert parts["balance"] == pytest.approx(0.0, abs=1e-9)


# ------------------------------------------------------------------------------------------
# OnlineWorker against an in-process CentroidStore


class RecordingStore(CentroidStore):
    """The real store, also recording each push's (round id, points)."""

    def __init__(self, centroids: np.ndarray, **kwargs):
        super().__init__(centroids, **kwargs)
        self.rounds: list[tuple[int, int]] = []

    def push(self, sums, counts, drift=None, drift_counts=None, worker=0, step=0,
             samples=None, rows=None):
        self.rounds.append((int(step), int(np.sum(counts))))
        return super().push(sums, counts, drift, drift_counts, worker, step, samples, rows)


def make_worker(model: nn.Module, store: CentroidStore, **kwargs) -> OnlineWorker:
    spec = OnlineLossSpec(temperature=1.0, compactness_weight=0.1, consistency_weight=0.0,
                          entropy_weight=0.0, balance=True)
    return OnlineWorker(model=model, optimizer=make_optimizer(model, "sgd", 0.5, 0.0, 0.0),
                        store=store, loss_spec=spec, augment_spec=None,
                        device=torch.device("cpu"), **kwargs)


def two_groups() -> torch.Tensor:
    """Eight 1×1×2 'images': four near (-2, -2) and four near (2, 2)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 2, generator=g) * 0.3
    x[:4] -= 2
    x[4:] += 2
    return x.reshape(8, 1, 1, 2)


def identity_model() -> nn.Module:
    """Features = the two pixel values (a linear layer fixed at the identity)."""
    layer = nn.Linear(2, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(2))
        layer.bias.zero_()
    return nn.Sequential(nn.Flatten(), layer)


def linear_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(2, 2))


def test_drift_compensation_moves_each_centroid_by_its_held_out_probe_displacement():
    """Step 1 trains on x, which enters the probe; step 2 trains on y. Round 2 then moves
    each centroid, after its mini-batch update with y, by the mean displacement of its x
    images between the weights after step 1 and after step 2: images the optimiser did not
    step on in between. y's own images only get their baseline."""
    x, y = two_groups(), two_groups().flip(0) * 0.9
    model = linear_model()
    with torch.no_grad():
        init = model(x)[[0, 4]].numpy()
    store = CentroidStore(init, reseed_every=NO_RESEED, drift_smoothing=1.0)
    worker = make_worker(model, store, drift_compensation=True, drift_probe=8)
    worker.refresh()
    worker.train_step(x, train_cnn=True)
    with torch.no_grad():
        fx1, fy1 = model(x), model(y)
    expected, w = store.centroids.copy(), store.weights.copy()  # after round 1
    after_round_1 = expected.copy()
    worker.train_step(y, train_cnn=True)
    with torch.no_grad():
        fx2 = model(x)
    labels_y = assign(fy1, torch.from_numpy(expected))[0].numpy()
    sums = np.zeros(expected.shape)
    np.add.at(sums, labels_y, fy1.numpy())
    minibatch_update(expected, w, sums, np.bincount(labels_y, minlength=2))
    # each x image counts for the cluster nearest its step-1 feature among the centroids
    # the worker holds in round 2 (those after round 1): its present cluster
    probe_x = assign(fx1, torch.from_numpy(after_round_1))[0].numpy()
    assert sorted(np.bincount(probe_x, minlength=2)) == [4, 4]
    moved = (fx2 - fx1).numpy()
    assert np.linalg.norm(moved, axis=1).min() > 0.01  # the weights did change
    expected += np.stack([moved[probe_x == j].mean(0) for j in range(2)])
    np.testing.assert_allclose(store.centroids, expected, rtol=0, atol=1e-5)
    assert worker.probe is not None and worker.probe.baseline.sum() == 16


def test_without_drift_compensation_centroids_are_the_old_features_mean():
    x = two_groups()
    model = linear_model()
    with torch.no_grad():
        before = model(x)
    init = before[[0, 4]].numpy()
    store = CentroidStore(init, reseed_every=NO_RESEED)
    worker = make_worker(model, store, drift_compensation=False)
    worker.refresh()
    worker.train_step(x, train_cnn=True)
    with torch.no_grad():
        after = model(x)
    labels, _, _ = assign(before, torch.from_numpy(init))
    assert worker.probe is None
    for j in range(2):
        np.testing.assert_allclose(store.centroids[j], before[labels == j].mean(0).numpy(),
                                   rtol=0, atol=1e-6)
        moved = store.centroids[j] - after[labels == j].mean(0).numpy()
        assert np.linalg.norm(moved) > 0.04  # and not the new features' mean


def test_the_augmented_view_leaves_batchnorm_running_statistics_alone():
    """Running statistics come from clean batches only: they are what the eval-mode
    assignment pass normalises with."""
    from pipeline.data.augment import AugmentSpec

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Flatten(),
                          nn.Linear(4 * 8 * 8, 2))
    x = torch.randn(16, 1, 8, 8)
    clean = nn.Sequential(model[0], nn.BatchNorm2d(4))
    clean[1].load_state_dict(model[1].state_dict())
    store = CentroidStore(np.random.default_rng(0).normal(size=(2, 2)).astype(np.float32),
                          reseed_every=NO_RESEED)
    spec = OnlineLossSpec(temperature=1.0, consistency_weight=1.0, entropy_weight=0.0)
    worker = OnlineWorker(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
                          store=store, loss_spec=spec, augment_spec=AugmentSpec(),
                          device=torch.device("cpu"), drift_compensation=False)
    worker.refresh()
    worker.train_step(x, train_cnn=True)
    clean.train()
    with torch.no_grad():
        clean(x)  # the clean forward alone, with the same (unchanged, lr 0) conv
    torch.testing.assert_close(model[1].running_mean, clean[1].running_mean)
    torch.testing.assert_close(model[1].running_var, clean[1].running_var)
    assert model[1].momentum == 0.1  # restored after the augmented forward


def test_warmup_steps_push_no_drift_even_with_compensation_on():
    x = two_groups()
    store = CentroidStore(x.reshape(8, 2)[[0, 4]].numpy(), reseed_every=NO_RESEED)
    worker = make_worker(identity_model(), store, drift_compensation=True)
    worker.refresh()
    worker.train_step(x, train_cnn=False)  # frozen features: k-means only
    feats = x.reshape(8, 2)
    np.testing.assert_allclose(store.centroids, np.stack([feats[:4].mean(0), feats[4:].mean(0)]),
                               rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------
# Round ids with sync_every > 1


def identity_batches(n_batches: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 1, 1, 2, generator=g) for _ in range(n_batches)]


def test_sync_every_sums_steps_into_consecutive_rounds():
    batches = identity_batches(7, 0)
    init = np.array([[-1.0, -1.0], [1.0, 1.0]], np.float32)
    store = RecordingStore(init, reseed_every=NO_RESEED)
    worker = make_worker(identity_model(), store, sync_every=3, max_staleness=0)
    worker.refresh()
    worker.run_epoch(batches, train_cnn=False)
    # steps 0-2 -> round 0, 3-5 -> round 1, and the epoch's last step flushed as round 2
    assert store.rounds == [(0, 12), (1, 12), (2, 4)]
    assert store.version == 3 and store.next_round == 3 and not store.pending
    assert store.weights.sum() == 28 and worker.step == 7


def test_sync_every_one_pushes_every_step_as_its_own_round():
    store = RecordingStore(np.array([[-1.0, -1.0], [1.0, 1.0]], np.float32),
                           reseed_every=NO_RESEED)
    worker = make_worker(identity_model(), store, sync_every=1, max_staleness=0)
    worker.refresh()
    worker.run_epoch(identity_batches(3, 1), train_cnn=False)
    assert store.rounds == [(0, 4), (1, 4), (2, 4)] and store.version == 3


def test_round_ids_stay_unique_across_epochs_that_end_mid_round():
    """A round id is the worker's count of flushes, so the partial round an epoch end
    pushes never shares its id with the next epoch's first round (protocol v2; with
    ``step // sync_every`` it did: [0, 1, 2, 2, 3, 4])."""
    store = RecordingStore(np.array([[-1.0, -1.0], [1.0, 1.0]], np.float32),
                           reseed_every=NO_RESEED)
    worker = make_worker(identity_model(), store, sync_every=3, max_staleness=0)
    worker.refresh()
    worker.run_epoch(identity_batches(7, 2), train_cnn=False)
    worker.run_epoch(identity_batches(7, 3), train_cnn=False)
    ids = [r for r, _ in store.rounds]
    assert ids == list(range(6)), ids
    assert store.version == 6 and store.weights.sum() == 56 and not store.pending


@pytest.fixture(scope="module")
def reference_run(digits_shards, tmp_path_factory):  # noqa: F811
    """The whole method in one process against the in-process CentroidStore (the server's
    reference): the sampled initial pool, a warm-up epoch, a joint epoch, precise BN, the
    export."""
    from pipeline.config import Config, resolve
    from pipeline.methods.reference import run_reference

    cfg = resolve(Config, None, ["cluster.k=10", "train.epochs=2", "train.warmup_epochs=1",
                                 "train.batch_size=64", "data.image_size=16",
                                 "model.feature_dim=16", "model.width=32"],  # as measured
                  {"data.input": digits_shards,
                   "data.output": str(tmp_path_factory.mktemp("online") / "run")})
    return cfg, run_reference(cfg, digits_shards)


def test_online_runs_in_the_reference_runner(reference_run):
    _, trained = reference_run
    assert trained.centroids.shape == (10, 16)
    assert [row["epoch"] for row in trained.history] == [0, 1]
    warmup, joint = trained.history
    assert warmup["images"] == joint["images"] == 28 * 64  # 28 steps of 64 an epoch
    assert "loss" in joint and "loss" not in warmup  # the warm-up trains no CNN
    # NMI of the training-time assignments; measured 0.22 (k-means on frozen random
    # features) then 0.51 after one joint epoch
    assert warmup["nmi"] > 0.15 and joint["nmi"] > 0.4 and joint["nmi"] > warmup["nmi"]


def test_a_batch_is_assigned_as_in_training_by_the_exported_model(reference_run):
    """Consistent feature spaces: a training step assigns features normalised by its own
    batch's statistics; the assignment pass uses the exported model in eval mode. After
    precise BN (``train.precise_bn_images``) they agree on a fixed batch of the training
    batch size, up to the noise of one batch's statistics. Measured over 16 batches of 64:
    mean 0.95 (lowest 0.89) with precise BN; 0.80 (lowest 0.75) with BatchNorm's running
    averages from training."""
    from pipeline.methods.arch import load_model, model_arch
    from pipeline.methods.reference import _decode_all

    cfg, trained = reference_run
    _, pixels, _ = _decode_all(cfg, cfg.data.input)
    model = load_model(trained.model_bytes, model_arch(cfg), torch.device("cpu"))
    centroids = torch.from_numpy(trained.centroids)
    batches = pixels[torch.randperm(len(pixels), generator=torch.Generator().manual_seed(0))]
    agree = []
    for x in batches[:16 * 64].split(64):
        with torch.no_grad():
            exported = assign(model.eval()(x), centroids)[0]
            with running_stats_frozen(model):
                training = assign(model.train()(x), centroids)[0]
        agree.append(float((exported == training).float().mean()))
    assert min(agree) >= 0.85 and np.mean(agree) >= 0.92, agree


def test_the_second_view_is_simclrs_for_colour_and_the_affine_warp_for_greyscale():
    """``online.augment``: colour inputs get a resized crop, flip, colour jitter and greyscale
    (one crop group at the input's size); digits keep the flip-free affine warp."""
    from pipeline.config import Config, resolve
    from pipeline.data.augment import AugmentSpec, random_view
    from pipeline.data.multicrop import MultiCropSpec
    from pipeline.methods.online import GREY_SHEAR, augment_spec

    grey = augment_spec(resolve(Config))
    assert grey == AugmentSpec(shear=GREY_SHEAR) and not grey.flip and GREY_SHEAR > 0
    cfg = resolve(Config, overrides=["data.channels=3", "data.image_size=32",
                                     "data.mean=[0.5,0.4,0.3]", "data.std=[0.2,0.2,0.2]",
                                     "online.colour_crop_scale=[0.3,0.9]"])
    colour = augment_spec(cfg)
    assert isinstance(colour, MultiCropSpec)
    (group,) = colour.groups
    assert (group.count, group.size, group.scale) == (1, 32, (0.3, 0.9))
    assert colour.flip and colour.mean == (0.5, 0.4, 0.3) and colour.grey_p == 0.2
    x = torch.randn(6, 3, 32, 32)
    views = [random_view(x, colour, torch.Generator().manual_seed(3)) for _ in range(2)]
    assert views[0].shape == x.shape
    torch.testing.assert_close(views[0], views[1])  # a seed gives the same views
    assert not torch.allclose(views[0], x)
    assert augment_spec(resolve(Config, overrides=["online.augment=false"])) is None


def test_the_kept_start_has_the_lowest_last_epoch_loss():
    """``online.starts``: k-means' n_init rule on the joint objective. A start without a
    CNN epoch (no loss) or with a non-finite loss never wins; ties keep the first."""
    def history(*losses: float | None) -> list[dict[str, float]]:
        return [{"epoch": e, **({} if v is None else {"loss": v})} for e, v in enumerate(losses)]

    assert best_start([history(None, 0.9, 0.5), history(None, 0.2, 0.6),
                       history(None, 0.8, 0.4)]) == 2  # the last epoch decides
    assert best_start([history(None, float("nan")), history(None, 3.0)]) == 1
    assert best_start([history(None), history(None, 5.0)]) == 1
    assert best_start([history(None, 0.3), history(None, 0.3)]) == 0


def test_start_seeds_keep_the_run_seed_first_and_differ():
    seeds = [start_seed(7, r) for r in range(4)]
    assert seeds[0] == 7 and len(set(seeds)) == 4
    assert all(0 <= s < 2**32 for s in seeds) and start_seed(8, 1) != seeds[1]


@pytest.fixture(scope="module")
def reference_starts(digits_shards, tmp_path_factory):  # noqa: F811
    """Two starts of two epochs (a warm-up and a joint one), the kept one goes on for a
    third, in one process."""
    from pipeline.config import Config, resolve
    from pipeline.methods.reference import run_reference

    cfg = resolve(Config, None, ["cluster.k=10", "train.epochs=3", "train.warmup_epochs=1",
                                 "online.starts=2", "online.start_epochs=2",
                                 "train.batch_size=64", "data.image_size=16",
                                 "model.feature_dim=16", "model.width=32"],
                  {"data.input": digits_shards,
                   "data.output": str(tmp_path_factory.mktemp("starts") / "run")})
    return cfg, run_reference(cfg, digits_shards)


def test_the_kept_start_goes_on_for_the_rest_of_the_epochs(reference_starts):
    """The history is the kept start's path: its two epochs (warm-up, joint), then the rest
    of ``train.epochs`` from its weights, optimiser and centroids (a joint epoch: the
    warm-up is not repeated). metrics.json gets what each start measured."""
    cfg, trained = reference_starts
    starts = trained.results["starts"]
    kept = trained.results["kept_start"]
    assert [s["seed"] for s in starts] == [cfg.train.seed, start_seed(cfg.train.seed, 1)]
    assert kept == int(np.argmin([s["loss"] for s in starts]))
    assert starts[0]["loss"] != starts[1]["loss"]  # different models and centroids
    assert [row["epoch"] for row in trained.history] == [0, 1, 2]
    assert {row["start"] for row in trained.history} == {kept}
    assert trained.history[1]["loss"] == starts[kept]["loss"]
    assert "loss" not in trained.history[0] and "loss" in trained.history[2]
    # measured: 0.51 after one joint epoch (test above), higher after two
    assert trained.history[2]["nmi"] > 0.45 and trained.centroids.shape == (10, 16)


def test_a_run_no_longer_than_one_start_has_a_single_start():
    """With ``train.epochs`` <= ``online.start_epochs`` there is nothing to go on with: the
    run is a single start (no selection, the stages of ``online.starts=1``)."""
    from pipeline.config import Config, resolve
    from pipeline.methods.online import stages

    cfg = resolve(Config, overrides=["train.epochs=4", "online.start_epochs=5"])
    first = next(stages(cfg))
    assert first.name == "initial-pool"
    cfg = resolve(Config, overrides=["train.epochs=6", "online.start_epochs=5"])
    assert next(stages(cfg)).name == "initial-pool-start0"


def test_a_start_must_train_the_cnn_before_the_starts_are_compared():
    from pipeline.config import Config, ConfigError, resolve

    with pytest.raises(ConfigError, match=r"online.start_epochs: .* > train.warmup_epochs=2"):
        resolve(Config, overrides=["train.warmup_epochs=2", "online.start_epochs=2"])
    with pytest.raises(ConfigError, match=r"online.starts: must be > 0"):
        resolve(Config, overrides=["online.starts=0"])
    resolve(Config, overrides=["train.warmup_epochs=2", "online.start_epochs=2",
                               "online.starts=1"])  # a single start compares nothing


def test_the_starts_share_the_time_budget_and_the_kept_start_gets_what_is_left():
    """``train.time_budget_s`` is the run's: each start gets its epochs' share of every
    planned epoch (3·5 + 20 − 5 = 30 here, so 5/30), the kept start what the starts left."""
    from pipeline.config import Config, resolve
    from pipeline.methods.base import PerId, TrainResult
    from pipeline.methods.online import stages, start_budget

    assert start_budget(0.0, 3, 5, 20) is None
    assert start_budget(300.0, 3, 5, 20) == pytest.approx(50.0)
    cfg = resolve(Config, overrides=["train.time_budget_s=300", "online.starts=2",
                                     "online.start_epochs=2", "train.warmup_epochs=1",
                                     "train.epochs=4", "cluster.k=3", "cluster.init_pool=2"])
    gen, budgets, result = stages(cfg), [], None
    for _ in range(5):  # pool, start, pool, start, the kept start's rest
        stage = gen.send(result)
        if hasattr(stage, "budget_s"):
            budgets.append(stage.budget_s)
            state = {k: v.numpy() for k, v in stage.program.module.state_dict().items()}
            result = TrainResult(state, [{"epoch": 0, "loss": 1.0 + len(budgets)}],
                                 centroids=np.zeros((3, 4), np.float32))
        else:
            feats = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32)
            result = PerId(np.arange(8).astype(str), {"feature": feats})
    assert budgets[:2] == [pytest.approx(300 * 2 / 6)] * 2
    assert 0 < budgets[2] <= 300
