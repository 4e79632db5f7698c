"""The methods' seam (DESIGN §5): stages, programs and the worker context. No Ray.

A method is a generator of **stages** (:func:`drive` runs it on a runner):

* :class:`Embed` -- a full pass of every image through a model, on the workers; the runner
  sends back a :class:`PerId` (features by image id), or what the stage's ``reduce`` makes
  of it on the driver (DeepCluster's clustering, with its k-means spread over feature
  shards by the runner's :data:`Scatter`). Saved, and skipped when present.
* :class:`Train` -- epochs of steps of a :class:`Program` over the shuffled stream, with
  per-id arrays of earlier stages joined into each batch; the runner sends back a
  :class:`TrainResult` (the program's final state and per-epoch metrics).

Between stages the generator computes on the driver whatever it likes (k-means, PCA), and
so it can loop (DeepCluster) or branch on earlier results (DEPICT). Its return value is the
export: a :class:`~pipeline.outputs.TrainedModel` whose nearest-centroid rule is the
method's own cluster rule, so assignment, outliers, metrics and the report need nothing per
method.

Two runners execute the same stage list: :class:`pipeline.methods.reference.LocalRunner`
in one process, and :class:`pipeline.distributed.runner.RayRunner` on Ray (Ray Data for
passes and streams, Ray Train for programs). A program sees only a :class:`Context`, whose
collectives are the identity in one process (the pattern of lightly's
``gather_distributed``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


@dataclass
class Context:
    """What a program's step sees on one worker.

    ``all_reduce``: (…) tensor -> its sum over workers; ``all_gather``: (n, …) -> (world·n, …)
    concatenated in rank order (equal n on every rank); ``wrap``: a module -> the module to
    train with (DDP under Ray Train). All three are the identity in one process.
    ``centroids``: the centroid-server client (:class:`pipeline.methods.online.CentroidClient`:
    the Ray actor, its shards, or the in-process :class:`~pipeline.kmeans.store.CentroidStore`)
    in a train stage that asked for one (``Train.centroids``), else None.
    ``steps_per_epoch``: in a train stage, the optimiser steps of one of its epochs
    (:func:`steps_per_epoch`, the same on every worker and in both runners), so a program
    can size a schedule by the run (IMC's warm-up); None outside a train stage or from a
    runner that does not know it.
    """

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    rank: int = 0
    world: int = 1
    all_reduce: Callable[[torch.Tensor], torch.Tensor] = _identity
    all_gather: Callable[[torch.Tensor], torch.Tensor] = _identity
    wrap: Callable[[nn.Module], nn.Module] = lambda m: m
    centroids: Any = None
    steps_per_epoch: int | None = None


@dataclass
class PerId:
    """Arrays by image id: ``ids`` (n,) str sorted, ``arrays[name]`` (n, …), ``labels`` (n,)
    str ground truth or None."""

    ids: np.ndarray
    arrays: dict[str, np.ndarray]
    labels: np.ndarray | None = None
    extra: dict[str, np.ndarray] = field(default_factory=dict)  # not per id (centroids, ...)
    facts: dict[str, float] = field(default_factory=dict)  # figures for the history

    def sorted(self) -> PerId:
        order = np.argsort(self.ids, kind="stable")
        return PerId(self.ids[order], {k: v[order] for k, v in self.arrays.items()},
                     None if self.labels is None else self.labels[order], self.extra,
                     self.facts)

    @staticmethod
    def concat(parts: list[PerId]) -> PerId:
        """The rows of every part (the workers' shares of a pass), sorted by id."""
        labels = [p.labels for p in parts if p.labels is not None]
        return PerId(np.concatenate([p.ids for p in parts]),
                     {k: np.concatenate([p.arrays[k] for p in parts]) for k in parts[0].arrays},
                     np.concatenate(labels) if labels else None).sorted()

    def take(self, ids: np.ndarray, name: str) -> np.ndarray:
        """``arrays[name]`` rows of ``ids`` (each must be present; ``ids`` sorted here)."""
        pos = np.searchsorted(self.ids, ids)
        if len(self.ids) == 0 or np.any(pos >= len(self.ids)) or np.any(self.ids[
                np.minimum(pos, len(self.ids) - 1)] != ids):
            raise KeyError(f"{name}: ids missing from the joined stage")
        return self.arrays[name][pos]


class Program(Protocol):
    """A train stage's work on one worker. Picklable before :meth:`setup`.

    ``module`` holds everything the stage trains or carries between epochs (checkpointed
    as safetensors; buffers included), ``setup`` builds it on ``ctx.device`` and returns
    the optimisers (checkpointed too). ``start(epoch, ctx)`` runs once the module and
    optimisers hold their resumed state (if any), before this worker group's first step;
    ``before_checkpoint`` before every checkpoint (:class:`Hooks` has both as no-ops).
    """

    module: nn.Module

    def setup(self, ctx: Context) -> list[torch.optim.Optimizer]: ...

    def start(self, epoch: int, ctx: Context) -> None: ...

    def before_checkpoint(self, ctx: Context) -> None: ...

    def step(self, batch: dict[str, Any], ctx: Context) -> dict[str, float]:
        """One batch: tensors (``pixels`` (b, C, H, W) float32, joined arrays) plus
        ``id`` (b,) and ``label`` (b,) as numpy."""
        ...

    def end_epoch(self, epoch: int, ctx: Context) -> dict[str, float]: ...


class Hooks:
    """No-op :class:`Program` hooks, for programs that need none."""

    def start(self, epoch: int, ctx: Context) -> None:
        pass

    def before_checkpoint(self, ctx: Context) -> None:
        pass


class EpochMeans:
    """A program's per-step figures averaged over an epoch: ``add`` each step's, ``pop`` the
    means at the epoch's end (and start over)."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.steps = 0

    def add(self, parts: dict[str, float]) -> None:
        for key, value in parts.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.steps += 1

    def pop(self) -> dict[str, float]:
        out = {key: value / max(1, self.steps) for key, value in self.sums.items()}
        self.sums, self.steps = {}, 0
        return out


class Shards(Protocol):
    """Objects each holding one part of an array, whose methods the driver calls: in this
    process, or on Ray actors in parallel (faiss ``contrib/clustering.py``'s pattern)."""

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> Any: ...

    def call_all(self, method: str, *args: Any) -> list[Any]: ...

    def close(self) -> None: ...


# (factory, parts) -> Shards holding factory(part) for each part.
Scatter = Callable[[Callable[[np.ndarray], Any], list[np.ndarray]], Shards]


class LocalShards(list[Any]):
    """:class:`Shards` in this process (the reference runner's :data:`Scatter`)."""

    @classmethod
    def scatter(cls, factory: Callable[[np.ndarray], Any], parts: list[np.ndarray]
                ) -> LocalShards:
        return cls(factory(p) for p in parts)

    def call_all(self, method: str, *args: Any) -> list[Any]:
        return [getattr(s, method)(*args) for s in self]

    def close(self) -> None:
        self.clear()


@dataclass
class Embed:
    """A full pass: features (n, d) of every image under ``model`` (safetensors + arch
    record), as :class:`PerId` ``arrays["feature"]``; ``reduce(features, scatter)`` turns
    them on the driver into the stage's result (only that is saved). With ``sample``, only
    that many images are embedded, drawn uniformly by a ``train.seed``-keyed hash of their
    ids (the same images whatever the stored order; bad images skipped), in batches of
    ``cluster.assign_batch_size``.

    With ``precise_bn`` (a batch size; needs ``sample``), the model's BatchNorm statistics
    are first recomputed over the sample in batches of that size
    (:func:`~pipeline.models.layers.recompute_bn_stats`); the features are then the
    calibrated model's, in eval mode, and its safetensors bytes are ``extra["model"]``
    (uint8).

    With ``pool``, a runner whose workers are not yet busy (no train stage has run) embeds
    on an inference pool of its own instead (Ray: a Ray Data actor pool, GPU when present),
    the batch-inference layout; the features are the same. Multiview's view passes, which
    all come before its first train stage, ask for it."""

    name: str
    model: bytes
    arch: dict[str, Any]
    batch_stats: bool = False  # BatchNorm from each batch (an untrained model's are void)
    reduce: Callable[[PerId, Scatter], PerId] | None = None
    sample: int | None = None
    precise_bn: int | None = None
    pool: bool = False


@dataclass
class Train:
    """``epochs`` of ``program`` over the shuffled stream (``batch_size``, else
    ``cfg.train.batch_size``, images a step, split over workers), with ``join[name]`` arrays added to each batch by id. An epoch is
    ``passes`` passes over the stream; ``lr[e]``, when given, is every optimiser's learning
    rate in epoch ``e``. With ``centroids`` (k, d), the runner serves them from a centroid
    server for the stage (``ctx.centroids``), checkpoints its state with the program's and
    returns its final centroids.

    With ``inputs="arrays"`` the stage trains on the joined arrays alone, not on images:
    batches hold ``id``, ``label`` and the ``join`` arrays, drawn by :func:`array_batches`
    (no image is read or decoded; every joined table must hold the same ids). Multiview's
    fusion network trains so, on the views' features."""

    name: str
    epochs: int
    program: Program
    join: dict[str, PerId] = field(default_factory=dict)
    passes: int = 1
    lr: list[float] | None = None
    centroids: np.ndarray | None = None
    batch_size: int | None = None  # the global batch; None = train.batch_size
    inputs: str = "images"  # "images": the decoded stream; "arrays": the join arrays only
    # Progress lines: the word for an epoch, and this stage's place in the run's epochs
    # (online's starts: "start 2/3 epoch 1/5"; the kept start's rest: "epoch 6/20").
    shown_as: str = "epoch"
    first_epoch: int = 0  # the run's epoch of this stage's epoch 0
    of_epochs: int | None = None  # the run's epochs; None: this stage's
    # This stage's share of ``train.time_budget_s`` (the runner stops after the epoch in
    # which it ran out); None: the whole budget. A method of several train stages splits it.
    budget_s: float | None = None

    def spent(self, time_budget_s: float, began: float) -> bool:
        """Whether the stage's training, begun at ``time.monotonic()`` ``began``, has used
        its budget (it stops at this epoch's end): ``budget_s``, else the run's
        ``train.time_budget_s``; 0 is none."""
        budget = time_budget_s if self.budget_s is None else self.budget_s
        return budget > 0 and time.monotonic() - began >= budget

    def rows(self) -> int:
        """Rows of an ``inputs="arrays"`` stage: its joined tables' ids, the same in each."""
        tables = list(self.join.values())
        if self.inputs != "arrays" or not tables:
            raise ValueError(f"stage {self.name}: inputs='arrays' needs joined arrays")
        ids = tables[0].ids
        if any(len(t.ids) != len(ids) or np.any(t.ids != ids) for t in tables[1:]):
            raise ValueError(f"stage {self.name}: the joined tables hold different ids")
        return len(ids)


@dataclass
class TrainResult:
    """A train stage's outcome: the program module's final ``state``, its ``history`` (a
    row per epoch: the program's figures, ``images_per_s``, ``epoch_s`` (the epoch's
    seconds; after a restart those since the resume), ``resumed_from_step`` after a
    restart) and the optimisers' final state dicts."""

    state: dict[str, np.ndarray]
    history: list[dict[str, Any]]
    optimizers: list[dict[str, Any]] = field(default_factory=list)
    centroids: np.ndarray | None = None  # the centroid server's, when the stage had one


Stage = Embed | Train
Stages = Generator[Stage, Any, Any]


class Runner(Protocol):
    def embed(self, stage: Embed) -> PerId: ...

    def train(self, stage: Train) -> TrainResult: ...


def drive(stages: Stages, runner: Runner) -> Any:
    """Run each stage the generator yields on ``runner``, sending its result back; returns
    the generator's return value (the method's export)."""
    result: Any = None
    while True:
        try:
            stage = stages.send(result)
        except StopIteration as done:
            return done.value
        result = runner.embed(stage) if isinstance(stage, Embed) else runner.train(stage)


def steps_per_epoch(rows: int, stage: Train, batch_size: int) -> int:
    """Optimiser steps in one epoch of ``stage`` over ``rows`` images (an ``inputs="arrays"``
    stage: over its own rows): ``stage.passes``
    passes in global batches of ``stage.batch_size`` (else ``batch_size``, i.e.
    ``train.batch_size``), the last partial batch of each pass dropped.

    On W workers the count is the same: each gets an equal split of ⌊rows/W⌋ rows in
    batches of B/W (B is a multiple of W), and ⌊⌊rows/W⌋ / (B/W)⌋ = ⌊rows/B⌋, since the
    largest multiple of W up to ``rows`` is at least any multiple of B up to it."""
    if stage.inputs == "arrays":
        rows = stage.rows()
    return rows // (stage.batch_size or batch_size) * stage.passes


def array_batches(stage: Train, rank: int, world: int, batch: int, seed: int, epoch: int,
                  pass_: int) -> Iterator[dict[str, Any]]:
    """Batches of ``batch`` rows of worker ``rank`` of ``world`` for one pass of an
    ``inputs="arrays"`` stage: a permutation of the rows keyed by (seed, epoch, pass) split
    into ``world`` equal shares, the last partial batch dropped. Both runners draw from
    this, so their orders agree; a resumed stage redraws the same order."""
    n = stage.rows()
    table = next(iter(stage.join.values()))
    order = np.random.default_rng((seed, epoch, pass_)).permutation(n)
    share = n // world
    mine = order[rank * share:(rank + 1) * share]
    for start in range(0, share - batch + 1, batch):
        rows = np.sort(mine[start:start + batch])
        out: dict[str, Any] = {"id": table.ids[rows]}
        if table.labels is not None:
            out["label"] = table.labels[rows]
        out.update({name: t.arrays[name][rows] for name, t in stage.join.items()})
        yield out


def descend(optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    """One gradient step of ``optimizer`` on ``loss``."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def set_lr(optimizers: list[torch.optim.Optimizer], lr: float) -> None:
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = lr


def seed_step(seed: int, rank: int, step: int) -> None:
    """Seed torch's RNG for global step ``step`` of worker ``rank``: the random draws of a
    step (augmentation, dropout, noise) depend only on (seed, rank, step), so a run resumed
    from a checkpoint draws what the unkilled run drew (exact resume)."""
    torch.manual_seed(int(np.random.SeedSequence((seed, rank, step)).generate_state(1)[0]))


def to_batch(rows: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Numeric columns as float/int tensors on ``device``; ``id`` and ``label`` stay numpy."""
    out: dict[str, Any] = {}
    for name, value in rows.items():
        array = np.asarray(value)
        if name in ("id", "label") or array.dtype.kind not in "biuf":
            out[name] = array
        else:
            out[name] = torch.from_numpy(np.ascontiguousarray(array)).to(device)
    return out


# ------------------------------------------------------------------------------------------
# Independent starts (k-means' ``n_init`` for a trained objective): ``online.starts`` and
# ``multiview.starts``.


def start_seed(seed: int, start: int) -> int:
    """The seed of start ``start`` of a run with ``train.seed`` ``seed``: the run's own for
    start 0, a SeedSequence draw from (seed, start) for the others."""
    if start == 0:
        return seed
    return int(np.random.SeedSequence((seed, start)).generate_state(1)[0])


def best_start(histories: list[list[dict[str, Any]]], key: str = "loss") -> int:
    """The start to keep: the lowest ``key`` (a mean training loss) in its last epoch (the
    rule of k-means' ``n_init``, lowest objective, applied to a trained objective). A start
    whose last epoch has no such loss (no step) or a non-finite one never wins."""
    def last_loss(history: list[dict[str, Any]]) -> float:
        loss = history[-1].get(key) if history else None
        return float(loss) if loss is not None and math.isfinite(loss) else math.inf

    return int(np.argmin([last_loss(h) for h in histories]))


def starts_report(last_rows: list[tuple[int, dict[str, Any]]], kept: int, key: str = "loss"
                  ) -> dict[str, Any]:
    """For metrics.json: each start's seed, last-epoch ``key`` and (with labels) training
    NMI, from (seed, last epoch's history row) per start, and the kept start."""
    return {"starts": [{"seed": seed, key: row.get(key),
                        **({"nmi": row["nmi"]} if "nmi" in row else {})}
                       for seed, row in last_rows], "kept_start": kept}
