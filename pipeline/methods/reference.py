"""The single-process reference runner: any registered method's stages, in-process, no Ray.

It reads the input shards with pyarrow, decodes with the same decoder as the Ray path,
embeds with the model in eval mode (as the Ray runner's workers do) and trains a program over a seeded permutation per epoch, in batches of
the stage's batch size (the last partial batch dropped, as on Ray). Tests hold the Ray runner
to it; it is also the easiest place to debug a new method.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from pipeline import methods
from pipeline.config import Config
from pipeline.data.decode import decode_batch, normalize
from pipeline.data.reader import decode_spec, find_shards
from pipeline.data.sampling import bottom_k, row_keys
from pipeline.kmeans.store import CentroidStore, store_kwargs
from pipeline.methods.arch import load_model
from pipeline.methods.base import (
    Context,
    Embed,
    LocalShards,
    PerId,
    Train,
    TrainResult,
    array_batches,
    drive,
    seed_step,
    set_lr,
    steps_per_epoch,
    to_batch,
)
from pipeline.models.layers import recompute_bn_stats
from pipeline.models.weights import save_bytes
from pipeline.outputs import TrainedModel


class LocalRunner:
    """Runs stages on the decoded input held in memory (small inputs: tests, debugging)."""

    def __init__(self, cfg: Config, input_uri: str):
        self.cfg = cfg
        self.ids, self.pixels, self.labels = _decode_all(cfg, input_uri)

    def embed(self, stage: Embed) -> PerId:
        t0 = time.perf_counter()
        rows = np.arange(len(self.ids))
        if stage.sample is not None:  # the same draw as the Ray runner's bottom-k sample
            rows = bottom_k(row_keys(self.ids, self.cfg.train.seed), stage.sample)
        features, extra = embed_pixels(stage, self.pixels[rows],
                                       self.cfg.cluster.assign_batch_size)
        found = PerId(self.ids[rows], {"feature": features},
                      None if self.labels is None else self.labels[rows], extra).sorted()
        found.facts["embed_s"] = time.perf_counter() - t0
        return found if stage.reduce is None else stage.reduce(found, LocalShards.scatter)

    def train(self, stage: Train) -> TrainResult:
        store = None
        if stage.centroids is not None:
            store = CentroidStore(stage.centroids, **store_kwargs(self.cfg))
        ctx = Context(centroids=store, steps_per_epoch=steps_per_epoch(
            len(self.ids), stage, self.cfg.train.batch_size))
        torch.manual_seed(self.cfg.train.seed)
        program = stage.program
        optimizers = program.setup(ctx)
        program.start(0, ctx)
        joined = self._joined(stage) if stage.inputs == "images" else {}
        batch, history, step = stage.batch_size or self.cfg.train.batch_size, [], 0
        began = time.monotonic()
        for epoch in range(stage.epochs):
            if stage.lr is not None:
                set_lr(optimizers, stage.lr[epoch])
            t0, seen = time.perf_counter(), 0
            for p in range(stage.passes):
                for rows in self._batches(stage, joined, batch, epoch, p):
                    seed_step(self.cfg.train.seed, 0, step)
                    step += 1
                    program.step(to_batch(rows, ctx.device), ctx)
                    seen += len(rows["id"])
            seconds = time.perf_counter() - t0
            history.append({"epoch": epoch, **program.end_epoch(epoch, ctx),
                            "images_per_s": seen / max(1e-9, seconds), "epoch_s": seconds})
            if stage.spent(self.cfg.train.time_budget_s, began):
                break
        state = {k: v.detach().cpu().numpy() for k, v in program.module.state_dict().items()}
        return TrainResult(state, history, [o.state_dict() for o in optimizers],
                           None if store is None else store.centroids.copy())

    def _batches(self, stage: Train, joined: dict[str, np.ndarray], batch: int, epoch: int,
                 pass_: int) -> Iterator[dict[str, Any]]:
        """One pass: the images in a seeded permutation, or the arrays of an
        ``inputs="arrays"`` stage in the Ray runner's order (:func:`array_batches`)."""
        if stage.inputs == "arrays":
            yield from array_batches(stage, 0, 1, batch, self.cfg.train.seed, epoch, pass_)
            return
        order = np.random.default_rng(self.cfg.train.seed + 1000 * epoch + pass_
                                      ).permutation(len(self.ids))
        for start in range(0, len(order) - batch + 1, batch):
            yield self._rows(order[start:start + batch], joined)

    def _joined(self, stage: Train) -> dict[str, np.ndarray]:
        """The stage's per-id arrays, their rows in ``self.ids`` order."""
        order_ids = np.argsort(self.ids)
        joined = {}
        for name, per_id in stage.join.items():
            rows = np.empty((len(self.ids), *per_id.arrays[name].shape[1:]),
                            per_id.arrays[name].dtype)
            rows[order_ids] = per_id.take(self.ids[order_ids], name)
            joined[name] = rows
        return joined

    def _rows(self, rows: np.ndarray, joined: dict[str, np.ndarray]) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.ids[rows], "pixels": self.pixels[rows].numpy()}
        if self.labels is not None:
            out["label"] = self.labels[rows]
        out.update({name: array[rows] for name, array in joined.items()})
        return out


def embed_pixels(stage: Embed, pixels: torch.Tensor, batch: int
                 ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Features (m, d) float32 of normalised pixels (m, C, H, W) under ``stage``'s model, on
    the CPU in batches of ``batch`` (BatchNorm from each batch with ``stage.batch_stats``),
    and the stage's extra arrays (the calibrated model with ``stage.precise_bn``). The Ray
    runner embeds its sampled stages with this too."""
    model = load_model(stage.model, stage.arch, torch.device("cpu"))
    extra: dict[str, np.ndarray] = {}
    if stage.precise_bn:
        recompute_bn_stats(model, pixels, stage.precise_bn)
        extra["model"] = np.frombuffer(save_bytes(model), np.uint8).copy()
    elif stage.batch_stats:
        model.train()
    with torch.inference_mode():
        parts = [model(x).float().numpy() for x in pixels.split(batch)]
    d = int(stage.arch["feature_dim"])
    return (np.concatenate(parts) if parts else np.zeros((0, d), np.float32)), extra


def _decode_all(cfg: Config, uri: str) -> tuple[np.ndarray, torch.Tensor, np.ndarray | None]:
    """Every decodable image of the input: ids (n,) str, normalised pixels (n, C, H, W)
    float32, labels (n,) str or None."""
    shards = find_shards(uri, cfg.s3)
    spec = decode_spec(cfg)
    ids, pixels, labels = [], [], []
    for path in shards.files:
        table = pq.read_table(path, filesystem=shards.location.fs)
        decoded = decode_batch(table.column("image").to_pylist(), spec)
        ids += [table.column("id")[i].as_py() for i in decoded.ok]
        pixels.append(normalize(decoded.pixels, spec))
        if shards.has_label:
            labels += [str(table.column("label")[i].as_py()) for i in decoded.ok]
    return (np.asarray(ids, dtype=str), torch.cat(pixels),
            np.asarray(labels, dtype=str) if shards.has_label else None)


def run_reference(cfg: Config, input_uri: str) -> TrainedModel:
    """Train ``cfg.method`` in this process on the same stage list as the Ray runner."""
    stages = methods.get(cfg.method).stages_fn()(cfg)
    trained: TrainedModel = drive(stages, LocalRunner(cfg, input_uri))
    return trained
