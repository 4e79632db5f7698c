"""Filesystems for local paths and ``s3://`` URIs, built from config.

Credentials are never taken from config: pyarrow's S3 filesystem uses the standard AWS chain
(environment, shared config/credentials files, instance profile). The filesystem object carries
the endpoint and timeouts, and is pickled to Ray workers as is (RAY_NOTES: Data/S3).
"""

from __future__ import annotations

import os
import posixpath
import uuid
from dataclasses import dataclass

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


def s3_filesystem(cfg: S3Config) -> pafs.S3FileSystem:
    """pyarrow S3 filesystem with bounded retries, so a dead endpoint fails in seconds."""
    kwargs: dict = {
        "connect_timeout": cfg.connect_timeout_s,
        "request_timeout": cfg.request_timeout_s,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=2),
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
    return pafs.S3FileSystem(**kwargs)


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


def locate(uri: str, s3: S3Config | None = None) -> Location:
    """Resolve a local path or ``s3://bucket/prefix`` to a :class:`Location`."""
    if is_s3(uri):
        path = uri[len("s3://") :].rstrip("/")
        if not path:
            raise StorageError(f"{uri}: an S3 URI needs a bucket name")
        return Location(s3_filesystem(s3 or S3Config()), path, uri.rstrip("/"))
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


def _hidden(rel: str) -> bool:
    return any(part.startswith((".", "_")) for part in rel.split("/"))


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def read_bytes(loc: Location) -> bytes:
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
        with loc.fs.open_output_stream(loc.path) as fh:
            fh.write(data)
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
    loc.fs.delete_dir(loc.path)


def make_dirs(loc: Location) -> None:
    loc.fs.create_dir(loc.path, recursive=True)
