"""Ray Train wiring of the ``online`` method: TorchTrainer, DDP, checkpoints, resume.

``train_loop_per_worker`` is the function every Ray Train worker runs; ``fit`` is the driver
side. The method itself (:mod:`pipeline.methods.online`) knows nothing of Ray: this module
hands it batches from the worker's dataset shard and a :class:`RemoteStore` client of the
centroid server, and turns its progress into ``ray.train.report`` calls with checkpoints.

Checkpoints (``--output/checkpoints``, local or S3; :mod:`pipeline.distributed.checkpoint`,
the one format of every method) hold the model, the optimiser, the centroid-server state
and the step, so a restarted worker group (``FailureConfig``) or a re-run of the same
command continues where it stopped (RAY_NOTES: Train).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.config import Config
from pipeline.data import fs as fsx
from pipeline.data.augment import AugmentSpec
from pipeline.distributed import checkpoint
from pipeline.distributed.centroid_server import RemoteStore, fault_once
from pipeline.distributed.runtime import setup_worker, verbose
from pipeline.kmeans.sharded import centroids_of
from pipeline.methods.arch import build_model
from pipeline.methods.online import OnlineLossSpec, OnlineWorker, make_optimizer
from pipeline.progress import Progress

log = logging.getLogger(__name__)


@dataclass
class TrainOutcome:
    """What the driver gets back: final weights, centroids and the per-epoch history."""

    model_bytes: bytes
    centroids: np.ndarray
    history: list[dict[str, float]]


def loss_spec(cfg: Config) -> OnlineLossSpec:
    o = cfg.online
    return OnlineLossSpec(o.temperature, o.compactness_weight, o.consistency_weight,
                          o.entropy_weight, o.balance)


def augment_spec(cfg: Config) -> AugmentSpec | None:
    if not cfg.online.augment:
        return None
    return AugmentSpec(flip=cfg.data.channels == 3)


# ------------------------------------------------------------------------------------------
# Worker side.


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    inner = getattr(model, "module", model)
    assert isinstance(inner, torch.nn.Module)
    return inner


class _Reporter:
    """Reports metrics (and, from rank 0, a checkpoint) identically on every rank."""

    def __init__(self, worker: OnlineWorker, cfg: Config, rank: int):
        self.worker, self.cfg, self.rank = worker, cfg, rank

    def __call__(self, metrics: dict[str, Any], epoch: int, batch_in_epoch: int) -> None:
        self.worker.flush()
        store: Any = self.worker.store
        meta = {"epoch": epoch, "batch_in_epoch": batch_in_epoch, "step": self.worker.step,
                "history": self.worker.history}
        checkpoint.report(self.rank, metrics, _unwrap(self.worker.model),
                          [self.worker.optimizer], meta,
                          store.state() if self.rank == 0 else None)


def _restore(worker: OnlineWorker, rank: int) -> tuple[int, int]:
    """Load the latest checkpoint, if any; rank 0 re-seeds the server. -> (epoch, skip)."""
    from safetensors.torch import load as st_load

    state = checkpoint.latest()
    if state is None:
        return 0, 0
    _unwrap(worker.model).load_state_dict(st_load(state.model_bytes))
    worker.optimizer.load_state_dict(state.optimizers[0])
    meta = state.meta
    worker.step, worker.history = meta["step"], meta["history"]
    if rank == 0:
        store: Any = worker.store
        store.load_state(state.server or {})
    log.info("rank %d resumed at epoch %d, step %d", rank, meta["epoch"], meta["step"])
    return meta["epoch"], meta["batch_in_epoch"]


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def connect_store(servers: list[tuple[str, str | None]], bounds: list[int]) -> Any:
    """A client of the run's centroid server, or of its shards (``scale.centroid_shards``)."""
    if len(servers) == 1:
        return RemoteStore.connect(*servers[0])
    from pipeline.kmeans.sharded import ShardedStore

    return ShardedStore([RemoteStore.connect(*s) for s in servers], np.asarray(bounds))


