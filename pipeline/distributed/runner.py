"""The shared stage runner on Ray: executes any method written as stages
(:mod:`pipeline.methods.base`), so a new method needs no code in this package.

**One long-lived trainer.** Every stage of a run executes in one Ray Train run
(:func:`serve`), started at the first stage that is not already saved: the driver's method
generator posts each stage to a :class:`StageDesk` actor, every worker of the group takes
it, runs it and delivers its part; the driver waits for the parts and sends the result back
into the generator. So a method that loops (DeepCluster: a pass, a clustering, an epoch,
per epoch) pays for starting workers, process groups and dataset iterators once per run,
not once per stage (bench/epoch_overhead.py).

* :class:`~pipeline.methods.base.Embed`: each worker embeds its share of the decoded images
  (the ``embed`` dataset, split without dropping rows), GPU when present; the driver
  concatenates the shares (refusing up front when they would not fit its memory:
  :func:`~pipeline.distributed.features.check_feature_memory`), applies the stage's
  ``reduce`` with :func:`scatter` (shards on Ray actors), and saves the result as
  ``--output/stages/NAME.npz``.
  An Embed with ``sample`` embeds a uniform sample on the driver instead
  (:func:`~pipeline.distributed.job.sample_pixels`); one with ``pool``, posted before the
  trainer has started (multiview's view passes), on a Ray Data actor pool of its own
  (:class:`EmbedActor`, the batch-inference layout of the assign job), so the trainer
  starts only when a train stage needs it.
* :class:`~pipeline.methods.base.Train`: the shuffled training stream (the ``train``
  dataset, :func:`~pipeline.distributed.job.training_images`) with the stage's per-id arrays
  joined by id on the worker, in :func:`stage_loop`, the one worker loop of every program:
  passes, learning rates, fault points, progress lines, ``train.time_budget_s``, and a
  checkpoint in the one format (:mod:`pipeline.distributed.checkpoint`) every
  ``scale.checkpoint_every_steps`` and at each epoch end. The driver sends each train stage
  with its steps per epoch (:func:`~pipeline.methods.base.steps_per_epoch` of the rows in
  the Parquet footers), the workers' ``ctx.steps_per_epoch``. A stage with ``centroids`` gets
  a centroid-server actor (or ``scale.centroid_shards`` of them) for its duration, as
  ``ctx.centroids``; its state goes into every checkpoint and is restored with it. A
  restarted worker group (``FailureConfig``) or a re-run resumes the stage from its latest
  checkpoint. The result is saved as ``--output/stages/NAME/`` in that same format.

A re-run loads every saved stage without starting a trainer for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from pipeline import methods
from pipeline.config import Config
from pipeline.data import fs as fsx
from pipeline.data.fs import Location
from pipeline.data.reader import Shards, find_shards
from pipeline.distributed import checkpoint
from pipeline.distributed.assign import ModelActor
from pipeline.distributed.features import check_feature_memory
from pipeline.methods.base import (
    Context,
    Embed,
    PerId,
    Stage,
    Train,
    TrainResult,
    array_batches,
    drive,
    seed_step,
    set_lr,
    steps_per_epoch,
    to_batch,
)
from pipeline.outputs import RunPaths, TrainedModel

log = logging.getLogger(__name__)

# An Embed pool's first actor must start within this (a GPU node may have to come up);
# Ray Data's own default waits for ever.
POOL_START_TIMEOUT_S = 600


# ------------------------------------------------------------------------------------------
# Driver and workers meet at the desk.


class StageDesk:
    """Async actor between the driver and the long-lived worker group: one stage in flight.

    The driver :meth:`post`\\ s stage ``i`` and awaits :meth:`result`; each worker awaits
    :meth:`take` (no polling), runs the stage and :meth:`deliver`\\ s its part. A restarted
    worker group takes the stage in flight again; it starts with :meth:`new_generation`,
    which drops the dead group's partial parts, and deliveries of an older generation that
    land late are ignored."""

    def __init__(self) -> None:
        self.current: tuple[int, list[Any]] | None = None
        self.parts: dict[int, Any] = {}
        self.generation = 0
        self.stream = 0  # passes over the train stream before the group's first (resume_stream)
        self.stopped, self.error = False, ""
        self.changed = asyncio.Condition()

    async def post(self, i: int, boxed: list[Any]) -> None:
        async with self.changed:
            self.current, self.parts = (i, boxed), {}
            self.changed.notify_all()

    async def take(self, after: int) -> tuple[int, list[Any]] | None:
        """The stage in flight once it is newer than ``after``; None when the run is over."""
        async with self.changed:
            await self.changed.wait_for(lambda: self.stopped or (
                self.current is not None and self.current[0] > after))
            return None if self.stopped else self.current

    async def new_generation(self) -> int:
        async with self.changed:
            self.generation += 1
            self.parts = {}
            return self.generation

    async def set_stream(self, executions: int) -> None:
        self.stream = executions

    async def stream_position(self) -> int:
        return self.stream

    async def deliver(self, i: int, generation: int, rank: int, part: Any) -> None:
        async with self.changed:
            if generation == self.generation and self.current and self.current[0] == i:
                self.parts[rank] = part
                self.changed.notify_all()

    async def result(self, i: int, need: int) -> dict[str, Any]:
        """{"parts": by rank} once ``need`` ranks delivered stage ``i``, or {"error": ...}."""
        async with self.changed:
            await self.changed.wait_for(lambda: bool(self.error) or len(self.parts) >= need)
            if self.error:
                return {"error": self.error}
            parts, self.current, self.parts = self.parts, None, {}
            return {"parts": [parts[r] for r in sorted(parts)]}

    async def fail(self, error: str) -> None:
        async with self.changed:
            self.error = error
            self.changed.notify_all()

    async def stop(self) -> None:
        async with self.changed:
            self.stopped = True
            self.changed.notify_all()


class LongLivedTrainer:
    """The run's one Ray Train run (:func:`serve`), fitted in a background thread from the
    first :meth:`run` to :meth:`close`."""

    def __init__(self, cfg: Config, datasets: Callable[[], dict[str, Any]], storage: Location):
        self.cfg, self.datasets, self.storage = cfg, datasets, storage
        self.desk: Any = None
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.posted = 0

    @property
    def started(self) -> bool:
        """Whether the Ray Train run (and so its workers' resources) is up."""
        return self.thread is not None

    def run(self, stage: Stage, servers: dict[str, Any] | None = None,
            steps_per_epoch: int | None = None) -> list[Any]:
        """Every rank's part of ``stage`` (rank 0's alone for a train stage); ``servers``:
        the stage's centroid servers ({"servers": [(name, namespace)], "bounds"});
        ``steps_per_epoch``: a train stage's, for its workers' :class:`Context`."""
        import ray

        if self.thread is None:
            self._start()
        self.posted += 1
        ray.get(self.desk.post.remote(self.posted,
                                      [ray.put((stage, servers, steps_per_epoch))]))
        need = self.cfg.scale.workers if isinstance(stage, Embed) else 1
        got = ray.get(self.desk.result.remote(self.posted, need))
        if "error" in got:
            if isinstance(self.error, fsx.StorageError):
                raise self.error
            raise RuntimeError(f"stage {stage.name}: {got['error']}") from self.error
        parts: list[Any] = got["parts"]
        return parts

    def _start(self) -> None:
        import ray

        from pipeline.distributed.train import make_trainer

        self.desk = ray.remote(num_cpus=0)(StageDesk).remote()
        trainer = make_trainer(self.cfg, serve, {"cfg": self.cfg, "desk": self.desk},
                               self.datasets(), self.storage, "stages",
                               data_config=_split_config(self.cfg.train.deterministic,
                                                         self.desk))
        self.thread = threading.Thread(target=self._fit, args=(trainer,), daemon=True,
                                       name="stage-trainer")
        self.thread.start()

    def _fit(self, trainer: Any) -> None:
        try:
            trainer.fit()
            message = "the worker group stopped before the stage finished"
        except BaseException as exc:  # noqa: BLE001 (handed to the driver's thread)
            # An S3 outage beyond the retry budget, in a worker or in Ray Train's controller:
            # one line naming the URI (fsx.s3_error), not Ray's wrapped traceback.
            s3 = fsx.s3_error(exc) if isinstance(exc, Exception) else None
            if s3 is not None:
                s3.__cause__ = exc
            self.error = s3 or exc
            message = f"training failed: {self.error}"
        self.desk.fail.remote(message)

    def close(self, wait: bool = True) -> None:
        """Stop the workers at their next stage; with ``wait``, until the Ray Train run has
        ended, raising what it raised."""
        if self.thread is None:
            return
        self.desk.stop.remote()
        if wait:
            self.thread.join()
            if self.error is not None:
                raise self.error


@contextlib.contextmanager
def _order_preserved(on: bool) -> Iterator[None]:
    """Datasets created (and executed) inside keep Ray Data's block order when ``on``: each
    dataset copies the driver's DataContext when it is created."""
    import ray.data

    options = ray.data.DataContext.get_current().execution_options
    saved = options.preserve_order
    options.preserve_order = saved or on
    try:
        yield
    finally:
        options.preserve_order = saved


def _split_config(deterministic: bool = False, desk: Any = None) -> Any:
    """Ray Train's dataset config: ``train`` split equally over the workers (a step is a
    barrier), ``embed`` split without dropping a row (every image gets a feature). With
    ``deterministic`` (``train.deterministic``), the train stream keeps Ray Data's block
    order: a seeded shuffle draws each block's permutation from seed + block index, so
    blocks arriving in a different order give a different epoch order.

    A worker group that resumes starts the train stream at the run's pass count (``desk``'s
    :meth:`StageDesk.stream_position`, :func:`resume_stream`), so a resumed epoch is drawn in
    the order the unkilled run drew it."""
    import ray
    from ray.train import DataConfig

    options = None
    if deterministic:
        options = {"train": DataConfig.default_ingest_options()}
        options["train"].preserve_order = True

    class Split(DataConfig):  # type: ignore[misc]
        def configure(self, datasets: dict[str, Any], world_size: int, *args: Any,
                      **kwargs: Any) -> list[dict[str, Any]]:
            # Ray Train V2 configures one dataset per call.
            rest = {k: v for k, v in datasets.items() if k != "embed"}
            if "train" in rest and desk is not None:
                start_stream(rest["train"], ray.get(desk.stream_position.remote()))
            out: list[dict[str, Any]] = super().configure(rest, world_size, *args, **kwargs)
            if "embed" in datasets:
                embed = datasets["embed"].copy(datasets["embed"])
                embed.context.execution_options = self._resolve_execution_options("embed")
                for i, split in enumerate(embed.streaming_split(world_size, equal=False)):
                    out[i]["embed"] = split
            return out

    return Split(datasets_to_split=["train", "embed"], execution_options=options)


def start_stream(ds: Any, executions: int) -> None:
    """Make ``ds``'s next execution its ``executions``-th. Ray Data seeds each execution's
    file and block order from (``train.seed``, the dataset's execution index), an index that
    counts executions since the split was made and so starts again at 0 in a restarted
    worker group; set here, epoch e of a resumed run gets the order of epoch e of the
    unkilled one. ``DataContext._execution_idx`` is private (Ray 2.60, pinned in
    constraints.txt); the killed-run test in tests/test_cluster_job.py fails if it stops
    working."""
    ds.context._execution_idx = executions


# ------------------------------------------------------------------------------------------
# Driver side.


class RayRunner:
    """Stages of one run on Ray, their results kept under ``--output/stages/``."""

    def __init__(self, cfg: Config, input_uri: str, paths: RunPaths):
        self.cfg, self.input_uri, self.paths = cfg, input_uri, paths
        self.shards = find_shards(input_uri, cfg.s3)
        self.dir = paths.root.join("stages")
        self.trainer = LongLivedTrainer(cfg, self.datasets, paths.checkpoints)
        self.names: set[str] = set()
        self._rows: int | None = None
        self._datasets: dict[str, Any] | None = None

    def datasets(self) -> dict[str, Any]:
        """The run's datasets, made once (a pool pass and the trainer share them)."""
        if self._datasets is None:
            self._datasets = self._make_datasets()
        return self._datasets

    def _make_datasets(self) -> dict[str, Any]:
        """``train``: the shuffled training stream; ``embed``: the decoded images in stored
        order (with ``data.cache_decoded`` both come from one materialised copy)."""
        from pipeline.distributed.job import decoded_images, training_images

        args = (self.cfg, self.input_uri, self.shards, ["id", "pixels"])
        # train.deterministic: the materialised copy keeps block order too (_split_config)
        with _order_preserved(self.cfg.train.deterministic):
            embed = decoded_images(*args)
            if self.cfg.data.cache_decoded:
                embed = embed.materialize()
            return {"train": training_images(*args, cached=embed), "embed": embed}

    def _claim(self, name: str) -> None:
        if name in self.names or not name or "/" in name:
            raise ValueError(f"stage {name!r}: names must be unique in a run, non-empty and "
                             "without '/'")
        self.names.add(name)

    def embed(self, stage: Embed) -> PerId:
        self._claim(stage.name)
        saved = self.dir.join(f"{stage.name}.npz")
        if fsx.exists(saved):
            return load_per_id(saved)
        t0 = time.perf_counter()
        if stage.sample is not None:
            found = self._sample(stage)
        else:
            check_feature_memory(self.rows(), stage.arch["feature_dim"], self.cfg)
            if stage.pool and not self.trainer.started:
                found = self._on_pool(stage)
            else:
                found = PerId.concat(self.trainer.run(stage))
        found.facts["embed_s"] = time.perf_counter() - t0
        result = found if stage.reduce is None else stage.reduce(found, scatter)
        save_per_id(saved, result)
        return result

    def _sample(self, stage: Embed) -> PerId:
        """Features of ``stage.sample`` uniformly drawn images, embedded on the driver."""
        from pipeline.distributed.job import sample_pixels

        assert stage.sample is not None
        rows, pixels = sample_pixels(self.cfg, self.shards, stage.sample)
        labels = [str(r["label"]) for r in rows] if self.shards.has_label else None
        return embed_sample(stage, self.cfg, np.asarray([r["id"] for r in rows], str),
                            pixels, labels)

    def _on_pool(self, stage: Embed) -> PerId:
        """The pass on a Ray Data actor pool (:class:`EmbedActor`) fed by the ``embed``
        dataset's decode: 1 to ``scale.workers`` actors with a training worker's resources
        (a GPU each with ``scale.gpu``), free since no trainer holds them yet. A pool whose
        first actor cannot start within :data:`POOL_START_TIMEOUT_S` (no free GPU) fails,
        naming the stage, rather than waiting for ever."""
        import ray
        import ray.data

        cfg = self.cfg
        ds = self.datasets()["embed"].map_batches(
            EmbedActor, batch_size=cfg.cluster.assign_batch_size, batch_format="numpy",
            fn_constructor_kwargs={
                "model_bytes": ray.put(stage.model), "arch": stage.arch,
                "threads": cfg.scale.threads_per_worker or cfg.scale.cpus_per_worker,
                "batch_stats": stage.batch_stats, "dtype": feature_dtype(cfg)},
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=cfg.scale.workers),
            num_cpus=cfg.scale.cpus_per_worker, num_gpus=int(cfg.scale.gpu))
        ds.context.wait_for_min_actors_s = POOL_START_TIMEOUT_S
        try:
            batches = list(ds.iter_batches(batch_size=None, batch_format="numpy"))
        except ray.exceptions.GetTimeoutError as exc:
            need = f"{cfg.scale.cpus_per_worker} CPU" + (" and 1 GPU" if cfg.scale.gpu else "")
            raise RuntimeError(f"stage {stage.name}: no actor of its pool ({need}) started "
                               f"within {POOL_START_TIMEOUT_S} s: the cluster has no room "
                               "for one") from exc
        if not batches:
            d = int(stage.arch["feature_dim"])
            return PerId(np.array([], str), {"feature": np.zeros((0, d), feature_dtype(cfg))})
        return PerId.concat([PerId(np.asarray(b["id"]).astype(str), {"feature": b["feature"]},
                                   np.asarray(b["label"]).astype(str) if "label" in b else None)
                             for b in batches])

    def train(self, stage: Train) -> TrainResult:
        self._claim(stage.name)
        saved = self.dir.join(stage.name)
        if not fsx.exists(saved.join(checkpoint.META)):
            state: checkpoint.TrainState = self._train(stage)
            save_train_state(saved, state)
        return load_train_result(saved)

    def _train(self, stage: Train) -> checkpoint.TrainState:
        steps = steps_per_epoch(self.rows(), stage, self.cfg.train.batch_size)
        if stage.centroids is None:
            state: checkpoint.TrainState = self.trainer.run(stage, None, steps)[0]
            return state
        import ray

        from pipeline.distributed.job import start_servers

        handles, names, bounds = start_servers(self.cfg, self.paths, stage.centroids)
        try:
            state = self.trainer.run(stage, {"servers": names, "bounds": bounds.tolist()},
                                     steps)[0]
        finally:
            for handle in handles:
                ray.kill(handle, no_restart=True)
        return state

    def rows(self) -> int:
        """Rows in the input (Parquet footers), for the memory guard and a train stage's
        steps per epoch (images that fail to decode are counted: an upper bound then)."""
        if self._rows is None:
            self._rows = count_rows(self.shards)
        return self._rows

    def close(self, wait: bool = True) -> None:
        self.trainer.close(wait)


