"""A method's model: its architecture record and a fresh model built from it."""

from __future__ import annotations

from typing import Any

from torch import nn

from pipeline.config import Config
from pipeline.methods import get, load
from pipeline.models.arch import backbone_arch, build_from_arch


def model_arch(cfg: Config) -> dict[str, Any]:
    """The architecture record of ``cfg``'s model, adapted by its method."""
    arch = backbone_arch(cfg)
    adapt = get(cfg.method).arch
    return load(adapt)(cfg, arch) if adapt else arch


def build_model(cfg: Config) -> nn.Module:
    """A fresh model for ``cfg`` (the method's architecture; weights from torch's RNG)."""
    return build_from_arch(model_arch(cfg))
