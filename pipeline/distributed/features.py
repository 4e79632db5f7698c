"""The driver's memory guard for a feature pass (:mod:`pipeline.distributed.runner`)."""

from __future__ import annotations

from pipeline.config import Config
from pipeline.data.reader import InputError


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
