"""``multiview``: Guérin, Thiery, Nyiri, Gibaru & Boots, "Combining pretrained CNN feature
extractors to enhance clustering of complex natural images", Neurocomputing 2021
(DESIGN §5.5). No public code exists; this is our design from the paper's idea: the
features of several extractors are the views of a multi-view clustering problem, fused by
a multi-input network trained end to end.

**Views** (:func:`parse_view`, ``multiview.views``). Each entry is a finished run of ours
(local or ``s3://``; its ``model/``), ``ARCH[:WEIGHTS_URI]`` for a torchvision architecture
(:mod:`pipeline.models.zoo`, penultimate features, random weights when none are given), or
``noise[:DIM]``, a diagnostic extractor whose features carry no information about the image.
``#size=S,mean=a/b/c,std=a/b/c`` after an entry overrides its input. Images are decoded
once, at ``data.image_size``; each view's :class:`ViewNet` maps them on the device to its
own input (channels, size, normalisation: a run's ``model.json``, torchvision's ImageNet
defaults for the architectures). A run of ``depict`` or ``imc`` gives the representation
under its softmax head (the embedding, the head's last hidden layer), not k probabilities.

**Feature passes.** One Embed stage per view (saved: a finished view is never recomputed);
its reduce PCA-whitens the features to ``multiview.pca_dim`` and L2-normalises them
(DeepCluster's :class:`~pipeline.methods.deepcluster.Whitening`), runs k-means on them (the
single-view baseline) and measures the view's cluster structure, the gap statistic of
Tibshirani, Walther & Hastie (2001) against a null of the same features with every
column permuted independently (:func:`structure_gap`): pure noise scores ~0.

**View weights** (:func:`view_weights`). The user cannot know which extractor is bad (the
paper's point), so the network gates each view by its measured structure: views with
gap_v ≥ ``multiview.min_gap`` share equal weights, the others get 0 (``weighting: gated``,
the default; ``gap``: w_v ∝ gap_v over those views; ``uniform``: every view the same).

**Network** (:class:`FusionNet`). Per view an MLP branch (p_v → hidden → embed_dim); the
fused embedding z = Σ_v w_v·branch_v(x_v); per view an MLP decoder reconstructing x_v from z;
a DEC clustering layer (Xie, Girshick & Farhadi 2016): Student-t soft assignments
q_ij ∝ (1 + ‖z_i − μ_j‖²/α)^{−(α+1)/2} and the sharpened target p_ij ∝ q_ij² / Σ_i q_ij.

**Stages.** The view passes; ``fusion-pretrain-startR``: ``multiview.starts`` independent
pretrainings, reconstruction alone (Σ_v w_v·MSE_v), the lowest final reconstruction kept
(:func:`pretrained`); k-means on its z initialises μ; then rounds of ``fusion-round-RRR``
(``multiview.target_every`` epochs of reconstruction + ``multiview.cluster_weight``·KL(P‖Q),
IDEC's loss, Guo et al. 2017) with P recomputed over every image between rounds, until fewer than
``multiview.tol`` of the clusters change or ``train.epochs`` are spent. The fusion stages
train on the feature arrays alone (``Train(inputs="arrays")``), with the shared runner's
shuffling, checkpoints and resume.

**Baselines** (``metrics.json`` ``views``): each view's k-means, k-means on the
concatenated views, and the co-association ensemble of the single-view partitions, as
normalised spectral clustering of C = HHᵀ/V with H the one-hot partitions (n × Vk) through
the small Vk × Vk Gram matrix (:func:`coassociation`; C itself is never formed).

**Export.** :class:`MultiviewNet`: every view's network and the fusion network, images →
z, with μ as centroids. argmax_j q_ij is the nearest μ_j, so the assign job, the outliers and
the report give the method's own cluster, from raw images. Plain PyTorch/numpy: no Ray.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import ConfigError
from pipeline.kmeans.shards import kmeans_features
from pipeline.methods.argmax import cluster_scores
from pipeline.methods.base import (
    Context,
    Embed,
    EpochMeans,
    Hooks,
    PerId,
    Scatter,
    Stages,
    Train,
    best_start,
    descend,
    start_seed,
    starts_report,
)
from pipeline.models import zoo

if TYPE_CHECKING:
    from pipeline.config import Config
    from pipeline.outputs import TrainedModel

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------
# View entries.

LUMA = (0.299, 0.587, 0.114)
# Argmax-head models give the representation under the head (module docstring).
_UNDER_HEAD = {"depict": ("embedding", "embed_dim"), "imc": ("hidden", "head_hidden")}


@dataclass(frozen=True)
class ViewSpec:
    """One ``multiview.views`` entry: ``kind`` "run" (``source`` its URI), "arch"
    (``source`` the architecture, ``weights`` a URI or None, found in the checkpoint at
    ``key`` and ``prefix`` when given) or "noise" (``dim``), with input overrides ``size``,
    ``mean``, ``std``."""

    entry: str
    kind: str
    source: str
    weights: str | None = None
    dim: int = 64
    size: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    key: str | None = None  # the checkpoint's table of weights ("teacher", "model/ema")
    prefix: str | None = None  # stripped from the weights' names ("module.encoder_q.")


def parse_view(entry: str) -> ViewSpec:
    """The spec of ``entry`` (syntax only; :func:`resolve_view` reads it); a ConfigError
    naming the entry when it cannot be one."""
    if not isinstance(entry, str) or not entry.strip():
        raise ConfigError(f"multiview.views: {entry!r}: expected a run URI or ARCH[:WEIGHTS]")
    body, _, options = entry.strip().partition("#")
    opts = _options(entry, options)
    head, colon, rest = body.partition(":")
    if ("key" in opts or "prefix" in opts) and not (head in zoo.ZOO and rest):
        raise ConfigError(f"multiview.views: {entry!r}: key= and prefix= say where an "
                          "ARCH:WEIGHTS checkpoint holds the weights; this entry has none")
    if head in zoo.ZOO:
        return ViewSpec(entry, "arch", head, rest or None, **opts)
    if head == "noise":
        if rest and not rest.isdigit() or rest == "0":
            raise ConfigError(f"multiview.views: {entry!r}: noise[:DIM] needs DIM >= 1")
        return ViewSpec(entry, "noise", "", None, int(rest or 64), **opts)
    if colon and not rest.startswith("//") and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", head):
        raise ConfigError(f"multiview.views: {entry!r}: unknown architecture {head!r}; "
                          f"known: {', '.join(zoo.ZOO)}")
    return ViewSpec(entry, "run", body, **opts)


def _options(entry: str, text: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for part in filter(None, text.split(",")):
        key, eq, value = part.partition("=")
        try:
            if key == "size" and eq:
                out["size"] = int(value)
                if out["size"] < 1:
                    raise ValueError
            elif key in ("mean", "std") and eq:
                out[key] = tuple(float(v) for v in value.split("/"))
            elif key in ("key", "prefix") and eq:  # where the weights sit in the checkpoint
                out[key] = value
            else:
                raise ValueError
        except ValueError:
            raise ConfigError(f"multiview.views: {entry!r}: bad option {part!r} (size=N, "
                              "mean=a/b/c, std=a/b/c, key=K, prefix=P)") from None
    return out


def view_names(specs: list[ViewSpec]) -> list[str]:
    """Short unique names for tables and stage names: the architecture, the run's folder."""
    names: list[str] = []
    for spec in specs:
        base = {"arch": spec.source, "noise": f"noise{spec.dim}"}.get(
            spec.kind, spec.source.rstrip("/").rsplit("/", 1)[-1] or "run")
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", base)
        names.append(name if name not in names else f"{name}-{len(names)}")
    return names