def count_rows(shards: Shards) -> int:
    from concurrent.futures import ThreadPoolExecutor

    import pyarrow.parquet as pq

    def rows(path: str) -> int:
        return int(pq.ParquetFile(path, filesystem=shards.location.fs).metadata.num_rows)

    with ThreadPoolExecutor(8) as pool:
        return sum(pool.map(rows, shards.files))


def save_per_id(loc: Location, table: PerId) -> None:
    """An Embed stage's result as one .npz: ``ids``, ``a/NAME``, ``x/NAME``, ``labels``,
    ``facts`` (JSON)."""
    arrays = {"ids": table.ids, "facts": np.asarray(json.dumps(table.facts)),
              **{f"a/{k}": v for k, v in table.arrays.items()},
              **{f"x/{k}": v for k, v in table.extra.items()}}
    if table.labels is not None:
        arrays["labels"] = table.labels
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    fsx.write_bytes_atomic(loc, buf.getvalue())


def load_per_id(loc: Location) -> PerId:
    with np.load(io.BytesIO(fsx.read_bytes(loc)), allow_pickle=False) as f:
        def group(prefix: str) -> dict[str, np.ndarray]:
            return {k[2:]: f[k] for k in f.files if k.startswith(prefix)}

        return PerId(f["ids"], group("a/"), f["labels"] if "labels" in f.files else None,
                     group("x/"), json.loads(str(f["facts"])))


