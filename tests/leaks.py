"""Searching everything a run wrote for a secret: files on disk, Ray's spill files while they
exist, and every object in a bucket."""

from __future__ import annotations

import os
import threading
from pathlib import Path


def files_containing(root: Path, needle: bytes) -> list[str]:
    """Every file under ``root`` whose bytes contain ``needle`` (sockets, links skipped)."""
    hits = []
    for folder, _, names in os.walk(root):
        for name in names:
            path = Path(folder, name)
            if path.is_symlink() or not path.is_file():
                continue
            try:
                if needle in path.read_bytes():
                    hits.append(str(path))
            except OSError:  # removed while we walked (Ray cleans up as it goes)
                continue
    return sorted(hits)


def objects_containing(client: object, bucket: str, needle: bytes) -> tuple[int, list[str]]:
    """(objects searched, keys of those whose bytes contain ``needle``) in ``bucket``."""
    hits, count = [], 0
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket)  # type: ignore[attr-defined]
    for page in pages:
        for item in page.get("Contents", []):
            count += 1
            body = client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()  # type: ignore[attr-defined]
            if needle in body:
                hits.append(item["Key"])
    return count, hits


class SpillWatch:
    """Polls ``root`` for Ray's spill files while a job runs and searches each one once:
    Ray deletes them when the objects are freed, so a search after the run misses them."""

    def __init__(self, root: Path, needle: bytes, interval_s: float = 0.2):
        self.root, self.needle, self.interval_s = root, needle, interval_s
        self.seen: dict[str, int] = {}  # spill file -> size when last searched
        self.hits: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> SpillWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._scan()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._scan()

    def _scan(self) -> None:
        for folder, _, names in os.walk(self.root):
            if "spilled" not in folder:
                continue
            for name in names:
                path = os.path.join(folder, name)
                try:
                    if self.seen.get(path) == os.path.getsize(path):
                        continue
                    data = Path(path).read_bytes()
                except OSError:
                    continue
                self.seen[path] = len(data)
                if self.needle in data:
                    self.hits.add(path)
