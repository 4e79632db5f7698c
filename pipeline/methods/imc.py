"""``imc``: Ntelemis, Jin & Thomas, "Information Maximization Clustering via Multi-View
Self-Labelling" (IMC-SwAV), 2021, arXiv:2103.07368 (DESIGN §5.4; the authors' code is
``foiv0s/imc-swav-pub``). Representation and clusters are learned together, in one phase.

**Network** (:class:`ImcNet`). A backbone trunk (``model.backbone``: ``small_cnn`` for CPU
runs, or a ResNet whose stem for ≤ 48 px inputs is a 3×3 stride-1 conv without max-pool,
for ≤ 128 px a 3×3 stride-1 conv with it, as in the reference; torchvision's otherwise),
then three parts on its features f (n, d):

* a projection d → d → ``imc.project_dim`` (two linear layers, as the reference's), its
  output L2-normalised;
* ``imc.prototypes`` trainable prototypes: a bias-free linear layer whose rows are
  re-normalised before every step, so the scores u (n, k') are cosine similarities;
* the MI head on the **detached** features: d → ``imc.head_hidden`` → BN → ReLU → same →
  BN → ReLU → k logits y. It never trains the trunk.

**Views** (:mod:`pipeline.data.multicrop`). Every image of a batch gives ``imc.global_crops``
global and ``imc.local_crops`` local crops, made on the training device from the decoded
batch; each crop group goes through the network at once.

**Losses** (one step, :class:`ImcProgram`):

* SwAV's swapped prediction (:func:`swapped_prediction`): the codes q of each global crop,
  :func:`sinkhorn` of exp(u/ε) with its normalisations summed over every worker
  (``ctx.all_reduce``, as SwAV's ``distributed_sinkhorn``), predicted from every other
  crop's softmax(u/τ) by cross-entropy;
* the MI loss (:func:`mi_loss`): H(Y|U) − λ·H(Y) averaged over every pair of crops (y of
  one, the detached u/τ of another), the joint P = softmax(y)ᵀ·softmax(u/τ) normalised;
  H(Y)'s marginal is summed over every worker;
* the logit regulariser (:func:`logit_penalty`).

Adam over everything, a linear warm-up during which the prototypes stay fixed (its length
fitted to the run from ``ctx.steps_per_epoch``: :func:`warmup_updates`), then step decay
(:func:`lr_at`).

**Stages** (:func:`stages`): one ``imc`` train stage of ``train.epochs`` (15 unless set:
the method's own default, its registry line); then, with
``train.precise_bn_images``, an ``export-calibration`` pass over that many uniformly drawn
whole images that recomputes every BatchNorm's statistics (the reference warms BatchNorm up
on whole images before it evaluates) and gives any cluster that no sampled image's argmax
picks half of the largest one (:func:`~pipeline.methods.argmax.split_empty_heads`).

**Export.** The cluster is the head's argmax. The model maps an image to the head's
probabilities p (n, k) and the centroids are the one-hot vectors
(:func:`~pipeline.methods.argmax.probs_export`, as ``depict``), so nearest-centroid
assignment is exactly argmax p. Plain PyTorch: no Ray.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.data.multicrop import CropGroup, MultiCropSpec, multi_crop
from pipeline.methods.argmax import cluster_scores, probs_export, split_empty_heads
from pipeline.methods.base import Context, Embed, Hooks, PerId, Scatter, Stages, Train, set_lr

if TYPE_CHECKING:
    from pipeline.config import Config, ImcConfig
    from pipeline.outputs import TrainedModel

log = logging.getLogger(__name__)

_TINY = 1e-30  # floor inside logarithms of probabilities


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


# ------------------------------------------------------------------------------------------
# The network.


def imc_arch(cfg: Config, output: str = "probs") -> dict[str, Any]:
    """The model record (``kind`` "imc"): input contract, parts, and what ``forward``
    returns: the head's ``probs`` (n, k) or its last ``hidden`` layer (n, head_hidden)."""
    size, imc = cfg.data.image_size, cfg.imc
    return {"kind": "imc", "backbone": cfg.model.backbone, "width": cfg.model.width,
            "in_channels": cfg.data.channels, "image_size": size, "mean": cfg.data.mean,
            "std": cfg.data.std, "small_stem": size <= 128, "stem_pool": size > 48,
            "project_dim": imc.project_dim, "prototypes": imc.prototypes,
            "head_hidden": imc.head_hidden, "k": cfg.cluster.k, "output": output,
            "feature_dim": cfg.cluster.k if output == "probs" else imc.head_hidden,
            "normalize": False}