def save_train_state(loc: Location, state: checkpoint.TrainState) -> None:
    """A finished train stage in the checkpoint format, ``meta.json`` last (marks it done)."""
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint.write_state(tmp, state)
        for name in (checkpoint.MODEL, checkpoint.OPTIMIZERS, checkpoint.SERVER,
                     checkpoint.META):
            if os.path.exists(os.path.join(tmp, name)):
                with open(os.path.join(tmp, name), "rb") as fh:
                    fsx.write_bytes_atomic(loc.join(name), fh.read())


def load_train_result(loc: Location) -> TrainResult:
    from safetensors.torch import load as st_load

    from pipeline.kmeans.sharded import centroids_of
    from pipeline.kmeans.state_io import unpack_state

    meta = json.loads(fsx.read_bytes(loc.join(checkpoint.META)))
    optimizers = torch.load(io.BytesIO(fsx.read_bytes(loc.join(checkpoint.OPTIMIZERS))),
                            weights_only=True)
    tensors = st_load(fsx.read_bytes(loc.join(checkpoint.MODEL)))
    server = loc.join(checkpoint.SERVER)
    centroids = (centroids_of(unpack_state(fsx.read_bytes(server)))
                 if fsx.exists(server) else None)
    return TrainResult({k: v.numpy() for k, v in tensors.items()}, meta["history"], optimizers,
                       centroids)


