"""``depict``: Ghasedi Dizaji, Herandi, Deng, Cai & Huang, "Deep Clustering via Joint
Convolutional Autoencoder Embedding and Relative Entropy Minimization", ICCV 2017
(DESIGN §5.3; the authors' code is ``herandy/DEPICT``).

**Network** (:class:`DepictNet`). A convolutional encoder (the reference's 50@4×4/2 then
50@5×5/2 with LeakyReLU(0.01) for 28-32 px; larger images get more 5×5/2 layers, channels
doubling, until the map is at most 8 px: :func:`conv_plan`; colour images use the same
stack, 3 input channels), a dense embedding of ``depict.embed_dim`` (= k, as in the
reference), a mirrored decoder, and a softmax head on the embedding. Two departures from the
reference, both measured on MNIST with Adam at ``train.lr`` 1e-3 (the reference trains at
1e-4 for up to 4,000 epochs, which a CPU budget cannot afford): the embedding is linear, not
tanh (the tanh saturated within 10 steps: every image the same code, k-means NMI 0.00), and
each conv layer is followed by a GroupNorm over the whole layer (without it the plain
autoencoder diverged). GroupNorm, unlike BatchNorm, computes the same function in train and
eval mode, so the clean pathway, the clustering passes and the exported model live in one
feature space.

**Two pathways** (:class:`Pathways`). The *noisy* pathway sees a random affine + jitter view
of the image (``depict.augment``, :mod:`pipeline.data.augment`) and drops out the input and
every conv layer but the last (``depict.dropout``); the *clean* one sees the image, with no
noise. Reconstruction is layer-wise: each noisy decoder output against the matching clean
encoder activation (weight 1 for the input, ``depict.hidden_weight`` for the hidden layers).
The clustering loss is the cross-entropy of the noisy softmax against the targets q. The
view is what lets the joint rounds improve the k-means start instead of memorising it
(README, ablation).

**Targets** (:func:`targets`). From the clean probabilities p (n, k) of every image and their
frequencies f_k = Σ_i p_ik: q_ik ∝ p_ik / f_k^{1/2} (the paper's KL(Q‖P) + KL(f‖uniform)
solution), or DEC's p_ik² / f_k (``depict.target: dec``, what the reference code runs).
The frequencies are sums over every image of a full clean pass, so they are global
whatever the number of workers.

**Stages** (:func:`stages`), each saved and skipped on a re-run:

1. ``pretrain``: the autoencoder alone, ``depict.pretrain_epochs`` epochs.
2. ``initial-clustering``: k-means on the clean embeddings of every image
   (:func:`pipeline.kmeans.shards.kmeans_features`: faiss, or Lloyd over feature shards
   beyond one node); the softmax head starts from the L2-normalised centroids, the first
   targets are the k-means labels, as in the reference. One departure (``depict.whiten``):
   the embeddings are PCA-whitened and L2-normalised for this k-means, as DeepCluster's
   features are, and the whitening is folded into the head (:func:`whitened_head`). The
   autoencoder's embedding puts its variance in few directions; on the 10,000 MNIST test
   digits the k-means start went from NMI 0.63 (raw) to 0.77 (whitened), and the run's end
   from 0.76 to 0.87 (README, ``python -m bench depict``).
3. Rounds of ``round-RRR-training`` (``depict.target_every`` epochs of reconstruction plus
   cross-entropy to q) and ``round-RRR-targets`` (a clean pass: p, an empty-cluster check,
   new q) until fewer than ``depict.tol`` of the targets change their argmax, or
   ``train.epochs`` of joint training are spent.

**Export** (:func:`export`, :mod:`pipeline.methods.argmax`, shared with ``imc``). The model
maps an image to p (its ``output`` is ``probs``) and the centroids are the k one-hot
vectors: ‖p − e_j‖² = ‖p‖² + 1 − 2 p_j, so nearest-centroid assignment is exactly the
method's cluster, argmax p; an outlier is an image of low confidence. No empty cluster: a
cluster that no image's argmax picks gets half of the largest one by splitting that
cluster's head row (:func:`~pipeline.methods.argmax.split_empty_heads`). Plain
PyTorch/numpy: no Ray.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.data.augment import AugmentSpec, augment
from pipeline.kmeans.shards import kmeans_features
from pipeline.methods.argmax import cluster_scores, probs_export, softmax, split_empty_heads
from pipeline.methods.base import (
    Context,
    Embed,
    EpochMeans,
    Hooks,
    PerId,
    Scatter,
    Stages,
    Train,
    descend,
)
from pipeline.methods.deepcluster import MomentStats, Whitening

if TYPE_CHECKING:
    from pipeline.config import Config
    from pipeline.outputs import TrainedModel

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------
# The network.


def conv_plan(image_size: int, channels: list[int]) -> list[tuple[int, int, int, int]]:
    """(out_channels, kernel, stride, padding) per encoder conv: 4×4/2 unpadded first, then
    5×5/2 padded by 2 (the reference's MNIST layers), more of those with doubled channels
    until the map is at most 8 px."""
    plan = [(c, 4, 2, 0) if i == 0 else (c, 5, 2, 2) for i, c in enumerate(channels)]
    size = _sizes(image_size, plan)[-1]
    while size > 8:
        plan.append((2 * plan[-1][0], 5, 2, 2))
        size = _sizes(image_size, plan)[-1]
    return plan


def _sizes(image_size: int, plan: list[tuple[int, int, int, int]]) -> list[int]:
    sizes = [image_size]
    for _, k, s, p in plan:
        sizes.append(max(1, (sizes[-1] + 2 * p - k) // s + 1))
    return sizes


def depict_arch(cfg: Config, output: str = "embedding") -> dict[str, Any]:
    """The model record (``kind`` "depict"): input contract, layers, and what ``forward``
    returns: the clean ``embedding`` (n, embed_dim) or the cluster ``probs`` (n, k)."""
    k, d = cfg.cluster.k, cfg.depict.embed_dim or cfg.cluster.k
    return {"kind": "depict", "in_channels": cfg.data.channels, "image_size": cfg.data.image_size,
            "mean": cfg.data.mean, "std": cfg.data.std, "channels": list(cfg.depict.channels),
            "embed_dim": d, "k": k, "dropout": cfg.depict.dropout, "output": output,
            "feature_dim": d if output == "embedding" else k, "normalize": False}


def adapt_arch(cfg: Config, arch: dict[str, Any]) -> dict[str, Any]:
    """DEPICT has its own autoencoder: the backbone record is replaced (model.backbone and
    model.width are not read)."""
    return depict_arch(cfg)


def build_model(arch: dict[str, Any]) -> nn.Module:
    """The registry's builder for model kind "depict" (``model/model.json``)."""
    return DepictNet(arch)


class DepictNet(nn.Module):
    """Encoder, decoder and softmax head: images (n, C, H, W) -> ``forward`` the clean
    embedding (n, d) or probabilities (n, k), by ``arch["output"]``."""

    def __init__(self, arch: dict[str, Any]):
        super().__init__()
        plan = conv_plan(arch["image_size"], arch["channels"])
        sizes = _sizes(arch["image_size"], plan)
        ins = [arch["in_channels"]] + [c for c, *_ in plan[:-1]]
        self.convs = nn.ModuleList(nn.Conv2d(i, c, k, s, p)
                                   for i, (c, k, s, p) in zip(ins, plan, strict=True))
        self.deconvs = nn.ModuleList(
            nn.ConvTranspose2d(c, i, k, s, p, output_padding=(size + 2 * p - k) % s)
            for i, (c, k, s, p), size in zip(ins, plan, sizes[:-1], strict=True))
        self.norms = nn.ModuleList(nn.GroupNorm(1, c) for c, *_ in plan)
        self.denorms = nn.ModuleList(nn.GroupNorm(1, i) if j else nn.Identity()
                                     for j, i in enumerate(ins))
        self.map_shape = (plan[-1][0], sizes[-1], sizes[-1])
        flat = int(np.prod(self.map_shape))
        d = arch["embed_dim"]
        self.embed, self.unembed = nn.Linear(flat, d), nn.Linear(d, flat)
        self.head = nn.Linear(d, arch["k"])
        self.dropout, self.output = float(arch["dropout"]), arch["output"]
        mean, std = (torch.tensor(arch[key], dtype=torch.float32) for key in ("mean", "std"))
        lo, hi = (torch.zeros(arch["in_channels"]) - mean) / std, (1 - mean) / std
        self.lo: torch.Tensor
        self.span: torch.Tensor
        self.register_buffer("lo", lo.reshape(1, -1, 1, 1))
        self.register_buffer("span", (hi - lo).reshape(1, -1, 1, 1))

    def encode(self, x: torch.Tensor, noisy: bool) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Activations [input, conv_1, …, conv_L] and the embedding z (n, d) in (−1, 1).
        ``noisy`` drops out the input and every conv layer but the last."""
        acts, h = [x], x
        if noisy:
            h = F.dropout(h, self.dropout, training=True)
        for i, conv in enumerate(self.convs):
            a = F.leaky_relu(self.norms[i](conv(h)), 0.01)
            acts.append(a)
            h = F.dropout(a, self.dropout, training=True) if noisy and i < len(self.convs) - 1 else a
        return acts, self.embed(h.flatten(1))

    def decode(self, z: torch.Tensor) -> list[torch.Tensor]:
        """Reconstructions [input, conv_1, …, conv_L] of the encoder's activations; the input's
        is squashed into the range of normalised pixels."""
        h = F.leaky_relu(self.unembed(z), 0.01).reshape(-1, *self.map_shape)
        recs = [h]
        for i in reversed(range(len(self.deconvs))):
            h = self.denorms[i](self.deconvs[i](h))
            h = self.lo + self.span * torch.sigmoid(h) if i == 0 else F.leaky_relu(h, 0.01)
            recs.append(h)
        return recs[::-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.encode(x, noisy=False)[1]
        return F.softmax(self.head(z), dim=1) if self.output == "probs" else z


class Pathways(nn.Module):
    """The training forward (what DDP wraps): noisy and clean pathways of ``net``.

    ``forward(x)`` -> (reconstruction loss (), noisy logits (n, k)). The noisy pathway sees
    a random view of x (``augment``, when given) under dropout; its reconstructions are held
    to the clean pathway's activations of x itself. With ``noisy`` false, a plain
    autoencoder: no noise, the input's reconstruction only.
    """

    def __init__(self, net: DepictNet, noisy: bool, hidden_weight: float,
                 augment: AugmentSpec | None = None):
        super().__init__()
        self.net, self.noisy, self.hidden_weight = net, noisy, hidden_weight
        self.augment = augment

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.noisy:
            with torch.no_grad():
                clean = self.net.encode(x, noisy=False)[0]
            if self.augment is not None:
                x = augment(x, self.augment)
            z = self.net.encode(x, noisy=True)[1]
        else:
            clean, z = self.net.encode(x, noisy=False)
        recs = self.net.decode(z)
        loss = layerwise_loss(recs, clean, self.hidden_weight if self.noisy else 0.0)
        return loss, self.net.head(z)


def layerwise_loss(recs: list[torch.Tensor], targets: list[torch.Tensor],
                   hidden_weight: float) -> torch.Tensor:
    """Σ_l w_l · mean((rec_l − target_l)²) with w_0 = 1 (the input) and w_l = ``hidden_weight``;
    the targets are detached (the clean pathway only teaches)."""
    loss = F.mse_loss(recs[0], targets[0].detach())
    if hidden_weight:
        for rec, target in zip(recs[1:], targets[1:], strict=True):
            loss = loss + hidden_weight * F.mse_loss(rec, target.detach())
    return loss


# ------------------------------------------------------------------------------------------
# Targets, the head, empty clusters.


def targets(p: np.ndarray, kind: str = "sqrt", frequency: np.ndarray | None = None
            ) -> np.ndarray:
    """Targets q (n, k) from probabilities p (n, k): q_ik ∝ p_ik / f_k^{1/2} (``sqrt``, the
    paper's Eq. 7) or p_ik² / f_k (``dec``), normalised over k, with f_k = Σ_i p_ik over
    every image (pass ``frequency`` (k,) when p is only a part)."""
    p = np.asarray(p, np.float64)
    f = p.sum(axis=0) if frequency is None else np.asarray(frequency, np.float64)
    f = np.maximum(f, 1e-12)
    q = p / np.sqrt(f) if kind == "sqrt" else p ** 2 / f
    return q / np.maximum(q.sum(axis=1, keepdims=True), 1e-300)  # type: ignore[no-any-return]


def head_from_centroids(centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The reference's head initialisation: W (k, d) the L2-normalised centroids, b = 0."""
    w = centroids / np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
    return w.astype(np.float32), np.zeros(len(w), np.float32)


def whitened_head(centroids: np.ndarray, whitening: Whitening) -> tuple[np.ndarray, np.ndarray]:
    """The reference's head for centroids (k, p) found in whitened space, as a head on the
    raw embedding z (n, d): logits ((z − mean) · proj) · ĉᵀ = z · Wᵀ + b with ĉ the
    L2-normalised centroids, W = ĉ · projᵀ (k, d) and b = −mean · proj · ĉᵀ (k,)."""
    unit, _ = head_from_centroids(centroids)
    w = unit @ whitening.proj.T
    b = -(whitening.mean @ whitening.proj) @ unit.T
    return w.astype(np.float32), b.astype(np.float32)


def initial_clusters(cfg: Config, seed: int) -> Callable[[PerId, Scatter], PerId]:
    """The ``initial-clustering`` reduce: k-means on the clean embeddings (n, d), PCA-whitened
    and L2-normalised first with ``depict.whiten`` (DeepCluster's :class:`Whitening`) ->
    ``arrays["target"]`` one-hot (n, k) float16, ``arrays["cluster"]`` (n,), ``extra`` the
    head (``head_w`` (k, d), ``head_b`` (k,)) from the normalised centroids
    (:func:`whitened_head` folds the whitening into it)."""

    def reduce(found: PerId, scatter: Scatter) -> PerId:
        t0 = time.perf_counter()
        z, k, dc = found.arrays["feature"].astype(np.float32), cfg.cluster.k, cfg.deepcluster
        whitening = Whitening.fit(MomentStats.of(z), z.shape[1]) if cfg.depict.whiten else None
        centroids, labels = kmeans_features(
            z if whitening is None else whitening(z), k, cfg.depict.kmeans_iters, seed,
            scatter, dc.local_max_points, dc.kmeans_shards, cfg.scale.gpu,
            redo=cfg.depict.kmeans_redo)
        w, b = (head_from_centroids(centroids) if whitening is None
                else whitened_head(centroids, whitening))
        q = np.eye(k, dtype=np.float16)[labels]
        facts = {**found.facts, "kmeans_s": time.perf_counter() - t0,
                 **cluster_scores(found.labels, labels)}
        return PerId(found.ids, {"target": q, "cluster": labels.astype(np.int64)}, found.labels,
                     {"head_w": w, "head_b": b, "centroids": centroids}, facts)

    return reduce


def refresh_targets(cfg: Config, w: np.ndarray, b: np.ndarray, previous: np.ndarray
                    ) -> Callable[[PerId, Scatter], PerId]:
    """A ``round-RRR-targets`` reduce: p = softmax(z Wᵀ + b) of the clean embeddings, the
    head split where a cluster is empty, then q (:func:`targets`). ``facts["changed"]``: the
    fraction of images whose argmax q differs from ``previous`` (n,), the last targets'."""

    def reduce(found: PerId, scatter: Scatter) -> PerId:
        z = found.arrays["feature"].astype(np.float32)
        head_w, head_b, filled = split_empty_heads(z, w, b)
        p = softmax(z @ head_w.T + head_b)
        q = targets(p, cfg.depict.target)
        cluster, assigned = p.argmax(axis=1), q.argmax(axis=1)
        counts = np.bincount(cluster, minlength=cfg.cluster.k)
        facts = {**found.facts, "changed": float(np.mean(assigned != previous)),
                 "split_clusters": len(filled), "smallest_cluster": int(counts.min()),
                 **cluster_scores(found.labels, cluster)}
        return PerId(found.ids, {"target": q.astype(np.float16), "cluster": cluster},
                     found.labels, {"head_w": head_w, "head_b": head_b,
                                    "frequency": p.sum(axis=0).astype(np.float32)}, facts)

    return reduce


# ------------------------------------------------------------------------------------------
# The training program.


class Autoencoder(Hooks):
    """A train stage of :class:`DepictNet`: the layer-wise reconstruction loss, plus (``joint``)
    ``depict.reconstruction_weight``-scaled reconstruction and cross-entropy of the noisy
    softmax against the joined ``target`` q (b, k). Adam on ``train.lr``; its state carries
    over between joint rounds (``optimizer_state``). The head is frozen while pretraining."""

    def __init__(self, cfg: Config, net: DepictNet, joint: bool,
                 optimizer_state: dict[str, Any] | None = None):
        self.cfg, self.net, self.joint, self.optimizer_state = cfg, net, joint, optimizer_state
        self.module: nn.Module = net
        self.means = EpochMeans()

    def setup(self, ctx: Context) -> list[torch.optim.Optimizer]:
        net, t = self.net.to(ctx.device), self.cfg.train
        net.head.requires_grad_(self.joint)
        d = self.cfg.depict
        spec = AugmentSpec(flip=self.cfg.data.channels == 3) if d.augment else None
        self.wrapped = ctx.wrap(Pathways(net, d.noisy, d.hidden_weight, spec))
        params = [p for p in net.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay)
        if self.optimizer_state is not None:
            self.optimizer.load_state_dict(self.optimizer_state)
        return [self.optimizer]

    def step(self, batch: dict[str, Any], ctx: Context) -> dict[str, float]:
        self.wrapped.train()
        reconstruction, logits = self.wrapped(batch["pixels"])
        loss, parts = reconstruction, {"reconstruction": reconstruction.item()}
        if self.joint:
            q = batch["target"].float()
            q = q / q.sum(dim=1, keepdim=True).clamp_min(1e-12)
            clustering = -(q * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
            loss = self.cfg.depict.reconstruction_weight * reconstruction + clustering
            parts["clustering"] = clustering.item()
        descend(self.optimizer, loss)
        self.means.add(parts)
        return {}

    def end_epoch(self, epoch: int, ctx: Context) -> dict[str, float]:
        return self.means.pop()


# ------------------------------------------------------------------------------------------
# The method as stages.


def initial_net(cfg: Config) -> DepictNet:
    """The seeded network (every worker builds the same one; DDP broadcasts rank 0's)."""
    torch.manual_seed(cfg.train.seed)
    return DepictNet(depict_arch(cfg))


def stages(cfg: Config) -> Stages:
    """Pretraining, the k-means initialisation, then rounds of joint training and target
    refreshes (module docstring). ``train.time_budget_s`` is checked between rounds."""
    from pipeline.progress import figures, say

    net, arch = initial_net(cfg), depict_arch(cfg)
    started, budget, history = time.monotonic(), cfg.train.time_budget_s, []
    if cfg.depict.pretrain_epochs:
        result = yield Train("pretrain", cfg.depict.pretrain_epochs, Autoencoder(cfg, net, False),
                             batch_size=cfg.depict.batch_size)
        _load(net, result.state)
        history.append(_pretrain_row(result.history))
    found = yield Embed("initial-clustering", _bytes(net), arch,
                        reduce=initial_clusters(cfg, cfg.train.seed))
    history.append({"stage": "initial-clustering", "epoch": 0, **found.facts})
    say(f"depict initial k-means{figures(found.facts)}")
    state, every = None, cfg.depict.target_every
    for r in range(math.ceil(cfg.train.epochs / every)):
        if r and budget and time.monotonic() - started >= budget:
            log.info("depict: train.time_budget_s=%s reached after %d rounds", budget, r)
            break
        t0 = time.perf_counter()
        _set_head(net, found.extra["head_w"], found.extra["head_b"])
        epochs = min(every, cfg.train.epochs - r * every)
        result = yield Train(f"round-{r:03d}-training", epochs, Autoencoder(cfg, net, True, state),
                             join={"target": found}, batch_size=cfg.depict.batch_size)
        _load(net, result.state)
        state = result.optimizers[0]
        found = yield Embed(f"round-{r:03d}-targets", _bytes(net), arch, reduce=refresh_targets(
            cfg, net.head.weight.detach().numpy(), net.head.bias.detach().numpy(),
            found.arrays["target"].argmax(axis=1)))
        trained = {key: v for key, v in result.history[-1].items() if key != "epoch"}
        row = {"stage": "joint", "epoch": r * every + epochs, **found.facts, **trained,
               "seconds": time.perf_counter() - t0}
        history.append(row)
        say(f"depict round {r + 1} (epoch {row['epoch']}/{cfg.train.epochs}){figures(row)}")
        if found.facts["changed"] < cfg.depict.tol:
            log.info("depict: %.4f of the targets changed (< depict.tol): converged",
                     found.facts["changed"])
            break
    return export(cfg, net, found, history)


def _pretrain_row(epochs: list[dict[str, Any]]) -> dict[str, Any]:
    """Pretraining as one history row (at epoch 0, before the joint epochs): its last
    epoch's figures, its length, and the step it resumed from after a restart, if any."""
    row = {"stage": "pretrain", "epoch": 0, "pretrain_epochs": len(epochs),
           **{key: v for key, v in epochs[-1].items() if key != "epoch"}}
    resumed = [e["resumed_from_step"] for e in epochs if "resumed_from_step" in e]
    return {**row, "resumed_from_step": resumed[0]} if resumed else row


def _load(net: nn.Module, state: dict[str, np.ndarray]) -> None:
    net.load_state_dict({key: torch.from_numpy(np.asarray(v)) for key, v in state.items()})


def _set_head(net: DepictNet, w: np.ndarray, b: np.ndarray) -> None:
    with torch.no_grad():
        net.head.weight.copy_(torch.from_numpy(np.asarray(w, np.float32)))
        net.head.bias.copy_(torch.from_numpy(np.asarray(b, np.float32)))


def _bytes(model: nn.Module) -> bytes:
    from pipeline.models.weights import save_bytes

    return save_bytes(model)


def export(cfg: Config, net: DepictNet, final: PerId, history: list[dict[str, Any]]
           ) -> TrainedModel:
    """The network with the last targets' head, mapping images to p (n, k), and the k
    one-hot centroids (:func:`~pipeline.methods.argmax.probs_export`): nearest-centroid
    assignment is argmax p, the method's cluster."""
    _set_head(net, final.extra["head_w"], final.extra["head_b"])
    net.output = "probs"
    return probs_export(_bytes(net), depict_arch(cfg, "probs"), history)
