"""Driver-side wiring of the training stage: dataset, initial centroids, server, trainer."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pipeline.config import Config
from pipeline.data.reader import decode_spec, find_shards, read_images
from pipeline.distributed.centroid_server import create_server
from pipeline.distributed.train import fit
from pipeline.methods.online import initial_centroids
from pipeline.models.arch import build_model, model_arch
from pipeline.models.weights import save_bytes

if TYPE_CHECKING:
    from pipeline.run import RunPaths, TrainedModel

log = logging.getLogger(__name__)


def store_kwargs(cfg: Config) -> dict[str, Any]:
    c = cfg.cluster
    return {"num_workers": cfg.scale.workers, "drift_smoothing": c.drift_smoothing,
            "reseed_every": c.reseed_every, "reseed_ratio": c.reseed_ratio,
            "reservoir_size": c.reservoir_size, "seed": cfg.train.seed}


def initial_model(cfg: Config) -> torch.nn.Module:
    """The seeded initial model (workers build the same one; DDP also broadcasts rank 0's)."""
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg)
    if cfg.model.weights:
        from pipeline.models.loading import load_pretrained

        load_pretrained(model, cfg.model.weights, cfg.s3)
    return model


def sample_centroids(cfg: Config, images: Any, model: torch.nn.Module) -> np.ndarray:
    """Features of k random images (DESIGN §5.1), embedded in bounded batches: (k, d)."""
    k = cfg.cluster.k
    sample = images.select_columns(["pixels"]).randomize_block_order(seed=cfg.train.seed).limit(k)
    feats = [initial_centroids(model, b["pixels"])
             for b in sample.iter_torch_batches(batch_size=256, dtypes=torch.float32)]
    out = np.concatenate(feats) if feats else np.empty((0, cfg.model.feature_dim), np.float32)
    if len(out) < k:
        raise ValueError(f"cluster.k={k} is larger than the number of images ({len(out)})")
    return out


def start_servers(cfg: Config, paths: RunPaths, init: np.ndarray
                  ) -> tuple[list[Any], list[tuple[str, str | None]], np.ndarray]:
    """The run's centroid server, or ``scale.centroid_shards`` servers each owning a range
    of cluster ids (:mod:`pipeline.kmeans.sharded`). -> (handles, (name, namespace)s, bounds)."""
    import ray

    from pipeline.kmeans.sharded import shard_bounds

    namespace = ray.get_runtime_context().namespace
    base = f"centroid-server-{abs(hash(paths.root.uri)) % 10**8}"
    bounds = shard_bounds(len(init), cfg.scale.centroid_shards)
    handles, names = [], []
    for s, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        single = len(bounds) == 2
        name = base if single else f"{base}-{s}"
        state = paths.server_state.uri if single else f"{paths.server_state.uri}.shard{s}"
        handles.append(create_server(name, namespace, init[lo:hi], store_kwargs(cfg), state,
                                     cfg.s3, persist_every=cfg.cluster.persist_every,
                                     crash_at_round=cfg.debug.kill_server_at_round
                                     if s == 0 else -1))
        names.append((name, namespace))
    ray.get([h.info.remote() for h in handles])  # reachable before the workers look them up
    return handles, names, bounds


def train_online(cfg: Config, input_uri: str, paths: RunPaths) -> TrainedModel:
    """Train the ``online`` method on Ray Train with a centroid-server actor."""
    import ray

    from pipeline.run import TrainedModel

    has_label = find_shards(input_uri, cfg.s3).has_label
    images = read_images(input_uri, decode_spec(cfg), s3=cfg.s3,
                         batch_size=cfg.data.decode_batch_size)
    images = images.select_columns(["pixels"] + (["label"] if has_label else []))
    if cfg.data.cache_decoded:
        images = images.materialize()
    model = initial_model(cfg)
    init = sample_centroids(cfg, images, model)
    servers, names, bounds = start_servers(cfg, paths, init)
    outcome = fit(cfg, images, {"servers": names, "bounds": bounds.tolist()},
                  paths.checkpoints, save_bytes(model))
    for server in servers:
        ray.kill(server, no_restart=True)
    return TrainedModel(outcome.model_bytes, model_arch(cfg), outcome.centroids,
                        outcome.history)
