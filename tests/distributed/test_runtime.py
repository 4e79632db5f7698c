"""Local clusters (pipeline/distributed/runtime.py, reaper.py): a job's cluster is its own,
never another one found on the machine, and it dies with its driver even after SIGKILL; a
cluster address that cannot be reached fails in seconds, in one line."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipeline.distributed.reaper import tagged
from pipeline.distributed.runtime import (
    SUBMITTED_JOB_ENV,
    TRAIN_POLL_ENV,
    TRAIN_POLL_S,
    _train_poll_env,
)
from tests.conftest import REPO

DRIVER = """
import json, os, time
import ray
from pipeline.distributed.reaper import TAG_ENV
from pipeline.distributed.runtime import init_ray
init_ray(num_cpus=1, dashboard=False)

@ray.remote(num_cpus=0)
class Idle:
    def poll(self):
        return os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")

idle = Idle.remote()
poll = ray.get(idle.poll.remote())  # a worker process of this cluster
print(json.dumps({"gcs": ray.get_runtime_context().gcs_address,
                  "tag": os.environ[TAG_ENV], "poll": poll}), flush=True)
time.sleep(600)
"""


def test_local_cluster_is_private_and_dies_with_its_driver(ray_cluster):
    # Another cluster on this machine, advertised where `ray start` advertises itself: a
    # plain ray.init() would join it. The job must start its own.
    other = ray_cluster.get_runtime_context().gcs_address
    temp = Path(tempfile.mkdtemp(prefix="rt-"))  # short: Ray's socket paths have a limit
    (temp / "ray").mkdir()
    (temp / "ray" / "ray_current_cluster").write_text(other)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", TRAIN_POLL_ENV)}
    env["RAY_TMPDIR"] = str(temp)
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert driver.stdout is not None
        started = json.loads(driver.stdout.readline())
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    assert started["gcs"] != other
    assert started["poll"] == TRAIN_POLL_S  # every process of the cluster polls Train so
    deadline = time.monotonic() + 30
    while tagged(started["tag"]) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert tagged(started["tag"]) == []  # GCS, raylet, agents and workers are all gone
    assert ray_cluster.get(ray_cluster.put(1)) == 1  # the other cluster was left alone


def test_unreachable_cluster_address_fails_fast_in_one_line(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    t0 = time.monotonic()
    result = subprocess.run(
        [sys.executable, "jobs/cluster_imagenet.py", "--address", f"127.0.0.1:{port}",
         "--output", str(tmp_path / "run")], cwd=REPO, capture_output=True, text=True,
        timeout=120)
    assert time.monotonic() - t0 < 30  # ray.init alone would retry for minutes
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: cannot reach the Ray cluster at 127.0.0.1:{port} (RAY_ADDRESS "
                      "or --address): Connection refused"], result.stderr


def test_a_joined_cluster_gets_the_train_poll_through_the_jobs_runtime_env(monkeypatch):
    """The driver's environment does not reach a joined cluster's processes, so the interval
    travels in the runtime_env; a job submitted with it set keeps its own (Ray refuses the
    same key from ``ray job submit`` and ``ray.init``)."""
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    assert SUBMITTED_JOB_ENV == RAY_JOB_CONFIG_JSON_ENV_VAR  # what Ray itself reads
    monkeypatch.setenv(TRAIN_POLL_ENV, "0.5")
    monkeypatch.delenv(RAY_JOB_CONFIG_JSON_ENV_VAR, raising=False)
    assert _train_poll_env() == {"env_vars": {TRAIN_POLL_ENV: "0.5"}}
    monkeypatch.setenv(RAY_JOB_CONFIG_JSON_ENV_VAR, json.dumps(
        {"runtime_env": {"working_dir": "gcs://x.zip", "env_vars": {"OTHER": "1"}}}))
    assert _train_poll_env() == {"env_vars": {TRAIN_POLL_ENV: "0.5"}}
    monkeypatch.setenv(RAY_JOB_CONFIG_JSON_ENV_VAR, json.dumps(
        {"runtime_env": {"env_vars": {TRAIN_POLL_ENV: "1"}}}))
    assert _train_poll_env() is None
