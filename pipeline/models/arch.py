"""The architecture record saved as ``model/model.json``, and building a model from it."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load as st_load
from torch import nn

from pipeline.models.backbones import build_embedder
from pipeline.models.layers import Sobel, WhitenedEmbedder

if TYPE_CHECKING:
    from pipeline.config import Config


def backbone_arch(cfg: Config) -> dict[str, Any]:
    """Everything needed to rebuild the backbone and feed it images (``kind`` "embedder");
    a method adapts it (:func:`pipeline.methods.model_arch`)."""
    return {"kind": "embedder", "backbone": cfg.model.backbone, "width": cfg.model.width,
            "in_channels": cfg.data.channels, "feature_dim": cfg.model.feature_dim,
            "normalize": cfg.model.normalize_features, "image_size": cfg.data.image_size,
            "mean": cfg.data.mean, "std": cfg.data.std}


def _embedder(arch: dict[str, Any], embed_dim: int) -> nn.Module:
    """A backbone embedder; ``sobel``: fixed Sobel input filters in front (DeepCluster)."""
    sobel = bool(arch.get("sobel"))
    embedder = build_embedder(arch["backbone"], 2 if sobel else arch["in_channels"], embed_dim,
                              arch["normalize"], arch.get("width", 32))
    if sobel:
        embedder.trunk = nn.Sequential(Sobel(arch["in_channels"]), embedder.trunk)
    return embedder


def _whitened(arch: dict[str, Any]) -> nn.Module:
    """An embedder of size ``whiten_from``, then a fixed PCA-whitening to ``feature_dim`` and
    L2 normalisation (a finished DeepCluster model)."""
    return WhitenedEmbedder(_embedder(arch, arch["whiten_from"]), arch["whiten_from"],
                            arch["feature_dim"])


def build_from_arch(arch: dict[str, Any]) -> nn.Module:
    """The model an arch record describes, by its ``kind`` (the shared embedders; a method's
    own kinds go through :func:`pipeline.methods.arch.build_any`). Records written before
    kinds existed are told apart by ``whiten_from``."""
    kind = arch.get("kind") or ("whitened_embedder" if arch.get("whiten_from") else "embedder")
    if kind == "embedder":
        return _embedder(arch, arch["feature_dim"])
    if kind == "whitened_embedder":
        return _whitened(arch)
    raise ValueError(f"model.json: unknown model kind {kind!r}")


def load_model(model_bytes: bytes, arch: dict[str, Any], device: torch.device,
               build: Callable[[dict[str, Any]], nn.Module] = build_from_arch) -> nn.Module:
    """A trained model (safetensors bytes) in eval mode on ``device``, built by ``build``."""
    model = build(arch)
    model.load_state_dict(st_load(model_bytes))
    return model.to(device).eval()
