"""``deepcluster``: Caron, Bojanowski, Joulin & Douze, "Deep Clustering for Unsupervised
Learning of Visual Features", ECCV 2018 (DESIGN §5.2).

Every epoch alternates two steps:

1. **Cluster.** Embed every image with the current CNN; PCA-reduce the features with
   whitening, L2-normalise them (:class:`Whitening`), and run k-means
   (:func:`~pipeline.kmeans.shards.kmeans_features`: Lloyd over feature shards, or
   ``faiss.Kmeans`` on one node). Empty clusters are split off a donor
   (:func:`pipeline.kmeans.minibatch.split_empty`) and, should identical points still leave
   one empty, :func:`~pipeline.kmeans.shards.fill_empty` hands it half of the largest
   cluster: no cluster is empty.
2. **Train.** The cluster ids are pseudo-labels. A fresh linear head (feature → k) is
   created (:func:`new_head`) and the CNN plus head are trained with cross-entropy, each
   sample weighted by the inverse size of its cluster (:func:`class_weights`), which in
   expectation equals the paper's uniform sampling over clusters.

Optional Sobel input (:class:`~pipeline.models.layers.Sobel`): fixed greyscale then horizontal and vertical Sobel
filters, which the paper uses to stop the CNN from clustering by colour.

The method is written as stages (:func:`stages`, :mod:`pipeline.methods.base`): per epoch an
:class:`~pipeline.methods.base.Embed` whose ``reduce`` is the clustering
(:func:`clustering`), then a one-epoch :class:`~pipeline.methods.base.Train` of
:class:`PseudoLabels`; after the last epoch one more clustering, whose whitening is folded
into the saved model (:func:`export`), so centroids, ``jobs/assign.py`` and the report all
live in the same space. Everything here is plain numpy/PyTorch: no Ray. The shared stage
runners execute it (one long-lived Ray Train run for every epoch on Ray).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.kmeans.shards import kmeans_features
from pipeline.methods.base import Context, Embed, Hooks, PerId, Scatter, Stages, Train

if TYPE_CHECKING:
    from pipeline.config import Config
    from pipeline.outputs import TrainedModel

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------
# Input and model pieces.


def adapt_arch(cfg: Any, arch: dict[str, Any]) -> dict[str, Any]:
    """Raw (unnormalised) features, optionally behind Sobel filters: PCA-whitening and L2
    come after training (:func:`whitened_arch`)."""
    return {**arch, "normalize": False, "sobel": cfg.deepcluster.sobel}


def whitened_arch(arch: dict[str, Any], pca_dim: int) -> dict[str, Any]:
    """The finished model's record: the embedder, then a whitening to ``pca_dim``."""
    return {**arch, "kind": "whitened_embedder", "whiten_from": arch["feature_dim"],
            "feature_dim": pca_dim}


def new_head(feature_dim: int, k: int, seed: int) -> nn.Linear:
    """The epoch's fresh classifier (feature_dim -> k): N(0, 0.01) weights, zero bias, as in
    the reference implementation's ``top_layer`` re-initialisation."""
    gen = torch.Generator().manual_seed(seed)
    head = nn.Linear(feature_dim, k)
    with torch.no_grad():
        head.weight.copy_(torch.randn(k, feature_dim, generator=gen) * 0.01)
        head.bias.zero_()
    return head


def class_weights(labels: np.ndarray, k: int) -> np.ndarray:
    """(k,) float32 weights n / (k · n_c), 0 for empty clusters: each cluster contributes
    equally to the loss, the expectation of uniform sampling over clusters."""
    counts = np.bincount(labels, minlength=k).astype(np.float64)
    w = np.zeros(k)
    np.divide(len(labels), k * counts, out=w, where=counts > 0)
    return w.astype(np.float32)


