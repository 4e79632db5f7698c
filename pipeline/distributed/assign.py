"""Assignment pass on Ray Data: read -> decode -> embed + assign on an actor pool -> driver.

Each :class:`AssignActor` loads the model once (GPU when the job has one, channels_last and
fp16 autocast there), embeds decoded images and assigns them to the nearest centroid. Output
rows: ``id``, ``path`` (the input shard), ``reason`` ("" or why the image was rejected),
``cluster`` (int32, -1 when rejected), ``distance`` (euclidean to the assigned centroid),
``margin`` (second-best minus best distance) and ``label`` when the input has one.

Only these small rows travel back to the driver, which writes them per shard
(:mod:`pipeline.assign`). Decoding runs as plain tasks, so on a cluster it can use CPU
nodes while the actors sit on GPU nodes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from pipeline.config import Config
from pipeline.data import fs as fsx
from pipeline.data.decode import DecodeSpec
from pipeline.data.reader import DecodeImages
from pipeline.distributed.runtime import setup_worker
from pipeline.kmeans.stats import assign
from pipeline.methods.arch import load_model


@dataclass(frozen=True)
class AssignSettings:
    """Sizes and placement of the assignment pass."""

    decode_batch_size: int = 256
    assign_batch_size: int = 512
    actors: int = 1
    gpu: bool = False
    max_pixels: int = 50_000_000
    actor_cpus: float = 1.0  # CPUs reserved per actor (and its torch threads)
    read_cpus: float = 1.0  # CPUs per Parquet read task
    decode_in_actor: bool = False  # decode inside the actor: no pixel arrays cross processes


def decode_spec_of(arch: dict[str, Any], max_pixels: int) -> DecodeSpec:
    """The decoding a trained model expects, from its ``model.json``."""
    return DecodeSpec(channels=arch["in_channels"], size=arch["image_size"],
                      mean=tuple(arch["mean"]), std=tuple(arch["std"]), max_pixels=max_pixels)


class ModelActor:
    """A model loaded once per Ray Data actor, on the GPU when there is one."""

    def __init__(self, model_bytes: Any, arch: dict[str, Any], threads: float = 1.0,
                 decode: DecodeImages | None = None):
        """``model_bytes``: safetensors bytes, or an ObjectRef to them (the driver puts the
        weights in the object store once instead of shipping them inside the UDF)."""
        setup_worker(threads)
        if not isinstance(model_bytes, bytes):
            import ray

            model_bytes = ray.get(model_bytes)
        self.decode = decode
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_model(model_bytes, arch, self.device)
        if self.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.arch = arch
        self.norm: tuple[torch.Tensor, torch.Tensor] | None = None  # at the first uint8 batch

    def _normalisation(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's input mean and std (1, C, 1, 1) on its device, from ``model.json``."""
        c = int(self.arch["in_channels"])

        def stat(key: str) -> torch.Tensor:
            values = torch.tensor(self.arch[key], dtype=torch.float32)
            return values.expand(c).view(1, c, 1, 1).to(self.device)

        return stat("mean"), stat("std")

    def embed(self, pixels: np.ndarray) -> torch.Tensor:
        """(n, C, H, W) uint8 (normalised here, on the model's device) or already normalised
        float32 -> features (n, d) float32."""
        # No per-batch pin_memory(): allocating page-locked memory for every batch cost more
        # than it saved (bench/gpu_throughput.py: 1.8k vs 2.6k images/s on an H100).
        x = torch.from_numpy(np.ascontiguousarray(pixels)).to(self.device)
        if x.dtype == torch.uint8:
            if self.norm is None:
                self.norm = self._normalisation()
            mean, std = self.norm
            x = (x.float() / 255.0 - mean) / std
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=torch.float16):
                return self.model(x).float()
        return self.model(x).float()


