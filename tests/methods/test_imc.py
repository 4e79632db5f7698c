"""IMC-SwAV's math and network (no Ray): Sinkhorn's marginals and its global
normalisations (2 workers × B/2 against 1 × B, the workers as threads of this process with
a summing ``all_reduce``), the MI loss against a hand-computed case and its global
marginal, the swapped prediction, the schedule, the model record, and a run on the digits
through the reference runner whose export assigns every image to its head's argmax."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load as st_load

from pipeline.config import Config, ConfigError, resolve
from pipeline.methods.imc import (
    ImcNet,
    crop_scales,
    crop_sizes,
    crop_spec,
    imc_arch,
    logit_penalty,
    lr_at,
    mi_loss,
    sinkhorn,
    swapped_prediction,
    warmup_updates,
)
from tests.test_cluster_job import digits_shards  # noqa: F401  (fixture)


class Workers:
    """``world`` workers as threads: ``all_reduce`` sums a tensor over them in rank order
    (so every worker gets the same bits), as torch.distributed's does across processes."""

    def __init__(self, world: int):
        self.world, self.slots = world, [torch.zeros(0)] * world
        self.barrier = threading.Barrier(world)

    def all_reduce_of(self, rank: int) -> Callable[[torch.Tensor], torch.Tensor]:
        def all_reduce(x: torch.Tensor) -> torch.Tensor:
            self.slots[rank] = x.detach().clone()
            self.barrier.wait()
            total = self.slots[0].clone()
            for part in self.slots[1:]:
                total = total + part
            self.barrier.wait()
            return total

        return all_reduce

    def run(self, fn: Callable[[int, Callable[[torch.Tensor], torch.Tensor]], Any]) -> list[Any]:
        """fn(rank, all_reduce) on every worker at once; their results in rank order."""
        results: list[Any] = [None] * self.world
        errors: list[BaseException] = []

        def target(rank: int) -> None:
            try:
                results[rank] = fn(rank, self.all_reduce_of(rank))
            except BaseException as exc:  # noqa: BLE001 - re-raised below
                errors.append(exc)
                self.barrier.abort()

        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        if errors:
            raise errors[0]
        return results


