"""Filesystems for local paths and ``s3://`` URIs, built from config.

Credentials are never taken from config: pyarrow's S3 filesystem uses the standard AWS chain
(environment, shared config/credentials files, SSO, instance profile). With
``s3.credentials: worker`` (the default) the filesystem carries no keys, and every process
that unpickles it resolves the chain itself; ``driver`` puts the driver's keys inside it
(:func:`s3_filesystem`). The filesystem object carries the endpoint, timeouts and retry
budget, and is pickled to Ray workers as is (RAY_NOTES: Data/S3).

Two budgets. Every request gets ``s3.max_attempts`` attempts with exponential backoff, which
rides out throttling (``503 SlowDown``), connection resets and short outages; pyarrow's own
pickling drops the retry strategy, so :class:`RetryingS3FileSystem` puts it back in every
process. A dead endpoint would then take that whole budget to fail, so :func:`locate`
first probes it with :data:`PROBE_ATTEMPTS` attempts, once per process and endpoint: a
refused connection, an unknown host or a connect timeout fails at once naming the URI.
"""

from __future__ import annotations

import os
import posixpath
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.fs as pafs

from pipeline.config import S3Config
from pipeline.errors import StorageError


@dataclass(frozen=True)
class Location:
    """A resolved URI: the filesystem, the path inside it, and the URI the user gave."""

    fs: pafs.FileSystem
    path: str
    uri: str

    def join(self, *parts: str) -> Location:
        path = posixpath.join(self.path, *parts)
        uri = self.uri.rstrip("/") + "/" + "/".join(parts)
        return Location(self.fs, path, uri)

    @property
    def is_s3(self) -> bool:
        return is_s3(self.uri)


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


PROBE_ATTEMPTS = 2  # the reachability probe: a dead endpoint fails in under a second
# curl's codes for "nothing answers": couldn't resolve proxy (5) or host (6), couldn't
# connect (7), timeout (28). Resets, 5xx and 4xx mean something answered.
_UNREACHABLE = re.compile(r"curlCode: (5|6|7|28)\b")
_reachable: set[tuple[str | None, str | None, bool]] = set()
_reachable_lock = threading.Lock()


# The AWS SDK calls a ranged GET whose error body (a 503 SlowDown's XML) does not fit the
# range's buffer "INTERNAL_FAILURE: Failed to flush response stream" and does not retry it;
# small objects (leases, manifests, checkpoint meta.json) meet it under throttling.
MISCLASSIFIED = "AWS Error INTERNAL_FAILURE"
_COMPRESSED = (".gz", ".bz2", ".lz4", ".zst", ".br")
T = TypeVar("T")


class RetryingS3FileSystem(pafs.S3FileSystem):
    """pyarrow's S3 filesystem with the AWS SDK's default retry strategy (exponential
    backoff, no retry quota) and ``max_attempts`` attempts per request, kept when pickled.

    pyarrow's ``S3FileSystem.__reduce__`` leaves the retry strategy out, so a Ray worker
    would unpickle a filesystem with pyarrow's default (standard mode, 3 attempts, whose
    retry quota also stops retrying after ~100 failed attempts per client, as a throttled
    job soon has). Python callers of :meth:`open_input_stream` (ours, Ray Train's checkpoint
    manager) also get :data:`MISCLASSIFIED` errors retried.
    """

    def __init__(self, max_attempts: int, **options: Any):
        super().__init__(retry_strategy=pafs.AwsDefaultS3RetryStrategy(max_attempts=max_attempts),
                         **options)
        self.max_attempts = max_attempts

    def __reduce__(self) -> tuple[Any, tuple[int, dict[str, Any]]]:
        _, (options,) = super().__reduce__()
        return _rebuild_s3, (self.max_attempts, options)

    def open_input_stream(self, path: str, compression: str | None = "detect",
                          buffer_size: int | None = None) -> Any:
        """The whole object, read with :func:`retry_read`, as an in-memory stream (callers
        of a stream read it whole: JSON, weights, images); compressed names stream as is."""
        if buffer_size or (compression == "detect" and path.endswith(_COMPRESSED)) or \
                compression not in ("detect", None):
            return super().open_input_stream(path, compression, buffer_size)

        def whole() -> bytes:
            with super(RetryingS3FileSystem, self).open_input_stream(path, None) as fh:
                return fh.read()

        return pa.BufferReader(retry_read(whole, self.max_attempts))


def retry_read(read: Callable[[], T], max_attempts: int) -> T:
    """``read()``, again with backoff (50 ms doubling, as the SDK's) while it fails with
    :data:`MISCLASSIFIED`, up to ``max_attempts`` attempts in all."""
    for attempt in range(1, max_attempts + 1):
        try:
            return read()
        except OSError as exc:
            if MISCLASSIFIED not in str(exc) or attempt == max_attempts:
                raise
            time.sleep(0.025 * 2**attempt)
    raise AssertionError("unreachable")  # pragma: no cover