def adapt_arch(cfg: Config, arch: dict[str, Any]) -> dict[str, Any]:
    """The registry's adapter: IMC's record replaces the backbone's (model.feature_dim and
    model.normalize_features are not read)."""
    return imc_arch(cfg)


def build_model(arch: dict[str, Any]) -> nn.Module:
    """The registry's builder for model kind "imc" (``model/model.json``)."""
    return ImcNet(arch)


def make_trunk(arch: dict[str, Any]) -> tuple[nn.Module, int]:
    """The backbone without head: (n, C, H, W) -> (n, d), and d."""
    from pipeline.models.backbones import SmallCNN, resnet_trunk

    if arch["backbone"] == "small_cnn":
        small = SmallCNN(arch["in_channels"], arch["width"])
        return small, small.out_dim
    net, dim = resnet_trunk(arch["backbone"], arch["in_channels"])
    if arch["small_stem"]:
        net.conv1 = nn.Conv2d(arch["in_channels"], 64, 3, 1, 1, bias=False)
        if not arch["stem_pool"]:
            net.maxpool = nn.Identity()
    return net, dim


class ImcNet(nn.Module):
    """Trunk, projection, prototypes and MI head (module docstring). ``forward``: images
    (n, C, H, W) -> the head's probabilities (n, k), or its last hidden layer
    (n, head_hidden), by ``arch["output"]``."""

    def __init__(self, arch: dict[str, Any]):
        super().__init__()
        self.trunk, d = make_trunk(arch)
        self.project = nn.Sequential(nn.Linear(d, d), nn.Linear(d, arch["project_dim"]))
        self.prototypes = nn.Linear(arch["project_dim"], arch["prototypes"], bias=False)
        h = arch["head_hidden"]
        self.head = nn.Sequential(nn.Linear(d, h), nn.BatchNorm1d(h), nn.ReLU(True),
                                  nn.Linear(h, h), nn.BatchNorm1d(h), nn.ReLU(True),
                                  nn.Linear(h, arch["k"]))
        self.output = arch["output"]

    @property
    def last(self) -> nn.Linear:
        """The head's last layer (head_hidden -> k): the clusters' logits."""
        layer = self.head[-1]
        assert isinstance(layer, nn.Linear)
        return layer

    def views(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Crops x (m, C, h, w) -> prototype scores u (m, k') in [−1, 1] and head logits
        y (m, k), the head on detached features."""
        f = self.trunk(x)
        u = self.prototypes(F.normalize(self.project(f), dim=1))
        return u, self.head(f.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.trunk(x)
        if self.output == "hidden":
            return self.head[:-1](f)  # type: ignore[no-any-return]
        return F.softmax(self.head(f), dim=1)


@torch.no_grad()
def normalise_prototypes(layer: nn.Linear) -> None:
    """Rows of the prototype matrix (k', project_dim) to unit length, in place."""
    layer.weight.copy_(F.normalize(layer.weight, dim=1))


# ------------------------------------------------------------------------------------------
# The losses.


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, eps: float, iters: int,
             all_reduce: Callable[[torch.Tensor], torch.Tensor] = _identity) -> torch.Tensor:
    """SwAV's codes (Caron et al. 2020, Alg. 1 and ``distributed_sinkhorn``): scores
    (…, b, k') of this worker's b samples -> codes q (…, b, k') float32, each row a
    distribution (sums to 1) and, over the samples of every worker, each prototype's total
    close to B/k' (exactly after enough ``iters``); B is the global sample count.

    q starts as exp(scores/ε) and alternates prototype normalisations, whose sums run over
    every worker through ``all_reduce``, with per-sample ones, which are local: so W workers
    with b samples each give the codes of one worker with all W·b. Float64 inside, so
    exp(1/ε) does not overflow for the cosine scores here (|scores| ≤ 1) and any ε ≥ 0.002.
    """
    q = torch.exp((scores.double() / eps).clamp(max=700.0))
    k = q.shape[-1]
    total = all_reduce(torch.tensor(float(q.shape[-2]), dtype=q.dtype, device=q.device))
    q = q / all_reduce(q.sum(dim=(-2, -1), keepdim=True))
    for _ in range(iters):
        q = q / (all_reduce(q.sum(dim=-2, keepdim=True)) * k)  # each prototype: 1/k'
        q = q / (q.sum(dim=-1, keepdim=True) * total)  # each sample: 1/B
    return (q * total).float()


def swapped_prediction(scores: list[torch.Tensor], codes: torch.Tensor, tau: float
                       ) -> torch.Tensor:
    """SwAV's loss: the mean over pairs (i, p ≠ i) of −Σ q_i · log softmax(u_p / τ), rows
    averaged. ``scores``: V crops' u (b, k'), globals first; ``codes``: (G, b, k') of the
    first G crops."""
    logp = [F.log_softmax(u / tau, dim=1) for u in scores]
    losses = [-(codes[i] * logp[p]).sum(dim=1).mean()
              for i in range(codes.shape[0]) for p in range(len(scores)) if p != i]
    return torch.stack(losses).mean()


def global_sum(x: torch.Tensor, all_reduce: Callable[[torch.Tensor], torch.Tensor]
               ) -> torch.Tensor:
    """The sum of ``x`` over every worker as a value; gradients flow into this worker's
    ``x`` only (a collective is not differentiable)."""
    return x + (all_reduce(x.detach()) - x.detach())


def conditional_entropy(py: torch.Tensor, pu: torch.Tensor) -> torch.Tensor:
    """H(Y|U) of the joint P = pyᵀ·pu normalised: py (b, k), pu (b, k') probabilities ->
    −Σ P·log(P / P_u), a scalar."""
    joint = py.T @ pu
    joint = joint / joint.sum()
    pu_marginal = joint.sum(dim=0, keepdim=True)
    return (joint * (torch.log(pu_marginal.clamp_min(_TINY))
                     - torch.log(joint.clamp_min(_TINY)))).sum()


def mi_loss(logits: list[torch.Tensor], scores: list[torch.Tensor], weight: float,
            all_reduce: Callable[[torch.Tensor], torch.Tensor] = _identity, world: int = 1
            ) -> dict[str, torch.Tensor]:
    """IMC's loss H(Y|U) − λ·H(Y) over every pair (j, i) of V crops: y_j (b, k) head logits
    of crop j, scores u_i (b, k') already divided by τ (detached by the caller).

    H(Y|U) is the batch estimate of each pair's joint (:func:`conditional_entropy`) on this
    worker; H(Y) is the entropy of crop j's marginal mean softmax(y_j), summed over every
    worker (so a pair's H(Y) depends only on j). Returns ``conditional``, ``marginal`` (the
    mean H(Y)) and ``loss``: the conditional term minus ``weight``·``world``·H(Y): H(Y)'s
    gradient reaches this worker through its own rows only, so ``world`` times it, averaged
    over the workers as DDP averages gradients, is the single-process gradient.
    """
    py = [F.softmax(y, dim=1) for y in logits]
    pu = [F.softmax(u, dim=1) for u in scores]
    conditional = torch.stack([conditional_entropy(a, b) for a in py for b in pu]).mean()
    rows = logits[0].new_tensor(float(logits[0].shape[0]))
    marginal = global_sum(torch.stack([p.sum(dim=0) for p in py]), all_reduce) / all_reduce(rows)
    h_y = -(marginal * torch.log(marginal.clamp_min(_TINY))).sum(dim=1).mean()
    return {"conditional": conditional, "marginal": h_y,
            "loss": conditional - weight * world * h_y}


def logit_penalty(logits: torch.Tensor, bound: float) -> torch.Tensor:
    """mean over rows of Σ_k relu(|y| − bound): logits (n, k) -> a scalar."""
    return F.relu(logits.abs() - bound).sum(dim=1).mean()


WARMUP_CAP = 500  # the reference's warm-up updates (of 500 epochs x 195 on CIFAR-10)
WARMUP_SHARE = 0.1  # SwAV's largest: 10 warm-up epochs of its 100-epoch schedule


def warmup_updates(imc: ImcConfig, epochs: int, steps_per_epoch: int | None) -> int:
    """The warm-up's length in updates: ``imc.warmup_steps`` when set, else
    min(:data:`WARMUP_CAP`, ⌈:data:`WARMUP_SHARE` · ``epochs`` · ``steps_per_epoch``⌉), so a
    long run warms up as the reference does and a short one over a tenth of itself (the
    cap when the runner does not know ``steps_per_epoch``)."""
    if imc.warmup_steps is not None:
        return imc.warmup_steps
    if steps_per_epoch is None:
        return WARMUP_CAP
    return min(WARMUP_CAP, math.ceil(WARMUP_SHARE * epochs * steps_per_epoch))


def lr_at(imc: ImcConfig, epochs: int, update: int, epoch: int, warmup: int) -> float:
    """``imc.lr`` at update ``update`` (0-based, over the whole stage) of epoch ``epoch``:
    linear warm-up over ``warmup`` updates (:func:`warmup_updates`), times
    ``imc.decay_gamma`` for each milestone ``round(f · epochs)``, f in ``imc.decay_at``,
    that ``epoch`` has reached."""
    warm = min(1.0, (update + 1) / warmup) if warmup else 1.0
    decays = sum(epoch >= round(f * epochs) for f in imc.decay_at)
    return float(imc.lr * warm * imc.decay_gamma ** decays)


# ------------------------------------------------------------------------------------------
# The training program.


def crop_sizes(cfg: Config) -> tuple[int, int]:
    """(global, local) crop sizes: ``imc.global_size``/``imc.local_size``, or 0 = the
    reference's 28 and 18 px at 32 px scaled to ``data.image_size`` (at least 4 px)."""
    size, imc = cfg.data.image_size, cfg.imc
    return (imc.global_size or max(4, round(size * 28 / 32)),
            imc.local_size or max(4, round(size * 18 / 32)))


# Crop area fractions (global, local) when imc.global_scale/local_scale are null: the
# reference's for colour images; larger boxes for greyscale ones (config.py, README).
COLOUR_SCALES = ((0.2, 1.0), (0.08, 0.4))
GREY_SCALES = ((0.5, 1.0), (0.2, 0.5))
GREY_ROTATE = 20.0  # degrees (imc.rotate null): see ImcConfig.rotate


def crop_scales(cfg: Config) -> tuple[tuple[float, float], tuple[float, float]]:
    """(global, local) crop area fractions: ``imc.global_scale``/``imc.local_scale``, or
    where null :data:`COLOUR_SCALES` or :data:`GREY_SCALES` by ``data.channels``."""
    imc = cfg.imc
    glob, loc = COLOUR_SCALES if cfg.data.channels == 3 else GREY_SCALES
    if imc.global_scale is not None:
        glob = (imc.global_scale[0], imc.global_scale[1])
    if imc.local_scale is not None:
        loc = (imc.local_scale[0], imc.local_scale[1])
    return glob, loc


def crop_spec(cfg: Config) -> MultiCropSpec:
    """The multi-crop views of ``cfg`` (:mod:`pipeline.data.multicrop`)."""
    imc, (g, loc), (g_scale, loc_scale) = cfg.imc, crop_sizes(cfg), crop_scales(cfg)
    groups = [CropGroup(imc.global_crops, g, g_scale)]
    if imc.local_crops:
        groups.append(CropGroup(imc.local_crops, loc, loc_scale))
    flip = cfg.data.channels == 3 if imc.flip is None else imc.flip
    j = imc.jitter
    rotate = imc.rotate
    if rotate is None:
        rotate = 0.0 if cfg.data.channels == 3 else GREY_ROTATE
    return MultiCropSpec(tuple(groups), tuple(cfg.data.mean), tuple(cfg.data.std), flip,
                         (j[0], j[1], j[2], j[3]), imc.jitter_p, imc.grey_p, rotate)


class ImcTraining(nn.Module):
    """What the train stage trains and checkpoints (and DDP wraps): the network and the
    number of updates done (for the warm-up after a resume). ``forward``: crop groups, each
    (count·b, C, s, s) -> per group the scores u (count·b, k') and logits y (count·b, k)."""

    def __init__(self, net: ImcNet):
        super().__init__()
        self.net = net
        self.updates: torch.Tensor
        self.register_buffer("updates", torch.zeros((), dtype=torch.int64))

    def forward(self, groups: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        out = [self.net.views(x) for x in groups]
        return [u for u, _ in out], [y for _, y in out]


class ImcProgram(Hooks):
    """The ``imc`` train stage (module docstring): per step, the views of the batch, the
    three losses, one Adam update. Per-epoch figures: the losses, the learning rate and, with
    labels, ``nmi`` and ``acc``: this worker's argmax of the head on the first global crop
    of each training batch against them (augmented views, during training)."""

    def __init__(self, cfg: Config, net: ImcNet):
        self.cfg, self.spec, self.epoch, self.lr = cfg, crop_spec(cfg), 0, cfg.imc.lr
        self.warmup = 0
        self.model = ImcTraining(net)
        self.module: nn.Module = self.model
        self.sums: dict[str, torch.Tensor] = {}
        self.found: list[torch.Tensor] = []
        self.labels: list[np.ndarray] = []
        self.steps = 0

    def setup(self, ctx: Context) -> list[torch.optim.Optimizer]:
        imc = self.cfg.imc
        self.warmup = warmup_updates(imc, self.cfg.train.epochs, ctx.steps_per_epoch)
        if ctx.rank == 0:
            log.info("imc: warm-up over %d updates (%s steps an epoch)", self.warmup,
                     ctx.steps_per_epoch)
        self.model.to(ctx.device)
        self.wrapped = ctx.wrap(self.model)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=imc.lr,
                                          betas=(imc.betas[0], imc.betas[1]),
                                          weight_decay=imc.weight_decay)
        return [self.optimizer]

    def start(self, epoch: int, ctx: Context) -> None:
        self.epoch = epoch

    def losses(self, x: torch.Tensor, ctx: Context) -> dict[str, torch.Tensor]:
        """The step's losses for normalised images x (b, C, H, W); ``total`` to minimise."""
        imc, b = self.cfg.imc, x.shape[0]
        normalise_prototypes(self.model.net.prototypes)
        scores, logits = self.wrapped(multi_crop(x, self.spec))
        u = [s for group in scores for s in group.split(b)]  # V crops, globals first
        y = [t for group in logits for t in group.split(b)]
        codes = sinkhorn(torch.stack(u[:imc.global_crops]).detach(), imc.eps,
                         imc.sinkhorn_iters, ctx.all_reduce)
        swav = swapped_prediction(u, codes, imc.tau)
        mi = mi_loss(y, [s.detach() / imc.tau for s in u], imc.entropy_weight,
                     ctx.all_reduce, ctx.world)
        penalty = logit_penalty(torch.cat(y), imc.logit_bound)
        total = swav + mi["loss"] + imc.logit_weight * penalty
        return {"total": total, "swav": swav, "conditional": mi["conditional"],
                "marginal": mi["marginal"], "logit_penalty": penalty, "first": y[0]}

    def step(self, batch: dict[str, Any], ctx: Context) -> dict[str, float]:
        self.wrapped.train()
        update = int(self.model.updates)
        lr = lr_at(self.cfg.imc, self.cfg.train.epochs, update, self.epoch, self.warmup)
        set_lr([self.optimizer], lr)
        parts = self.losses(batch["pixels"], ctx)
        self.optimizer.zero_grad(set_to_none=True)
        parts["total"].backward()
        if update < self.warmup:
            self.model.net.prototypes.weight.grad = None  # prototypes wait for the warm-up
        self.optimizer.step()
        self.model.updates += 1
        for key in ("swav", "conditional", "marginal", "logit_penalty"):
            self.sums[key] = self.sums.get(key, 0.0) + parts[key].detach()
        self.steps, self.lr = self.steps + 1, lr
        if "label" in batch:
            self.found.append(parts["first"].detach().argmax(dim=1))
            self.labels.append(np.asarray(batch["label"]).astype(str))
        return {}

    def end_epoch(self, epoch: int, ctx: Context) -> dict[str, float]:
        out = {key: float(value) / max(1, self.steps) for key, value in self.sums.items()}
        out["lr"] = self.lr
        if self.found:
            found = torch.cat(self.found).cpu().numpy()
            scores = cluster_scores(np.concatenate(self.labels), found)
            out["nmi"], out["acc"] = scores["nmi"], scores["acc"]
        self.sums, self.found, self.labels, self.steps = {}, [], [], 0
        self.epoch = epoch + 1
        return out


# ------------------------------------------------------------------------------------------
# The method as stages, and the export.


def split_heads(w: np.ndarray, b: np.ndarray) -> Callable[[PerId, Scatter], PerId]:
    """The ``export-calibration`` reduce: the last hidden layer z (m, h) of the sampled
    images under the calibrated model -> the head's last layer with no empty cluster among
    them (``extra`` ``head_w`` (k, h), ``head_b`` (k,), and the calibrated ``model``), the
    sample's ``cluster`` (m,) and its scores."""

    def reduce(found: PerId, scatter: Scatter) -> PerId:
        z = found.arrays["feature"].astype(np.float32)
        head_w, head_b, filled = split_empty_heads(z, w, b)
        cluster = np.argmax(z @ head_w.T + head_b, axis=1)
        counts = np.bincount(cluster, minlength=len(w))
        facts = {**found.facts, "split_clusters": len(filled),
                 "smallest_cluster": int(counts.min()), **cluster_scores(found.labels, cluster)}
        return PerId(found.ids, {"cluster": cluster}, found.labels,
                     {"head_w": head_w, "head_b": head_b, "model": found.extra["model"]},
                     facts)

    return reduce


def stages(cfg: Config) -> Stages:
    """The ``imc`` train stage, then (with ``train.precise_bn_images``) the
    ``export-calibration`` pass; returns the export (module docstring)."""
    from pipeline.methods.arch import initial_model
    from pipeline.progress import figures, say

    net = initial_model(cfg)
    assert isinstance(net, ImcNet)
    result = yield Train("imc", cfg.train.epochs, ImcProgram(cfg, net))
    _load(net, {key[len("net."):]: v for key, v in result.state.items()
                if key.startswith("net.")})
    history = [{"stage": "train", **row} for row in result.history]
    if cfg.train.precise_bn_images:
        net.output = "hidden"
        last = net.last
        found = yield Embed("export-calibration", _bytes(net), imc_arch(cfg, "hidden"),
                            sample=cfg.train.precise_bn_images,
                            precise_bn=cfg.train.batch_size // cfg.scale.workers,
                            reduce=split_heads(last.weight.detach().numpy(),
                                               last.bias.detach().numpy()))
        _load_bytes(net, found.extra["model"].tobytes())
        with torch.no_grad():
            last.weight.copy_(torch.from_numpy(found.extra["head_w"]))
            last.bias.copy_(torch.from_numpy(found.extra["head_b"]))
        row = {"stage": "calibration", "epoch": len(result.history), **found.facts}
        history.append(row)
        say(f"imc calibrated on {len(found.ids)} images{figures(row)}")
    return export(cfg, net, history)


def export(cfg: Config, net: ImcNet, history: list[dict[str, Any]]) -> TrainedModel:
    """The network mapping images to the head's probabilities p (n, k), with the one-hot
    centroids: nearest-centroid assignment is argmax p, the method's cluster."""
    net.output = "probs"
    return probs_export(_bytes(net), imc_arch(cfg, "probs"), history)


def _load(net: nn.Module, state: dict[str, Any]) -> None:
    net.load_state_dict({key: torch.from_numpy(np.asarray(v)) for key, v in state.items()})


def _load_bytes(net: nn.Module, model: bytes) -> None:
    from safetensors.torch import load as st_load

    net.load_state_dict(st_load(model))


def _bytes(model: nn.Module) -> bytes:
    from pipeline.models.weights import save_bytes

    return save_bytes(model)
