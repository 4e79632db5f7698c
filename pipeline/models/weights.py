"""Loading and saving weights safely: safetensors or weights-only ``torch.load``, never pickles.

Pretrained weights come from a local path or URI the user gives (``--weights``); nothing is
downloaded from a model hub. A checkpoint is used as its training script saved it: the
network's tensors are looked for in every table of tensors in the file and under every name
prefix, and the place that fills most of the network wins (:func:`fit`).
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

log = logging.getLogger(__name__)


class WeightsError(ValueError):
    """Weights cannot be read or do not fit the model. The message names the file."""


Tables = dict[str, dict[str, torch.Tensor]]


def read_tables(data: bytes, name: str) -> Tables:
    """Every table of tensors in a checkpoint file, by its path of keys (:func:`tensor_tables`):
    safetensors bytes (one table, ``""``), or a ``torch.save`` file loaded with
    ``weights_only=True`` (never a pickle)."""
    if name.endswith(".safetensors"):
        try:
            return {"": st_load(data)}
        except Exception as exc:  # noqa: BLE001
            raise WeightsError(f"{name}: not a valid safetensors file ({exc})") from exc
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - includes refused pickles
        raise WeightsError(f"{name}: cannot load as a weights-only state dict ({exc})") from exc
    tables = tensor_tables(obj)
    if not tables:
        raise WeightsError(f"{name}: expected a state dict, found no tensors in a "
                           f"{type(obj).__name__}")
    return tables


def tensor_tables(obj: Any, path: str = "", depth: int = 3) -> Tables:
    """The dicts of tensors inside a loaded checkpoint, by path (``""`` the top level,
    ``"state_dict"``, ``"model/ema"``), in the file's order: the layouts training scripts
    save, e.g. ``{"state_dict": ...}`` (Lightning, MoCo), ``{"model": ..., "optimizer":
    ...}`` (torchvision's and timm's scripts), ``{"student": ..., "teacher": ...}`` (DINO)."""
    out: Tables = {}
    if not isinstance(obj, dict):
        return out
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if tensors:
        out[path] = tensors
    if depth > 1:
        for key, value in obj.items():
            if isinstance(key, str) and isinstance(value, dict):
                out.update(tensor_tables(value, f"{path}/{key}".lstrip("/"), depth - 1))
    return out


@dataclass(frozen=True)
class Fit:
    """Where a checkpoint holds a network's tensors: the ``table`` and the name ``prefix``
    (``"module."``, ``"_orig_mod."``, ``"module.encoder_q."``, ...) that, stripped, give the
    network's names; ``state`` holds the tensors that fit by name and shape, under the
    network's names; ``coverage`` is the share of the network's elements they fill;
    ``also`` lists other places that fit as well, and ``misfits`` the names found there
    with another shape (checkpoint's vs network's)."""

    state: dict[str, torch.Tensor]
    coverage: float
    table: str
    prefix: str
    also: tuple[str, ...] = ()
    # names there with the wrong shape: "layer1.0.conv1.weight (64, 64, 3, 3) vs (32, ...)"
    misfits: tuple[str, ...] = ()

    @property
    def where(self) -> str:
        return place(self.table, self.prefix)


def place(table: str, prefix: str) -> str:
    parts = [f"key {table!r}" if table else "", f"prefix {prefix!r}" if prefix else ""]
    return ", ".join(p for p in parts if p) or "the top level"


def fit(own: dict[str, torch.Tensor], tables: Tables, name: str, table: str | None = None,
        prefix: str | None = None) -> Fit:
    """The place in ``tables`` that fills most of the network whose state dict is ``own``,
    among every table (or ``table``) and every prefix of its names (or ``prefix``).
    Ties go to the earlier table, then to the prefix whose names come first in it (MoCo's
    ``encoder_q`` before its ``encoder_k``)."""
    if table is not None and table not in tables:
        raise WeightsError(f"{name}: no table of tensors under key {table!r} (found: "
                           f"{', '.join(repr(t) for t in tables)})")
    total = sum(t.numel() for t in own.values()) or 1
    scored = []
    for order, (tname, tensors) in enumerate(tables.items()):
        if table is not None and tname != table:
            continue
        for rank, p in enumerate([prefix] if prefix is not None else _prefixes(tensors, own)):
            state = {k: tensors[p + k] for k, t in own.items()
                     if p + k in tensors and tuple(tensors[p + k].shape) == tuple(t.shape)}
            share = sum(t.numel() for t in state.values()) / total
            scored.append((-share, order, rank, tname, p, state))
    if not scored:
        return Fit({}, 0.0, table or "", prefix or "")
    scored.sort(key=lambda s: s[:3])
    best = scored[0]
    also = tuple(place(s[3], s[4]) for s in scored[1:] if s[0] == best[0] and best[0] < 0)
    tensors, p = tables[best[3]], best[4]
    misfits = tuple(f"{k} {tuple(tensors[p + k].shape)} vs {tuple(t.shape)}"
                    for k, t in own.items()
                    if p + k in tensors and tuple(tensors[p + k].shape) != tuple(t.shape))
    return Fit(best[5], -best[0], best[3], best[4], also, misfits)


def _prefixes(tensors: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> list[str]:
    """``""`` and every dotted prefix that turns one of ``tensors``' names into one of
    ``own``'s (``module.encoder_q.`` for ``module.encoder_q.conv1.weight``), in the order
    their names first appear."""
    found = {"": None}
    for key in tensors:
        dots = [i + 1 for i, c in enumerate(key) if c == "."]
        found.update((key[:i], None) for i in dots if key[i:] in own)
    return list(found)


def load_into(model: nn.Module, trunk: nn.Module, tables: Tables, name: str,
              table: str | None = None, prefix: str | None = None) -> str:
    """Load a whole-model state dict, or else a backbone (trunk) one such as torchvision's,
    from wherever in the checkpoint it fits best (:func:`fit`; ``table`` and ``prefix`` pin
    the place). Returns "model" or "trunk". Keys the trunk lacks (a classifier's ``fc.*``)
    are ignored; a tensor of the trunk's with another shape (another architecture, another
    input's channels) is a WeightsError."""
    own = model.state_dict()
    whole = fit(own, tables, name, table, prefix)
    if len(whole.state) == len(own):
        model.load_state_dict(whole.state)
        log_place(name, whole)
        return "model"
    part = fit(trunk.state_dict(), tables, name, table, prefix)
    if not part.state:
        first = next(iter(next(iter(tables.values()))))
        raise WeightsError(f"{name}: no tensor matches the backbone (e.g. {first})")
    if part.misfits:
        raise WeightsError(f"{name}: does not fit the backbone: {len(part.misfits)} tensors "
                           f"have another shape (e.g. {part.misfits[0]})")
    trunk.load_state_dict(part.state, strict=False)
    if part.coverage < 1.0:
        log.warning("%s: the weights fill %.0f%% of the backbone's tensors", name,
                    100 * part.coverage)
    log_place(name, part)
    return "trunk"


def log_place(name: str, found: Fit) -> None:
    """Say where the weights were found, when not plainly at the top level; warn when
    another place fits as well (DINO's student and teacher, MoCo's two encoders): the
    first was taken, and key/prefix settings choose another."""
    if found.also:
        log.warning("%s: weights taken from %s; as well: %s (pin one with key=/prefix=)",
                    name, found.where, "; ".join(found.also))
    elif found.table or found.prefix:
        log.info("%s: weights taken from %s", name, found.where)


def save_bytes(model: nn.Module) -> bytes:
    """safetensors bytes of ``model``'s state dict (contiguous CPU tensors)."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return st_save(state)


def arch_json(**arch: Any) -> bytes:
    return json.dumps(arch, indent=2, sort_keys=True).encode()
