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


def initial_model(cfg: Config) -> nn.Module:
    """The seeded initial model, with ``model.weights`` loaded when given (workers build the
    same one; DDP also broadcasts rank 0's)."""
    import torch

    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg)
    if cfg.model.weights:
        from pipeline.models.loading import load_pretrained

        load_pretrained(model, cfg.model.weights, cfg.s3)
    return model