def resolve_view(spec: ViewSpec, cfg: Config) -> tuple[nn.Module, dict[str, Any]]:
    """The view's network (:class:`ViewNet`, weights loaded) and its arch record; a
    ConfigError naming the entry when the run, architecture or weights do not fit."""
    torch.manual_seed(_seed(cfg.train.seed, spec.entry))  # a fresh network: the same each time
    try:
        extractor, state = _extractor(spec, cfg)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - one line naming the entry
        raise ConfigError(f"multiview.views: {spec.entry!r}: {exc}") from exc
    size = spec.size or extractor["image_size"]
    arch = {"kind": "multiview_view", "entry": spec.entry, "extractor": extractor,
            "in_channels": cfg.data.channels, "in_mean": list(_per_channel(cfg.data.mean,
                                                                           cfg.data.channels)),
            "in_std": list(_per_channel(cfg.data.std, cfg.data.channels)),
            "channels": extractor["in_channels"], "size": size,
            "mean": list(_per_channel(spec.mean or extractor["mean"], extractor["in_channels"])),
            "std": list(_per_channel(spec.std or extractor["std"], extractor["in_channels"])),
            "feature_dim": extractor["feature_dim"], "normalize": False}
    net = ViewNet(arch)
    if state is not None:
        net.extractor.load_state_dict(state)
    return net.eval(), arch