class RemoteShards(list[Any]):
    """:class:`~pipeline.methods.base.Shards` on Ray actors (num_cpus=0), one per part:
    ``call_all`` runs a method on all of them in parallel."""

    def __init__(self, factory: Callable[[np.ndarray], Any], parts: list[np.ndarray]):
        import ray

        actor = ray.remote(num_cpus=0)(factory)
        super().__init__(_Proxy(actor.remote(ray.put(np.ascontiguousarray(p)))) for p in parts)

    def call_all(self, method: str, *args: Any) -> list[Any]:
        import ray

        return ray.get([getattr(p.actor, method).remote(*args) for p in self])

    def close(self) -> None:
        import ray

        for p in self:
            ray.kill(p.actor)
        self.clear()


class _Proxy:
    """One remote object, its methods called synchronously."""

    def __init__(self, actor: Any):
        self.actor = actor

    def __getattr__(self, method: str) -> Any:
        import ray

        remote = getattr(self.actor, method)
        return lambda *args: ray.get(remote.remote(*args))


def scatter(factory: Callable[[np.ndarray], Any], parts: list[np.ndarray]) -> RemoteShards:
    """The Ray runner's :data:`~pipeline.methods.base.Scatter`."""
    return RemoteShards(factory, parts)


def train_stages(cfg: Config, input_uri: str, paths: RunPaths) -> TrainedModel:
    """The ``trainer`` of every method written as stages (:func:`pipeline.methods.staged`)."""
    stages = methods.get(cfg.method).stages_fn()(cfg)
    runner = RayRunner(cfg, input_uri, paths)
    try:
        trained: TrainedModel = drive(stages, runner)
    except BaseException:
        runner.close(wait=False)  # the run is failing: do not wait for a stage in flight
        raise
    runner.close()
    return trained