def read_attempts(fs: pafs.FileSystem) -> int:
    """The retry budget of ``fs`` for :func:`retry_read` (1 for local filesystems)."""
    return int(getattr(fs, "max_attempts", 1))


def _rebuild_s3(max_attempts: int, options: dict[str, Any]) -> RetryingS3FileSystem:
    """Unpickle a :class:`RetryingS3FileSystem` (keys resolve from this process's chain
    unless ``options`` carry the driver's)."""
    return RetryingS3FileSystem(max_attempts, **options)


def s3_filesystem(cfg: S3Config, max_attempts: int | None = None) -> RetryingS3FileSystem:
    """pyarrow S3 filesystem with the config's retry budget (``max_attempts`` overrides it)
    and bounded timeouts.

    With ``cfg.credentials == "driver"`` this process's AWS chain is resolved now and the keys
    are stored in the object, so they travel, in clear, wherever it is pickled (Ray task
    specs, object store, spill files) and stop working when temporary keys expire.
    """
    kwargs: dict = {
        "connect_timeout": cfg.connect_timeout_s,
        "request_timeout": cfg.request_timeout_s,
        "anonymous": cfg.anonymous,
    }
    if cfg.region:
        kwargs["region"] = cfg.region
    if not cfg.anonymous and cfg.credentials == "driver":
        kwargs.update(_chain_credentials())
    if cfg.endpoint_url:
        scheme, _, host = cfg.endpoint_url.partition("://")
        kwargs["endpoint_override"] = host or scheme
        kwargs["scheme"] = scheme if host else "https"
        kwargs.setdefault("region", os.environ.get("AWS_REGION", "us-east-1"))
    return RetryingS3FileSystem(max_attempts or cfg.max_attempts, **kwargs)


def _chain_credentials() -> dict[str, str]:
    """Keys from the standard AWS chain (env, config files, SSO, instance profile), or {}."""
    try:
        import botocore.session
    except ImportError:  # pragma: no cover - botocore ships with s3fs
        return {}
    creds = botocore.session.get_session().get_credentials()
    if creds is None:
        return {}
    frozen = creds.get_frozen_credentials()
    out = {"access_key": frozen.access_key, "secret_key": frozen.secret_key}
    if frozen.token:
        out["session_token"] = frozen.token
    return out


def probe(cfg: S3Config, bucket: str, uri: str) -> None:
    """Fail at once, naming ``uri``, when nothing answers at the S3 endpoint.

    One ``HeadBucket`` with :data:`PROBE_ATTEMPTS` attempts, once per process and endpoint
    (a success is remembered). Any answer counts as reachable, errors included (403, 503,
    reset): those are for the full retry budget, or the real request, to handle.
    """
    key = (cfg.endpoint_url, cfg.region, cfg.anonymous)
    if key in _reachable:
        return
    fast = s3_filesystem(cfg, PROBE_ATTEMPTS)
    try:
        fast.get_file_info(bucket)
    except OSError as exc:
        if _UNREACHABLE.search(str(exc)):
            raise StorageError(f"cannot reach {uri}: {_short(exc)}") from exc
    with _reachable_lock:
        _reachable.add(key)


def locate(uri: str, s3: S3Config | None = None) -> Location:
    """Resolve a local path or ``s3://bucket/prefix`` to a :class:`Location`; an S3
    endpoint that does not answer fails here, within seconds (:func:`probe`)."""
    if is_s3(uri):
        path = uri[len("s3://") :].rstrip("/")
        if not path:
            raise StorageError(f"{uri}: an S3 URI needs a bucket name")
        cfg = s3 or S3Config()
        probe(cfg, path.split("/", 1)[0], uri)
        return Location(s3_filesystem(cfg), path, uri.rstrip("/"))
    if "://" in uri:
        raise StorageError(f"{uri}: unsupported scheme (use a local path or s3://)")
    return Location(pafs.LocalFileSystem(), os.path.abspath(uri), uri)


def info(loc: Location) -> pafs.FileInfo:
    """File info, turning every backend error into one StorageError naming the URI."""
    try:
        return loc.fs.get_file_info(loc.path)
    except OSError as exc:
        raise StorageError(f"cannot reach {loc.uri}: {_short(exc)}") from exc


def list_files(loc: Location, extensions: tuple[str, ...] | None = None) -> list[pafs.FileInfo]:
    """All files under ``loc`` (recursive, sorted), skipping hidden and ``_``-prefixed parts."""
    try:
        infos = loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=True))
    except FileNotFoundError as exc:
        raise StorageError(f"{loc.uri}: no such directory or prefix") from exc
    except OSError as exc:
        raise StorageError(f"cannot list {loc.uri}: {_short(exc)}") from exc
    files = []
    for item in infos:
        rel = posixpath.relpath(item.path, loc.path)
        if item.type != pafs.FileType.File or _hidden(rel):
            continue
        if extensions and not item.path.lower().endswith(extensions):
            continue
        files.append(item)
    return sorted(files, key=lambda i: i.path)


