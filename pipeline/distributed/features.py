"""Per-image data on Ray: feature passes through an actor pool, and per-id joins into a
stream. Used by the stage runner (:mod:`pipeline.distributed.runner`) and DeepCluster."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.config import Config
from pipeline.data.reader import InputError
from pipeline.methods.arch import model_arch
from pipeline.methods.base import PerId


@dataclass
class Features:
    """One feature pass: ids (n,) str, features (n, d), ground-truth labels (n,) or None."""

    ids: np.ndarray
    x: np.ndarray
    truth: np.ndarray | None


def check_feature_memory(n: int, d: int, cfg: Config, available: int | None = None) -> int:
    """Bytes the driver needs for n x d features; refuses with the numbers when more than
    ``deepcluster.max_feature_memory_fraction`` of its available memory."""
    import psutil

    itemsize = 2 if cfg.deepcluster.feature_dtype == "float16" else 4
    need = n * d * itemsize * 2  # the raw features and their whitened copy
    have = psutil.virtual_memory().available if available is None else available
    limit = int(have * cfg.deepcluster.max_feature_memory_fraction)
    if need > limit:
        raise InputError(
            f"deepcluster: {n:,} images x {d} features x {itemsize} B (x2 for the whitened "
            f"copy) = {need / 2**30:.1f} GiB, over deepcluster.max_feature_memory_fraction="
            f"{cfg.deepcluster.max_feature_memory_fraction} of the driver's available "
            f"{have / 2**30:.1f} GiB; lower model.feature_dim, set "
            "deepcluster.feature_dtype=float16, or run the driver on a larger node")
    return need


def feature_pass(images: Any, model_bytes: bytes, cfg: Config, n: int,
                 untrained: bool = False, arch: dict[str, Any] | None = None) -> Features:
    """Every image through the model (``arch``, default ``cfg``'s) in a Ray Data actor
    pool: :class:`Features`. ``untrained``: BatchNorm uses batch statistics (a fresh model's
    running ones are not)."""
    import ray
    import ray.data

    from pipeline.distributed.assign import EmbedActor

    arch = arch or model_arch(cfg)
    check_feature_memory(n, arch["feature_dim"], cfg)
    dtype = np.float16 if cfg.deepcluster.feature_dtype == "float16" else np.float32
    ds = images.map_batches(
        EmbedActor, fn_constructor_kwargs={"model_bytes": ray.put(model_bytes), "arch": arch,
                                           "threads": cfg.scale.assign_cpus_per_actor,
                                           "batch_stats": untrained},
        batch_size=cfg.cluster.assign_batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=cfg.scale.assign_actors),
        num_cpus=cfg.scale.assign_cpus_per_actor, num_gpus=1 if cfg.scale.gpu else 0)
    ids, feats, truth = [], [], []
    for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
        ids.append(np.asarray(batch["id"]).astype(str))
        feats.append(np.asarray(batch["feature"], dtype=dtype))
        if "label" in batch:
            truth.append(np.asarray(batch["label"]).astype(str))
    return Features(np.concatenate(ids), np.concatenate(feats),
                    np.concatenate(truth) if truth else None)


# ------------------------------------------------------------------------------------------
# Per-id joins.


class JoinArrays:
    """Ray Data UDF: adds ``name`` columns, looked up by each row's id.

    ``arrays[name]`` = (sorted ids ref, values ref) in the object store, fetched once per
    worker process on first use, so the N-row arrays are not serialised into every task.
    """

    _cache: dict[str, Any] = {}

    def __init__(self, arrays: dict[str, tuple[Any, Any]]):
        self.refs = arrays

    def _get(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        import ray

        ids_ref, values_ref = self.refs[name]
        key = f"{ids_ref}/{values_ref}"
        if key not in self._cache:
            self._cache[key] = (ray.get(ids_ref), ray.get(values_ref))
        return self._cache[key]  # type: ignore[no-any-return]

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        out = dict(batch)
        ids = np.asarray(batch["id"]).astype(str)
        for name in self.refs:
            sorted_ids, values = self._get(name)
            out[name] = PerId(sorted_ids, {name: values}).take(ids, name)
        return out


def join_udf(join: dict[str, PerId]) -> JoinArrays:
    import ray

    return JoinArrays({name: (ray.put(per_id.ids), ray.put(per_id.arrays[name]))
                       for name, per_id in join.items()})