def pseudo_label_loss(logits: torch.Tensor, labels: torch.Tensor,
                      weights: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of logits (n, k) against pseudo-labels (n,), per-cluster ``weights`` (k,),
    normalised by the batch's total weight."""
    return F.cross_entropy(logits, labels, weight=weights)


# ------------------------------------------------------------------------------------------
# PCA-whitening from summable statistics.


@dataclass
class MomentStats:
    """Summable first and second moments of features: n, Σx (d,), Σxxᵀ (d, d), float64.

    Sums from any split of the data add up to the sums of the whole, so each Ray actor
    (or batch) contributes its part and the driver fits the PCA once.
    """

    n: int
    s: np.ndarray
    ss: np.ndarray

    @classmethod
    def of(cls, x: np.ndarray) -> MomentStats:
        x64 = np.asarray(x, np.float64)
        return cls(len(x64), x64.sum(axis=0), x64.T @ x64)

    def __add__(self, other: MomentStats) -> MomentStats:
        return MomentStats(self.n + other.n, self.s + other.s, self.ss + other.ss)


@dataclass
class Whitening:
    """x -> normalize((x − mean) · proj): PCA to p dims, each scaled to unit variance.

    ``mean`` (d,), ``proj`` (d, p) float32 with ``proj = V_p / sqrt(λ_p + eps)``: the top p
    eigenvectors of the covariance, as ``faiss.PCAMatrix(d, p, eigen_power=-0.5)`` that the
    reference implementation uses.
    """

    mean: np.ndarray
    proj: np.ndarray

    @classmethod
    def fit(cls, stats: MomentStats, dim: int, eps: float = 1e-5) -> Whitening:
        d = len(stats.s)
        if not 1 <= dim <= d or stats.n < 2:
            raise ValueError(f"deepcluster.pca_dim: need 1 <= pca_dim <= {d} and >= 2 "
                             f"points, got pca_dim={dim} with {stats.n} points")
        mean = stats.s / stats.n
        cov = stats.ss / stats.n - np.outer(mean, mean)
        values, vectors = np.linalg.eigh((cov + cov.T) / 2)  # ascending
        top = np.argsort(values)[::-1][:dim]
        proj = vectors[:, top] / np.sqrt(np.maximum(values[top], 0.0) + eps)
        return cls(mean.astype(np.float32), proj.astype(np.float32))

    @property
    def dim(self) -> int:
        return int(self.proj.shape[1])

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """(n, d) -> (n, p) float32, whitened and L2-normalised."""
        z = (np.asarray(x, np.float32) - self.mean) @ self.proj
        norms = np.linalg.norm(z, axis=1, keepdims=True)
        return z / np.maximum(norms, 1e-12)

    def load_into(self, layer: nn.Linear) -> None:
        """Set ``layer`` (d -> p) to this map before the normalisation: W = projᵀ, b = −mean·proj."""
        with torch.no_grad():
            layer.weight.copy_(torch.from_numpy(self.proj.T.copy()))
            layer.bias.copy_(torch.from_numpy(-(self.mean @ self.proj)))


# ------------------------------------------------------------------------------------------
# The method as stages.


def lr_at(cfg: Config, epoch: int) -> float:
    """``train.lr`` under ``train.lr_schedule`` at ``epoch`` (0-based) of ``train.epochs``."""
    t, lr = epoch / max(1, cfg.train.epochs), cfg.train.lr
    if cfg.train.lr_schedule == "cosine":
        return float(lr * 0.5 * (1 + np.cos(np.pi * t)))
    if cfg.train.lr_schedule == "step":
        return float(lr * (0.1 ** ((t >= 0.5) + (t >= 0.75))))
    return float(lr)


def clustering(cfg: Config, seed: int) -> Callable[[PerId, Scatter], PerId]:
    """The Embed stage's ``reduce``: PCA-whitening fitted on the features (n, d), then
    k-means with no empty cluster -> ``arrays["pseudo"]`` (n,) int64 by id, ``extra`` the
    whitening (``mean`` (d,), ``proj`` (d, p)) and ``centroids`` (k, p); ``faiss.Kmeans`` on
    the driver up to ``deepcluster.local_max_points``, else Lloyd over
    ``deepcluster.kmeans_shards`` shards (on Ray actors under the Ray runner)."""

    def reduce(found: PerId, scatter: Scatter) -> PerId:
        t0 = time.perf_counter()
        x = found.arrays["feature"].astype(np.float32)
        whitening = Whitening.fit(MomentStats.of(x), min(cfg.deepcluster.pca_dim, x.shape[1]))
        z = whitening(x)
        k, dc = cfg.cluster.k, cfg.deepcluster
        centroids, labels = kmeans_features(z, k, dc.kmeans_iters, seed, scatter,
                                            dc.local_max_points, dc.kmeans_shards, cfg.scale.gpu)
        facts = {**found.facts, "kmeans_s": time.perf_counter() - t0,
                 "empty_clusters": int((np.bincount(labels, minlength=k) == 0).sum())}
        if found.labels is not None:
            from pipeline.metrics import acc, nmi

            facts.update(nmi=nmi(found.labels, labels), acc=acc(found.labels, labels))
        return PerId(found.ids, {"pseudo": labels.astype(np.int64)}, found.labels,
                     {"mean": whitening.mean, "proj": whitening.proj, "centroids": centroids},
                     facts)

    return reduce


class Classifier(nn.Module):
    """The CNN (``trunk``: image -> feature_dim) and the epoch's fresh ``head`` (-> k)."""

    def __init__(self, trunk: nn.Module, head: nn.Linear):
        super().__init__()
        self.trunk, self.head = trunk, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))  # type: ignore[no-any-return]


