"""Image sources for ingest: folders, zip archives, S3 prefixes, MNIST IDX files, sklearn digits.

A source is enumerated once in the driver (:meth:`Source.items`, cheap metadata only) and its
rows are fetched in parallel by Ray Data tasks (:meth:`Source.fetch`, per row, errors returned
rather than raised), so that one unreadable file never fails a task.
"""

from __future__ import annotations

import gzip
import io
import os
import posixpath
import struct
import zipfile
from typing import Any, Protocol

import numpy as np
from PIL import Image

from pipeline.config import S3Config
from pipeline.data import fs as fsx
from pipeline.errors import SourceError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class Source(Protocol):
    """Driver-side enumeration plus worker-side fetching of encoded bytes."""

    uri: str

    def items(self) -> list[dict[str, Any]]:
        """One dict per image: ``id`` (str), ``ref`` (how to fetch it), optional ``label``."""
        ...

    def fetch(self, refs: list[Any]) -> list[bytes | str]:
        """Encoded bytes per ref, or an error string for a ref that cannot be read."""
        ...


def _folder_label(rel: str) -> str:
    parent = posixpath.dirname(rel)
    if not parent:
        raise SourceError(f"{rel}: --labels-from-folders needs every image inside a folder")
    return posixpath.basename(parent)


class FileTreeSource:
    """Images under a local directory or an ``s3://`` prefix; id = path relative to the root."""

    def __init__(self, uri: str, s3: S3Config, labels_from_folders: bool = False):
        self.uri, self.root = uri, fsx.locate(uri, s3)
        self.labels_from_folders = labels_from_folders

    def items(self) -> list[dict[str, Any]]:
        kind = fsx.info(self.root).type
        if kind.name == "NotFound" and not self.root.is_s3:
            raise SourceError(f"{self.uri}: no such directory")
        files = fsx.list_files(self.root, IMAGE_EXTENSIONS)
        if not files:
            raise SourceError(f"{self.uri}: no image files found ({', '.join(IMAGE_EXTENSIONS)})")
        rows = []
        for f in files:
            rel = posixpath.relpath(f.path, self.root.path)
            row: dict[str, Any] = {"id": rel, "ref": f.path}
            if self.labels_from_folders:
                row["label"] = _folder_label(rel)
            rows.append(row)
        return rows

    def fetch(self, refs: list[Any]) -> list[bytes | str]:
        out: list[bytes | str] = []
        for path in refs:
            try:
                with self.root.fs.open_input_stream(path) as fh:
                    out.append(fh.read())
            except OSError as exc:
                out.append(f"unreadable file: {exc}")
        return out


class ZipSource:
    """Images inside a zip archive (local or S3); id = member name; label = parent folder."""

    def __init__(self, uri: str, s3: S3Config, labels_from_folders: bool = False):
        self.uri, self.loc = uri, fsx.locate(uri, s3)
        self.labels_from_folders = labels_from_folders

    def _open(self) -> zipfile.ZipFile:
        try:
            return zipfile.ZipFile(self.loc.fs.open_input_file(self.loc.path))
        except FileNotFoundError as exc:
            raise SourceError(f"{self.uri}: no such zip file") from exc
        except zipfile.BadZipFile as exc:
            raise SourceError(f"{self.uri}: not a valid zip archive ({exc})") from exc

    def items(self) -> list[dict[str, Any]]:
        with self._open() as archive:
            names = [n for n in archive.namelist()
                     if n.lower().endswith(IMAGE_EXTENSIONS) and not _hidden_member(n)]
        if not names:
            raise SourceError(f"{self.uri}: the archive holds no image files")
        rows = []
        for name in sorted(names):
            row: dict[str, Any] = {"id": name, "ref": name}
            if self.labels_from_folders:
                row["label"] = _folder_label(name)
            rows.append(row)
        return rows

    def fetch(self, refs: list[Any]) -> list[bytes | str]:
        out: list[bytes | str] = []
        with self._open() as archive:
            for name in refs:
                try:
                    out.append(archive.read(name))
                except (zipfile.BadZipFile, OSError, KeyError) as exc:
                    out.append(f"unreadable zip member: {exc}")
        return out


