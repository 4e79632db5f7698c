"""Dotted keys (``train.lr``) over nested config dataclasses."""

from __future__ import annotations

import dataclasses
from typing import Any


def flat(obj: Any, prefix: str = "") -> dict[str, Any]:
    """A nested dataclass as ``{dotted.key: value}``."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out.update(flat(value, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = value
    return out


def matches(key: str, patterns: tuple[str, ...]) -> bool:
    """``key`` is one of ``patterns``, or lies under one that ends with a dot (a section)."""
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in patterns)