# ------------------------------------------------------------------------------------------
# Worker side.


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


def serve(config: dict[str, Any]) -> None:
    """Ray Train entry point of the long-lived trainer: take stages from the desk until the
    driver stops it. ``config`` = {"cfg", "desk"}."""
    import ray
    import ray.train

    from pipeline.distributed.runtime import setup_worker

    cfg: Config = config["cfg"]
    desk = config["desk"]
    setup_worker(cfg.scale.threads_per_worker or cfg.scale.cpus_per_worker)
    ctx = ray_context()
    mine = ray.get(desk.new_generation.remote()) if ctx.rank == 0 else 0
    generation = int(ctx.all_reduce(torch.tensor([mine], device=ctx.device)).item())
    saved = checkpoint.latest()
    stream = TrainStream(None, 0 if saved is None else int(saved.meta.get("executions", 0)))
    if ctx.rank == 0:  # before the train split is configured (on rank 0's first call)
        ray.get(desk.set_stream.remote(stream.executions))
    shards = {name: ray.train.get_dataset_shard(name) for name in ("train", "embed")}
    stream.shard = shards["train"]
    after = -1
    while (taken := ray.get(desk.take.remote(after))) is not None:
        after, (ref,) = taken
        stage, servers, steps = ray.get(ref)
        if isinstance(stage, Embed):
            part: Any = embed_share(cfg, stage, shards["embed"], ctx)
        else:
            stage_ctx = dataclasses.replace(_with_servers(ctx, servers, generation),
                                            steps_per_epoch=steps)
            part = stage_loop(cfg, stage, stream, stage_ctx, saved)
            saved = None  # only the group's first train stage resumes (checkpoint.latest)
        if part is not None:
            ray.get(desk.deliver.remote(after, generation, ctx.rank, part))


