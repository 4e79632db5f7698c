"""Serialising nested state dicts (numpy arrays, numbers, strings, lists, dicts) without pickle.

Arrays go into an ``.npz`` (``allow_pickle=False``); the structure goes into JSON stored inside
it. Used for centroid-server state in checkpoints and for its restart file, which may live in
a bucket: loading never executes code.
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np

_STRUCT = "__structure__"


def _encode(value: Any, arrays: dict[str, np.ndarray]) -> Any:
    if isinstance(value, np.ndarray):
        key = f"a{len(arrays)}"
        arrays[key] = value
        return {"__array__": key}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {"__dict__": [[_encode(k, arrays), _encode(v, arrays)] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        return {"__list__": [_encode(v, arrays) for v in value]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot serialise {type(value).__name__} in a state dict")


def _decode(value: Any, arrays: Any) -> Any:
    if isinstance(value, dict):
        if "__array__" in value:
            return arrays[value["__array__"]]
        if "__dict__" in value:
            return {_decode(k, arrays): _decode(v, arrays) for k, v in value["__dict__"]}
        if "__list__" in value:
            return [_decode(v, arrays) for v in value["__list__"]]
    return value


def pack_state(state: Any) -> bytes:
    """Nested state -> bytes (an uncompressed npz)."""
    arrays: dict[str, np.ndarray] = {}
    structure = json.dumps(_encode(state, arrays))
    buf = io.BytesIO()
    arrays[_STRUCT] = np.frombuffer(structure.encode(), dtype=np.uint8)
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


def unpack_state(data: bytes) -> Any:
    """Inverse of :func:`pack_state`; never unpickles."""
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        arrays = {key: npz[key] for key in npz.files}
    structure = json.loads(arrays.pop(_STRUCT).tobytes().decode())
    return _decode(structure, arrays)
