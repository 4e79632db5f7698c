"""Fixed layers that methods put around an embedder (no trainable parameters)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Sobel(nn.Module):
    """Fixed (not trained) greyscale + Sobel filters: (n, C, H, W) -> (n, 2, H, W).

    Greyscale is the channel mean (for C = 3 the paper's luminance-free average); the two
    output channels are the horizontal and vertical Sobel responses (Caron et al. 2018 §5).
    """

    def __init__(self, in_channels: int):
        super().__init__()
        gx = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])
        kernel = torch.stack([gx, gx.t()]).unsqueeze(1)  # (2, 1, 3, 3)
        self.grey: torch.Tensor
        self.kernel: torch.Tensor
        self.register_buffer("grey", torch.full((1, in_channels, 1, 1), 1.0 / in_channels))
        self.register_buffer("kernel", kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grey = (x * self.grey).sum(dim=1, keepdim=True)
        return F.conv2d(grey, self.kernel, padding=1)


class WhitenedEmbedder(nn.Module):
    """An embedder followed by a fixed PCA-whitening and L2 normalisation.

    The saved DeepCluster model maps images straight to the space its centroids live in,
    so ``jobs/assign.py`` and the report use it like any other model. (n, C, H, W) -> (n, p).
    """

    def __init__(self, embedder: nn.Module, in_dim: int, out_dim: int):
        super().__init__()
        self.embedder = embedder
        self.whiten = nn.Linear(in_dim, out_dim)
        self.whiten.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.whiten(self.embedder(x)), dim=1)


def batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """Every BatchNorm layer of ``model`` (any dimension)."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def has_batchnorm(model: nn.Module) -> bool:
    return bool(batchnorms(model))


@torch.no_grad()
def recompute_bn_stats(model: nn.Module, pixels: torch.Tensor, batch: int) -> int:
    """Precise BatchNorm (Wu & Johnson, "Rethinking 'Batch' in BatchNorm", 2021, §3.1):
    every BatchNorm layer's running mean and variance become the plain average of its batch
    statistics over ``pixels`` (m, C, H, W) in batches of ``batch``, under the current
    weights. With ``batch`` the training batch per worker, eval mode then normalises as an
    average training batch does, instead of by an exponential average that lags the
    weights. Leaves ``model`` in eval mode; returns the number of batches used."""
    norms = batchnorms(model)
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: running = mean of the batches seen
    model.train()
    chunks = [x for x in pixels.split(max(1, batch)) if len(x) > 1]  # BN needs 2 rows
    try:
        for x in chunks:
            model(x)
    finally:
        for m, momentum in zip(norms, saved, strict=True):
            m.momentum = momentum
        model.eval()
    return len(chunks)
