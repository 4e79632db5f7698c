"""The shared stage runner on Ray: executes any method written as stages
(:mod:`pipeline.methods.base`), so a new method needs no code in this package.

* :class:`~pipeline.methods.base.Embed`: the decoded images (read once, materialised)
  through a Ray Data actor pool (:func:`~pipeline.distributed.deepcluster.feature_pass`:
  :class:`~pipeline.distributed.assign.EmbedActor`, GPU when present, with the driver-memory
  guard). Saved as ``--output/stages/NAME.npz``; a re-run loads it.
* :class:`~pipeline.methods.base.Train`: the shuffled training stream
  (:func:`~pipeline.distributed.job.training_images`) with the stage's per-id arrays joined
  by id (:class:`JoinArrays`), on Ray Train (:func:`~pipeline.distributed.train.trainer_result`:
  DDP, FailureConfig restarts), in :func:`stage_loop`, one worker loop for every program:
  the program's module and optimisers are checkpointed at every epoch end in the one format
  (:mod:`pipeline.distributed.checkpoint`), a restarted worker group or a re-run resumes at
  the next epoch, and ``train.time_budget_s`` stops every rank together. The result is saved
  as ``--output/stages/NAME.safetensors`` (+ ``.json`` history); a re-run loads it.
"""

from __future__ import annotations

import dataclasses
import io
import json
import time
from typing import Any

import numpy as np
import torch

from pipeline import methods
from pipeline.config import Config
from pipeline.data import fs as fsx
from pipeline.data.reader import decode_spec, find_shards, read_images
from pipeline.distributed.features import feature_pass, join_udf
from pipeline.methods.base import (
    Context,
    Embed,
    PerId,
    Train,
    TrainResult,
    drive,
    to_batch,
)
from pipeline.outputs import RunPaths, TrainedModel


class RayRunner:
    """Stages of one run on Ray, their results kept under ``--output/stages/``."""

    def __init__(self, cfg: Config, input_uri: str, paths: RunPaths):
        self.cfg, self.input_uri, self.paths = cfg, input_uri, paths
        self.shards = find_shards(input_uri, cfg.s3)
        self._images: Any = None
        self.dir = paths.root.join("stages")

    def images(self) -> Any:
        """The decoded images (id, pixels[, label]), materialised once for every pass."""
        if self._images is None:
            ds = read_images(self.input_uri, decode_spec(self.cfg), s3=self.cfg.s3,
                             batch_size=self.cfg.data.decode_batch_size)
            columns = ["id", "pixels"] + (["label"] if self.shards.has_label else [])
            self._images = ds.select_columns(columns).materialize()
        return self._images

    def embed(self, stage: Embed) -> PerId:
        saved = self.dir.join(f"{stage.name}.npz")
        if fsx.exists(saved):
            with np.load(io.BytesIO(fsx.read_bytes(saved)), allow_pickle=False) as f:
                return PerId(f["ids"], {"feature": f["feature"]},
                             f["labels"] if "labels" in f.files else None)
        images = self.images()
        found = feature_pass(images, stage.model, self.cfg, images.count(),
                             untrained=stage.batch_stats, arch=stage.arch)
        result = PerId(found.ids, {"feature": found.x}, found.truth).sorted()
        arrays = {"ids": result.ids, "feature": result.arrays["feature"]}
        if result.labels is not None:
            arrays["labels"] = result.labels
        buf = io.BytesIO()
        np.savez(buf, **arrays)  # type: ignore[arg-type]
        fsx.write_bytes_atomic(saved, buf.getvalue())
        return result

    def train(self, stage: Train) -> TrainResult:
        from safetensors.torch import load as st_load

        from pipeline.distributed.job import training_images
        from pipeline.distributed.train import trainer_result

        weights, history = (self.dir.join(f"{stage.name}{ext}") for ext in
                            (".safetensors", ".json"))
        if not fsx.exists(weights):
            data = training_images(self.cfg, self.input_uri, self.shards, ["id", "pixels"])
            if stage.join:
                data = data.map_batches(join_udf(stage.join), batch_format="numpy")
            bare = dataclasses.replace(stage, join={})  # the arrays travel by reference
            state = trainer_result(self.cfg, stage_loop, {"cfg": self.cfg, "stage": bare},
                                   data, self.paths.checkpoints, stage.name)
            fsx.write_bytes_atomic(history, json.dumps(state.meta["history"]).encode())
            fsx.write_bytes_atomic(weights, state.model_bytes)  # last: marks the stage done
        tensors = st_load(fsx.read_bytes(weights))
        return TrainResult({k: v.numpy() for k, v in tensors.items()},
                           json.loads(fsx.read_bytes(history)))


