"""One writer per output: a lock that a second run on the same ``--output`` cannot take.

A run (and an assign job) holds ``OUTPUT/.lock`` for its whole life. A second writer refuses
in one line that names the holder; a lock left by a run that was killed (even by SIGKILL)
never blocks a re-run for long:

* **Local paths:** an exclusive ``flock`` on ``.lock``. The kernel drops it when the holder's
  process dies, however it dies, so a re-run after a kill takes it at once. The file keeps the
  holder's host, pid and start time for the message, and a clean exit removes it.
  (``flock`` also works over NFSv4.)
* **S3 (no locks, no atomic create through pyarrow):** a *lease* object, ``.lock``, renewed
  by a heartbeat thread every ``ttl/4``. Its age is read from the object's ``LastModified``
  (the store's clock, so hosts' clock skew does not matter beyond the store's own). A lease
  younger than ``ttl`` is held; an older one is stale and taken over. A lease that stopped
  being renewed (older than ``ttl/2``) but has not expired yet is waited out, so a re-run
  right after a kill starts within ``ttl`` instead of failing. Two writers that race for a
  free lease both write, wait, and read back: the one whose token is there won; the other
  refuses. (The window is one settle interval; S3 offers no compare-and-swap through
  pyarrow.)

Dot-files are invisible to every reader of our outputs (:func:`pipeline.data.fs.list_files`,
Parquet readers), and ``--overwrite`` clears a run's folder *around* its lock.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import pyarrow.fs as pafs

from pipeline.data import fs as fsx
from pipeline.data.fs import Location
from pipeline.errors import StorageError

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"


class OutputBusyError(StorageError):
    """Another live writer holds the output. The message names it and the output."""


def _owner(token: str) -> dict[str, Any]:
    return {"token": token, "host": socket.gethostname(), "pid": os.getpid(),
            "started_unix": time.time()}


def _describe(owner: dict[str, Any]) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("started_unix", 0)))
    return f"pid {owner.get('pid', '?')} on {owner.get('host', '?')}, started {started}"


@dataclass
class OutputLock:
    """Exclusive hold on ``root`` (a run or assign output) while the ``with`` block runs.

    ``ttl_s`` is the S3 lease's lifetime without a heartbeat; ``settle_s`` how long a writer
    waits before reading back a lease it just wrote (the race window on S3).
    """

    root: Location
    ttl_s: float = 60.0
    settle_s: float = 1.0
    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    _fd: int | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _beat: threading.Thread | None = None

    @property
    def where(self) -> Location:
        return self.root.join(LOCK_NAME)

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock or raise :class:`OutputBusyError` naming the holder."""
        if self.root.is_s3:
            self._acquire_lease()
        else:
            self._acquire_flock()

    def release(self) -> None:
        if self._fd is not None:
            os.unlink(self.where.path)  # still locked: nobody can be holding the next one
            os.close(self._fd)  # drops the flock
            self._fd = None
        if self._beat is not None:
            self._stop.set()
            self._beat.join(timeout=10)
            self._beat = None
            try:
                if self._read_lease().get("token") == self.token:
                    self.root.fs.delete_file(self.where.path)
            except OSError as exc:  # the store is down: the lease expires by itself
                log.warning("%s: could not remove the output lease (%s); it expires in %.0f s",
                            self.root.uri, exc, self.ttl_s)

    # -- local: flock ------------------------------------------------------------------------

    def _acquire_flock(self) -> None:
        """Lock ``.lock``; the holder removes it on release (while still locked), so a
        writer that locked a file just unlinked sees another inode at the path and retries."""
        os.makedirs(self.root.path, exist_ok=True)
        while True:
            fd = os.open(self.where.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _parse(os.pread(fd, 4096, 0))
                os.close(fd)
                raise self._busy(holder) from None
            if _same_file(fd, self.where.path):
                break
            os.close(fd)  # released and removed by its holder meanwhile: lock the new one
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_owner(self.token)).encode(), 0)
        self._fd = fd

    # -- S3: a lease with a heartbeat ------------------------------------------------------------

    def _acquire_lease(self) -> None:
        holder, age = self._lease_and_age()
        if holder and age < self.ttl_s and age > self.ttl_s / 2:
            wait = self.ttl_s - age
            log.info("%s: the lease of %s stopped being renewed %.0f s ago; waiting %.0f s "
                     "for it to expire", self.root.uri, _describe(holder), age, wait)
            time.sleep(wait)
            holder, age = self._lease_and_age()
        if holder and age < self.ttl_s:
            raise self._busy(holder)
        self._write_lease()
        time.sleep(self.settle_s)
        winner = self._read_lease()
        if winner.get("token") != self.token:
            raise self._busy(winner)
        self._beat = threading.Thread(target=self._heartbeat, name="output-lease",
                                      daemon=True)
        self._beat.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                if _parse(fsx.read_bytes(self.where)).get("token") != self.token:
                    log.error("%s: lost the output lease to another writer", self.root.uri)
                    return
                self._write_lease()
            except (OSError, StorageError) as exc:  # the store is down: the next beat retries
                log.warning("%s: lease heartbeat failed: %s", self.root.uri, exc)

    def _write_lease(self) -> None:
        fsx.write_bytes_atomic(self.where, json.dumps(_owner(self.token)).encode())

    def _read_lease(self) -> dict[str, Any]:
        try:
            return _parse(fsx.read_bytes(self.where))
        except StorageError:
            return {}

    def _lease_and_age(self) -> tuple[dict[str, Any], float]:
        info = fsx.info(self.where)
        if info.type == pafs.FileType.NotFound or info.mtime is None:
            return {}, float("inf")
        age = time.time() - info.mtime.timestamp()
        return self._read_lease(), max(0.0, age)

    def _busy(self, holder: dict[str, Any]) -> OutputBusyError:
        return OutputBusyError(
            f"{self.root.uri} is being written by another run ({_describe(holder)}); wait for "
            "it to finish, or choose another --output")


def _same_file(fd: int, path: str) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _parse(blob: bytes) -> dict[str, Any]:
    try:
        value = json.loads(blob.decode() or "{}")
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return value if isinstance(value, dict) else {}
