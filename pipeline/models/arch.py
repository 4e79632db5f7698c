"""The architecture record saved as ``model/model.json``, and building a model from it."""

from __future__ import annotations

from typing import Any

import torch
from safetensors.torch import load as st_load

from pipeline.config import Config
from pipeline.models.backbones import Embedder, build_embedder


def model_arch(cfg: Config) -> dict[str, Any]:
    """Everything needed to rebuild the model and feed it images."""
    return {"backbone": cfg.model.backbone, "width": cfg.model.width,
            "in_channels": cfg.data.channels, "feature_dim": cfg.model.feature_dim,
            "normalize": cfg.model.normalize_features, "image_size": cfg.data.image_size,
            "mean": cfg.data.mean, "std": cfg.data.std}


def build_from_arch(arch: dict[str, Any]) -> Embedder:
    return build_embedder(arch["backbone"], arch["in_channels"], arch["feature_dim"],
                          arch["normalize"], arch.get("width", 32))


def build_model(cfg: Config) -> Embedder:
    return build_from_arch(model_arch(cfg))


def load_model(model_bytes: bytes, arch: dict[str, Any], device: torch.device) -> Embedder:
    """A trained model (safetensors bytes) in eval mode on ``device``."""
    model = build_from_arch(arch)
    model.load_state_dict(st_load(model_bytes))
    return model.to(device).eval()