def _hidden_member(name: str) -> bool:
    return any(part.startswith((".", "__MACOSX")) for part in name.split("/"))


class ArraySource:
    """In-memory uint8 images (n, H, W) with integer labels, stored as PNG bytes."""

    def __init__(self, uri: str, images: np.ndarray, labels: np.ndarray, prefix: str):
        if len(images) == 0:
            raise SourceError(f"{uri}: no images")
        self.uri, self.images, self.labels, self.prefix = uri, images, labels, prefix

    def items(self) -> list[dict[str, Any]]:
        width = len(str(len(self.images) - 1))
        return [{"id": f"{self.prefix}/{i:0{width}d}", "ref": i, "label": int(self.labels[i])}
                for i in range(len(self.images))]

    def fetch(self, refs: list[Any]) -> list[bytes | str]:
        return [png_bytes(self.images[int(i)]) for i in refs]


def png_bytes(image: np.ndarray) -> bytes:
    """uint8 (H, W) or (H, W, 3) -> PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def read_idx(path: str) -> np.ndarray:
    """Parse an MNIST-style IDX file (optionally gzipped) into a numpy array."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as fh:
        data = fh.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise SourceError(f"{path}: not an IDX file (bad magic)")
    dtype: dict[int, Any] = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if data[2] not in dtype:
        raise SourceError(f"{path}: unknown IDX element type 0x{data[2]:02x}")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    array = np.frombuffer(data, dtype=dtype[data[2]], offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise SourceError(f"{path}: truncated IDX file ({array.size} of {np.prod(shape)} values)")
    return array.reshape(shape)


def idx_source(directory: str) -> ArraySource:
    """``idx:DIR``: the one ``*images-idx3*`` file and its ``*labels-idx1*`` file in DIR."""
    if not os.path.isdir(directory):
        raise SourceError(f"idx:{directory}: no such directory")
    names = sorted(os.listdir(directory))
    images = [n for n in names if "images-idx3" in n or "images.idx3" in n]
    if len(images) != 1:
        raise SourceError(f"idx:{directory}: expected one *images-idx3* file, found {images}")
    stem = images[0].split("images")[0]
    labels = [n for n in names if n.startswith(stem) and ("labels-idx1" in n or "labels.idx1" in n)]
    if len(labels) != 1:
        raise SourceError(f"idx:{directory}: expected one {stem}labels-idx1* file, found {labels}")
    x = read_idx(os.path.join(directory, images[0]))
    y = read_idx(os.path.join(directory, labels[0]))
    if x.ndim != 3 or len(x) != len(y):
        raise SourceError(f"idx:{directory}: {x.shape} images do not match {y.shape} labels")
    prefix = images[0].split(".")[0]
    return ArraySource(f"idx:{directory}", x.astype(np.uint8), y.astype(np.int64), prefix)


def digits_source() -> ArraySource:
    """scikit-learn's bundled 8x8 digits (1,797 images), scaled from 0..16 to 0..255."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    return ArraySource("sklearn-digits", images, digits.target.astype(np.int64), "digits")


def open_source(spec: str, s3: S3Config, labels_from_folders: bool = False) -> Source:
    """Parse the ``--source`` argument (DESIGN §8)."""
    if spec == "sklearn-digits":
        return digits_source()
    if spec.startswith("idx:"):
        return idx_source(spec[len("idx:") :])
    if spec.lower().endswith(".zip"):
        return ZipSource(spec, s3, labels_from_folders)
    if fsx.is_s3(spec) or os.path.isdir(spec):
        return FileTreeSource(spec, s3, labels_from_folders)
    raise SourceError(f"{spec}: no such directory, zip file or known source "
                      "(expected DIR, FILE.zip, s3://bucket/prefix, idx:DIR or sklearn-digits)")
