"""Data parallelism is exact (DESIGN §2): 2 workers x batch B/2 under our Ray Train wiring
(:func:`pipeline.distributed.train.trainer_result`: TorchTrainer, gloo, ``prepare_model``,
our checkpoint format) reach the parameters of 1 worker x batch B after N SGD steps. The
1-worker reference and the control run in this process: they need no Ray.

Why this holds and what tolerance: each worker's loss is the mean over its B/2 rows, and
DDP averages gradients over the 2 workers, so every step applies the gradient of the mean
over the same B rows. Only float32 summation order differs (two half-batch sums then an
all-reduce vs one sum), a relative error of ~1e-7 per parameter per step; over 6 steps of
plain SGD the parameters agree to ``atol=2e-5``. The control (rank 0 of 2 workers *without*
gradient synchronisation, i.e. training on its half-batches alone) differs by orders of
magnitude more, so the test can fail.

The CNN has no BatchNorm on purpose: BatchNorm's batch statistics are per worker under DDP
(PyTorch's SyncBatchNorm, which would make them global, runs on GPUs only), so a model with
it is equivalent only up to those statistics; the README says so.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pipeline.config import Config, resolve
from pipeline.data import fs as fsx

STEPS, BATCH = 6, 32


def cnn() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(), torch.nn.Linear(16, 10))


def sgd(x: np.ndarray, y: np.ndarray, rank: int, world: int, model: torch.nn.Module
        ) -> torch.nn.Module:
    """STEPS SGD steps of ``model``, rank r on rows [r·B/w, (r+1)·B/w) of each batch."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    local = BATCH // world
    for step in range(STEPS):
        lo = step * BATCH + rank * local
        loss = torch.nn.functional.cross_entropy(model(xt[lo:lo + local]), yt[lo:lo + local])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


def loop(config: dict[str, Any]) -> None:
    """Ray Train worker: :func:`sgd` under DDP, then our checkpoint from rank 0."""
    import ray.train
    import ray.train.torch

    from pipeline.distributed import checkpoint

    ctx = ray.train.get_context()
    torch.set_num_threads(1)
    model = ray.train.torch.prepare_model(cnn())  # DDP when world > 1
    sgd(config["x"], config["y"], ctx.get_world_rank(), ctx.get_world_size(), model)
    inner = getattr(model, "module", model)
    checkpoint.report(ctx.get_world_rank(), {"done": True}, inner, [], {"done": True})


def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    return (rng.normal(size=(STEPS * BATCH, 1, 12, 12)).astype(np.float32),
            rng.integers(0, 10, STEPS * BATCH).astype(np.int64))


def params(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def train_on_ray(tmp_path, workers: int) -> dict[str, np.ndarray]:
    import ray.data
    from safetensors.torch import load as st_load

    from pipeline.distributed.train import trainer_result

    cfg: Config = resolve(Config, overrides=[f"scale.workers={workers}",
                                             "scale.cpus_per_worker=0.5"],
                          flags={"data.output": str(tmp_path)})
    x, y = data()
    state = trainer_result(cfg, loop, {"x": x, "y": y}, ray.data.range(4),
                           fsx.locate(str(tmp_path / "ckpt")), f"w{workers}")
    return {k: v.numpy() for k, v in st_load(state.model_bytes).items()}


def test_two_workers_half_batch_equal_one_worker_full_batch(ray_cluster, tmp_path):
    start = params(cnn())
    one = params(sgd(*data(), rank=0, world=1, model=cnn()))  # 1 worker x B, in-process
    two = train_on_ray(tmp_path, 2)
    assert max(np.abs(one[k] - start[k]).max() for k in start) > 1e-2  # the steps moved it
    for key in one:
        np.testing.assert_allclose(two[key], one[key], atol=2e-5, rtol=0, err_msg=key)
    unsynced = params(sgd(*data(), rank=0, world=2, model=cnn()))  # the control
    gap = max(np.abs(unsynced[k] - one[k]).max() for k in one)
    assert gap > 1e-3, gap
