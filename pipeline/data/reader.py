"""Streaming reader: Parquet image shards (local or ``s3://``) -> decoded, model-ready rows.

``read_images`` returns a lazy Ray Data dataset with columns ``id`` (str), ``pixels``
(float32 (C, size, size), normalised; or uint8 with ``normalized=False``) and ``label`` when
the shards have one. Decoding happens per row inside the map UDF: a bad image is written to
the quarantine folder with its id and reason and dropped, so it never fails a block
(RAY_NOTES: Data). Nothing is materialised: Ray Data streams blocks through bounded queues.

**Order.** Real inputs are often sorted by class, so a training stream never trusts the
stored order (:class:`ShuffleSpec`, re-drawn every epoch, i.e. every execution of the
dataset, from ``train.seed`` and Ray Data's execution index):

* ``global``: a full random permutation of the encoded rows (``Dataset.random_shuffle``,
  before decode, so the all-to-all moves compressed bytes, not pixels);
* ``stream``: file order re-drawn per epoch at the read (``FileShuffleConfig``), block order
  re-drawn when the dataset is materialised (``randomize_block_order``), and the workers'
  local shuffle buffer (``data.shuffle_buffer_mb``).

``auto`` (the default) is ``global`` up to ``data.global_shuffle_max_gb`` of input, else
``stream``. Initial samples (k-means seeds) come from :func:`sample_rows`: a uniform bottom-k
sample over one streaming pass (:mod:`pipeline.data.sampling`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import Config, S3Config
from pipeline.data import fs as fsx
from pipeline.data.decode import DecodeSpec, decode_batch, normalize
from pipeline.data.fs import Location
from pipeline.data.quarantine import write_rejects
from pipeline.data.sampling import BottomK, bottom_k, row_keys
from pipeline.errors import InputError


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
    nbytes: int = 0  # total size of the files


def find_shards(uri: str, s3: S3Config | None = None) -> Shards:
    """List ``*.parquet`` under ``uri`` and check the schema; fail fast with the URI named."""
    try:
        loc = fsx.locate(uri, s3)
        kind = fsx.info(loc).type
    except fsx.StorageError as exc:
        raise InputError(str(exc)) from exc
    if kind.name == "NotFound":
        raise InputError(f"{uri}: no such directory or prefix")
    infos = fsx.list_files(loc, (".parquet",)) if kind.name != "File" else [fsx.info(loc)]
    files = [f.path for f in infos]
    if not files:
        raise InputError(f"{uri}: no Parquet shards (*.parquet) found")
    schema = pq.read_schema(files[0], filesystem=loc.fs)
    check_schema(schema, f"{uri} ({files[0]})")
    return Shards(loc, files, "label" in schema.names, sum(max(0, f.size or 0) for f in infos))


def single_retry_budget() -> None:
    """Leave S3 retries to the filesystem (``s3.max_attempts``, :mod:`pipeline.data.fs`),
    except the one error the AWS SDK wrongly gives up on (``fsx.MISCLASSIFIED``).

    By default Ray Data retries throttling and connection errors again around its reads (10
    attempts, backoff up to 32 s, each wrapping our whole budget), so an outage would take
    minutes to fail instead of the configured budget. Called before every ``read_parquet``:
    a dataset copies the driver's DataContext when it is created.
    """
    import warnings

    import ray.data

    with warnings.catch_warnings():  # "substring matching will be deprecated": a plain one
        warnings.simplefilter("ignore", DeprecationWarning)
        ray.data.DataContext.get_current().retried_io_errors = [fsx.MISCLASSIFIED]


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


@dataclass(frozen=True)
class ShuffleSpec:
    """How a training stream is randomised (module docstring): the mode and its base seed."""

    mode: Literal["global", "stream"]
    seed: int
    buffer_rows: int  # local shuffle buffer per worker, in rows

    @staticmethod
    def of(cfg: Config, shards: Shards) -> ShuffleSpec:
        """``cfg.data.shuffle`` resolved for this input (``auto`` by its size)."""
        mode = cfg.data.shuffle
        if mode == "auto":
            small = shards.nbytes <= cfg.data.global_shuffle_max_gb * 2**30
            mode = "global" if small else "stream"
        return ShuffleSpec(mode, cfg.train.seed, shuffle_buffer_rows(cfg))

    def seed_config(self) -> Any:
        """A new permutation per execution (epoch), reproducible from ``seed``."""
        from ray.data import RandomSeedConfig

        return RandomSeedConfig(seed=self.seed, reseed_after_execution=True)

    def apply(self, ds: Any) -> Any:
        """Re-order a dataset per epoch: a full shuffle, or its block order (cheap once
        materialised; on a lazy read it would be an all-to-all barrier, so
        :func:`read_images` shuffles files at the source instead)."""
        if self.mode == "global":
            return ds.random_shuffle(seed=self.seed_config())
        return ds.randomize_block_order(seed=self.seed_config())


def shuffle_buffer_rows(cfg: Config) -> int:
    """Rows of each worker's local shuffle buffer: ``data.shuffle_buffer_mb`` of float32
    pixels, and never under two local batches."""
    row_bytes = 4 * cfg.data.channels * cfg.data.image_size ** 2
    local_batch = cfg.train.batch_size // cfg.scale.workers
    return max(2 * local_batch, int(cfg.data.shuffle_buffer_mb * 2**20 // row_bytes))


def read_images(uri: str, spec: DecodeSpec, *, s3: S3Config | None = None,
                rejects: Location | None = None, normalized: bool = True,
                batch_size: int = 256, num_cpus: float = 1.0,
                shuffle: ShuffleSpec | None = None) -> Any:
    """Lazy ``ray.data.Dataset`` of decoded images from the shards under ``uri``; with
    ``shuffle``, in a new random order every epoch (module docstring)."""
    import ray.data

    shards = find_shards(uri, s3)
    columns = ["id", "image"] + (["label"] if shards.has_label else [])
    files = None if shuffle is None else ray.data.FileShuffleConfig(
        seed=shuffle.seed, reseed_after_execution=True)
    single_retry_budget()
    ds = ray.data.read_parquet(shards.files, filesystem=shards.location.fs, shuffle=files)
    ds = ds.select_columns(columns)
    if shuffle is not None and shuffle.mode == "global":
        ds = shuffle.apply(ds)
    return ds.map_batches(DecodeImages(spec, rejects, normalized), batch_size=batch_size,
                          batch_format="numpy", num_cpus=num_cpus)


class _BlockBottomK:
    """Ray Data UDF: a block's own bottom-k rows by :func:`row_keys`, with their keys."""

    def __init__(self, k: int, seed: int):
        self.k, self.seed = k, seed

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        keys = row_keys(batch["id"], self.seed)
        keep = bottom_k(keys, self.k)
        return {"key": keys[keep], **{c: np.asarray(v)[keep] for c, v in batch.items()}}


def sample_rows(shards: Shards, k: int, seed: int) -> list[dict[str, Any]]:
    """k rows (``id``, ``image`` bytes, ``label`` when present) drawn uniformly from the
    whole input in one streaming pass, whatever the stored or arrival order, in key order;
    the same ``seed`` gives the same rows. Blocks reduce themselves to their bottom-k and the
    driver merges them (O(k) memory)."""
    import ray.data

    columns = ["id", "image"] + (["label"] if shards.has_label else [])
    single_retry_budget()
    ds = ray.data.read_parquet(shards.files, filesystem=shards.location.fs)
    ds = ds.select_columns(columns).map_batches(
        _BlockBottomK(k, seed), batch_format="numpy", batch_size=None)
    sample = BottomK(k)
    for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
        rows = [{c: batch[c][i] for c in columns} for i in range(len(batch["key"]))]
        sample.add(batch["key"], rows)
    return sample.rows
