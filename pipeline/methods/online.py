"""``online``: joint CNN and mini-batch k-means with feature drift compensation.

Hsu & Lin, "CNN-Based Joint Clustering and Representation Learning with Feature Drift
Compensation for Large-Scale Image Data", IEEE TMM 2017 (arXiv:1705.07091).

Per step, on a worker:

1. ``f = model(x)`` for the clean batch x (n, C, H, W) -> f (n, d); assign each row to the
   nearest of the current centroids C (k, d); the assignments are the pseudo-labels.
2. Loss (DESIGN §5.1): inverse-cluster-size weighted cross-entropy of the logits
   ``-||f - c||² / τ`` against the assignments, a compactness term (distance to the assigned
   centroid), augmentation consistency (an augmented view must get the same assignment) and a
   marginal-entropy balance term, ``log k - H(mean softmax)``, that guards against collapse.
3. Backward and optimiser step. The augmented view's forward leaves BatchNorm's running
   statistics alone, so they describe clean images, as the eval-mode assignment pass sees
   them.
4. Every ``cluster.sync_every`` steps (a round), push per-cluster sums/counts of f to the
   centroid store, which applies the mini-batch update. With drift compensation, the batch's
   images are offered to a held-out per-cluster probe (:mod:`pipeline.kmeans.drift`), and
   each round a chunk of the probe is re-embedded (train mode, as f): the per-cluster mean
   displacement since its last embedding goes with the push, and the store shifts those
   centroids by it.

Everything here is plain PyTorch against the :class:`CentroidClient` protocol: the in-process
``CentroidStore`` and the Ray centroid server both satisfy it. No Ray imports. The method is
written as stages (:func:`stages`): features of a uniform sample under the initial model
seed the centroids, then one train stage of :class:`OnlineProgram` with the centroid server,
then precise BatchNorm statistics for the exported model (``train.precise_bn_images``), so
the eval-mode assignment pass normalises features as the training steps did.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.data.augment import AugmentSpec, View, colour_view, random_view
from pipeline.kmeans.drift import DriftProbe, toward_centroid
from pipeline.kmeans.stats import assign, partial_stats
from pipeline.kmeans.store import Delta
from pipeline.methods.base import (
    Context,
    Embed,
    Hooks,
    Stages,
    Train,
    TrainResult,
    best_start,
    start_seed,
    starts_report,
)
from pipeline.metrics import acc, nmi
from pipeline.models.layers import batchnorms, has_batchnorm

if TYPE_CHECKING:
    from pipeline.config import Config

log = logging.getLogger(__name__)


class CentroidClient(Protocol):
    """The centroid-server protocol (DESIGN §4)."""

    def push(self, sums: np.ndarray, counts: np.ndarray, drift: np.ndarray | None = None,
             drift_counts: np.ndarray | None = None, worker: int = 0, step: int = 0,
             samples: np.ndarray | None = None) -> Any: ...

    def pull(self, since_version: int = -1) -> tuple[int, np.ndarray] | None: ...

    def sync(self, since_version: int = -1, incarnation: str | None = None,
             until_round: int = -1, timeout_s: float = 10.0) -> Delta: ...

    def drain(self) -> None: ...


@dataclass(frozen=True)
class OnlineLossSpec:
    """Loss weights; see :class:`pipeline.config.OnlineConfig` for the reasons."""

    temperature: float = 0.1
    compactness_weight: float = 0.1
    consistency_weight: float = 1.0
    entropy_weight: float = 1.0
    balance: bool = True


def sq_distances(f: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """f (n, d), c (k, d) -> squared euclidean distances (n, k), differentiable in f."""
    return (f.pow(2).sum(1, keepdim=True) - 2 * f @ c.T + c.pow(2).sum(1)).clamp_min(0)


def balance_weights(labels: torch.Tensor, k: int, on: bool) -> torch.Tensor:
    """Per-sample weights ∝ 1 / (batch size of its cluster), mean 1 (collapse guard)."""
    if not on:
        return torch.ones_like(labels, dtype=torch.float32)
    counts = torch.bincount(labels, minlength=k).float()
    w = 1.0 / counts[labels]
    return w / w.mean()


def online_loss(f: torch.Tensor, f_aug: torch.Tensor | None, centroids: torch.Tensor,
                spec: OnlineLossSpec) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """Loss of one step. f, f_aug (n, d); centroids (k, d) -> (loss, labels (n,), parts)."""
    k = centroids.shape[0]
    d = sq_distances(f, centroids)
    labels = d.detach().argmin(1)
    w = balance_weights(labels, k, spec.balance)
    logits = -d / spec.temperature
    ce = (w * F.cross_entropy(logits, labels, reduction="none")).mean()
    compact = (w * d.gather(1, labels[:, None])[:, 0]).mean()
    mean_p = logits.softmax(1).mean(0)
    balance = math.log(k) + (mean_p * mean_p.clamp_min(1e-12).log()).sum()
    loss = ce + spec.compactness_weight * compact + spec.entropy_weight * balance
    parts = {"ce": ce.item(), "compact": compact.item(), "balance": balance.item()}
    if f_aug is not None and spec.consistency_weight > 0:
        logits_aug = -sq_distances(f_aug, centroids) / spec.temperature
        consistency = (w * F.cross_entropy(logits_aug, labels, reduction="none")).mean()
        loss = loss + spec.consistency_weight * consistency
        parts["consistency"] = consistency.item()
    parts["loss"] = loss.item()
    return loss, labels, parts


@contextlib.contextmanager
def running_stats_frozen(model: nn.Module) -> Iterator[None]:
    """BatchNorm layers still normalise with the batch's statistics (train mode), but their
    running statistics stay as they are (momentum 0) inside this block."""
    norms = batchnorms(model)
    saved = [m.momentum for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in zip(norms, saved, strict=True):
            m.momentum = momentum


@dataclass
class StepStats:
    """Summable statistics of one or more steps, ready to push to the centroid store."""

    sums: torch.Tensor  # (k, d) float32
    counts: torch.Tensor  # (k,) int64
    drift: torch.Tensor  # (k, d) float32
    drift_counts: torch.Tensor  # (k,) int64
    samples: torch.Tensor  # (m, d) recent features for the reservoir
    sqdist_sum: float = 0.0
    n: int = 0
    labels: torch.Tensor | None = None  # (n,) assignments of the latest step (not summed)

    def add(self, other: StepStats) -> None:
        self.sums += other.sums
        self.counts += other.counts
        self.drift += other.drift
        self.drift_counts += other.drift_counts
        self.samples = other.samples
        self.sqdist_sum += other.sqdist_sum
        self.n += other.n


def kmeans_stats(f: torch.Tensor, centroids: torch.Tensor, n_samples: int = 32) -> StepStats:
    """Assign f (n, d) to centroids (k, d) and collect sums and counts (no drift: that is
    measured on the probe, once a round)."""
    k = centroids.shape[0]
    labels, sqdist, _ = assign(f, centroids)
    sums, counts = partial_stats(f, labels, k)
    return StepStats(sums, counts, torch.zeros_like(sums), torch.zeros_like(counts),
                     f[:n_samples].detach().clone(), float(sqdist.sum()), int(f.shape[0]),
                     labels)


@dataclass
class OnlineWorker:
    """One worker's training state: model, optimiser, local copy of the centroids.

    ``train_cnn=False`` runs mini-batch k-means on frozen features (the warm-up epochs).
    With ``drift_compensation``, ``drift_probe`` images per cluster are held out for the
    drift (:class:`~pipeline.kmeans.drift.DriftProbe`) and ``drift_chunk`` of them are
    re-embedded per round.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    store: CentroidClient
    loss_spec: OnlineLossSpec
    augment_spec: View | None
    device: torch.device
    drift_compensation: bool = True
    drift_probe: int = 4
    drift_chunk: int = 64
    probe_seed: int = 0
    sync_every: int = 1
    max_staleness: int = 1
    worker: int = 0
    step: int = 0  # global step counter (all epochs)
    round: int = 0  # id of the round being accumulated: the number of flushes so far
    version: int = -1
    incarnation: str | None = None  # of the store the local copy came from
    centroids: torch.Tensor | None = None
    pending: StepStats | None = None
    stall_timeout_s: float = 10.0
    history: list[dict[str, float]] = field(default_factory=list)
    last_labels: torch.Tensor | None = None  # cluster of each image of the latest step
    probe: DriftProbe | None = None  # created at the first CNN step when compensating
    drift_alignment: list[float] = field(default_factory=list)  # toward_centroid per round

    def refresh(self, until_round: int = -1) -> None:
        """Bring the local centroids up to date; wait until the store has applied every
        round below ``until_round`` (bounded staleness, ``max_staleness`` rounds, as in
        stale-synchronous parameter servers).

        The wait is the server's (a blocking call, no polling) and ends early when the store
        is a new incarnation (it restarted and lost rounds that will never come: the worker
        goes on from its state), or after ``stall_timeout_s``.
        """
        got = self.store.sync(self.version, self.incarnation, until_round,
                              self.stall_timeout_s)
        if self.incarnation is not None and got.incarnation != self.incarnation:
            log.info("worker %d: new centroid-server incarnation at version %d, round %d: "
                     "full copy", self.worker, got.version, got.next_round)
        self._take(got)

    def _take(self, got: Delta) -> None:
        """Install a delta: the full (k, d) copy, or the changed rows (m, d) patched in."""
        rows = torch.from_numpy(np.array(got.centroids, np.float32)).to(self.device)
        if got.rows is None:
            self.centroids = rows
        elif len(got.rows):
            assert self.centroids is not None
            self.centroids[torch.as_tensor(np.array(got.rows, np.int64),
                                           device=self.device)] = rows
        self.version, self.incarnation = got.version, got.incarnation

    def train_step(self, x: torch.Tensor, train_cnn: bool) -> dict[str, float]:
        """One step on a clean batch x (n, C, H, W); returns loss parts."""
        self.refresh(self.round - self.max_staleness)
        assert self.centroids is not None
        if train_cnn:
            stats, parts = self._cnn_step(x)
        else:
            with torch.no_grad():
                f = self.model(x)
            stats, parts = kmeans_stats(f, self.centroids), {}
        self.last_labels = stats.labels
        self._accumulate(stats)
        parts["sqdist"] = stats.sqdist_sum / max(1, stats.n)
        self.step += 1
        return parts

    def _cnn_step(self, x: torch.Tensor) -> tuple[StepStats, dict[str, float]]:
        assert self.centroids is not None
        self.model.train()
        f = self.model(x)
        f_aug = None
        if self.augment_spec is not None and self.loss_spec.consistency_weight > 0:
            with running_stats_frozen(self.model):
                f_aug = self.model(random_view(x, self.augment_spec))
        loss, _, parts = online_loss(f, f_aug, self.centroids, self.loss_spec)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        stats = kmeans_stats(f.detach(), self.centroids)
        if self.drift_compensation:
            self._offer(x, stats.labels)
        return stats, parts

    def _offer(self, x: torch.Tensor, labels: torch.Tensor | None) -> None:
        """The batch's images, with their clusters, for the drift probe (taken after the step
        that optimised on them: their baseline is set at the next measurement)."""
        assert self.centroids is not None and labels is not None
        if self.probe is None:
            k, d = self.centroids.shape
            self.probe = DriftProbe(k, self.drift_probe, tuple(x.shape[1:]), d,
                                    self.probe_seed)
        self.probe.offer(x.detach().cpu().numpy(), labels.cpu().numpy())

    def _measure_drift(self, stats: StepStats) -> None:
        """Re-embed the next probe chunk and put its per-cluster displacement since its last
        embedding into ``stats`` (drift sums (k, d), counts (k,)).

        In the space the centroids' features come from: train mode, normalised with the
        chunk's own batch statistics (BatchNorm's running statistics untouched). Measured
        in eval mode instead, the displacement also carried the running statistics chasing
        the weights, a shift that batch statistics normalise away, and compensation hurt
        (MNIST, seed 0: NMI 0.24 against 0.69 off after 5 epochs)."""
        if self.probe is None or not len(self.probe):
            return
        slots = self.probe.next_chunk(self.drift_chunk)
        self.model.train()
        with torch.no_grad(), running_stats_frozen(self.model):
            f = self.model(torch.from_numpy(self.probe.items[slots]).to(self.device))
        new, old = f.float().cpu().numpy(), self.probe.features[slots].copy()
        had = self.probe.baseline[slots].copy()
        centroids = None if self.centroids is None else self.centroids.cpu().numpy()
        if had.any() and centroids is not None:
            mine = centroids[self.probe.clusters_of(slots[had], centroids)]
            self.drift_alignment.append(toward_centroid(old[had], new[had], mine))
        sums, counts = self.probe.measure(slots, new, centroids)
        stats.drift = torch.from_numpy(sums.astype(np.float32)).to(stats.sums.device)
        stats.drift_counts = torch.from_numpy(counts).to(stats.counts.device)

    def _accumulate(self, stats: StepStats) -> None:
        if self.pending is None:
            self.pending = stats
        else:
            self.pending.add(stats)
        if self.step % self.sync_every == self.sync_every - 1:
            self.flush()

    def flush(self) -> None:
        """Push the accumulated statistics as round ``self.round`` (asynchronous for remote
        stores) and start the next. Every worker flushes at the same steps (each
        ``sync_every`` steps, before each checkpoint, at each epoch end), so round ids agree
        across workers whatever ``sync_every`` is."""
        if self.pending is None:
            return
        p, self.pending = self.pending, None
        if self.drift_compensation:
            self._measure_drift(p)
        self.store.push(p.sums.cpu().numpy(), p.counts.cpu().numpy(), p.drift.cpu().numpy(),
                        p.drift_counts.cpu().numpy(), self.worker, self.round,
                        p.samples.cpu().numpy())
        self.round += 1

    def run_epoch(self, batches: Iterable[torch.Tensor | tuple[torch.Tensor, np.ndarray]],
                  train_cnn: bool, skip: int = 0,
                  on_step: Callable[[int], None] | None = None) -> dict[str, float]:
        """Train over ``batches``; mean loss parts of the epoch.

        A batch is float (n, C, H, W), or ``(x, truth)`` with ground-truth labels (n,); then
        the epoch also reports the NMI and ACC of the training-time assignments.
        ``skip`` batches are consumed without training (resuming inside an epoch);
        ``on_step(batch_index)`` runs after every trained step (checkpoint hooks).
        """
        totals: dict[str, float] = {"images": 0.0}
        truth: list[np.ndarray] = []
        pred: list[np.ndarray] = []
        n, start = 0, time.perf_counter()
        for i, item in enumerate(batches):
            if i < skip:
                continue
            x, y = item if isinstance(item, tuple) else (item, None)
            parts = self.train_step(x.to(self.device, non_blocking=True), train_cnn)
            for key, value in parts.items():
                totals[key] = totals.get(key, 0.0) + value
            totals["images"] += x.shape[0]
            if y is not None and self.last_labels is not None:
                truth.append(np.asarray(y))
                pred.append(self.last_labels.cpu().numpy())
            n += 1
            if on_step is not None:
                on_step(i)
        self.flush()
        out = {key: value / max(1, n) for key, value in totals.items() if key != "images"}
        out["images"] = totals["images"]
        out["images_per_s"] = totals["images"] / max(1e-9, time.perf_counter() - start)
        if truth:
            y_true, y_pred = np.concatenate(truth).astype(str), np.concatenate(pred)
            out["nmi"], out["acc"] = nmi(y_true, y_pred), acc(y_true, y_pred)
        return out


