"""Pretrained weights from a local path or URI (``--weights``), never from a model hub."""

from __future__ import annotations

import logging

from torch import nn

from pipeline.config import S3Config
from pipeline.data import fs as fsx
from pipeline.models.weights import WeightsError, load_into, read_tables

log = logging.getLogger(__name__)


def load_pretrained(model: nn.Module, uri: str, s3: S3Config | None = None,
                    key: str | None = None, prefix: str | None = None) -> str:
    """Load safetensors / weights-only state dict at ``uri`` into ``model`` (or its trunk),
    from the checkpoint's table ``key`` and name ``prefix`` when given, else wherever they
    fit best (:func:`~pipeline.models.weights.fit`)."""
    try:
        data = fsx.read_bytes(fsx.locate(uri, s3))
    except fsx.StorageError as exc:
        raise WeightsError(f"model.weights: {exc}") from exc
    trunk = getattr(model, "trunk", model)
    assert isinstance(trunk, nn.Module)
    part = load_into(model, trunk, read_tables(data, uri), uri, key, prefix)
    log.info("loaded %s weights from %s", part, uri)
    return part