class AssignActor(ModelActor):
    """Stateful Ray Data UDF: decoded rows -> assignment rows."""

    def __init__(self, model_bytes: Any, arch: dict[str, Any], centroids: np.ndarray,
                 threads: float = 1.0, decode: DecodeImages | None = None):
        super().__init__(model_bytes, arch, threads, decode)
        self.centroids = torch.from_numpy(np.array(centroids, np.float32)).to(self.device)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        if self.decode is not None:
            batch = self.decode(batch)
        n = len(batch["id"])
        ok = batch["reason"] == "" if "reason" in batch else np.ones(n, bool)
        cluster = np.full(n, -1, np.int32)
        distance = np.full(n, np.nan, np.float32)
        margin = np.full(n, np.nan, np.float32)
        if ok.any():
            with torch.inference_mode():
                labels, sqdist, second = assign(self.embed(batch["pixels"][ok]), self.centroids)
            best = sqdist.sqrt()
            cluster[ok] = labels.to(torch.int32).cpu().numpy()
            distance[ok] = best.cpu().numpy()
            margin[ok] = (second.sqrt() - best).cpu().numpy()
        out = {k: v for k, v in batch.items() if k != "pixels"}
        out.update(cluster=cluster, distance=distance, margin=margin)
        return out


class ReadShards:
    """Ray Data UDF: a batch of shard paths -> their rows (id, image, path[, label]), one
    row group per output batch, so a large shard never sits in memory whole."""

    def __init__(self, filesystem: Any, has_label: bool):
        self.fs, self.columns = filesystem, ["id", "image"] + (["label"] if has_label else [])

    def __call__(self, batch: dict[str, Any]) -> Iterator[dict[str, Any]]:
        import pyarrow.parquet as pq

        attempts = fsx.read_attempts(self.fs)
        for path in batch["path"]:
            with self.fs.open_input_file(str(path)) as fh:
                # pre_buffer: one coalesced read per row group, not one per column chunk
                shard = fsx.retry_read(partial(pq.ParquetFile, fh, pre_buffer=True), attempts)
                for i in range(shard.num_row_groups):
                    table = fsx.retry_read(
                        partial(shard.read_row_group, i, columns=self.columns), attempts)
                    out = {c: table.column(c).to_numpy(zero_copy_only=False)
                           for c in self.columns}
                    out["path"] = np.full(table.num_rows, str(path), dtype=object)
                    yield out


def settings_of(cfg: Config) -> AssignSettings:
    s = cfg.scale
    return AssignSettings(cfg.data.decode_batch_size, cfg.cluster.assign_batch_size,
                          s.assign_actors, s.gpu, cfg.data.max_pixels,
                          actor_cpus=0.5 if s.gpu else s.assign_cpus_per_actor,
                          read_cpus=s.read_cpus, decode_in_actor=s.assign_decode == "actor")


def assignment_batches(files: list[str], filesystem: Any, has_label: bool, model_bytes: bytes,
                       arch: dict[str, Any], centroids: np.ndarray,
                       settings: AssignSettings) -> Iterator[pa.Table]:
    """Stream assignment rows for every row of ``files`` (rejects included) to the driver."""
    import ray.data

    # One read task per shard, streaming its row groups: read_parquet packs small shards into
    # a few blocks, which left most of the actor pool idle and delayed every shard's output.
    ds: Any = ray.data.from_items([{"path": f} for f in files], override_num_blocks=len(files))
    ds = ds.map_batches(ReadShards(filesystem, has_label), batch_size=1, batch_format="numpy",
                        num_cpus=settings.read_cpus)
    # Pixels cross processes as uint8 (4x fewer bytes than float32) and are normalised by
    # the actor on the model's device.
    decode = DecodeImages(decode_spec_of(arch, settings.max_pixels), normalized=False,
                          inline_rejects=True)
    if not settings.decode_in_actor:
        ds = ds.map_batches(decode, batch_size=settings.decode_batch_size,
                            batch_format="numpy")
    ds = ds.map_batches(
        AssignActor,
        fn_constructor_kwargs={"model_bytes": ray.put(model_bytes), "arch": arch,
                               "centroids": centroids.astype(np.float32),
                               "threads": settings.actor_cpus,
                               "decode": decode if settings.decode_in_actor else None},
        batch_size=settings.assign_batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=settings.actors),
        num_cpus=settings.actor_cpus, num_gpus=1 if settings.gpu else 0,
    )
    yield from ds.iter_batches(batch_format="pyarrow", batch_size=None)