def walk(loc: Location) -> list[str]:
    """Every file path under ``loc``, hidden ones included; [] when it does not exist."""
    try:
        infos = loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=True,
                                                       allow_not_found=True))
    except OSError as exc:
        raise StorageError(f"cannot list {loc.uri}: {_short(exc)}") from exc
    return sorted(i.path for i in infos if i.type == pafs.FileType.File)


_KEY_IN_BUCKET = re.compile(r"key '([^']*)' in bucket '([^']*)'")
_BUCKET = re.compile(r"bucket '([^']*)'")
_ERROR_PREFIX = re.compile(r"^(?:[\w.]+(?:Error|Exception): )+")


def name_s3_uris(text: str) -> str:
    """pyarrow's "key 'K' in bucket 'B'" (and "bucket 'B'") as ``s3://B/K`` (``s3://B``)."""
    text = _KEY_IN_BUCKET.sub(lambda m: f"s3://{m[2]}/{m[1]}", text)
    return _BUCKET.sub(lambda m: f"s3://{m[1]}", text)


def s3_error(exc: BaseException) -> StorageError | None:
    """The S3 failure behind ``exc`` as one line naming its ``s3://`` URI, or None.

    Follows Ray's ``.cause`` and Python's ``__cause__`` links (an error raised in a Ray worker
    or Ray Train's controller arrives wrapped, its message holding the remote traceback) to
    the last line that carries an AWS error or one of our :class:`StorageError` lines.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    found: str | None = None
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        lines = [line.strip() for line in str(current).splitlines()
                 if "AWS Error" in line or (isinstance(current, StorageError) and "s3://" in line)]
        found = lines[-1] if lines else found
        nxt = getattr(current, "cause", None) or current.__cause__
        current = nxt if isinstance(nxt, BaseException) else None
    return None if found is None else StorageError(name_s3_uris(_ERROR_PREFIX.sub("", found)))


def _hidden(rel: str) -> bool:
    return any(part.startswith((".", "_")) for part in rel.split("/"))


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return name_s3_uris(text[0]) if text else type(exc).__name__


def read_bytes(loc: Location) -> bytes:
    """The whole file (on S3 with :meth:`RetryingS3FileSystem.open_input_stream`'s retries)."""
    try:
        with loc.fs.open_input_stream(loc.path) as fh:
            return fh.read()
    except FileNotFoundError as exc:
        raise StorageError(f"{loc.uri}: not found") from exc
    except OSError as exc:
        raise StorageError(f"cannot read {loc.uri}: {_short(exc)}") from exc


def write_bytes_atomic(loc: Location, data: bytes) -> None:
    """Write a small file so readers see the old content or the new, never a partial one.

    Locally: temp file, fsync, ``os.replace``. On S3 a single PUT is already atomic.
    """
    if loc.is_s3:
        try:
            with loc.fs.open_output_stream(loc.path) as fh:
                fh.write(data)
        except OSError as exc:
            raise StorageError(f"cannot write {loc.uri}: {_short(exc)}") from exc
        return
    folder, name = os.path.split(loc.path)
    os.makedirs(folder or ".", exist_ok=True)
    # Hidden name: directory readers (pyarrow, Spark) skip dot-files, so a crash mid-write
    # never exposes a partial file.
    tmp = os.path.join(folder, f".{name}.tmp-{uuid.uuid4().hex[:8]}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, loc.path)


def exists(loc: Location) -> bool:
    return info(loc).type != pafs.FileType.NotFound


def remove_tree(loc: Location) -> None:
    """Delete a directory/prefix if it exists."""
    if info(loc).type == pafs.FileType.NotFound:
        return
    try:
        loc.fs.delete_dir(loc.path)
    except OSError as exc:
        raise StorageError(f"cannot delete {loc.uri}: {_short(exc)}") from exc


def make_dirs(loc: Location) -> None:
    try:
        loc.fs.create_dir(loc.path, recursive=True)
    except OSError as exc:
        raise StorageError(f"cannot create {loc.uri}: {_short(exc)}") from exc


def remove_contents(loc: Location, keep: tuple[str, ...] = ()) -> None:
    """Delete everything directly under ``loc`` except the entries named in ``keep``
    (``--overwrite`` clears a run's folder around its writer lock)."""
    try:
        entries = loc.fs.get_file_info(pafs.FileSelector(loc.path, allow_not_found=True))
    except OSError as exc:
        raise StorageError(f"cannot list {loc.uri}: {_short(exc)}") from exc
    for entry in entries:
        if posixpath.basename(entry.path.rstrip("/")) in keep:
            continue
        if entry.type == pafs.FileType.Directory:
            loc.fs.delete_dir(entry.path)
        else:
            loc.fs.delete_file(entry.path)