def _build_worker(cfg: Config, server: dict[str, Any], rank: int) -> OnlineWorker:
    import ray.train.torch

    torch.manual_seed(cfg.train.seed)
    model: torch.nn.Module = build_model(cfg)
    model = ray.train.torch.prepare_model(model)
    t = cfg.train
    optimizer = make_optimizer(model, t.optimizer, t.lr, t.momentum, t.weight_decay)
    return OnlineWorker(
        model=model, optimizer=optimizer,
        store=connect_store(server["servers"], server["bounds"]),
        loss_spec=loss_spec(cfg), augment_spec=augment_spec(cfg),
        device=ray.train.torch.get_device(), drift_compensation=cfg.cluster.drift_compensation,
        sync_every=cfg.cluster.sync_every, max_staleness=cfg.cluster.max_staleness, worker=rank,
    )


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point: ``config`` = {"cfg": Config, "server": {"servers": [(name,
    namespace), ...], "bounds": shard bounds},
    "init_model": safetensors bytes or None}."""
    import ray.train
    from safetensors.torch import load as st_load

    cfg: Config = config["cfg"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    setup_worker(cfg.scale.threads_per_worker or cfg.scale.cpus_per_worker)
    worker = _build_worker(cfg, config["server"], rank)
    if config.get("init_model"):
        _unwrap(worker.model).load_state_dict(st_load(config["init_model"]))
    start_epoch, skip = _restore(worker, rank)
    resumed_from = worker.step if ray.train.get_checkpoint() is not None else None
    _barrier()
    worker.refresh()
    worker.base_round = worker.version - worker.step // worker.sync_every
    shard = ray.train.get_dataset_shard("train")
    report = _Reporter(worker, cfg, rank)
    progress = Progress(cfg.train.epochs, enabled=rank == 0)
    local_batch = cfg.train.batch_size // world
    started = time.monotonic()
    for epoch in range(start_epoch, cfg.train.epochs):
        batches = _batches(shard, local_batch, epoch_batches_kwargs(cfg, epoch))

        def on_step(i: int, epoch: int = epoch) -> None:
            if rank == 0:
                fault_point(cfg, worker.step)
            if worker.step % cfg.scale.checkpoint_every_steps == 0:
                report({"epoch": epoch, "step": worker.step}, epoch, i + 1)
            progress.step(epoch, i + 1)

        progress.start_epoch()
        parts = worker.run_epoch(batches, train_cnn=epoch >= cfg.train.warmup_epochs,
                                 skip=skip, on_step=on_step)
        skip = 0
        row: dict[str, float] = {"epoch": epoch, **parts}
        if resumed_from is not None:  # the first epoch after a resume records its start step
            row["resumed_from_step"], resumed_from = resumed_from, None
        worker.history.append(row)
        progress.end_epoch(epoch, parts)
        report({"epoch": epoch, "step": worker.step, **parts}, epoch + 1, 0)
        if out_of_time(cfg.train.time_budget_s, started):
            break


def out_of_time(budget_s: float, started: float) -> bool:
    """Rank 0's verdict on ``train.time_budget_s``, broadcast so every rank stops together."""
    import ray.train.torch

    stop = torch.tensor([float(budget_s > 0 and time.monotonic() - started >= budget_s)])
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


def _batches(shard: Any, batch_size: int, kwargs: dict[str, Any]) -> Iterator[Any]:
    """(pixels (n, C, H, W) float tensor, labels (n,) or None) from this worker's shard."""
    for b in shard.iter_batches(batch_size=batch_size, **kwargs):
        x = torch.from_numpy(np.asarray(b["pixels"], dtype=np.float32))
        yield (x, b["label"]) if "label" in b else x


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
    """Run (or resume) :func:`make_trainer` over ``train_ds`` -> its final checkpoint."""
    result = make_trainer(cfg, loop, config, {"train": train_ds}, storage, name).fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training under {storage.uri}/{name} finished without a checkpoint")
    return checkpoint.of(result.checkpoint)


def fit(cfg: Config, train_ds: Any, server: dict[str, Any], storage: Any,
        init_model: bytes | None) -> TrainOutcome:
    """Run (or resume) Ray Train for ``cfg`` with checkpoints under ``storage`` (Location)."""
    state = trainer_result(cfg, train_loop_per_worker,
                           {"cfg": cfg, "server": server, "init_model": init_model},
                           train_ds, storage, "train")
    return TrainOutcome(state.model_bytes, centroids_of(state.server or {}),
                        state.meta["history"])


def fault_point(cfg: Config, step: int) -> None:
    """``debug.kill_worker_at_step``: exit this worker once when ``step`` reaches it."""
    if step == cfg.debug.kill_worker_at_step:
        fault_once(fsx.locate(cfg.data.output, cfg.s3).join("checkpoints", "_fault-worker"))