def initial_centroids(model: nn.Module, images: torch.Tensor) -> np.ndarray:
    """Features of k random images (k, C, H, W) -> initial centroids (k, d) float32."""
    model.train()  # batch statistics: a fresh model's running BN stats are meaningless
    with torch.no_grad():
        return model(images).float().cpu().numpy()


def make_optimizer(model: nn.Module, name: str, lr: float, momentum: float,
                   weight_decay: float) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


# ------------------------------------------------------------------------------------------
# The method as stages.


def loss_spec(cfg: Config) -> OnlineLossSpec:
    o = cfg.online
    return OnlineLossSpec(o.temperature, o.compactness_weight, o.consistency_weight,
                          o.entropy_weight, o.balance)


# The greyscale view's slant: a horizontal shear uniform in ±0.3 (±17°), as torchvision's
# RandomAffine(shear=...): the low runs crossed pairs of digits by slant. README, "online
# with a slanted second view".
GREY_SHEAR = 0.3


def augment_spec(cfg: Config) -> View | None:
    """The consistency term's second view (``online.augment``): SimCLR's crop, flip and
    colour jitter for colour inputs, the affine warp for greyscale ones."""
    if not cfg.online.augment:
        return None
    if cfg.data.channels == 3:
        lo, hi = cfg.online.colour_crop_scale
        return colour_view(cfg.data.image_size, tuple(cfg.data.mean), tuple(cfg.data.std),
                           (lo, hi))
    return AugmentSpec(shear=GREY_SHEAR)


