"""Starting or joining a Ray cluster, and per-process thread limits.

A job joins an existing cluster only when told to: ``--address`` or ``RAY_ADDRESS`` (which
``ray job submit`` sets for the driver). Otherwise it starts a private local cluster bound to
127.0.0.1 (dashboard included, also on 127.0.0.1) that dies with the driver, even after
SIGKILL (:mod:`pipeline.distributed.reaper`), and never collides with another cluster on the
machine.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from pipeline.errors import ClusterError

log = logging.getLogger(__name__)

# Ray Train's controller takes each worker's reports from a queue one deep, polling every
# RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (Ray's default 2 s): a report made while the last one
# waits blocks the worker until the next poll. Every epoch and checkpoint reports, so an
# epoch shorter than the interval waited for it (multiview's fusion epochs, small inputs:
# 222 images/s instead of 2,100 in tests/distributed/test_multiview.py's fusion). At 0.2 s
# the controller polls each worker 5 times a second, and notices a dead one as much sooner.
# A value in the environment (or the job's runtime_env) wins.
TRAIN_POLL_ENV, TRAIN_POLL_S = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2"
# Set in the driver's environment unless already there (a local cluster's processes inherit
# them; a joined cluster gets the Train poll through the job's runtime_env, _train_poll_env).
_DEFAULTS = {
    "RAY_USAGE_STATS_ENABLED": "0",  # never phone home
    "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "1",  # 32 footer readers are slow on small nodes
    TRAIN_POLL_ENV: TRAIN_POLL_S,
}
# What `ray job submit` hands the driver: the job's config, its runtime_env included
# (ray._private.runtime_env.constants.RAY_JOB_CONFIG_JSON_ENV_VAR).
SUBMITTED_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
VERBOSE_ENV = "PIPELINE_VERBOSE"  # set by pipeline.cli.setup_logging
RAY_DATA_QUIET = os.path.join(os.path.dirname(__file__), "ray_data_logging.yaml")


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV) == "1"


def _quiet_env() -> dict[str, str]:
    """Environment that keeps Ray's console to warnings and progress (unless --verbose).

    Ray Data reads its logging config at import, so this must be in place before
    ``import ray.data`` in every process; worker processes get it through the job's
    runtime_env. Everything still goes to the Ray session's log files.
    """
    if verbose():
        return {}
    return {"RAY_DATA_LOGGING_CONFIG": RAY_DATA_QUIET,
            "RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL": "60",
            VERBOSE_ENV: "0",  # tells worker processes to keep their INFO logs off the console
            "PYTHONWARNINGS": "ignore::DeprecationWarning,ignore::FutureWarning"}


def init_ray(num_cpus: int | None = None, address: str | None = None,
             dashboard: bool = True) -> None:
    """Join ``address`` / ``RAY_ADDRESS`` if given, else start a local cluster."""
    import ray

    if ray.is_initialized():
        return
    for key, value in _DEFAULTS.items():
        os.environ.setdefault(key, value)
    quiet = _quiet_env()
    os.environ.update({k: v for k, v in quiet.items() if k != "PYTHONWARNINGS"})
    logging_config = None if verbose() else ray.LoggingConfig(log_level="WARNING")
    _plain_when_not_a_terminal()
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        _join(address, logging_config)
        return
    _start_local(num_cpus, dashboard, logging_config, quiet)


def _join(address: str, logging_config: Any) -> None:
    """Join the cluster at ``address``; an unreachable one fails in seconds, in one line
    (``ray.init`` itself retries a dead GCS address for minutes)."""
    import ray

    _probe(address)
    try:
        # Workers on other nodes may not have this package at the driver's path, so only
        # the log level (Ray Data's own INFO lines still show there) and the Train poll
        # travel.
        ray.init(address=address, log_to_driver=True, logging_config=logging_config,
                 runtime_env=_train_poll_env())
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ClusterError(f"cannot join the Ray cluster at {address}: "
                           f"{str(exc).strip().splitlines()[0][:300]}") from exc


def _train_poll_env() -> dict[str, Any] | None:
    """The Train poll interval for a joined cluster's processes, through the job's
    runtime_env (the driver's environment does not reach them); None when the job submitted
    with ``ray job submit`` sets it already (Ray refuses the same key twice)."""
    submitted = json.loads(os.environ.get(SUBMITTED_JOB_ENV, "{}"))
    if TRAIN_POLL_ENV in ((submitted.get("runtime_env") or {}).get("env_vars") or {}):
        return None
    return {"env_vars": {TRAIN_POLL_ENV: os.environ[TRAIN_POLL_ENV]}}


def _probe(address: str, timeout_s: float = 5.0) -> None:
    """A TCP connect to ``host:port`` (GCS) or ``ray://host:port`` (Ray Client)."""
    import socket

    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto", "local": Ray resolves these itself, quickly
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise ClusterError(f"cannot reach the Ray cluster at {address} (RAY_ADDRESS or "
                           f"--address): {exc.strerror or exc}") from exc


def _start_local(num_cpus: int | None, dashboard: bool, logging_config: Any,
                 quiet: dict[str, str]) -> None:
    """A private cluster on 127.0.0.1 that dies with this driver (:mod:`.reaper`).

    ``address="local"`` makes Ray start a new cluster even when another one runs here (a
    ``ray start`` head, another job): a job joins a cluster only when told to.
    """
    import ray

    from pipeline.distributed import reaper
    # A private single-node cluster has no node drains to watch for, and Ray Train's
    # PreemptionWatcher actor logs a core_worker error line at every start (its constructor
    # arguments sit in the object store with max_restarts > 0). Clusters joined by address
    # keep it. Inherited by the local raylet and so by every worker.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    # Ray 2.59+ starts local clusters with token auth when RAY_AUTH_MODE is unset, and says
    # so in a WARNING at every start. The auth stays; its notice goes to the log file.
    # (Setting RAY_AUTH_MODE=token here instead breaks the driver's first GCS connection:
    # Ray refreshes its cached config only on its own default path.)
    if not verbose():
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
            logging.ERROR)
    # The dashboard (on 127.0.0.1 only) also serves the State API that Ray Train polls;
    # without it every run logs "Failed to query Ray Train Controller actor state".
    port = _pin_state_api() if dashboard else None
    reaper.start()
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=dashboard,
             dashboard_host="127.0.0.1",
             dashboard_port=port, _node_ip_address="127.0.0.1", log_to_driver=True,
             configure_logging=False, logging_config=logging_config,
             runtime_env={"env_vars": quiet} if quiet else None)


