"""Backbones and the embedding model shared by every method.

* ``small_cnn``: a 4-block conv net for 28-32 px images (MNIST, CIFAR-10, digits).
* ``resnet18`` / ``resnet50``: torchvision ResNets (He et al. 2016) with random initialisation,
  or weights from a local path or URI the user gives (never a hub download).

The :class:`Embedder` maps images (n, C, H, W) to features (n, feature_dim), L2-normalised by
default. No Ray imports here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(True),
    )


class SmallCNN(nn.Module):
    """(n, C, 16..32, 16..32) -> (n, 4 * width) trunk features; VGG-style, for small images.

    ``width`` 32 (the default) costs ~30 MMAC per 28 px image, which trains at a few hundred
    images/s on one CPU core; 64 is the classic 64-128-256 net, 4x the cost.
    """

    def __init__(self, in_channels: int, width: int = 32):
        super().__init__()
        self.out_dim = 4 * width
        self.features = nn.Sequential(
            _block(in_channels, width), nn.MaxPool2d(2),
            _block(width, 2 * width), nn.MaxPool2d(2),
            _block(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def resnet_trunk(name: str, in_channels: int) -> tuple[nn.Module, int]:
    """torchvision ResNet without its classifier: (n, C, H, W) -> (n, 512 | 2048)."""
    from torchvision import models as tvm  # here: ~3 s of import a small_cnn run never needs

    net = getattr(tvm, name)(weights=None)
    if in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    out_dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, out_dim


class Embedder(nn.Module):
    """Backbone + projection head: images (n, C, H, W) -> features (n, feature_dim).

    The head is Linear-BN-ReLU-Linear, as in SimCLR/SwAV projection heads; ``normalize``
    puts features on the unit sphere so squared distances lie in [0, 4].
    """

    def __init__(self, trunk: nn.Module, trunk_dim: int, feature_dim: int, normalize: bool):
        super().__init__()
        self.trunk, self.normalize = trunk, normalize
        self.head = nn.Sequential(
            nn.Linear(trunk_dim, trunk_dim), nn.BatchNorm1d(trunk_dim), nn.ReLU(True),
            nn.Linear(trunk_dim, feature_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.head(self.trunk(x))
        return F.normalize(z, dim=1) if self.normalize else z


def build_embedder(backbone: str, in_channels: int, feature_dim: int,
                   normalize: bool = True, width: int = 32) -> Embedder:
    """Build the model for ``backbone`` in {"small_cnn", "resnet18", "resnet50"}."""
    if backbone == "small_cnn":
        small = SmallCNN(in_channels, width)
        trunk: nn.Module = small
        trunk_dim = small.out_dim
    elif backbone in ("resnet18", "resnet50"):
        trunk, trunk_dim = resnet_trunk(backbone, in_channels)
    else:
        raise ValueError(f"model.backbone: unknown backbone {backbone!r}")
    return Embedder(trunk, trunk_dim, feature_dim, normalize)