class OnlineState(nn.Module):
    """What a checkpoint keeps of :class:`OnlineProgram`: the CNN and the global step."""

    def __init__(self, cnn: nn.Module):
        super().__init__()
        self.cnn = cnn
        self.step: torch.Tensor
        self.round: torch.Tensor
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        self.register_buffer("round", torch.zeros((), dtype=torch.int64))


class OnlineProgram(Hooks):
    """The train stage of ``online``: :class:`OnlineWorker` steps against ``ctx.centroids``;
    the first ``train.warmup_epochs`` run k-means on the frozen initial features. An epoch's
    row: mean loss parts, ``images``, and with labels the NMI/ACC of the training-time
    assignments."""

    def __init__(self, cfg: Config, cnn: nn.Module, first_epoch: int = 0,
                 optimizers: list[dict[str, Any]] | None = None):
        self.cfg, self.state = cfg, OnlineState(cnn)
        self.module: nn.Module = self.state
        # A stage that goes on from an earlier one (a kept start): the run's epoch of this
        # stage's epoch 0 (for the warm-up), and the optimiser state to start from.
        self.first_epoch, self.optimizers = first_epoch, optimizers
        self.epoch = first_epoch
        self._reset()

    def _reset(self) -> None:
        self.totals: dict[str, float] = {}
        self.steps, self.images = 0, 0
        self.truth: list[np.ndarray] = []
        self.pred: list[np.ndarray] = []

    def setup(self, ctx: Context) -> list[torch.optim.Optimizer]:
        from pipeline.kmeans.drift import probe_size

        cfg, t = self.cfg, self.cfg.train
        self.state.to(ctx.device)
        model = ctx.wrap(self.state.cnn)
        optimizer = make_optimizer(model, t.optimizer, t.lr, t.momentum, t.weight_decay)
        if self.optimizers:  # a checkpoint's state, when resuming, is loaded over this one
            optimizer.load_state_dict(self.optimizers[0])
        self.worker = OnlineWorker(
            model=model, optimizer=optimizer, store=ctx.centroids, loss_spec=loss_spec(cfg),
            augment_spec=augment_spec(cfg), device=ctx.device,
            drift_compensation=cfg.cluster.drift_compensation,
            drift_probe=probe_size(cfg.cluster.k, cfg.cluster.drift_probe,
                                   cfg.cluster.drift_probe_max),
            drift_chunk=cfg.cluster.drift_chunk, probe_seed=cfg.train.seed + 7919 * ctx.rank,
            sync_every=cfg.cluster.sync_every,
            max_staleness=0 if cfg.train.deterministic else cfg.cluster.max_staleness,
            worker=ctx.rank)
        return [optimizer]

    def start(self, epoch: int, ctx: Context) -> None:
        """After a (re)start: the step and round from the checkpoint, the server's centroids."""
        w = self.worker
        self.epoch = self.first_epoch + epoch
        w.step, w.round = int(self.state.step), int(self.state.round)
        w.refresh()

    def step(self, batch: dict[str, Any], ctx: Context) -> dict[str, float]:
        x = batch["pixels"]
        parts = self.worker.train_step(x, train_cnn=self.epoch >= self.cfg.train.warmup_epochs)
        self.state.step.fill_(self.worker.step)
        self.state.round.fill_(self.worker.round)
        for key, value in parts.items():
            self.totals[key] = self.totals.get(key, 0.0) + value
        self.steps, self.images = self.steps + 1, self.images + len(x)
        if "label" in batch and self.worker.last_labels is not None:
            self.truth.append(np.asarray(batch["label"]).astype(str))
            self.pred.append(self.worker.last_labels.cpu().numpy())
        return parts

    def before_checkpoint(self, ctx: Context) -> None:
        self._flush()

    def _flush(self) -> None:
        self.worker.flush()
        self.state.round.fill_(self.worker.round)

    def end_epoch(self, epoch: int, ctx: Context) -> dict[str, float]:
        self._flush()
        out = {key: value / max(1, self.steps) for key, value in self.totals.items()}
        if self.worker.drift_alignment:  # how much of the measured drift is the loss's pull
            out["drift_toward_centroid"] = float(np.mean(self.worker.drift_alignment))
            self.worker.drift_alignment.clear()
        out["images"] = float(self.images)
        if self.truth:
            y_true, y_pred = np.concatenate(self.truth), np.concatenate(self.pred)
            out["nmi"], out["acc"] = nmi(y_true, y_pred), acc(y_true, y_pred)
        self._reset()
        self.epoch = self.first_epoch + epoch + 1
        return out


