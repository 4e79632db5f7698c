"""Streaming reader: Parquet image shards (local or ``s3://``) -> decoded, model-ready rows.

``read_images`` returns a lazy Ray Data dataset with columns ``id`` (str), ``pixels``
(float32 (C, size, size), normalised; or uint8 with ``normalized=False``) and ``label`` when
the shards have one. Decoding happens per row inside the map UDF: a bad image is written to
the quarantine folder with its id and reason and dropped, so it never fails a block
(RAY_NOTES: Data). Nothing is materialised: Ray Data streams blocks through bounded queues.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import Config, S3Config
from pipeline.data import fs as fsx
from pipeline.data.decode import DecodeSpec, decode_batch, normalize
from pipeline.data.fs import Location
from pipeline.data.quarantine import write_rejects


class InputError(ValueError):
    """The input shards are missing, unreachable or do not follow the data contract."""


def decode_spec(cfg: Config) -> DecodeSpec:
    return DecodeSpec(channels=cfg.data.channels, size=cfg.data.image_size,
                      mean=tuple(cfg.data.mean), std=tuple(cfg.data.std),
                      max_pixels=cfg.data.max_pixels)


@dataclass(frozen=True)
class Shards:
    """The Parquet files of an input, and whether they carry labels."""

    location: Location
    files: list[str]
    has_label: bool


def find_shards(uri: str, s3: S3Config | None = None) -> Shards:
    """List ``*.parquet`` under ``uri`` and check the schema; fail fast with the URI named."""
    loc = fsx.locate(uri, s3)
    try:
        kind = fsx.info(loc).type
    except fsx.StorageError as exc:
        raise InputError(str(exc)) from exc
    if kind.name == "NotFound":
        raise InputError(f"{uri}: no such directory or prefix")
    files = [f.path for f in fsx.list_files(loc, (".parquet",))] if kind.name != "File" \
        else [loc.path]
    if not files:
        raise InputError(f"{uri}: no Parquet shards (*.parquet) found")
    schema = pq.read_schema(files[0], filesystem=loc.fs)
    check_schema(schema, f"{uri} ({files[0]})")
    return Shards(loc, files, "label" in schema.names)


def check_schema(schema: pa.Schema, where: str) -> None:
    """Raise InputError unless ``schema`` has the contract's ``id`` and binary ``image``."""
    fields = {f.name: f.type for f in schema}
    if "id" not in fields or "image" not in fields:
        raise InputError(f"{where}: shards need columns 'id' and 'image'; found {sorted(fields)}")
    if not (pa.types.is_binary(fields["image"]) or pa.types.is_large_binary(fields["image"])):
        raise InputError(f"{where}: column 'image' must be binary; found {fields['image']}")


class DecodeImages:
    """Ray Data UDF: (id, image bytes, ...) rows -> (id, pixels, ...); bad images quarantined.

    Columns other than ``image`` (``label``, ``path``) pass through. By default a row that
    cannot be decoded is written to ``rejects`` (when given) and dropped. With
    ``inline_rejects=True`` every row is kept, with a ``reason`` column ("" when decoded,
    zero pixels otherwise), so a consumer can account for every input row (the assign job).
    """

    def __init__(self, spec: DecodeSpec, rejects: Location | None = None,
                 normalized: bool = True, inline_rejects: bool = False):
        self.spec, self.rejects, self.normalized = spec, rejects, normalized
        self.inline_rejects = inline_rejects

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        ids = [str(i) for i in batch["id"]]
        decoded = decode_batch(list(batch["image"]), self.spec)
        pixels = normalize(decoded.pixels, self.spec) if self.normalized else decoded.pixels
        extra = {k: np.asarray(v) for k, v in batch.items() if k not in ("id", "image")}
        if self.inline_rejects:
            return self._all_rows(ids, decoded, pixels.numpy(), extra)
        if self.rejects is not None and decoded.rejects:
            bad = [ids[i] for i, _ in decoded.rejects]
            write_rejects(self.rejects, bad, bad, [reason for _, reason in decoded.rejects])
        out: dict[str, Any] = {"id": np.array([ids[i] for i in decoded.ok], dtype=object),
                               "pixels": pixels.numpy()}
        out.update({k: v[decoded.ok] for k, v in extra.items()})
        return out

    @staticmethod
    def _all_rows(ids: list[str], decoded: Any, pixels: np.ndarray,
                  extra: dict[str, np.ndarray]) -> dict[str, Any]:
        full = np.zeros((len(ids), *pixels.shape[1:]), pixels.dtype)
        full[decoded.ok] = pixels
        reason = np.full(len(ids), "", dtype=object)
        for i, why in decoded.rejects:
            reason[i] = why
        return {"id": np.array(ids, dtype=object), "pixels": full, "reason": reason, **extra}


def read_images(uri: str, spec: DecodeSpec, *, s3: S3Config | None = None,
                rejects: Location | None = None, normalized: bool = True,
                batch_size: int = 256, num_cpus: float = 1.0) -> Any:
    """Lazy ``ray.data.Dataset`` of decoded images from the shards under ``uri``."""
    import ray.data

    shards = find_shards(uri, s3)
    columns = ["id", "image"] + (["label"] if shards.has_label else [])
    ds = ray.data.read_parquet(shards.files, filesystem=shards.location.fs)
    ds = ds.select_columns(columns)
    return ds.map_batches(DecodeImages(spec, rejects, normalized), batch_size=batch_size,
                          batch_format="numpy", num_cpus=num_cpus)