def _pin_state_api() -> int:
    """A free port for this cluster's dashboard, exported as ``RAY_API_SERVER_ADDRESS``
    before the raylet starts, so every process of the cluster inherits it.

    Ray Train's PlacementGroupCleaner queries the State API with the address "auto", which
    fails with "Found multiple active Ray instances" whenever another Ray instance runs on
    the machine (another job, a test cluster); with the address pinned it asks this one.
    """
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    return port


def _plain_when_not_a_terminal() -> None:
    """Logs that are not a terminal (``ray job logs``, cron mail, CI) get plain lines: no
    colour codes around Ray's ``(pid=...)`` prefixes, and Ray Data's logged progress block
    instead of tqdm bars forwarded from the actors that run datasets (Ray Train's split
    coordinator uses Ray's distributed tqdm whatever the driver's terminal is)."""
    import sys

    import ray.data

    if sys.stdout.isatty():
        return
    os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    ray.data.DataContext.get_current().use_ray_tqdm = False


def setup_worker(threads: float | int) -> None:
    """Per-process setup of a Ray worker that runs our code: thread pools pinned, and, in a
    quiet run, the console kept to warnings (the root logger; Ray Train's worker context logs
    every ``report`` at INFO under a logger named by its file path, outside ``ray.*``)."""
    pin_threads(threads)
    if os.environ.get(VERBOSE_ENV) == "0":
        logging.getLogger().setLevel(logging.WARNING)


def pin_threads(n: float | int) -> None:
    """Limit torch, OpenMP and BLAS pools in this process to ``n`` threads (RAY_NOTES).

    Call it after the numeric libraries are imported, so every pool is seen.
    """
    import torch
    from threadpoolctl import threadpool_limits

    threads = max(1, int(n))
    torch.set_num_threads(threads)
    threadpool_limits(threads)