def seeded_start(cfg: Config, name: str) -> Stages:
    """The seeded initial model of ``cfg`` (``train.seed``), and its k centroids seeded from
    the features of a uniform sample (``cluster.init_pool`` per cluster) with batch
    statistics (DESIGN §4). -> (cnn, centroids (k, d))."""
    from pipeline.kmeans.init import pool_size, seed_centroids
    from pipeline.methods.arch import initial_model, model_arch
    from pipeline.models.weights import save_bytes

    c = cfg.cluster
    cnn = initial_model(cfg)
    pool = yield Embed(name, save_bytes(cnn), model_arch(cfg), batch_stats=True,
                       sample=pool_size(c.k, c.init_pool, c.init_pool_max))
    features = pool.arrays["feature"]
    if len(features) < c.k:
        raise ValueError(f"cluster.k={c.k} is larger than the number of decodable images "
                         f"({len(features)})")
    return cnn, seed_centroids(features, c.k, cfg.train.seed, c.init)


def trained_starts(cfg: Config) -> Stages:
    """``online.starts`` independent starts of ``online.start_epochs`` epochs each, start r
    with ``train.seed`` :func:`start_seed` (its own initial model and centroids; the data
    order and augmentations are the run's); the :func:`best_start` one goes on for the rest
    of ``train.epochs``, with its optimiser state and centroids. A single start trains
    ``train.epochs`` at once, and so does a run no longer than one start's epochs (there is
    nothing to go on with). ``train.time_budget_s`` is the whole run's: each start gets
    :func:`start_budget` of it, the kept start what the starts left. -> (cnn, TrainResult
    of the kept path, what the starts measured: a dict for metrics.json, empty for a single
    start)."""
    from dataclasses import replace

    epochs, starts, first = cfg.train.epochs, cfg.online.starts, cfg.online.start_epochs
    if starts == 1 or epochs <= first:
        cnn, init = yield from seeded_start(cfg, "initial-pool")
        result = yield Train("online", epochs, OnlineProgram(cfg, cnn), centroids=init)
        return cnn, result, {}
    tried, began = [], time.monotonic()
    budget = cfg.train.time_budget_s
    for r in range(starts):
        cfg_r = replace(cfg, train=replace(cfg.train, seed=start_seed(cfg.train.seed, r)))
        cnn, init = yield from seeded_start(cfg_r, f"initial-pool-start{r}")
        result = yield Train(f"online-start{r}", first, OnlineProgram(cfg_r, cnn),
                             centroids=init, shown_as=f"start {r + 1}/{starts} epoch",
                             budget_s=start_budget(budget, starts, first, epochs))
        tried.append((cfg_r, cnn, result))
    chosen = best_start([result.history for _, _, result in tried])
    report = starts_report([(c.train.seed, r.history[-1]) for c, _, r in tried], chosen)
    log.info("online: start %d of %d kept: %s", chosen, starts, report["starts"])
    cfg_r, cnn, result = tried[chosen]
    load_cnn(cnn, result)
    program = OnlineProgram(cfg_r, cnn, first_epoch=first, optimizers=result.optimizers)
    left = max(budget - (time.monotonic() - began), 1e-3) if budget else None
    rest = yield Train("online", epochs - first, program, centroids=result.centroids,
                       first_epoch=first, of_epochs=epochs, budget_s=left)
    history = [*({**row, "start": chosen} for row in result.history),
               *({**row, "epoch": row["epoch"] + first, "start": chosen} for row in rest.history)]
    return cnn, replace(rest, history=history), report


