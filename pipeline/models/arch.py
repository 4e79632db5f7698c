"""The architecture record saved as ``model/model.json``, and building a model from it."""

from __future__ import annotations

from typing import Any

import torch
from safetensors.torch import load as st_load
from torch import nn

from pipeline.config import Config
from pipeline.models.backbones import build_embedder


def model_arch(cfg: Config) -> dict[str, Any]:
    """Everything needed to rebuild the model and feed it images."""
    arch = {"backbone": cfg.model.backbone, "width": cfg.model.width,
            "in_channels": cfg.data.channels, "feature_dim": cfg.model.feature_dim,
            "normalize": cfg.model.normalize_features, "image_size": cfg.data.image_size,
            "mean": cfg.data.mean, "std": cfg.data.std}
    if cfg.method == "deepcluster":  # raw features; PCA-whitening + L2 come after training
        arch.update(normalize=False, sobel=cfg.deepcluster.sobel)
    return arch


def build_from_arch(arch: dict[str, Any]) -> nn.Module:
    """The model an arch record describes. Optional keys: ``sobel`` (fixed Sobel input
    filters, DeepCluster) and ``whiten_from`` (the embedder's output size, followed by a
    PCA-whitening to ``feature_dim`` and L2 normalisation: a finished DeepCluster model)."""
    from pipeline.methods.deepcluster import Sobel, WhitenedEmbedder

    embed_dim = arch.get("whiten_from") or arch["feature_dim"]
    sobel = bool(arch.get("sobel"))
    embedder = build_embedder(arch["backbone"], 2 if sobel else arch["in_channels"], embed_dim,
                              arch["normalize"], arch.get("width", 32))
    if sobel:
        embedder.trunk = nn.Sequential(Sobel(arch["in_channels"]), embedder.trunk)
    if arch.get("whiten_from"):
        return WhitenedEmbedder(embedder, embed_dim, arch["feature_dim"])
    return embedder


def build_model(cfg: Config) -> nn.Module:
    return build_from_arch(model_arch(cfg))


def load_model(model_bytes: bytes, arch: dict[str, Any], device: torch.device) -> nn.Module:
    """A trained model (safetensors bytes) in eval mode on ``device``."""
    model = build_from_arch(arch)
    model.load_state_dict(st_load(model_bytes))
    return model.to(device).eval()
