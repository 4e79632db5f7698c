"""Driver-side pieces of training on Ray: the training stream, uniform samples of the input,
the centroid servers."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from pipeline.config import Config
from pipeline.data.decode import decode_batch, normalize
from pipeline.data.reader import (
    Shards,
    ShuffleSpec,
    decode_spec,
    read_images,
    sample_rows,
)
from pipeline.distributed.centroid_server import create_server
from pipeline.kmeans.init import pool_size, seed_centroids
from pipeline.kmeans.store import store_kwargs
from pipeline.methods.online import initial_centroids
from pipeline.outputs import RunPaths

log = logging.getLogger(__name__)


def sample_centroids(cfg: Config, shards: Shards, model: torch.nn.Module) -> np.ndarray:
    """k initial centroids (k, d) float32 (DESIGN §4, §5.1): k-means++ over the features of
    :func:`initial_pool` (:mod:`pipeline.kmeans.init`)."""
    _, pool = initial_pool(cfg, shards, model)
    return seed_centroids(pool, cfg.cluster.k, cfg.train.seed, cfg.cluster.init)


def sample_pixels(cfg: Config, shards: Shards, size: int
                  ) -> tuple[list[dict[str, Any]], torch.Tensor]:
    """``size`` decodable rows drawn uniformly from the whole input (a bottom-k sample over
    one streaming pass, so neither a class-sorted input nor Ray Data's block order biases
    it; ``train.seed`` fixes it), in key order, and their normalised pixels (m, C, H, W)."""
    rows = sample_rows(shards, size + max(16, size // 8), cfg.train.seed)  # spares: bad images
    spec = decode_spec(cfg)
    decoded = decode_batch([bytes(r["image"]) for r in rows], spec)
    return ([rows[i] for i in decoded.ok[:size]],
            normalize(decoded.pixels[:size], spec) if len(decoded.ok) else torch.empty(0))


def initial_pool(cfg: Config, shards: Shards, model: torch.nn.Module
                 ) -> tuple[list[dict[str, Any]], np.ndarray]:
    """The rows of :func:`sample_pixels` for ``online``'s initial centroids and their
    features (m, d) under ``model`` with batch statistics, as its ``initial-pool`` stage."""
    c = cfg.cluster
    rows, pixels = sample_pixels(cfg, shards, pool_size(c.k, c.init_pool, c.init_pool_max))
    if len(rows) < c.k:
        raise ValueError(f"cluster.k={c.k} is larger than the number of decodable images "
                         f"({len(rows)})")
    pool = np.concatenate([initial_centroids(model, x)
                           for x in pixels.split(cfg.cluster.assign_batch_size)])
    return rows, pool


def training_images(cfg: Config, input_uri: str, shards: Shards, columns: list[str],
                    cached: Any = None) -> Any:
    """The decoded training stream (``columns`` plus ``label`` when present), in a new random
    order every epoch (:class:`~pipeline.data.reader.ShuffleSpec`); with
    ``data.cache_decoded`` decoded once (``cached``: :func:`decoded_images`, materialised)
    and re-ordered in the object store."""
    shuffle = ShuffleSpec.of(cfg, shards)
    log.info("training order: %s shuffle (data.shuffle=%s), %d-row local buffer per worker",
             shuffle.mode, cfg.data.shuffle, shuffle.buffer_rows)
    if cfg.data.cache_decoded:
        images = cached if cached is not None else decoded_images(cfg, input_uri, shards,
                                                                  columns).materialize()
        return shuffle.apply(images)
    return decoded_images(cfg, input_uri, shards, columns, shuffle)


def decoded_images(cfg: Config, input_uri: str, shards: Shards, columns: list[str],
                   shuffle: ShuffleSpec | None = None) -> Any:
    """The decoded images (``columns`` plus ``label`` when present), in stored order or,
    with ``shuffle``, in a new random order every epoch."""
    images = read_images(input_uri, decode_spec(cfg), s3=cfg.s3,
                         batch_size=cfg.data.decode_batch_size, shuffle=shuffle)
    return images.select_columns(columns + (["label"] if shards.has_label else []))


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