def _seed(seed: int, entry: str) -> int:
    """A seed for the view ``entry`` of a run seeded ``seed``, whatever the views' order."""
    import hashlib

    digest = hashlib.sha256(f"{seed}:{entry}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def _per_channel(values: Any, channels: int) -> tuple[float, ...]:
    values = tuple(float(v) for v in values)
    if len(values) == 1:
        return values * channels
    if len(values) != channels:
        raise ConfigError(f"multiview.views: {len(values)} mean/std values for {channels} "
                          "channels")
    return values


def _extractor(spec: ViewSpec, cfg: Config) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(extractor arch record, its state dict or None for a fresh one)."""
    if spec.kind == "noise":
        return {"kind": "noise", "dim": spec.dim, "in_channels": 1, "image_size": 8,
                "mean": [0.0], "std": [1.0], "feature_dim": spec.dim,
                "seed": cfg.train.seed}, None
    if spec.kind == "arch":
        return _zoo_extractor(spec, cfg)
    return _run_extractor(spec, cfg)


def _zoo_extractor(spec: ViewSpec, cfg: Config) -> tuple[dict[str, Any], dict[str, Any] | None]:
    entry = zoo.ZOO[spec.source]
    size = spec.size or entry.size
    arch = {"kind": "torchvision", "arch": spec.source, "in_channels": 3, "image_size": size,
            "mean": list(zoo.IMAGENET_MEAN), "std": list(zoo.IMAGENET_STD),
            "feature_dim": entry.dim}
    if spec.weights is None:
        log.warning("multiview view %s: no weights given; random initialisation", spec.entry)
        return arch, None
    from pipeline.data import fs as fsx
    from pipeline.models.weights import read_tables

    data = fsx.read_bytes(fsx.locate(spec.weights, cfg.s3))
    net = zoo.build(spec.source, size)
    zoo.load_checked(net, read_tables(data, spec.weights), spec.weights,
                     cfg.multiview.min_coverage, spec.key, spec.prefix)
    return arch, net.state_dict()


def _run_extractor(spec: ViewSpec, cfg: Config) -> tuple[dict[str, Any], dict[str, Any]]:
    from safetensors.torch import load as st_load

    from pipeline.data import fs as fsx
    from pipeline.data.publish import is_complete
    from pipeline.methods.arch import build_any

    root = fsx.locate(spec.source, cfg.s3)
    model = root.join("model")
    if not is_complete(model):
        raise ConfigError(f"multiview.views: {spec.entry!r}: neither a finished run "
                          f"({model.uri}/_SUCCESS is missing) nor a known architecture "
                          f"({', '.join(zoo.ZOO)})")
    arch = json.loads(fsx.read_bytes(model.join("model.json")))
    state = st_load(fsx.read_bytes(model.join("model.safetensors")))
    if arch.get("kind") in _UNDER_HEAD:
        output, dim_key = _UNDER_HEAD[arch["kind"]]
        arch = {**arch, "output": output, "feature_dim": arch[dim_key]}
    build_any(arch).load_state_dict(state)  # the record and the weights agree
    return arch, state


def check(cfg: Config) -> None:
    """The registry's preflight, before any work: every view parses, its run or weights
    exist and fit (:func:`resolve_view`)."""
    if not cfg.multiview.views:
        raise ConfigError("multiview.views: needs at least one view (a run URI or "
                          f"ARCH[:WEIGHTS]; architectures: {', '.join(zoo.ZOO)})")
    for entry in cfg.multiview.views:
        resolve_view(parse_view(entry), cfg)


# ------------------------------------------------------------------------------------------
# The networks.


class NoiseFeatures(nn.Module):
    """(n, 1, 8, 8) -> (n, dim) features with no information about the image: sin of a huge
    random projection, a deterministic hash of the pixels, ~uniform over [−√2, √2]."""

    def __init__(self, dim: int, seed: int):
        super().__init__()
        gen = torch.Generator().manual_seed(int(seed))
        self.proj: torch.Tensor
        self.register_buffer("proj", torch.randn(64, dim, generator=gen) * 1e4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return math.sqrt(2) * torch.sin(x.flatten(1).double() @ self.proj.double()).float()


def build_extractor(arch: dict[str, Any]) -> nn.Module:
    if arch["kind"] == "torchvision":
        return zoo.build(arch["arch"], arch["image_size"])
    if arch["kind"] == "noise":
        return NoiseFeatures(arch["dim"], arch["seed"])
    from pipeline.methods.arch import build_any

    return build_any(arch)


class ViewNet(nn.Module):
    """One view: images (n, C, H, W) under the run's input contract -> the extractor's
    features (n, d_v). Un-normalises, maps channels (grey → RGB by repetition, RGB → grey by
    luma), resizes (bilinear, antialiased), normalises for the extractor."""

    def __init__(self, arch: dict[str, Any]):
        super().__init__()
        self.extractor = build_extractor(arch["extractor"])
        self.size, self.channels = int(arch["size"]), int(arch["channels"])

        def col(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float32).reshape(1, -1, 1, 1)

        self.in_mean: torch.Tensor
        self.in_std: torch.Tensor
        self.mean: torch.Tensor
        self.std: torch.Tensor
        for name in ("in_mean", "in_std", "mean", "std"):
            self.register_buffer(name, col(arch[name]), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.in_std + self.in_mean
        if self.channels == 3 and x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        elif self.channels == 1 and x.shape[1] == 3:
            x = (x * x.new_tensor(LUMA).reshape(1, 3, 1, 1)).sum(dim=1, keepdim=True)
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear",
                              align_corners=False, antialias=self.size < x.shape[-1])
        return self.extractor((x - self.mean) / self.std).flatten(1).float()  # type: ignore[no-any-return]


def fusion_arch(cfg: Config, in_dims: list[int], dims: list[int], weights: list[float],
                seed: int) -> dict[str, Any]:
    mv = cfg.multiview
    return {"in_dims": in_dims, "dims": dims, "weights": weights, "hidden": mv.hidden,
            "embed_dim": mv.embed_dim, "k": cfg.cluster.k, "alpha": mv.alpha, "seed": seed}


def _mlp(a: int, h: int, b: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(a, h), nn.ReLU(True), nn.Linear(h, b))


class FusionNet(nn.Module):
    """The multi-input network: per view a whitening (fixed: ``mean`` (d_v,), ``proj``
    (d_v, p_v)), an encoder branch p_v → hidden → e and a decoder e → hidden → p_v; the fused
    embedding z = Σ_v w_v·branch_v(x_v) (n, e); DEC's centroids ``mu`` (k, e)."""

    def __init__(self, arch: dict[str, Any]):
        super().__init__()
        self.arch = arch
        d, p, h, e = arch["in_dims"], arch["dims"], arch["hidden"], arch["embed_dim"]
        self.alpha = float(arch["alpha"])
        self.encoders, self.decoders = nn.ModuleList(), nn.ModuleList()
        for v, pv in enumerate(p):  # each view's branch from its own seed: adding a view
            with torch.random.fork_rng():  # leaves the others' initial weights as they were
                torch.manual_seed(int(arch.get("seed", 0)) * 1009 + v)
                self.encoders.append(_mlp(pv, h, e))
                self.decoders.append(_mlp(e, h, pv))
        self.mu = nn.Parameter(torch.zeros(arch["k"], e))
        self.view_w: torch.Tensor
        self.register_buffer("view_w", torch.tensor(arch["weights"], dtype=torch.float32))
        for v, (dv, pv) in enumerate(zip(d, p, strict=True)):
            self.register_buffer(f"mean{v}", torch.zeros(dv))
            self.register_buffer(f"proj{v}", torch.zeros(dv, pv))

    def whiten(self, raw: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
        """Raw view features [(n, d_v)] -> the branches' inputs [(n, p_v)]:
        :func:`scaled_whitening` as a layer (None, a view of weight 0 not computed, stays)."""
        out: list[torch.Tensor | None] = []
        for v, x in enumerate(raw):
            if x is None:
                out.append(None)
                continue
            z = (x - getattr(self, f"mean{v}")) @ getattr(self, f"proj{v}")
            out.append(F.normalize(z, dim=1) * math.sqrt(z.shape[1]))
        return out

    def embed(self, xs: Sequence[torch.Tensor | None]) -> torch.Tensor:
        """Whitened views [(n, p_v)] -> z (n, e); a view of weight 0 is not evaluated."""
        parts = [w * enc(x) for w, enc, x in zip(self.view_w, self.encoders, xs, strict=True)
                 if w > 0]
        return torch.stack(parts).sum(dim=0)

    def reconstruction(self, z: torch.Tensor, xs: Sequence[torch.Tensor]) -> torch.Tensor:
        """Σ_v w_v · mean((decoder_v(z) − x_v)²), the views weighted as in z."""
        loss = z.new_zeros(())
        for w, dec, x in zip(self.view_w, self.decoders, xs, strict=True):
            if w > 0:
                loss = loss + w * F.mse_loss(dec(z), x)
        return loss

    def forward(self, raw: list[torch.Tensor | None]) -> torch.Tensor:
        return self.embed(self.whiten(raw))


class MultiviewNet(nn.Module):
    """The export: images (n, C, H, W) -> every view's features -> z (n, e)."""

    def __init__(self, arch: dict[str, Any]):
        super().__init__()
        self.views = nn.ModuleList(ViewNet(v) for v in arch["views"])
        self.fusion = FusionNet(arch["fusion"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.fusion.view_w.tolist()
        return self.fusion([view(x) if w[v] > 0 else None  # type: ignore[no-any-return]
                            for v, view in enumerate(self.views)])


def build_model(arch: dict[str, Any]) -> nn.Module:
    """The registry's builder for the model kinds "multiview" and "multiview_view"."""
    if arch["kind"] == "multiview_view":
        return ViewNet(arch)
    return MultiviewNet(arch)


# ------------------------------------------------------------------------------------------
# The math (numpy and torch, no Ray).


def scaled_whitening(x: np.ndarray, mean: np.ndarray, proj: np.ndarray) -> np.ndarray:
    """(n, d) -> (n, p) float32: PCA-whitened, L2-normalised, times √p (coordinates of unit
    variance on average): the fusion network's input (:meth:`FusionNet.whiten`)."""
    z = (np.asarray(x, np.float32) - mean) @ proj
    z /= np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
    return (z * np.float32(math.sqrt(z.shape[1]))).astype(np.float32)


def student_t(z: torch.Tensor, mu: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """DEC's soft assignment (Xie et al. 2016, Eq. 1): z (n, e), mu (k, e) -> q (n, k),
    q_ij ∝ (1 + ‖z_i − μ_j‖²/α)^{−(α+1)/2}, rows summing to 1."""
    d2 = torch.cdist(z, mu).pow(2)
    q = (1 + d2 / alpha).pow(-(alpha + 1) / 2)
    return q / q.sum(dim=1, keepdim=True)


def dec_target(q: np.ndarray) -> np.ndarray:
    """DEC's target (Xie et al. 2016, Eq. 3): p_ij ∝ q_ij² / f_j, f_j = Σ_i q_ij over every
    image, rows summing to 1. q (n, k) -> p (n, k) float64."""
    q = np.asarray(q, np.float64)
    p = q ** 2 / np.maximum(q.sum(axis=0), 1e-300)
    return p / np.maximum(p.sum(axis=1, keepdims=True), 1e-300)  # type: ignore[no-any-return]


def kl_loss(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(P‖Q) summed over clusters, averaged over the batch: p, q (b, k)."""
    return (p * (torch.log(p.clamp_min(1e-12)) - torch.log(q.clamp_min(1e-12)))).sum(1).mean()


def kmeans_inertia(x: np.ndarray, k: int, seed: int, iters: int) -> tuple[float, np.ndarray]:
    """(inertia, labels (n,)) of faiss k-means on x (n, d)."""
    from pipeline.kmeans.reference import faiss_kmeans
    from pipeline.kmeans.stats import assign

    centroids = faiss_kmeans(x, k, niter=iters, seed=seed)
    labels, d2, _ = assign(torch.from_numpy(np.ascontiguousarray(x, np.float32)),
                           torch.from_numpy(centroids))
    return float(d2.double().sum()), labels.numpy()


def structure_gap(x: np.ndarray, k: int, seed: int, iters: int = 20, sample: int = 20_000
                  ) -> float:
    """The gap statistic (Tibshirani et al. 2001) of x (n, p) (whitened, unnormalised
    coordinates): log W_null − log W, W the k-means inertia of the L2-normalised rows, the
    null the same matrix with each column permuted independently (the marginals kept, the
    dependence between coordinates, where clusters live, destroyed). Pure noise scores ~0;
    on at most ``sample`` rows."""
    rng = np.random.default_rng((seed, 11))
    if len(x) > sample:
        x = x[np.sort(rng.choice(len(x), sample, replace=False))]
    null = np.stack([rng.permutation(col) for col in np.asarray(x, np.float32).T], axis=1)

    def unit(a: np.ndarray) -> np.ndarray:
        return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)

    k = min(k, len(x))
    w = kmeans_inertia(unit(np.asarray(x, np.float32)), k, seed, iters)[0]
    w0 = kmeans_inertia(unit(null), k, seed, iters)[0]
    return float(np.log(max(w0, 1e-12)) - np.log(max(w, 1e-12)))


def view_weights(gaps: list[float], weighting: str, min_gap: float) -> list[float]:
    """Per-view weights summing to 1 (module docstring): equal over the views with gap ≥
    ``min_gap`` and 0 for the others (``gated``), ∝ gap over those views (``gap``), or
    equal over all (``uniform``). When no view passes, all are equal."""
    g = np.asarray(gaps, np.float64)
    if weighting == "uniform" or not np.any(g >= min_gap):
        return [1.0 / len(g)] * len(g)
    w = np.where(g >= min_gap, g if weighting == "gap" else 1.0, 0.0)
    return (w / w.sum()).tolist()  # type: ignore[no-any-return]


def coassociation(partitions: list[np.ndarray], k: int, seed: int, iters: int = 30
                  ) -> np.ndarray:
    """The co-association ensemble (Fred & Jain 2005) of V partitions (n,) each: normalised
    spectral clustering (Ng, Jordan & Weiss 2001) of C = HHᵀ/V, H (n, Vk) the one-hot
    partitions. With D the degrees of C, the top-k eigenvectors of D^{-1/2} C D^{-1/2} are
    the left singular vectors of D^{-1/2} H/√V, from its (Vk, Vk) Gram matrix; their rows,
    L2-normalised, are clustered by k-means. -> labels (n,)."""
    n, v = len(partitions[0]), len(partitions)
    cols = np.stack([p.astype(np.int64) + i * k for i, p in enumerate(partitions)], axis=1)
    sizes = np.bincount(cols.ravel(), minlength=v * k).astype(np.float64)
    degree = sizes[cols].sum(axis=1) / v  # Σ_j C_ij
    scale = 1.0 / np.sqrt(degree * v)
    gram = np.zeros((v * k, v * k))
    for a in range(v):
        for b in range(v):
            np.add.at(gram, (cols[:, a], cols[:, b]), scale ** 2)
    values, vectors = np.linalg.eigh(gram)
    top = np.argsort(values)[::-1][:k]
    s = np.sqrt(np.maximum(values[top], 1e-12))
    u = np.zeros((n, len(top)))
    for a in range(v):  # U = D^{-1/2} H V S^{-1}
        u += vectors[cols[:, a]][:, top]
    u = u * scale[:, None] / s[None, :]
    u /= np.maximum(np.linalg.norm(u, axis=1, keepdims=True), 1e-12)
    return kmeans_inertia(u.astype(np.float32), k, seed, iters)[1]


# ------------------------------------------------------------------------------------------
# The training program.


class FusionForward(nn.Module):
    """What DDP wraps: whitened views [(b, p_v)] -> (reconstruction loss (), q (b, k))."""

    def __init__(self, net: FusionNet):
        super().__init__()
        self.net = net

    def forward(self, xs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.net.embed(xs)
        return self.net.reconstruction(z, xs), student_t(z, self.net.mu, self.net.alpha)


class FusionTrainer(Hooks):
    """A fusion stage over the joined arrays ``x0``, ``x1``, … (whitened views): the
    weighted reconstruction, plus (``joint``) ``multiview.cluster_weight``·KL(P‖Q) against the
    joined ``target`` P (b, k). Adam on ``multiview.lr``; μ is trained only when ``joint``;
    the branches of views of weight 0 are frozen (they are not evaluated)."""

    def __init__(self, cfg: Config, net: FusionNet, joint: bool,
                 optimizer_state: dict[str, Any] | None = None):
        self.cfg, self.net, self.joint, self.optimizer_state = cfg, net, joint, optimizer_state
        self.module: nn.Module = net
        self.means = EpochMeans()

    def setup(self, ctx: Context) -> list[torch.optim.Optimizer]:
        net = self.net.to(ctx.device)
        net.mu.requires_grad_(self.joint)
        for w, enc, dec in zip(net.view_w.tolist(), net.encoders, net.decoders, strict=True):
            enc.requires_grad_(w > 0)
            dec.requires_grad_(w > 0)
        self.wrapped = ctx.wrap(FusionForward(net))
        params = [p for p in net.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(params, lr=self.cfg.multiview.lr)
        if self.optimizer_state is not None:
            self.optimizer.load_state_dict(self.optimizer_state)
        return [self.optimizer]

    def step(self, batch: dict[str, Any], ctx: Context) -> dict[str, float]:
        xs = [batch[f"x{v}"].float() for v in range(len(self.net.encoders))]
        self.wrapped.train()
        reconstruction, q = self.wrapped(xs)
        loss, parts = reconstruction, {"reconstruction": reconstruction.item()}
        if self.joint:
            kl = kl_loss(batch["target"].float(), q)
            loss = reconstruction + self.cfg.multiview.cluster_weight * kl
            parts["kl"] = kl.item()
        descend(self.optimizer, loss)
        self.means.add(parts)
        return {}

    def end_epoch(self, epoch: int, ctx: Context) -> dict[str, float]:
        return self.means.pop()


# ------------------------------------------------------------------------------------------
# The method as stages.


def view_reduce(cfg: Config, seed: int) -> Any:
    """A view pass's reduce: raw features (n, d) -> ``arrays["feature"]`` the whitened view
    (n, p) (:func:`scaled_whitening`), ``arrays["cluster"]`` its k-means (the single-view
    baseline, on the whitened L2-normalised features as DeepCluster clusters),
    ``extra`` the whitening, ``facts`` the gap, d and the baseline's scores."""
    from pipeline.methods.deepcluster import MomentStats, Whitening

    def reduce(found: PerId, scatter: Scatter) -> PerId:
        t0, mv, dc = time.perf_counter(), cfg.multiview, cfg.deepcluster
        x = found.arrays["feature"].astype(np.float32)
        whitening = Whitening.fit(MomentStats.of(x), max(1, min(mv.pca_dim, x.shape[1],
                                                                len(x) - 1)))
        w = scaled_whitening(x, whitening.mean, whitening.proj)
        _, labels = kmeans_features(w / np.float32(math.sqrt(w.shape[1])), cfg.cluster.k,
                                    mv.kmeans_iters, seed, scatter, dc.local_max_points,
                                    dc.kmeans_shards, cfg.scale.gpu, redo=mv.kmeans_redo)
        facts = {**found.facts, "dim": int(x.shape[1]),
                 "gap": structure_gap(w, cfg.cluster.k, seed, mv.kmeans_iters),
                 "kmeans_s": time.perf_counter() - t0, **cluster_scores(found.labels, labels)}
        return PerId(found.ids, {"feature": w, "cluster": labels.astype(np.int64)}, found.labels,
                     {"mean": whitening.mean, "proj": whitening.proj}, facts)

    return reduce


def combine(views: list[PerId]) -> PerId:
    """The views' whitened features as one table: ``x0``, ``x1``, … over the ids every view
    has (all of them, unless a view's pass skipped an image)."""
    ids = views[0].ids
    for view in views[1:]:
        ids = np.intersect1d(ids, view.ids)
    arrays = {f"x{v}": view.take(ids, "feature") for v, view in enumerate(views)}
    labels = None if views[0].labels is None else views[0].labels[
        np.searchsorted(views[0].ids, ids)]
    return PerId(ids, arrays, labels)


def fused(net: FusionNet, table: PerId, chunk: int = 65536) -> np.ndarray:
    """z (n, e) float32 of every row of ``table`` (on the driver's CPU)."""
    n, views = len(table.ids), len(net.encoders)
    net = net.cpu().eval()
    parts = []
    with torch.no_grad():
        for start in range(0, n, chunk):
            xs = [torch.from_numpy(table.arrays[f"x{v}"][start:start + chunk]).float()
                  for v in range(views)]
            parts.append(net.embed(xs).numpy())
    return np.concatenate(parts) if parts else np.zeros((0, net.mu.shape[1]), np.float32)


def soft_assign(net: FusionNet, z: np.ndarray) -> np.ndarray:
    """q (n, k) float64 of z (n, e) under the net's centroids (:func:`student_t`)."""
    with torch.no_grad():
        q = student_t(torch.from_numpy(z).double(), net.mu.detach().double(), net.alpha)
    return q.numpy()  # type: ignore[no-any-return]


def baselines(cfg: Config, names: list[str], specs: list[ViewSpec], views: list[PerId],
              table: PerId, weights: list[float]) -> list[dict[str, Any]]:
    """The ``views`` rows: each view's k-means, the concatenation, the co-association."""
    k, seed, mv = cfg.cluster.k, cfg.train.seed, cfg.multiview
    rows: list[dict[str, Any]] = []
    for name, spec, view, w in zip(names, specs, views, weights, strict=True):
        f = view.facts
        rows.append({"view": name, "entry": spec.entry, "dim": f["dim"],
                     "gap": round(f["gap"], 4), "weight": round(w, 4),
                     **_scores(f), "embed_s": round(f.get("embed_s", 0.0), 1)})
    n_views = len(views)
    concat = np.concatenate([table.arrays[f"x{v}"] / np.float32(math.sqrt(
        table.arrays[f"x{v}"].shape[1] * n_views)) for v in range(n_views)], axis=1)
    labels = kmeans_inertia(concat, k, seed, mv.kmeans_iters)[1]
    rows.append({"view": "concatenation", "dim": int(concat.shape[1]),
                 **_scores(cluster_scores(table.labels, labels))})
    partitions = [view.take(table.ids, "cluster") for view in views]
    labels = coassociation(partitions, k, seed, mv.kmeans_iters)
    rows.append({"view": "co-association", **_scores(cluster_scores(table.labels, labels))})
    return rows


def _scores(facts: dict[str, Any]) -> dict[str, float]:
    return {key: round(float(facts[key]), 4) for key in ("nmi", "acc", "ari") if key in facts}


def stages(cfg: Config) -> Stages:
    """The view passes, then the fusion (:func:`fusion_stages`), then the export (module
    docstring)."""
    from pipeline.models.weights import save_bytes
    from pipeline.progress import figures, say

    specs = [parse_view(entry) for entry in cfg.multiview.views]
    names = view_names(specs)
    nets, archs, views = [], [], []
    for v, (spec, name) in enumerate(zip(specs, names, strict=True)):
        net, arch = resolve_view(spec, cfg)
        found = yield Embed(f"view-{v:02d}-{name}", save_bytes(net), arch,
                            reduce=view_reduce(cfg, cfg.train.seed), pool=True)
        say(f"multiview view {name}{figures(found.facts)}")
        nets.append(net)
        archs.append(arch)
        views.append(found)
    fusion, history, results = yield from fusion_stages(cfg, views, names, specs)
    return export(cfg, archs, nets, fusion, history, results)


def fusion_stages(cfg: Config, views: list[PerId], names: list[str], specs: list[ViewSpec]
                  ) -> Stages:
    """Given the view passes: the baselines, the fusion pretraining (:func:`pretrained`),
    DEC's start, then DEC rounds -> (the trained :class:`FusionNet`, the history, the
    results for metrics.json: ``views``, the baselines' and multiview's rows, and with
    several starts ``starts`` and ``kept_start``)."""
    from pipeline.progress import figures, say

    mv = cfg.multiview
    table = combine(views)
    weights = view_weights([view.facts["gap"] for view in views], mv.weighting, mv.min_gap)
    rows = baselines(cfg, names, specs, views, table, weights)
    started, joins = time.monotonic(), {f"x{v}": table for v in range(len(views))}
    net, history, starts = yield from pretrained(cfg, views, weights, joins)
    z = fused(net, table)
    start = initial_clusters(cfg, table, weights, z)
    with torch.no_grad():
        net.mu.copy_(torch.from_numpy(cluster_means(z, start, cfg.cluster.k)))
    q = soft_assign(net, z)
    history.append({"stage": "initial-clustering", "epoch": 0,
                    **cluster_scores(table.labels, q.argmax(axis=1))})
    state, every = None, mv.target_every
    for r in range(math.ceil(cfg.train.epochs / every)):
        budget = cfg.train.time_budget_s
        if r and budget and time.monotonic() - started >= budget:
            log.info("multiview: train.time_budget_s=%s reached after %d rounds", budget, r)
            break
        previous = q.argmax(axis=1)
        target = PerId(table.ids, {"target": dec_target(q).astype(np.float32)}, table.labels)
        epochs = min(every, cfg.train.epochs - r * every)
        result = yield Train(f"fusion-round-{r:03d}", epochs,
                             FusionTrainer(cfg, net, True, state),
                             join={**joins, "target": target}, batch_size=mv.batch_size,
                             inputs="arrays")
        _load(net, result.state)
        state = result.optimizers[0]
        q = soft_assign(net, fused(net, table))
        changed = float(np.mean(q.argmax(axis=1) != previous))
        row = {"stage": "joint", "epoch": r * every + epochs, "changed": changed,
               **_figures(result.history),
               **cluster_scores(table.labels, q.argmax(axis=1))}
        history.append(row)
        say(f"multiview round {r + 1} (epoch {row['epoch']}/{cfg.train.epochs}){figures(row)}")
        if changed < mv.tol:
            log.info("multiview: %.4f of the clusters changed (< multiview.tol)", changed)
            break
    rows.append({"view": "multiview", "dim": mv.embed_dim,
                 **_scores(cluster_scores(table.labels, q.argmax(axis=1)))})
    return net, history, {"views": rows, **starts}


def pretrained(cfg: Config, views: list[PerId], weights: list[float],
               joins: dict[str, PerId]) -> Stages:
    """The fusion network after its reconstruction pretraining: ``multiview.starts``
    independent starts (start r: branches seeded from :func:`~pipeline.methods.base.
    start_seed`, the data order the run's), each ``multiview.pretrain_epochs`` epochs; the
    one with the lowest reconstruction in its last epoch is kept (k-means' ``n_init`` rule,
    as ``online.starts``): DEC's start is k-means on its z, which decides the result.
    -> (the kept :class:`FusionNet`, one history row per start, the starts' report for
    metrics.json: empty for one start)."""
    mv, tried = cfg.multiview, []
    dims = ([view.extra["mean"].shape[0] for view in views],
            [view.extra["proj"].shape[1] for view in views])
    for r in range(mv.starts if mv.pretrain_epochs else 0):
        net = fusion_net(cfg, views, dims, weights, start_seed(cfg.train.seed, r))
        name = "fusion-pretrain" if mv.starts == 1 else f"fusion-pretrain-start{r}"
        result = yield Train(name, mv.pretrain_epochs, FusionTrainer(cfg, net, False),
                             join=joins, batch_size=mv.batch_size, inputs="arrays")
        _load(net, result.state)
        tried.append((net, result.history))
    if not tried:  # no pretraining: DEC starts from the initial branches
        return fusion_net(cfg, views, dims, weights, cfg.train.seed), [], {}
    kept = best_start([h for _, h in tried], "reconstruction")
    several = len(tried) > 1
    history = [{"stage": "pretrain", "epoch": 0, **_figures(h),
                **({"start": r, "kept": r == kept} if several else {})}
               for r, (_, h) in enumerate(tried)]
    if not several:
        return tried[0][0], history, {}
    report = starts_report([(net.arch["seed"], h[-1]) for net, h in tried], kept,
                           "reconstruction")
    log.info("multiview: pretraining start %d of %d kept: %s", kept, mv.starts,
             report["starts"])
    return tried[kept][0], history, report


def fusion_net(cfg: Config, views: list[PerId], dims: tuple[list[int], list[int]],
               weights: list[float], seed: int) -> FusionNet:
    """A :class:`FusionNet` with its branches seeded from ``seed`` and the views'
    whitening set."""
    net = FusionNet(fusion_arch(cfg, *dims, weights, seed))
    _set_whitening(net, views)
    return net


def weighted_concatenation(table: PerId, weights: list[float]) -> np.ndarray:
    """The views side by side, each L2-normalised and scaled by √w_v: (n, Σp_v), whose
    squared distances are Σ_v w_v·d_v² (a view of weight 0 adds nothing)."""
    parts = [table.arrays[f"x{v}"] * np.float32(math.sqrt(w / table.arrays[f"x{v}"].shape[1]))
             for v, w in enumerate(weights) if w > 0]
    return np.concatenate(parts, axis=1)


def initial_clusters(cfg: Config, table: PerId, weights: list[float], z: np.ndarray
                     ) -> np.ndarray:
    """The clusters (n,) DEC starts from (``multiview.init``): k-means on the weighted
    concatenation of the views (``concat``), or on the pretrained fused embedding z
    (``embedding``, DEC's classic start)."""
    mv = cfg.multiview
    x = weighted_concatenation(table, weights) if mv.init == "concat" else z
    from pipeline.kmeans.reference import faiss_kmeans
    from pipeline.kmeans.stats import assign

    centroids = faiss_kmeans(x, cfg.cluster.k, mv.kmeans_iters, cfg.train.seed,
                             redo=mv.kmeans_redo)
    return assign(torch.from_numpy(np.ascontiguousarray(x, np.float32)),  # type: ignore[no-any-return]
                  torch.from_numpy(centroids))[0].numpy()


def cluster_means(z: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """(k, e) float32 means of z's rows per cluster (an empty cluster: a random row)."""
    sums = np.zeros((k, z.shape[1]))
    np.add.at(sums, labels, z)
    counts = np.bincount(labels, minlength=k)
    means = sums / np.maximum(counts, 1)[:, None]
    empty = np.flatnonzero(counts == 0)
    means[empty] = z[np.random.default_rng(0).choice(len(z), len(empty), replace=False)]
    return means.astype(np.float32)


def _figures(epochs: list[dict[str, Any]]) -> dict[str, Any]:
    """A fusion stage as one history row: its last epoch's figures, its summed seconds, and
    the step it resumed from after a restart, if any."""
    row = {key: v for key, v in epochs[-1].items() if key != "epoch"}
    row["epoch_s"] = sum(e.get("epoch_s", 0.0) for e in epochs)
    resumed = [e["resumed_from_step"] for e in epochs if "resumed_from_step" in e]
    return {**row, "resumed_from_step": resumed[0]} if resumed else row


def _set_whitening(net: FusionNet, views: list[PerId]) -> None:
    with torch.no_grad():
        for v, view in enumerate(views):
            getattr(net, f"mean{v}").copy_(torch.from_numpy(view.extra["mean"]))
            getattr(net, f"proj{v}").copy_(torch.from_numpy(view.extra["proj"]))


def _load(net: nn.Module, state: dict[str, np.ndarray]) -> None:
    net.load_state_dict({key: torch.from_numpy(np.asarray(v)) for key, v in state.items()})


def multiview_arch(cfg: Config, view_archs: list[dict[str, Any]], f_arch: dict[str, Any]
                   ) -> dict[str, Any]:
    """The export's record (``kind`` "multiview"): the input contract, every view's record
    and the fusion network's."""
    return {"kind": "multiview", "views": view_archs, "fusion": f_arch,
            "in_channels": cfg.data.channels, "image_size": cfg.data.image_size,
            "mean": cfg.data.mean, "std": cfg.data.std,
            "feature_dim": cfg.multiview.embed_dim, "normalize": False}


def export(cfg: Config, view_archs: list[dict[str, Any]], view_nets: list[nn.Module],
           net: FusionNet, history: list[dict[str, Any]], results: dict[str, Any]
           ) -> TrainedModel:
    """The composite :class:`MultiviewNet` (images -> z) and μ as centroids: the nearest
    centroid is argmax q, the method's cluster."""
    from pipeline.models.weights import save_bytes
    from pipeline.outputs import TrainedModel

    arch = multiview_arch(cfg, view_archs, net.arch)
    model = MultiviewNet(arch)
    for view, trained in zip(model.views, view_nets, strict=True):
        view.load_state_dict(trained.state_dict())
    model.fusion.load_state_dict(net.state_dict())
    return TrainedModel(save_bytes(model), arch, net.mu.detach().cpu().numpy().astype(np.float32),
                        history, results)
