"""`ray job submit` of the main job against a real local head (RAY_NOTES: Dashboard and Jobs)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.test_cluster_job import SMALL

RAY = Path(sys.executable).with_name("ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head():
    if not RAY.exists():
        pytest.skip(f"ray CLI not found next to {sys.executable}")
    temp = tempfile.mkdtemp(prefix="rayhead-")
    # `python` in the job's entrypoint must be this environment's, as in an activated venv.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": path}
    env.pop("RAY_ADDRESS", None)
    dash, gcs = free_port(), free_port()
    # --block keeps the head's processes in one process group that we own, so teardown stops
    # exactly this cluster (`ray stop` would also kill the test session's own cluster).
    head = subprocess.Popen(
        [str(RAY), "start", "--head", "--block", "--num-cpus=2", f"--port={gcs}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         "--node-ip-address=127.0.0.1", f"--temp-dir={temp}", "--disable-usage-stats",
         # the session's own test cluster holds the default agent ports
         f"--dashboard-agent-listen-port={free_port()}",
         f"--dashboard-agent-grpc-port={free_port()}",
         f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for_dashboard(dash, head)
        yield f"http://127.0.0.1:{dash}", env
    finally:
        stop_group(head)
        shutil.rmtree(temp, ignore_errors=True)


def stop_group(head: subprocess.Popen, grace_s: float = 5) -> None:
    """Stop the head's whole process group (every Ray process it started shares it).
    SIGTERM first; whatever still runs after ``grace_s`` gets SIGKILL: on SIGTERM the GCS
    server waits about 30 s for the raylet it has lost, which only costs CI time here."""
    os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(head.pid, signal.SIGKILL)
    except ProcessLookupError:  # the group is gone already
        pass
    head.wait(timeout=30)


def wait_for_dashboard(port: int, head: subprocess.Popen, timeout_s: float = 120) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if head.poll() is not None:
            raise RuntimeError(f"ray start --head exited with {head.returncode}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/version", timeout=2)
            return
        except OSError:
            time.sleep(1)
    raise RuntimeError(f"the Ray dashboard on 127.0.0.1:{port} did not come up")


def test_ray_job_submit_runs_the_main_job(ray_head, tmp_path):
    address, env = ray_head
    out = tmp_path / "run"
    sets = [arg for s in SMALL for arg in ("--set", s)]
    cmd = [str(RAY), "job", "submit", "--address", address, "--working-dir", ".", "--",
           "python", "jobs/cluster_imagenet.py", "--output", str(out), "--epochs", "1",
           "--set", "train.warmup_epochs=0", *sets]
    for _ in range(20):  # the head's job agent comes up a few seconds after the dashboard
        result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                                timeout=600)
        if "No available agent" not in result.stderr:
            break
        time.sleep(3)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "succeeded" in result.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_images"] == 1797 and metrics["method"] == "online"
    assert (out / "assignments" / "_SUCCESS").exists() and (out / "model" / "model.json").exists()