def ray_context() -> Context:
    """This Ray Train worker's :class:`Context`: collectives over torch.distributed (gloo on
    CPU, nccl on GPU) when the group has more than one worker."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    world = ctx.get_world_size()
    group = world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()

    def all_reduce(x: torch.Tensor) -> torch.Tensor:
        if not group:
            return x
        out = x.clone()
        torch.distributed.all_reduce(out)
        return out

    def all_gather(x: torch.Tensor) -> torch.Tensor:
        if not group:
            return x
        parts = [torch.empty_like(x) for _ in range(world)]
        torch.distributed.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    return Context(ray.train.torch.get_device(), ctx.get_world_rank(), world, all_reduce,
                   all_gather, ray.train.torch.prepare_model)


def stage_loop(config: dict[str, Any]) -> None:
    """Ray Train entry point of every train stage: ``config`` = {"cfg", "stage"}.

    Checkpoints every ``scale.checkpoint_every_steps`` steps and at each epoch end; after a
    restart the interrupted epoch replays its remaining number of steps on a freshly
    shuffled stream (Ray Data iterators cannot resume mid-stream), and the first epoch row
    after a resume records ``resumed_from_step``. ``debug.kill_worker_at_step`` kills rank 0
    once, for the fault tests."""
    import ray.train

    from pipeline.distributed.runtime import setup_worker
    from pipeline.distributed.train import Progress, epoch_batches_kwargs, fault_point, out_of_time

    cfg: Config = config["cfg"]
    stage: Train = config["stage"]
    setup_worker(cfg.scale.threads_per_worker or cfg.scale.cpus_per_worker)
    torch.manual_seed(cfg.train.seed)
    ctx = ray_context()
    program = stage.program
    optimizers = program.setup(ctx)
    at = _resume(program, optimizers)
    shard = ray.train.get_dataset_shard("train")
    progress = Progress(stage.epochs, enabled=ctx.rank == 0)
    began = time.monotonic()
    for epoch in range(at["epoch"], stage.epochs):
        progress.start_epoch()
        batches = shard.iter_batches(batch_size=cfg.train.batch_size // ctx.world,
                                     **epoch_batches_kwargs(cfg, epoch))
        for i, rows in enumerate(batches):
            if i < at["batch"]:
                continue
            program.step(to_batch(rows, ctx.device), ctx)
            at["step"] += 1
            if ctx.rank == 0:
                fault_point(cfg, at["step"])
            if at["step"] % cfg.scale.checkpoint_every_steps == 0:
                _save(ctx, program, optimizers, {**at, "epoch": epoch, "batch": i + 1})
            progress.step(epoch, i + 1)
        parts = {**program.end_epoch(epoch, ctx), **at.pop("resumed", {})}
        at["history"].append({"epoch": epoch, **parts})
        progress.end_epoch(epoch, parts)
        at.update(epoch=epoch + 1, batch=0)
        _save(ctx, program, optimizers, at, {"epoch": epoch, **parts})
        if out_of_time(cfg.train.time_budget_s, began):
            break


def _resume(program: Any, optimizers: list[torch.optim.Optimizer]) -> dict[str, Any]:
    """Where this stage stands: {"epoch", "batch" (done in it), "step", "history"}, loaded
    with the program's module and optimisers from the latest checkpoint, if any."""
    from safetensors.torch import load as st_load

    from pipeline.distributed import checkpoint

    saved = checkpoint.latest()
    if saved is None:
        return {"epoch": 0, "batch": 0, "step": 0, "history": []}
    program.module.load_state_dict(st_load(saved.model_bytes))
    for optimizer, state in zip(optimizers, saved.optimizers, strict=True):
        optimizer.load_state_dict(state)
    at = {k: saved.meta[k] for k in ("epoch", "batch", "step", "history")}
    return {**at, "resumed": {"resumed_from_step": at["step"]}}


def _save(ctx: Context, program: Any, optimizers: list[torch.optim.Optimizer],
          at: dict[str, Any], metrics: dict[str, Any] | None = None) -> None:
    from pipeline.distributed import checkpoint

    meta = {k: at[k] for k in ("epoch", "batch", "step", "history")}
    checkpoint.report(ctx.rank, metrics or {"step": at["step"]}, program.module, optimizers,
                      meta)


def train_stages(cfg: Config, input_uri: str, paths: RunPaths) -> TrainedModel:
    """The ``trainer`` of every method written as stages (:func:`pipeline.methods.staged`)."""
    stages = methods.get(cfg.method).stages_fn()(cfg)
    trained: TrainedModel = drive(stages, RayRunner(cfg, input_uri, paths))
    return trained