def start_budget(budget_s: float, starts: int, start_epochs: int, epochs: int
                 ) -> float | None:
    """One start's share of a run's ``train.time_budget_s`` (None: no budget): the share of
    its epochs in every epoch the run plans, ``starts``·``start_epochs`` + the kept start's
    ``epochs`` − ``start_epochs``."""
    if not budget_s:
        return None
    return budget_s * start_epochs / (starts * start_epochs + epochs - start_epochs)


def load_cnn(cnn: nn.Module, result: TrainResult) -> None:
    """The CNN weights of an :class:`OnlineState` train result into ``cnn``."""
    cnn.load_state_dict({key[len("cnn."):]: torch.from_numpy(v)
                         for key, v in result.state.items() if key.startswith("cnn.")})


def stages(cfg: Config) -> Stages:
    """The starts of :func:`trained_starts` (each: the seeded initial model, centroids from
    its features, ``train.epochs`` or ``online.start_epochs`` of :class:`OnlineProgram` with
    the centroid server); then, for a model with BatchNorm, its running statistics
    recomputed over ``train.precise_bn_images`` images in training-size batches (an
    ``Embed`` with ``precise_bn``): the centroids are means of batch-normalised features,
    and the exported model's eval mode then matches."""
    from pipeline.methods.arch import model_arch
    from pipeline.models.weights import save_bytes
    from pipeline.outputs import TrainedModel

    cnn, result, starts = yield from trained_starts(cfg)
    load_cnn(cnn, result)
    assert result.centroids is not None
    model = save_bytes(cnn)
    if cfg.train.precise_bn_images and has_batchnorm(cnn):
        # The feature space of the centroids: each training step normalises with its own
        # batch statistics; the eval-mode assignment pass then normalises the same way.
        calibrated = yield Embed("precise-bn", model, model_arch(cfg),
                                 sample=cfg.train.precise_bn_images,
                                 precise_bn=cfg.train.batch_size // cfg.scale.workers)
        model = calibrated.extra["model"].tobytes()
    return TrainedModel(model, model_arch(cfg), result.centroids, result.history, starts)
