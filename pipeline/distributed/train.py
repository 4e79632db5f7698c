"""Ray Train plumbing of the stage runner (:mod:`pipeline.distributed.runner`): the
TorchTrainer (DDP, FailureConfig restarts, checkpoints under ``--output/checkpoints``, local
or S3), the training stream's per-epoch iteration, the shared stop on
``train.time_budget_s``, fault points, and the client of a run's centroid server(s).
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from pipeline.config import Config
from pipeline.data import fs as fsx
from pipeline.distributed import checkpoint
from pipeline.distributed.centroid_server import RemoteStore, fault_once
from pipeline.distributed.runtime import verbose

log = logging.getLogger(__name__)


def connect_store(servers: list[tuple[str, str | None]], bounds: list[int],
                  generation: int = 0) -> Any:
    """A client of the run's centroid server, or of its shards (``scale.centroid_shards``),
    for a worker of group ``generation``."""
    if len(servers) == 1:
        return RemoteStore.connect(*servers[0], generation=generation)
    from pipeline.kmeans.sharded import ShardedStore

    return ShardedStore([RemoteStore.connect(*s, generation=generation) for s in servers],
                        np.asarray(bounds), generation)


def out_of_time(spent: bool) -> bool:
    """Rank 0's verdict on the stage's time budget (``Train.spent``), broadcast so every rank
    stops together."""
    import ray.train.torch

    stop = torch.tensor([float(spent)])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        stop = stop.to(ray.train.torch.get_device())
        torch.distributed.broadcast(stop, 0)
    return bool(stop.item())


def epoch_batches_kwargs(cfg: Config, epoch: int, pass_: int = 0) -> dict[str, Any]:
    """``iter_batches`` arguments of one pass over a worker's shard: numpy batches through
    the local shuffle buffer (``data.shuffle_buffer_mb``), seeded per epoch and pass. The
    shard's own order is already re-drawn per epoch (``read_images``' ShuffleSpec)."""
    from pipeline.data.reader import shuffle_buffer_rows

    return {"batch_format": "numpy", "drop_last": True,
            "local_shuffle_buffer_size": shuffle_buffer_rows(cfg),
            "local_shuffle_seed": cfg.train.seed + 1000 * epoch + pass_}


# ------------------------------------------------------------------------------------------
# Driver side.


def make_trainer(cfg: Config, loop: Any, config: dict[str, Any], datasets: dict[str, Any],
                 storage: Any, name: str, data_config: Any = None) -> Any:
    """A TorchTrainer for ``cfg`` (resumes the run ``name`` under ``storage`` when it exists):
    DDP (gloo on CPU, nccl on GPU), FailureConfig restarts, quiet logs."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    resources: dict[str, float] = {"CPU": cfg.scale.cpus_per_worker}
    if cfg.scale.gpu:
        resources["GPU"] = 1
    extra = {} if data_config is None else {"dataset_config": data_config}
    return TorchTrainer(
        loop, train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=cfg.scale.workers, use_gpu=cfg.scale.gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=name, storage_path=storage.path, storage_filesystem=storage.fs,
            failure_config=FailureConfig(max_failures=cfg.scale.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            logging_config=LoggingConfig("INFO" if verbose() else "WARNING")),  # type: ignore[call-arg]
        datasets=datasets,
        torch_config=TorchConfig(backend="nccl" if cfg.scale.gpu else "gloo",
                                 timeout_s=cfg.scale.collective_timeout_s),
        **extra,
    )


def trainer_result(cfg: Config, loop: Any, config: dict[str, Any], train_ds: Any,
                   storage: Any, name: str) -> checkpoint.TrainState:
    """Run (or resume) :func:`make_trainer` over ``train_ds`` -> its final checkpoint.

    An S3 failure that outlasted the retry budget (``s3.max_attempts``) in a worker or in
    Ray Train's controller is raised as one :class:`StorageError` line naming the URI."""
    try:
        result = make_trainer(cfg, loop, config, {"train": train_ds}, storage, name).fit()
    except Exception as exc:
        error = fsx.s3_error(exc)
        if error is None:
            raise
        raise error from exc
    if result.checkpoint is None:
        raise RuntimeError(f"training under {storage.uri}/{name} finished without a checkpoint")
    return checkpoint.of(result.checkpoint)


def fault_point(cfg: Config, step: int) -> None:
    """``debug.kill_worker_at_step``: exit this worker once when ``step`` reaches it."""
    if step == cfg.debug.kill_worker_at_step:
        fault_once(fsx.locate(cfg.data.output, cfg.s3).join("checkpoints", "_fault-worker"))