def _with_servers(ctx: Context, servers: dict[str, Any] | None, generation: int) -> Context:
    """``ctx`` with the stage's centroid-server client, when it has servers; its pushes are
    tagged with the worker group's ``generation``."""
    from pipeline.distributed.train import connect_store

    if servers is None:
        return dataclasses.replace(ctx, centroids=None)
    return dataclasses.replace(ctx, centroids=connect_store(servers["servers"],
                                                            servers["bounds"], generation))


def embed_sample(stage: Embed, cfg: Config, ids: np.ndarray, pixels: torch.Tensor,
                 labels: list[str] | None) -> PerId:
    """Features of a sample's pixels (m, C, H, W) in this process, as the reference runner
    embeds (:func:`~pipeline.methods.reference.embed_pixels`)."""
    from pipeline.methods.reference import embed_pixels

    features, extra = embed_pixels(stage, pixels, cfg.cluster.assign_batch_size)
    return PerId(ids, {"feature": features},
                 None if labels is None else np.asarray(labels, str), extra).sorted()


def embed_share(cfg: Config, stage: Embed, shard: Any, ctx: Context) -> PerId:
    """This worker's share of the pass: features (n, d) in ``deepcluster.feature_dtype``
    (fp16 autocast on CUDA), unsorted."""
    from pipeline.methods.arch import load_model

    model = load_model(stage.model, stage.arch, ctx.device)
    if stage.batch_stats:
        model.train()
    dtype = feature_dtype(cfg)
    ids, feats, labels = [], [], []
    cuda = ctx.device.type == "cuda"
    with torch.inference_mode(), torch.autocast("cuda", torch.float16, enabled=cuda):
        for b in shard.iter_batches(batch_size=cfg.cluster.assign_batch_size,
                                    batch_format="numpy"):
            x = torch.from_numpy(np.asarray(b["pixels"], np.float32)).to(ctx.device)
            feats.append(model(x).float().cpu().numpy().astype(dtype))
            ids.append(np.asarray(b["id"]).astype(str))
            if "label" in b:
                labels.append(np.asarray(b["label"]).astype(str))
    d = int(stage.arch["feature_dim"])
    return PerId(np.concatenate(ids) if ids else np.array([], str),
                 {"feature": np.concatenate(feats) if feats else np.zeros((0, d), dtype)},
                 np.concatenate(labels) if labels else None)


