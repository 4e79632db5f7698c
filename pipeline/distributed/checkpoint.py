"""The one Ray Train checkpoint format of every method (a plain directory; Ray Train uploads
it to ``--output/checkpoints``, local or S3, and hands the latest back after a restart):

=========================  ===============================================================
``model.safetensors``      the model's weights (rank 0's; DDP keeps the ranks equal)
``optimizers.pt``          a list of optimiser state dicts (``torch.load(weights_only=True)``)
``centroid_server.npz``    the centroid server's state, for methods that train with one
``meta.json``              progress: epoch, step, history, losses, final metrics, ...
=========================  ===============================================================
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.kmeans.state_io import pack_state, unpack_state
from pipeline.models.weights import save_bytes

MODEL, OPTIMIZERS, SERVER, META = ("model.safetensors", "optimizers.pt", "centroid_server.npz",
                                   "meta.json")


@dataclass
class TrainState:
    """One checkpoint's contents."""

    model_bytes: bytes
    optimizers: list[dict[str, Any]]
    meta: dict[str, Any]
    server: dict[str, Any] | None = None


def write(path: str, model: torch.nn.Module, optimizers: list[torch.optim.Optimizer],
          meta: dict[str, Any], server: dict[str, Any] | None = None) -> None:
    write_state(path, TrainState(save_bytes(model), [o.state_dict() for o in optimizers],
                                 meta, server))


def write_state(path: str, state: TrainState) -> None:
    """``state`` into the directory ``path``, ``meta.json`` last."""
    with open(os.path.join(path, MODEL), "wb") as fh:
        fh.write(state.model_bytes)
    torch.save(state.optimizers, os.path.join(path, OPTIMIZERS))
    if state.server is not None:
        with open(os.path.join(path, SERVER), "wb") as fh:
            fh.write(pack_state(state.server))
    with open(os.path.join(path, META), "w") as fh:
        json.dump(state.meta, fh)


def read(path: str) -> TrainState:
    with open(os.path.join(path, MODEL), "rb") as fh:
        model_bytes = fh.read()
    optimizers = torch.load(os.path.join(path, OPTIMIZERS), weights_only=True)
    server = None
    if os.path.exists(os.path.join(path, SERVER)):
        with open(os.path.join(path, SERVER), "rb") as fh:
            server = unpack_state(fh.read())
    with open(os.path.join(path, META)) as fh:
        meta = json.load(fh)
    return TrainState(model_bytes, optimizers, meta, server)


def report(rank: int, metrics: dict[str, Any], model: torch.nn.Module,
           optimizers: list[torch.optim.Optimizer], meta: dict[str, Any],
           server: dict[str, Any] | None = None) -> None:
    """``ray.train.report`` on every rank (Ray Train needs all of them); rank 0 attaches the
    checkpoint."""
    import ray.train

    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as tmp:
        write(tmp, model, optimizers, meta, server)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def of(checkpoint: Any) -> TrainState:
    """The contents of a ``ray.train.Checkpoint``."""
    with checkpoint.as_directory() as path:
        return read(path)


_RESTORED: dict[str, bool] = {"taken": False}


def latest() -> TrainState | None:
    """This worker group's checkpoint to resume from (after a restart or a re-run), if any,
    on the first call in this worker process only. Ray Train hands every later call the
    same start-time checkpoint: later stages of a long-lived run must not resume from it,
    and ``num_to_keep`` may have deleted it by then (measured: a FileNotFoundError on rank 1
    at the stage after a restarted 2-worker group's)."""
    import ray.train

    if _RESTORED["taken"]:
        return None
    _RESTORED["taken"] = True
    checkpoint = ray.train.get_checkpoint()
    return None if checkpoint is None else of(checkpoint)
