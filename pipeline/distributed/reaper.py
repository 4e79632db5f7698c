"""A local cluster dies with the driver that started it, even after SIGKILL.

Ray ties its GCS and raylet to the driver that started them, but not everything: after a
``kill -9`` of a training driver, its dashboard and runtime-env agents and busy workers were
seen running on for minutes, holding ports and memory beside the next run.

So every process of a cluster that a job starts for itself carries a tag in its
environment (:data:`TAG_ENV`, set before ``ray.init`` and inherited by the raylet and every
worker it spawns), and a tiny watchdog process, in a session of its own so that a signal to
the driver's process group spares it, waits for the driver to die and then kills every
process with the tag. Processes of other clusters, and the user's shell, carry no tag.

Run as ``python -m pipeline.distributed.reaper DRIVER_PID DRIVER_START TAG``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid

import psutil

TAG_ENV = "PIPELINE_CLUSTER_TAG"
POLL_S = 0.5  # how soon after the driver's death the sweep starts
SWEEPS = 3  # passes, a second apart: processes spawned during a pass are caught by the next


def start() -> str:
    """Tag this process's environment and start the watchdog; returns the tag."""
    tag = uuid.uuid4().hex
    os.environ[TAG_ENV] = tag
    me = psutil.Process()
    env = {k: v for k, v in os.environ.items() if k != TAG_ENV}
    subprocess.Popen(  # noqa: S603 - our own module, our own interpreter
        [sys.executable, "-m", __name__, str(me.pid), repr(me.create_time()), tag],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True)
    return tag


def alive(pid: int, started: float) -> bool:
    """Whether the process ``pid`` that started at ``started`` still runs (not a reused pid,
    not a zombie)."""
    try:
        proc = psutil.Process(pid)
        return proc.create_time() == started and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def tagged(tag: str) -> list[psutil.Process]:
    """Every other process whose environment carries ``tag``."""
    found = []
    for proc in psutil.process_iter():
        if proc.pid == os.getpid():
            continue
        try:
            if proc.environ().get(TAG_ENV) == tag:
                found.append(proc)
        except psutil.Error:  # gone, or not ours to read
            continue
    return found


def sweep(tag: str) -> int:
    """Kill every process with ``tag``, in :data:`SWEEPS` passes; returns how many."""
    killed = 0
    for n in range(SWEEPS):
        for proc in tagged(tag):
            try:
                proc.kill()
                killed += 1
            except psutil.Error:
                continue
        if n + 1 < SWEEPS:
            time.sleep(1.0)
    return killed


def main(argv: list[str]) -> int:
    pid, started, tag = int(argv[0]), float(argv[1]), argv[2]
    while alive(pid, started):
        time.sleep(POLL_S)
    sweep(tag)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