def feature_dtype(cfg: Config) -> type:
    """The dtype of a pass's features on the driver (``deepcluster.feature_dtype``)."""
    return np.float16 if cfg.deepcluster.feature_dtype == "float16" else np.float32


class EmbedActor(ModelActor):
    """Ray Data actor of an Embed stage on a pool (:meth:`RayRunner._on_pool`): decoded
    rows -> ``id``, ``feature`` (n, d) in ``dtype``[, ``label``]; the model loaded once, on
    the GPU when there is one (fp16 autocast there, as :func:`embed_share`)."""

    def __init__(self, model_bytes: Any, arch: dict[str, Any], threads: float,
                 batch_stats: bool, dtype: type):
        super().__init__(model_bytes, arch, threads)
        if batch_stats:
            self.model.train()
        self.dtype = dtype

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        # The embed dataset's pixels are normalised float32 already (the run's decode), so
        # ModelActor's uint8 normalisation, from ``model.json``, never applies here: a view's
        # arch holds its own input's mean/std, not the run's.
        with torch.inference_mode():
            features = self.embed(np.asarray(batch["pixels"], np.float32))
        out = {"id": np.asarray(batch["id"]).astype(str),
               "feature": features.cpu().numpy().astype(self.dtype)}
        if "label" in batch:
            out["label"] = np.asarray(batch["label"]).astype(str)
        return out


@dataclasses.dataclass
class TrainStream:
    """A worker's split of the train stream and the run's pass count over it: every pass
    is one execution of the dataset (:func:`start_stream`)."""

    shard: Any
    executions: int = 0


def stage_loop(cfg: Config, stage: Train, stream: TrainStream, ctx: Context,
               saved: checkpoint.TrainState | None = None) -> checkpoint.TrainState | None:
    """The one worker loop of every train stage -> the final state (rank 0; else None).

    Checkpoints every ``scale.checkpoint_every_steps`` steps and at each epoch end, with the
    stream's pass count at the start of the epoch. A stage resumes from ``saved``, the
    worker group's start-time checkpoint, when it is this stage's: the interrupted epoch
    replays from its start in the same order (:func:`start_stream`), skipping the batches it
    trained on, and each step's random draws depend on its global step alone
    (:func:`~pipeline.methods.base.seed_step`), so with ``train.deterministic`` a resumed run
    trains exactly as the unkilled one. The first epoch row after a resume records
    ``resumed_from_step``. ``debug.kill_worker_at_step`` kills rank 0 once, for the fault
    tests."""
    from pipeline.distributed.train import fault_point, out_of_time
    from pipeline.progress import Progress

    torch.manual_seed(cfg.train.seed)
    program = stage.program
    optimizers = program.setup(ctx)
    at = _resume(stage.name, program, optimizers, ctx, saved)
    at["executions"] = stream.executions
    program.start(at["epoch"], ctx)
    join = _Join(stage.join if stage.inputs == "images" else {})
    progress = Progress(stage.of_epochs or stage.epochs, enabled=ctx.rank == 0,
                        label=stage.shown_as, first=stage.first_epoch)
    began = time.monotonic()
    local = (stage.batch_size or cfg.train.batch_size) // ctx.world
    for epoch in range(at["epoch"], stage.epochs):
        progress.start_epoch()
        if stage.lr is not None:
            set_lr(optimizers, stage.lr[epoch])
        t0, seen = time.perf_counter(), 0
        for i, rows in enumerate(_batches(stage, stream, local, cfg, epoch, ctx)):
            if i < at["batch"]:
                continue
            seed_step(cfg.train.seed, ctx.rank, at["step"])
            program.step(to_batch(join(rows), ctx.device), ctx)
            at["step"], seen = at["step"] + 1, seen + len(rows["id"])
            if ctx.rank == 0:
                fault_point(cfg, at["step"])
            if at["step"] % cfg.scale.checkpoint_every_steps == 0:
                _save(ctx, stage.name, program, optimizers, {**at, "epoch": epoch,
                                                             "batch": i + 1})
            progress.step(epoch, i + 1)
        if stage.inputs == "images":
            stream.executions += stage.passes
        seconds = time.perf_counter() - t0
        parts = {**program.end_epoch(epoch, ctx), **at.pop("resumed", {}),
                 "images_per_s": seen * ctx.world / max(1e-9, seconds), "epoch_s": seconds}
        at["history"].append({"epoch": epoch, **parts})
        if stage.epochs > 1:  # a one-epoch stage's method says how it went
            progress.end_epoch(epoch, parts)
        at.update(epoch=epoch + 1, batch=0, executions=stream.executions)
        _save(ctx, stage.name, program, optimizers, at, {"epoch": epoch, **parts})
        if out_of_time(stage.spent(cfg.train.time_budget_s, began)):
            break
    if ctx.rank != 0:
        return None
    return checkpoint.TrainState(_model_bytes(program.module),
                                 [o.state_dict() for o in optimizers], _meta(stage.name, at),
                                 None if ctx.centroids is None else ctx.centroids.state())


