"""Loading and saving weights safely: safetensors or weights-only ``torch.load``, never pickles.

Pretrained weights come from a local path or URI the user gives (``--weights``); nothing is
downloaded from a model hub.
"""

from __future__ import annotations

import io
import json
import logging
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

log = logging.getLogger(__name__)


class WeightsError(ValueError):
    """Weights cannot be read or do not fit the model. The message names the file."""


def parse_state_dict(data: bytes, name: str) -> dict[str, torch.Tensor]:
    """safetensors bytes, or a ``torch.save`` file loaded with ``weights_only=True``."""
    if name.endswith(".safetensors"):
        try:
            return st_load(data)
        except Exception as exc:  # noqa: BLE001
            raise WeightsError(f"{name}: not a valid safetensors file ({exc})") from exc
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - includes refused pickles
        raise WeightsError(f"{name}: cannot load as a weights-only state dict ({exc})") from exc
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsError(f"{name}: expected a state dict, found {type(state).__name__}")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_into(model: nn.Module, trunk: nn.Module, state: dict[str, torch.Tensor],
              name: str) -> str:
    """Load a whole-model state dict, or else a backbone (trunk) one such as torchvision's.

    Returns "model" or "trunk". Classifier keys (``fc.*``) of backbone checkpoints are ignored.
    """
    own = model.state_dict()
    if set(state) == set(own):
        model.load_state_dict(state)
        return "model"
    trunk_state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    if not set(trunk_state) & set(trunk.state_dict()):
        raise WeightsError(f"{name}: no tensor matches the backbone (e.g. {next(iter(state))})")
    try:
        missing, unexpected = trunk.load_state_dict(trunk_state, strict=False)
    except RuntimeError as exc:
        raise WeightsError(f"{name}: does not fit the backbone ({exc})") from exc
    if missing or unexpected:
        log.warning("%s: %d missing and %d unexpected keys (e.g. %s)", name, len(missing),
                    len(unexpected), (list(missing) + list(unexpected))[:3])
    return "trunk"


def save_bytes(model: nn.Module) -> bytes:
    """safetensors bytes of ``model``'s state dict (contiguous CPU tensors)."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return st_save(state)


def arch_json(**arch: Any) -> bytes:
    return json.dumps(arch, indent=2, sort_keys=True).encode()
