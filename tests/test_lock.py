"""One writer per output (pipeline/lock.py): a live holder refuses a second writer in one
line; a killed holder's lock never blocks a re-run for long. Local (flock) and S3 (lease)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from pipeline.data import fs as fsx
from pipeline.lock import LOCK_NAME, OutputBusyError, OutputLock
from tests.conftest import REPO

HOLD = """
import sys, time
from pipeline.data import fs as fsx
from pipeline.lock import OutputLock
lock = OutputLock(fsx.locate(sys.argv[1]))
lock.acquire()
print("held", flush=True)
time.sleep(600)
"""


def hold_in_subprocess(uri: str) -> subprocess.Popen:
    """A live holder in another process (as a training run would be)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, uri], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_second_run_on_a_live_output_refuses_in_one_line(tmp_path):
    out = tmp_path / "run"
    holder = hold_in_subprocess(str(out))
    try:
        t0 = time.monotonic()
        result = subprocess.run(
            [sys.executable, "jobs/cluster_imagenet.py", "--output", str(out), "--epochs", "1"],
            cwd=REPO, capture_output=True, text=True, timeout=120)
        took = time.monotonic() - t0
    finally:
        holder.kill()
        holder.wait()
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2, result.stderr
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"{out} is being written by another run (pid {holder.pid}" in errors[0]
    assert took < 60  # refused before Ray starts, not after a training attempt
    assert not (out / "config.yaml").exists()  # nothing was written by the refused run


def test_a_killed_holder_never_blocks_a_rerun(tmp_path):
    out = tmp_path / "run"
    holder = hold_in_subprocess(str(out))
    loc = fsx.locate(str(out))
    with pytest.raises(OutputBusyError):
        OutputLock(loc).acquire()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with OutputLock(loc):  # the kernel dropped the flock with the process: taken at once
        owner = json.loads((out / LOCK_NAME).read_text())
        assert owner["pid"] == os.getpid()
    assert not (out / LOCK_NAME).exists()  # a clean exit leaves nothing behind


def test_overwrite_clears_the_output_around_its_lock(tmp_path):
    out = tmp_path / "run"
    (out / "model").mkdir(parents=True)
    (out / "model" / "x").write_text("old")
    (out / "metrics.json").write_text("{}")
    loc = fsx.locate(str(out))
    with OutputLock(loc):
        fsx.remove_contents(loc, keep=(LOCK_NAME,))
        assert sorted(os.listdir(out)) == [LOCK_NAME]
        with pytest.raises(OutputBusyError):  # still held: the lock file was kept
            OutputLock(loc).acquire()


def test_s3_lease_refuses_while_renewed_and_is_taken_over_once_stale(s3_bucket):
    bucket, s3 = s3_bucket
    loc = fsx.locate(f"s3://{bucket}/runs/r1", s3)
    first = OutputLock(loc, ttl_s=2.0, settle_s=0.2)
    first.acquire()
    try:
        time.sleep(2.5)  # past one ttl: only the heartbeat keeps the lease alive
        with pytest.raises(OutputBusyError, match=f"s3://{bucket}/runs/r1 is being written"):
            OutputLock(loc, ttl_s=2.0, settle_s=0.2).acquire()
    finally:
        first._stop.set()  # the holder "dies": its heartbeat stops, its lease stays behind
        assert first._beat is not None
        first._beat.join()
    assert fsx.exists(loc.join(LOCK_NAME))
    time.sleep(1.2)  # older than ttl/2: no longer renewed, so a new writer waits it out
    t0 = time.monotonic()
    second = OutputLock(loc, ttl_s=2.0, settle_s=0.2)
    with second:  # waits out the stale lease (at most one ttl), then takes it
        assert json.loads(fsx.read_bytes(loc.join(LOCK_NAME)))["token"] == second.token
    assert time.monotonic() - t0 < 5
    assert not fsx.exists(loc.join(LOCK_NAME))  # released on exit