def _batches(stage: Train, stream: TrainStream, batch: int, cfg: Config, epoch: int,
             ctx: Context) -> Iterator[Any]:
    """This worker's batches of one epoch: of the image stream, or of the joined arrays
    (``inputs="arrays"``, :func:`~pipeline.methods.base.array_batches`)."""
    from pipeline.distributed.train import epoch_batches_kwargs

    for p in range(stage.passes):
        if stage.inputs == "arrays":
            yield from array_batches(stage, ctx.rank, ctx.world, batch, cfg.train.seed, epoch, p)
        else:
            yield from stream.shard.iter_batches(batch_size=batch,
                                                 **epoch_batches_kwargs(cfg, epoch, p))


class _Join:
    """Adds the stage's per-id arrays to each batch, by id (on the worker: the arrays came
    with the stage, once)."""

    def __init__(self, join: dict[str, PerId]):
        self.join = join

    def __call__(self, rows: dict[str, Any]) -> dict[str, Any]:
        if not self.join:
            return rows
        ids = np.asarray(rows["id"]).astype(str)
        return {**rows, **{name: table.take(ids, name) for name, table in self.join.items()}}


def _model_bytes(module: torch.nn.Module) -> bytes:
    from pipeline.models.weights import save_bytes

    return save_bytes(module)


def _meta(name: str, at: dict[str, Any]) -> dict[str, Any]:
    return {"stage": name, **{k: at[k] for k in ("epoch", "batch", "step", "history",
                                                  "executions")}}


def _resume(name: str, program: Any, optimizers: list[torch.optim.Optimizer],
            ctx: Context, saved: checkpoint.TrainState | None) -> dict[str, Any]:
    """Where stage ``name`` stands: {"epoch", "batch" (done in it), "step", "history"},
    loaded with the program's module and optimisers from the latest checkpoint when that
    checkpoint is this stage's. Rank 0 restarts the centroid server from it, or from its
    initial state when there is none, under this worker group's generation (the pushes
    after it, and any a dead group still has queued, are discarded); every rank waits for
    that."""
    from safetensors.torch import load as st_load

    if saved is None or saved.meta.get("stage") != name:
        saved = None
    if ctx.rank == 0 and ctx.centroids is not None:
        ctx.centroids.restart(None if saved is None else saved.server, ctx.centroids.generation)
    if ctx.centroids is not None:
        ctx.all_reduce(torch.zeros(1, device=ctx.device))  # a barrier
    if saved is None:
        return {"epoch": 0, "batch": 0, "step": 0, "history": []}
    program.module.load_state_dict(st_load(saved.model_bytes))
    for optimizer, state in zip(optimizers, saved.optimizers, strict=True):
        optimizer.load_state_dict(state)
    at = {k: saved.meta[k] for k in ("epoch", "batch", "step", "history")}
    log.info("rank %d resumed stage %s at epoch %d, step %d", ctx.rank, name, at["epoch"],
             at["step"])
    return {**at, "resumed": {"resumed_from_step": at["step"]}}


def _save(ctx: Context, name: str, program: Any, optimizers: list[torch.optim.Optimizer],
          at: dict[str, Any], metrics: dict[str, Any] | None = None) -> None:
    """A checkpoint. With a centroid server, every worker flushes and waits until its pushes
    landed, then all meet, and only then rank 0 snapshots the server: the snapshot holds
    every round up to this step, from every worker."""
    program.before_checkpoint(ctx)
    if ctx.centroids is not None:
        ctx.centroids.drain()
        ctx.all_reduce(torch.zeros(1, device=ctx.device))  # a barrier
    server = ctx.centroids.state() if ctx.rank == 0 and ctx.centroids is not None else None
    checkpoint.report(ctx.rank, metrics or {"step": at["step"]}, program.module, optimizers,
                      _meta(name, at), server)