class PseudoLabels(Hooks):
    """One epoch's training program: :class:`Classifier` with cross-entropy on the joined
    ``pseudo`` labels (b,), each sample weighted by the inverse size of its cluster
    (:func:`class_weights`). The trunk's optimiser state carries over from the previous
    epoch (``trunk_state``); the head and its optimiser are new."""

    def __init__(self, cfg: Config, trunk: nn.Module, trunk_state: dict[str, Any] | None,
                 weights: np.ndarray, seed: int):
        self.cfg, self.trunk_state, self.weights = cfg, trunk_state, weights
        self.net = Classifier(trunk, new_head(cfg.model.feature_dim, cfg.cluster.k, seed))
        self.module: nn.Module = self.net
        self.losses: list[float] = []

    def setup(self, ctx: Context) -> list[torch.optim.Optimizer]:
        from pipeline.methods.online import make_optimizer

        self.wrapped = ctx.wrap(self.net.to(ctx.device))
        t = self.cfg.train
        trunk = make_optimizer(self.net.trunk, t.optimizer, t.lr, t.momentum, t.weight_decay)
        if self.trunk_state is not None:
            trunk.load_state_dict(self.trunk_state)
        head = make_optimizer(self.net.head, t.optimizer, t.lr, t.momentum, 0.0)
        self.optimizers = [trunk, head]
        self.class_weights = torch.from_numpy(self.weights).to(ctx.device)
        return self.optimizers

    def step(self, batch: dict[str, Any], ctx: Context) -> dict[str, float]:
        from pipeline.data.augment import AugmentSpec, augment

        self.wrapped.train()
        x = batch["pixels"]
        if self.cfg.deepcluster.augment:
            x = augment(x, AugmentSpec(flip=self.cfg.data.channels == 3))
        loss = pseudo_label_loss(self.wrapped(x), batch["pseudo"].long(), self.class_weights)
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for optimizer in self.optimizers:
            optimizer.step()
        self.losses.append(loss.item())
        return {}

    def end_epoch(self, epoch: int, ctx: Context) -> dict[str, float]:
        loss = float(np.mean(self.losses)) if self.losses else float("nan")
        self.losses = []
        return {"loss": loss}


def stages(cfg: Config) -> Stages:
    """Per epoch: cluster the features of the current CNN, train one epoch on the
    pseudo-labels; then the final clustering. ``train.time_budget_s`` is checked between
    epochs. Stage names are per epoch, so a re-run skips every finished stage."""
    from pipeline.methods.arch import initial_model, model_arch
    from pipeline.progress import figures, say

    arch, k = model_arch(cfg), cfg.cluster.k
    trunk, trunk_state = initial_model(cfg), None
    history: list[dict[str, Any]] = []
    started, budget = time.monotonic(), cfg.train.time_budget_s
    for epoch in range(cfg.train.epochs):
        if history and budget and time.monotonic() - started >= budget:
            log.info("deepcluster: train.time_budget_s=%s reached after %d epochs", budget, epoch)
            break
        t0, seed = time.perf_counter(), cfg.train.seed + epoch
        labels = yield Embed(f"epoch-{epoch:03d}-clustering", _bytes(trunk), arch,
                             batch_stats=epoch == 0, reduce=clustering(cfg, seed))
        program = PseudoLabels(cfg, trunk, trunk_state,
                               class_weights(labels.arrays["pseudo"], k), seed)
        result = yield Train(f"epoch-{epoch:03d}-training", 1, program,
                             join={"pseudo": labels}, passes=cfg.deepcluster.passes,
                             lr=[lr_at(cfg, epoch)])
        trunk.load_state_dict({key[len("trunk."):]: torch.from_numpy(v)
                               for key, v in result.state.items() if key.startswith("trunk.")})
        trunk_state = result.optimizers[0]
        trained = {key: v for key, v in result.history[-1].items() if key != "epoch"}
        row = {"epoch": epoch, **labels.facts, **trained, "seconds": time.perf_counter() - t0}
        history.append(row)
        say(f"deepcluster epoch {epoch + 1}/{cfg.train.epochs}{figures(row)}  "
            f"({row['seconds']:.1f} s)")
    final = yield Embed("final-clustering", _bytes(trunk), arch,
                        reduce=clustering(cfg, cfg.train.seed + cfg.train.epochs))
    return export(cfg, trunk, final, history)


def _bytes(model: nn.Module) -> bytes:
    from pipeline.models.weights import save_bytes

    return save_bytes(model)


def export(cfg: Config, trunk: nn.Module, final: PerId, history: list[dict[str, Any]]
           ) -> TrainedModel:
    """The trained CNN with the final whitening folded in, and the final centroids."""
    from pipeline.methods.arch import model_arch
    from pipeline.models.layers import WhitenedEmbedder
    from pipeline.outputs import TrainedModel

    whitening = Whitening(final.extra["mean"], final.extra["proj"])
    model = WhitenedEmbedder(trunk, cfg.model.feature_dim, whitening.dim)
    whitening.load_into(model.whiten)
    return TrainedModel(_bytes(model), whitened_arch(model_arch(cfg), whitening.dim),
                        final.extra["centroids"], history)
