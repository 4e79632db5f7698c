"""Starting or joining a Ray cluster, and per-process thread limits.

``ray job submit`` sets ``RAY_ADDRESS`` for the driver, so jobs join that cluster; a plain
``python jobs/...`` starts a private local cluster bound to 127.0.0.1 (dashboard included,
also on 127.0.0.1).
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

_LOCAL_DEFAULTS = {
    "RAY_USAGE_STATS_ENABLED": "0",  # never phone home
    "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "1",  # 32 footer readers are slow on small nodes
}


def init_ray(num_cpus: int | None = None, address: str | None = None,
             dashboard: bool = True) -> None:
    """Join ``address`` / ``RAY_ADDRESS`` if given, else start a local cluster."""
    import ray

    if ray.is_initialized():
        return
    for key, value in _LOCAL_DEFAULTS.items():
        os.environ.setdefault(key, value)
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    # The dashboard (on 127.0.0.1 only) also serves the State API that Ray Train polls;
    # without it every run logs "Failed to query Ray Train Controller actor state".
    ray.init(num_cpus=num_cpus, include_dashboard=dashboard, dashboard_host="127.0.0.1",
             _node_ip_address="127.0.0.1", log_to_driver=True, configure_logging=False)


def pin_threads(n: float | int) -> None:
    """Limit torch, OpenMP and BLAS pools in this process to ``n`` threads (RAY_NOTES).

    Call it after the numeric libraries are imported, so every pool is seen.
    """
    import torch
    from threadpoolctl import threadpool_limits

    threads = max(1, int(n))
    torch.set_num_threads(threads)
    threadpool_limits(threads)
