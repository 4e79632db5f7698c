"""A method's model: its architecture record and a fresh model built from it."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pipeline.config import Config
from pipeline.methods import get, load, model_builder
from pipeline.models import arch as models_arch
from pipeline.models.arch import backbone_arch, build_from_arch


def model_arch(cfg: Config) -> dict[str, Any]:
    """The architecture record of ``cfg``'s model, adapted by its method."""
    arch = backbone_arch(cfg)
    adapt = get(cfg.method).arch
    return load(adapt)(cfg, arch) if adapt else arch


def build_any(arch: dict[str, Any]) -> nn.Module:
    """The model an arch record (``model/model.json``) describes: a registered method's own
    kind (:func:`pipeline.methods.model_builder`), else a shared one."""
    build = model_builder(str(arch.get("kind", "")))
    model: nn.Module = build(arch) if build is not None else build_from_arch(arch)
    return model


def load_model(model_bytes: bytes, arch: dict[str, Any], device: torch.device) -> nn.Module:
    """A trained model of any kind (safetensors bytes) in eval mode on ``device``: what the
    feature passes, the assign job and the report load."""
    return models_arch.load_model(model_bytes, arch, device, build=build_any)


def build_model(cfg: Config) -> nn.Module:
    """A fresh model for ``cfg`` (the method's architecture; weights from torch's RNG)."""
    return build_any(model_arch(cfg))


def initial_model(cfg: Config) -> nn.Module:
    """The seeded initial model, with ``model.weights`` loaded when given (workers build the
    same one; DDP also broadcasts rank 0's)."""
    import torch

    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg)
    if cfg.model.weights:
        from pipeline.models.loading import load_pretrained

        load_pretrained(model, cfg.model.weights, cfg.s3, cfg.model.weights_key,
                        cfg.model.weights_prefix)
    return model
