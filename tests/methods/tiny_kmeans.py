"""A method written only for the seam's tests: k-means on the features of a frozen random
CNN. It is one module, a registry line (:func:`pipeline.methods.staged`) and no code in
``pipeline/distributed/``; both runners execute it.

Stages: :class:`Embed` (features of every image under the seeded, untrained model), k-means++
seeds on the driver (:func:`pipeline.kmeans.init.seed_centroids`), then :class:`Train`:
``train.epochs`` Lloyd iterations as a program over the stream, with the features joined by
id. Each worker sums its batches' per-cluster features and counts; at the epoch end the
sums are all-reduced and every centroid moves to its members' mean, so the result does not
depend on batch order or on the number of workers (up to float summation and the rows the
last partial batches drop).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.config import Config
from pipeline.kmeans.init import seed_centroids
from pipeline.methods.arch import model_arch
from pipeline.methods.base import Context, Embed, Hooks, Stages, Train
from pipeline.models.arch import build_from_arch
from pipeline.models.weights import save_bytes
from pipeline.outputs import TrainedModel


class Centroids(nn.Module):
    """The program's whole state, as buffers (so a mid-epoch checkpoint keeps the sums):
    centroids (k, d), this epoch's per-cluster sums (k, d), counts (k,) and squared
    distances (1,)."""

    def __init__(self, init: np.ndarray):
        super().__init__()
        c = torch.from_numpy(np.array(init, np.float32))
        self.centroids: torch.Tensor
        self.sums: torch.Tensor
        self.counts: torch.Tensor
        self.sqdist: torch.Tensor
        self.register_buffer("centroids", c)
        self.register_buffer("sums", torch.zeros_like(c))
        self.register_buffer("counts", torch.zeros(len(c)))
        self.register_buffer("sqdist", torch.zeros(1))

    def reset(self) -> None:
        for buffer in (self.sums, self.counts, self.sqdist):
            buffer.zero_()


class Lloyd(Hooks):
    """One Lloyd iteration per epoch over ``feature`` (b, d) batches."""

    def __init__(self, init: np.ndarray):
        self.module = Centroids(init)

    def setup(self, ctx: Context) -> list[torch.optim.Optimizer]:
        self.module.to(ctx.device)
        return []

    def step(self, batch: dict[str, Any], ctx: Context) -> dict[str, float]:
        m = self.module
        x = batch["feature"].float()
        d2 = torch.cdist(x, m.centroids) ** 2  # (b, k)
        nearest = d2.argmin(dim=1)
        m.sums.index_add_(0, nearest, x)
        m.counts += torch.bincount(nearest, minlength=len(m.counts)).float()
        m.sqdist += d2.min(dim=1).values.sum()
        return {}

    def end_epoch(self, epoch: int, ctx: Context) -> dict[str, float]:
        m = self.module
        sums, counts, sqdist = (ctx.all_reduce(t) for t in (m.sums, m.counts, m.sqdist))
        filled = counts > 0
        m.centroids[filled] = sums[filled] / counts[filled, None]
        parts = {"sqdist": float(sqdist / counts.sum()), "images": int(counts.sum())}
        if ctx.steps_per_epoch is not None:  # what the runner told the program
            parts["steps_per_epoch"] = ctx.steps_per_epoch
        m.reset()  # after reading: in one process all_reduce returns the buffers themselves
        return parts


def frozen_cnn(arch: dict[str, Any]) -> nn.Module:
    """The seeded, untrained CNN with its linear biases zeroed: in eval mode its BatchNorms
    pass tiny activations through, and the untrained biases would otherwise make every
    feature nearly the same vector (spread 5e-4 of the norm on digits; 0.13 zeroed)."""
    model = build_from_arch(arch).eval()
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, nn.Linear) and layer.bias is not None:
                layer.bias.zero_()
    return model


def stages(cfg: Config) -> Stages:
    torch.manual_seed(cfg.train.seed)
    arch = model_arch(cfg)
    model_bytes = save_bytes(frozen_cnn(arch))
    features = yield Embed("frozen-features", model_bytes, arch)
    pool = features.arrays["feature"]
    pool = pool[np.random.default_rng(cfg.train.seed).permutation(len(pool))]
    init = seed_centroids(pool, cfg.cluster.k, cfg.train.seed)
    result = yield Train("lloyd", cfg.train.epochs, Lloyd(init), join={"feature": features})
    return TrainedModel(model_bytes, arch, result.state["centroids"], result.history)
