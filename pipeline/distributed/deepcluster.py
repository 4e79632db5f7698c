"""Ray wiring of the ``deepcluster`` method (:mod:`pipeline.methods.deepcluster`).

The driver alternates, per epoch ``e``, with everything under ``--output/deepcluster/``:

==============================  ============================================================
``epoch-EEE/clustering.npz``    whitening, centroids and pseudo-labels by image id; written
                                once, so a resumed run never recomputes a finished clustering
``checkpoints/epoch-EEE/``      that epoch's Ray Train run (checkpoints every
                                ``scale.checkpoint_every_steps``): a killed worker group
                                (``FailureConfig``) or a re-run resumes inside the epoch
``epoch-EEE/model.safetensors`` the CNN after the epoch (its optimiser state beside it)
==============================  ============================================================

1. **Feature pass:** the decoded images (materialised once: every epoch reads them twice)
   stream through a Ray Data actor pool (:class:`~pipeline.distributed.assign.EmbedActor`,
   GPU when present); the driver gathers the N x d features, refusing up front when they
   would not fit (:func:`~pipeline.distributed.features.check_feature_memory`).
2. **Clustering:** PCA-whitening from summed moments, then k-means: ``faiss.Kmeans`` on the
   driver, or above ``deepcluster.local_max_points`` Lloyd's partial sums reduced across
   ``deepcluster.kmeans_shards`` Ray actors (:class:`RemoteShards`, the same
   :func:`~pipeline.methods.deepcluster.lloyd` as the single-process reference).
3. **Training:** a Ray Train run on (pixels, pseudo-label) with a fresh linear head and
   inverse-cluster-size weights.

After the last epoch one more feature pass clusters the final features, and the whitening
is folded into the saved model, so the centroids, ``jobs/assign.py`` and the report all live
in the same space.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from pipeline.config import Config
from pipeline.data import fs as fsx
from pipeline.data.augment import AugmentSpec, augment
from pipeline.data.fs import Location
from pipeline.data.reader import ShuffleSpec, decode_spec, find_shards, read_images
from pipeline.distributed.features import Features, feature_pass
from pipeline.methods.arch import build_model, model_arch
from pipeline.methods.deepcluster import (
    LocalShard,
    MomentStats,
    Whitening,
    class_weights,
    cluster,
    new_head,
    pseudo_label_loss,
)
from pipeline.models.weights import save_bytes
from pipeline.outputs import RunPaths, TrainedModel

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------
# k-means shards on Ray actors.


class _ShardProxy:
    """One remote :class:`LocalShard`, called synchronously (the FeatureShard protocol)."""

    def __init__(self, actor: Any):
        self.actor = actor

    def __getattr__(self, method: str) -> Any:
        import ray

        remote = getattr(self.actor, method)
        return lambda *args: ray.get(remote.remote(*args))


class RemoteShards(Sequence[Any]):
    """Features split over Ray actors (faiss ``contrib/clustering.py``'s pattern): a sequence
    of :class:`LocalShard` proxies whose ``call_all`` runs a method on all in parallel."""

    def __init__(self, x: np.ndarray, shards: int):
        import ray

        actor = ray.remote(num_cpus=0)(LocalShard)
        self.actors: list[Any] = [actor.remote(ray.put(np.ascontiguousarray(part)))
                       for part in np.array_split(x, shards)]

    def __len__(self) -> int:
        return len(self.actors)

    def __getitem__(self, i: Any) -> Any:
        return _ShardProxy(self.actors[i])

    def call_all(self, method: str, *args: Any) -> list[Any]:
        import ray

        return ray.get([getattr(a, method).remote(*args) for a in self.actors])

    def close(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)


def cluster_features(features: Features, cfg: Config, seed: int) -> dict[str, np.ndarray]:
    """PCA-whitening, then k-means with no empty cluster: the epoch's clustering arrays."""
    x = features.x.astype(np.float32)
    dim = min(cfg.deepcluster.pca_dim, x.shape[1])
    whitening = Whitening.fit(MomentStats.of(x), dim)
    z = whitening(x)
    k = cfg.cluster.k
    if len(z) <= cfg.deepcluster.local_max_points:
        centroids, labels = cluster([LocalShard(z)], k, cfg.deepcluster.kmeans_iters, seed,
                                    gpu=cfg.scale.gpu and _faiss_gpu())
    else:
        shards = RemoteShards(z, cfg.deepcluster.kmeans_shards)
        try:
            centroids, labels = cluster(shards, k, cfg.deepcluster.kmeans_iters, seed,
                                        faiss_local=False)
        finally:
            shards.close()
    order = np.argsort(features.ids)
    return {"mean": whitening.mean, "proj": whitening.proj, "centroids": centroids,
            "ids": features.ids[order], "labels": labels[order].astype(np.int64)}


def _faiss_gpu() -> bool:
    import faiss

    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


# ------------------------------------------------------------------------------------------
# Training on pseudo-labels (Ray Train worker side).


def lr_at(cfg: Config, epoch: int) -> float:
    """``train.lr`` under ``train.lr_schedule`` at ``epoch`` (0-based)."""
    t, lr = epoch / max(1, cfg.train.epochs), cfg.train.lr
    if cfg.train.lr_schedule == "cosine":
        return lr * 0.5 * (1 + np.cos(np.pi * t))
    if cfg.train.lr_schedule == "step":
        return lr * (0.1 ** ((t >= 0.5) + (t >= 0.75)))
    return lr


def _net(cfg: Config, model_bytes: bytes, k: int, seed: int) -> torch.nn.Sequential:
    from safetensors.torch import load as st_load

    model = build_model(cfg)
    model.load_state_dict(st_load(model_bytes))
    return torch.nn.Sequential(model, new_head(cfg.model.feature_dim, k, seed))


def train_epoch_loop(config: dict[str, Any]) -> None:
    """Ray Train entry point for one epoch: CNN + fresh head on pseudo-labels."""
    import ray.train
    import ray.train.torch

    from pipeline.distributed.runtime import setup_worker
    from pipeline.distributed.train import (
        epoch_batches_kwargs,
        fault_point,
        restore_state,
        save_state,
    )
    from pipeline.methods.online import make_optimizer

    cfg: Config = config["cfg"]
    epoch, rank = config["epoch"], ray.train.get_context().get_world_rank()
    setup_worker(cfg.scale.threads_per_worker or cfg.scale.cpus_per_worker)
    torch.manual_seed(cfg.train.seed + epoch)
    net = ray.train.torch.prepare_model(_net(cfg, config["model_bytes"], cfg.cluster.k,
                                             cfg.train.seed + epoch))
    inner: Any = getattr(net, "module", net)
    t = cfg.train
    trunk_opt = make_optimizer(inner[0], t.optimizer, lr_at(cfg, epoch), t.momentum,
                               t.weight_decay)
    if config["optimizer"] is not None:
        trunk_opt.load_state_dict(config["optimizer"])
        for group in trunk_opt.param_groups:
            group["lr"] = lr_at(cfg, epoch)
    head_opt = make_optimizer(inner[1], t.optimizer, lr_at(cfg, epoch), t.momentum, 0.0)
    skip, losses, done = restore_state(inner, [trunk_opt, head_opt])
    if done is not None:  # the epoch finished before the driver could record it
        save_state(rank, inner, [trunk_opt, head_opt], -1, losses, done)
        return
    weights = torch.from_numpy(config["weights"]).to(ray.train.torch.get_device())
    shard = ray.train.get_dataset_shard("train")
    start, seen, step = time.perf_counter(), 0, skip
    local_batch = t.batch_size // ray.train.get_context().get_world_size()
    batches = (b for p in range(cfg.deepcluster.passes) for b in shard.iter_batches(
        batch_size=local_batch, **epoch_batches_kwargs(cfg, epoch, p)))
    device = ray.train.torch.get_device()
    for i, b in enumerate(batches):
        if i < skip:
            continue
        net.train()
        x = torch.from_numpy(np.asarray(b["pixels"], np.float32)).to(device)
        if cfg.deepcluster.augment:
            x = augment(x, AugmentSpec(flip=cfg.data.channels == 3))
        y = torch.from_numpy(np.asarray(b["pseudo"], np.int64)).to(device)
        loss = pseudo_label_loss(net(x), y, weights)
        trunk_opt.zero_grad(set_to_none=True)
        head_opt.zero_grad(set_to_none=True)
        loss.backward()
        trunk_opt.step()
        head_opt.step()
        losses.append(loss.item())
        seen, step = seen + len(x), i + 1
        if rank == 0:
            fault_point(cfg, step)
        if step % cfg.scale.checkpoint_every_steps == 0:
            save_state(rank, inner, [trunk_opt, head_opt], step, losses)
    metrics = {"loss": float(np.mean(losses)) if losses else float("nan"),
               "images_per_s": seen / max(1e-9, time.perf_counter() - start),
               "resumed_at_batch": skip}
    save_state(rank, inner, [trunk_opt, head_opt], -1, losses, metrics)


# ------------------------------------------------------------------------------------------
# Driver side.


class EpochFiles:
    """Where epoch ``e``'s clustering and model live (see the module docstring)."""

    def __init__(self, paths: RunPaths, epoch: int):
        self.dir = paths.root.join("deepcluster", f"epoch-{epoch:03d}")
        self.clustering = self.dir.join("clustering.npz")
        self.model = self.dir.join("model.safetensors")
        self.optimizer = self.dir.join("optimizer.pt")
        self.history = self.dir.join("history.json")
        self.checkpoints = paths.checkpoints.join(f"epoch-{epoch:03d}")


def save_npz(loc: Location, arrays: dict[str, np.ndarray]) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    fsx.write_bytes_atomic(loc, buf.getvalue())


def load_npz(loc: Location) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(fsx.read_bytes(loc)), allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def epoch_clustering(files: EpochFiles, images: Any, model_bytes: bytes, cfg: Config,
                     n: int, epoch: int) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """The epoch's clustering: loaded when a previous attempt finished it, else computed."""
    from pipeline.metrics import acc, nmi

    if fsx.exists(files.clustering):
        log.info("deepcluster epoch %d: clustering found in %s; not recomputed", epoch,
                 files.clustering.uri)
        return load_npz(files.clustering), {}
    t0 = time.perf_counter()
    features = feature_pass(images, model_bytes, cfg, n, untrained=epoch == 0)
    t1 = time.perf_counter()
    arrays = cluster_features(features, cfg, cfg.train.seed + epoch)
    facts = {"features_s": t1 - t0, "kmeans_s": time.perf_counter() - t1}
    if features.truth is not None:
        pred = arrays["labels"][np.searchsorted(arrays["ids"], features.ids)]
        facts.update(nmi=nmi(features.truth, pred), acc=acc(features.truth, pred))
    save_npz(files.clustering, arrays)
    return arrays, facts


def train_one_epoch(cfg: Config, images: Any, arrays: dict[str, np.ndarray],
                    model_bytes: bytes, optimizer: dict[str, Any] | None, epoch: int,
                    files: EpochFiles, shuffle: ShuffleSpec
                    ) -> tuple[bytes, dict[str, Any], dict[str, float]]:
    """One Ray Train run over (pixels, pseudo) in a fresh random order (``shuffle``, on the
    materialised images) -> (model bytes, trunk optimiser, metrics)."""
    from pipeline.distributed.features import join_udf
    from pipeline.distributed.train import trainer_result
    from pipeline.methods.base import PerId

    attach = join_udf({"pseudo": PerId(arrays["ids"], {"pseudo": arrays["labels"]})})
    # The epoch's own seed: each epoch is a new dataset (and Ray Train run), whose execution
    # index restarts; passes within the epoch still get new orders from it.
    order = dataclasses.replace(shuffle, seed=shuffle.seed + 1000 * epoch)
    data = order.apply(images).map_batches(attach, batch_format="numpy")
    config = {"cfg": cfg, "epoch": epoch, "model_bytes": model_bytes, "optimizer": optimizer,
              "weights": class_weights(arrays["labels"], cfg.cluster.k)}
    state = trainer_result(cfg, train_epoch_loop, config, data, files.checkpoints,
                           f"epoch-{epoch:03d}")
    return _trunk_bytes(cfg, state.model_bytes), state.optimizers[0], state.meta["metrics"]


def _trunk_bytes(cfg: Config, net_bytes: bytes) -> bytes:
    """The CNN's weights out of the (CNN, head) pair's state dict."""
    from safetensors.torch import load as st_load

    state = st_load(net_bytes)
    model = build_model(cfg)
    model.load_state_dict({k[2:]: v for k, v in state.items() if k.startswith("0.")})
    return save_bytes(model)


def train_deepcluster(cfg: Config, input_uri: str, paths: RunPaths) -> TrainedModel:
    """All epochs (resuming finished ones), then the final clustering and whitened model."""
    from pipeline.distributed.job import initial_model

    shards = find_shards(input_uri, cfg.s3)
    shuffle = ShuffleSpec.of(cfg, shards)
    images = read_images(input_uri, decode_spec(cfg), s3=cfg.s3,
                         batch_size=cfg.data.decode_batch_size)
    images = images.select_columns(["id", "pixels"] + (["label"] if shards.has_label else []))
    images = images.materialize()  # the feature passes' order does not matter
    n = images.count()
    model_bytes, optimizer = save_bytes(initial_model(cfg)), None
    history: list[dict[str, Any]] = []
    started = time.monotonic()
    for epoch in range(cfg.train.epochs):
        budget = cfg.train.time_budget_s
        if history and budget and time.monotonic() - started >= budget:
            log.info("deepcluster: train.time_budget_s=%s reached after %d epochs", budget,
                     epoch)
            break
        files = EpochFiles(paths, epoch)
        if fsx.exists(files.model):
            model_bytes = fsx.read_bytes(files.model)
            optimizer = _load_optimizer(files)
            history.append(json.loads(fsx.read_bytes(files.history)))
            continue
        t0 = time.perf_counter()
        arrays, facts = epoch_clustering(files, images, model_bytes, cfg, n, epoch)
        model_bytes, optimizer, metrics = train_one_epoch(cfg, images, arrays, model_bytes,
                                                          optimizer, epoch, files, shuffle)
        row = {"epoch": epoch, **facts, **metrics, "seconds": time.perf_counter() - t0,
               "empty_clusters": int((np.bincount(arrays["labels"], minlength=cfg.cluster.k)
                                      == 0).sum())}
        _save_epoch(files, model_bytes, optimizer, row)
        history.append(row)
        _say_epoch(cfg, row)
    return final_model(cfg, images, model_bytes, n, history)


def final_model(cfg: Config, images: Any, model_bytes: bytes, n: int,
                history: list[dict[str, Any]]) -> TrainedModel:
    """Cluster the final features; fold the whitening into the model that is saved."""
    from safetensors.torch import load as st_load

    from pipeline.methods.deepcluster import whitened_arch
    from pipeline.models.layers import WhitenedEmbedder

    arrays = cluster_features(feature_pass(images, model_bytes, cfg, n), cfg,
                              cfg.train.seed + cfg.train.epochs)
    whitening = Whitening(arrays["mean"], arrays["proj"])
    embedder = build_model(cfg)
    embedder.load_state_dict(st_load(model_bytes))
    model = WhitenedEmbedder(embedder, cfg.model.feature_dim, whitening.dim)
    whitening.load_into(model.whiten)
    arch = whitened_arch(model_arch(cfg), whitening.dim)
    return TrainedModel(save_bytes(model), arch, arrays["centroids"], history)


def _save_epoch(files: EpochFiles, model_bytes: bytes, optimizer: dict[str, Any],
                row: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save(optimizer, buf)
    fsx.write_bytes_atomic(files.optimizer, buf.getvalue())
    fsx.write_bytes_atomic(files.history, json.dumps(row).encode())
    fsx.write_bytes_atomic(files.model, model_bytes)  # last: marks the epoch done


def _load_optimizer(files: EpochFiles) -> dict[str, Any] | None:
    if not fsx.exists(files.optimizer):
        return None
    state = torch.load(io.BytesIO(fsx.read_bytes(files.optimizer)), weights_only=True)
    assert isinstance(state, dict)
    return state


def _say_epoch(cfg: Config, row: dict[str, Any]) -> None:
    from pipeline.distributed.train import _say

    line = f"deepcluster epoch {row['epoch'] + 1}/{cfg.train.epochs}"
    for key, fmt in (("loss", "loss {:.4f}"), ("nmi", "NMI {:.3f}"), ("acc", "ACC {:.3f}"),
                     ("images_per_s", "{:,.0f} images/s"), ("seconds", "({:.1f} s)")):
        if key in row:
            line += "  " + fmt.format(row[key])
    _say(line)