def cosine_scores(b: int, k: int, seed: int) -> torch.Tensor:
    """(b, k) scores of unit vectors against unit prototypes, in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    z = torch.nn.functional.normalize(torch.randn(b, 16, generator=g), dim=1)
    c = torch.nn.functional.normalize(torch.randn(k, 16, generator=g), dim=1)
    return z @ c.T


# ------------------------------------------------------------------------------------------
# Sinkhorn.


def test_sinkhorn_rows_are_distributions_and_prototypes_converge_to_equal_shares():
    scores = cosine_scores(64, 12, 0)
    q = sinkhorn(scores, eps=0.05, iters=3)
    assert q.shape == (64, 12) and q.dtype == torch.float32 and q.min() >= 0
    torch.testing.assert_close(q.sum(dim=1), torch.ones(64))  # the last step: per sample
    share = 64 / 12  # each prototype's total over the batch tends to B / k'

    def spread(codes: torch.Tensor) -> float:
        return float((codes.sum(dim=0) - share).abs().max())

    start = torch.softmax(scores / 0.05, dim=1)  # the codes before any prototype step
    assert spread(q) < 0.5 * spread(start)
    torch.testing.assert_close(sinkhorn(scores, 0.05, 200).sum(dim=0),
                               torch.full((12,), share), atol=1e-3, rtol=0)


def test_sinkhorn_batches_of_crops_are_independent():
    scores = torch.stack([cosine_scores(32, 8, 1), cosine_scores(32, 8, 2)])
    both = sinkhorn(scores, 0.05, 3)
    torch.testing.assert_close(both[1], sinkhorn(scores[1], 0.05, 3))


def test_sinkhorn_of_2_workers_with_half_batches_gives_the_codes_of_1_worker():
    """The normalisations are global: each of 2 workers holds B/2 samples of the same crop
    pair; their codes, concatenated, are the single-process codes of all B."""
    scores = torch.stack([cosine_scores(96, 20, 3), cosine_scores(96, 20, 4)])  # (G, B, k')
    single = sinkhorn(scores, 0.05, 3)
    halves = Workers(2).run(lambda rank, all_reduce: sinkhorn(
        scores[:, rank * 48:(rank + 1) * 48], 0.05, 3, all_reduce))
    torch.testing.assert_close(torch.cat(halves, dim=1), single, atol=1e-6, rtol=1e-5)
    local = sinkhorn(scores[:, :48], 0.05, 3)  # without the collective: other codes
    assert not torch.allclose(local, single[:, :48], atol=1e-3)


# ------------------------------------------------------------------------------------------
# The losses.


def test_mi_loss_matches_the_hand_computed_case():
    """softmax(y) rows (0.75, 0.25), (0.25, 0.75); softmax(u) rows (0.8, 0.2), (0.2, 0.8):
    P = pyᵀpu / 2 = [[0.325, 0.175], [0.175, 0.325]], P_u = (0.5, 0.5), so
    H(Y|U) = −Σ P log(P / P_u) = −(0.65 ln 0.65 + 0.35 ln 0.35) = 0.64745; the marginal of
    y is (0.5, 0.5): H(Y) = ln 2."""
    y = torch.log(torch.tensor([[0.75, 0.25], [0.25, 0.75]]))
    u = torch.log(torch.tensor([[0.8, 0.2], [0.2, 0.8]]))
    out = mi_loss([y], [u], weight=4.0)
    conditional = -(0.65 * math.log(0.65) + 0.35 * math.log(0.35))
    assert out["conditional"].item() == pytest.approx(conditional, rel=1e-5)
    assert out["marginal"].item() == pytest.approx(math.log(2), rel=1e-6)
    assert out["loss"].item() == pytest.approx(conditional - 4 * math.log(2), rel=1e-5)


def test_mi_loss_averages_every_pair_of_crops():
    g = torch.Generator().manual_seed(0)
    y = [torch.randn(8, 3, generator=g) for _ in range(3)]
    u = [torch.randn(8, 5, generator=g) for _ in range(3)]
    pairs = [mi_loss([a], [b], 4.0) for a in y for b in u]
    whole = mi_loss(y, u, 4.0)
    for key in ("conditional", "marginal", "loss"):
        assert whole[key].item() == pytest.approx(
            float(np.mean([p[key].item() for p in pairs])), rel=1e-5)


def test_the_marginal_of_2_workers_is_the_single_process_one_with_its_gradient():
    """H(Y) over 2 workers × B/2 equals 1 worker × B, and the gradient of the marginal term
    through a shared head, averaged over the workers as DDP does, is the single-process
    gradient (``world`` scales each worker's local part)."""
    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(64, 6, generator=g), torch.randn(6, 4, generator=g)
    u = torch.randn(64, 9, generator=g)

    def marginal_term(rows: slice, all_reduce: Any, world: int) -> tuple[float, torch.Tensor]:
        head = w.clone().requires_grad_(True)
        out = mi_loss([x[rows] @ head], [u[rows]], 4.0, all_reduce, world)
        (out["loss"] - out["conditional"]).backward()
        assert head.grad is not None
        return out["marginal"].item(), head.grad

    def identity(t: torch.Tensor) -> torch.Tensor:
        return t

    h_single, grad_single = marginal_term(slice(0, 64), identity, 1)
    parts = Workers(2).run(lambda rank, all_reduce: marginal_term(
        slice(rank * 32, (rank + 1) * 32), all_reduce, 2))
    assert [h for h, _ in parts] == pytest.approx([h_single, h_single], rel=1e-6)
    torch.testing.assert_close((parts[0][1] + parts[1][1]) / 2, grad_single)
    alone = marginal_term(slice(0, 32), identity, 1)[0]  # one worker's own marginal differs
    assert alone != pytest.approx(h_single, rel=1e-3)


def test_swapped_prediction_is_the_cross_entropy_of_codes_against_other_crops():
    scores = [torch.tensor([[0.5, -0.5]]), torch.tensor([[0.2, 0.1]]), torch.tensor([[-1.0, 1.0]])]
    codes = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # two global crops' codes
    tau = 0.1

    def ce(q: list[float], s: torch.Tensor) -> float:
        return -float((torch.tensor(q) * torch.log_softmax(s[0] / tau, 0)).sum())

    pairs = [ce([1, 0], scores[1]), ce([1, 0], scores[2]), ce([0, 1], scores[0]),
             ce([0, 1], scores[2])]
    assert swapped_prediction(scores, codes, tau).item() == pytest.approx(np.mean(pairs),
                                                                         rel=1e-6)


def test_logit_penalty_counts_only_the_excess_over_the_bound():
    y = torch.tensor([[6.0, -7.0, 1.0], [0.0, 4.0, -5.0]])
    assert logit_penalty(y, 5.0).item() == pytest.approx((1.0 + 2.0 + 0.0) / 2)


def test_learning_rate_warms_up_then_steps_down():
    imc = resolve(Config, overrides=[  # the reference's schedule
        "method=imc", "imc.lr=0.0005", "imc.decay_at=[0.3, 0.6, 0.8]", "imc.decay_gamma=0.4"]).imc
    assert lr_at(imc, 500, 0, 0, 500) == pytest.approx(5e-4 / 500)
    assert lr_at(imc, 500, 249, 0, 500) == pytest.approx(5e-4 / 2)
    assert lr_at(imc, 500, 10_000, 149, 500) == pytest.approx(5e-4)  # the reference's milestones
    assert lr_at(imc, 500, 10_000, 150, 500) == pytest.approx(5e-4 * 0.4)
    assert lr_at(imc, 500, 10_000, 499, 500) == pytest.approx(5e-4 * 0.4 ** 3)
    assert lr_at(imc, 500, 0, 0, 0) == pytest.approx(5e-4)  # no warm-up


def test_the_default_schedule_anneals_late():
    imc = resolve(Config, overrides=["method=imc"]).imc
    assert lr_at(imc, 15, 10_000, 8, 0) == pytest.approx(2e-3)  # epochs 0-8 at the full lr
    assert lr_at(imc, 15, 10_000, 9, 0) == pytest.approx(2e-3 * 0.3)  # from 60 %
    assert lr_at(imc, 15, 10_000, 12, 0) == pytest.approx(2e-3 * 0.09)  # and 80 %


@pytest.mark.parametrize("setting, epochs, steps, warmup", [
    (None, 500, 195, 500),  # the reference's CIFAR-10 run: its own 500 updates
    (None, 30, 39, 117),  # 30 epochs of 10,000 digits at batch 256: a tenth of 1,170
    (None, 2, 14, 3),  # a tenth, rounded up
    (None, 10, None, 500),  # a runner that does not know its steps: the reference's
    (150, 30, 39, 150),  # an explicit value wins
    (0, 30, 39, 0),
])
def test_the_warm_up_fits_the_run_unless_set(setting, epochs, steps, warmup):
    imc = resolve(Config, overrides=["method=imc", f"imc.warmup_steps={_yaml(setting)}"]).imc
    assert warmup_updates(imc, epochs, steps) == warmup


def _yaml(value: Any) -> str:
    return "null" if value is None else str(value)


# ------------------------------------------------------------------------------------------
# The network and its record.


@pytest.mark.parametrize("size, globals_, locals_", [(32, 28, 18), (28, 24, 16), (16, 14, 9),
                                                     (96, 84, 54)])
def test_crop_sizes_scale_with_the_image(size, globals_, locals_):
    cfg = resolve(Config, overrides=["method=imc", f"data.image_size={size}"])
    assert crop_sizes(cfg) == (globals_, locals_)


@pytest.mark.parametrize("settings, expected", [
    (["data.channels=3"], ((0.2, 1.0), (0.08, 0.4))),  # the reference's, for colour
    (["data.channels=1"], ((0.5, 1.0), (0.2, 0.5))),  # larger boxes for greyscale
    (["data.channels=1", "imc.global_scale=[0.3, 0.9]"], ((0.3, 0.9), (0.2, 0.5))),
    (["data.channels=3", "imc.local_scale=[0.1, 0.2]"], ((0.2, 1.0), (0.1, 0.2))),
])
def test_crop_scales_follow_the_channels_unless_set(settings, expected):
    cfg = resolve(Config, overrides=["method=imc", *settings])
    assert crop_scales(cfg) == expected


@pytest.mark.parametrize(("settings", "expected"), [
    ([], 20.0),  # greyscale: digits are drawn at a slant
    (["data.channels=3", "data.mean=[0.5,0.5,0.5]", "data.std=[0.5,0.5,0.5]"], 0.0),
    (["imc.rotate=5"], 5.0),
    (["data.channels=3", "data.mean=[0.5,0.5,0.5]", "data.std=[0.5,0.5,0.5]",
      "imc.rotate=10"], 10.0),
])
def test_crop_rotation_follows_the_channels_unless_set(settings, expected):
    assert crop_spec(resolve(Config, overrides=["method=imc", *settings])).rotate == expected


def test_a_rotation_out_of_range_is_refused():
    with pytest.raises(ConfigError, match="imc.rotate"):
        resolve(Config, overrides=["method=imc", "imc.rotate=-1"])


def test_resnet_gets_the_small_image_stem():
    cfg = resolve(Config, overrides=["method=imc", "model.backbone=resnet18", "data.channels=3",
                                     "data.image_size=32", "imc.prototypes=50"])
    net = ImcNet(imc_arch(cfg))
    conv1 = net.trunk.conv1
    assert (conv1.kernel_size, conv1.stride) == ((3, 3), (1, 1))
    assert isinstance(net.trunk.maxpool, torch.nn.Identity)
    net.eval()
    with torch.no_grad():
        u, y = net.views(torch.randn(2, 3, 28, 28))
        assert u.shape == (2, 50) and y.shape == (2, 10) and net(torch.randn(2, 3, 32, 32)
                                                                 ).shape == (2, 10)
    big = imc_arch(resolve(Config, overrides=["method=imc", "model.backbone=resnet18",
                                              "data.image_size=224"]))
    assert not big["small_stem"] and big["stem_pool"]


# ------------------------------------------------------------------------------------------
# A run through the reference runner, and the export.


def test_imc_runs_in_the_reference_runner_and_exports_the_head_argmax(
        digits_shards, tmp_path):  # noqa: F811
    """Two epochs on the digits at 16 px: every stage runs in one process; on every image
    the nearest one-hot centroid to the exported model's output is the argmax of the head's
    logits, computed here from the network's parts; and the clusters carry digit identity."""
    from pipeline.kmeans.stats import assign
    from pipeline.methods.base import Embed, drive
    from pipeline.methods.imc import stages
    from pipeline.methods.reference import LocalRunner
    from pipeline.metrics import nmi
    from pipeline.models.weights import save_bytes

    cfg: Config = resolve(Config, overrides=[
        "method=imc", "cluster.k=10", "data.image_size=16", "train.epochs=2",
        "train.batch_size=128", "model.width=16", "imc.prototypes=100", "imc.head_hidden=128",
        "imc.warmup_steps=5"], flags={"data.input": digits_shards,
                                       "data.output": str(tmp_path / "run")})
    runner = LocalRunner(cfg, digits_shards)  # run_reference's runner, decoded once here
    trained = drive(stages(cfg), runner)
    assert trained.arch["kind"] == "imc" and trained.arch["feature_dim"] == 10
    np.testing.assert_array_equal(trained.centroids, np.eye(10, dtype=np.float32))
    assert [row["stage"] for row in trained.history] == ["train", "train", "calibration"]
    assert trained.history[0]["swav"] > trained.history[1]["swav"]  # the encoder learns

    probs = runner.embed(Embed("p", trained.model_bytes, trained.arch))
    labels, _, _ = assign(torch.from_numpy(probs.arrays["feature"]), torch.eye(10))
    net = ImcNet({**trained.arch, "output": "hidden"})
    net.load_state_dict(st_load(trained.model_bytes))
    hidden = runner.embed(Embed("z", save_bytes(net), imc_arch(cfg, "hidden")))
    logits = torch.from_numpy(hidden.arrays["feature"]) @ net.last.weight.detach().T \
        + net.last.bias.detach()
    assert len(labels) == 1797
    assert torch.equal(labels, logits.argmax(dim=1))
    assert nmi(probs.labels, labels.numpy()) > 0.06  # measured 0.12 (2 short epochs)
