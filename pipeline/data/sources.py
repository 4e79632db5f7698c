"""Image sources for ingest: folders, zip archives, S3 prefixes, MNIST IDX files, sklearn digits.

A source is enumerated once in the driver (:meth:`Source.items`, cheap metadata only) and its
rows are fetched in parallel by Ray Data tasks (:meth:`Source.fetch`, per row, errors returned
rather than raised), so that one unreadable file never fails a task.

Hostile inputs end in quarantine with a reason, never outside the source: a local tree is
walked without following symlinked folders, and a file symlink that resolves outside the tree
is not read; zip members with absolute or ``..`` names are not read; names that are not
UTF-8 (ids are UTF-8 strings) are refused at listing; files and zip members larger than
``max_bytes`` (:data:`MAX_IMAGE_BYTES`) are refused before they are read, so a zip bomb
cannot exhaust memory.
"""

from __future__ import annotations

import gzip
import io
import os
import posixpath
import struct
import zipfile
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

import numpy as np
from PIL import Image

from pipeline.config import S3Config
from pipeline.data import fs as fsx
from pipeline.errors import SourceError, StorageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# No usable image is larger: 64M pixels (the default max_pixels) of uncompressed 16-bit RGBA.
MAX_IMAGE_BYTES = 512 * 2**20
NOT_UTF8 = "unusable file name: not valid UTF-8, which ids must be; rename the file"


class Source(Protocol):
    """Driver-side enumeration plus worker-side fetching of encoded bytes."""

    uri: str

    def items(self) -> list[dict[str, Any]]:
        """One dict per image: ``id`` (str), ``ref`` (how to fetch it), optional ``label``,
        and optional ``reason``: the item is known to be unusable at listing time, so it is
        quarantined with that reason and never fetched."""
        ...

    def fetch(self, refs: list[Any]) -> Iterable[bytes | str]:
        """Encoded bytes per ref, in order, or an error string for a ref that cannot be read;
        lazily where it matters, so a caller holds one unusable payload at a time."""
        ...


def _folder_label(rel: str) -> str:
    parent = posixpath.dirname(rel)
    if not parent:
        raise SourceError(f"{_named(rel)}: --labels-from-folders needs every image inside a "
                          "folder")
    return posixpath.basename(parent)


def _named(name: str) -> str:
    """A file or member name for a one-line message: quoted when it holds a line break or
    another unprintable character."""
    return name if name.isprintable() else repr(name)


class FileTreeSource:
    """Images under a local directory or an ``s3://`` prefix; id = path relative to the root.

    Hidden and ``_``-prefixed files and folders are skipped, as :func:`fsx.list_files` does.
    A local tree is walked here rather than by pyarrow, which follows symlinked folders
    (a link to an ancestor repeats the tree ~40 times deep) and fails on non-UTF-8 names.
    """

    def __init__(self, uri: str, s3: S3Config, labels_from_folders: bool = False,
                 max_bytes: int = MAX_IMAGE_BYTES):
        self.uri, self.root = uri, fsx.locate(uri, s3)
        self.labels_from_folders, self.max_bytes = labels_from_folders, max_bytes

    def items(self) -> list[dict[str, Any]]:
        kind = fsx.info(self.root).type
        if kind.name == "NotFound" and not self.root.is_s3:
            raise SourceError(f"{self.uri}: no such directory")
        if self.root.is_s3:
            files = fsx.list_files(self.root, IMAGE_EXTENSIONS)
            rels = [posixpath.relpath(f.path, self.root.path) for f in files]
        else:
            rels = _local_images(self.root.path)
        if not rels:
            raise SourceError(f"{self.uri}: no image files found ({', '.join(IMAGE_EXTENSIONS)})")
        return [self._item(rel) for rel in rels]

    def _item(self, rel: str) -> dict[str, Any]:
        name = _printable_name(rel)
        row: dict[str, Any] = {"id": name, "ref": posixpath.join(self.root.path, name)}
        if name != rel:
            row["reason"] = NOT_UTF8
        if self.labels_from_folders:
            row["label"] = _folder_label(name)
        return row

    def fetch(self, refs: list[Any]) -> Iterator[bytes | str]:
        real_root = None if self.root.is_s3 else os.path.realpath(self.root.path)
        for path in refs:
            yield self._read(path, real_root)

    def _read(self, path: str, real_root: str | None) -> bytes | str:
        """The file's bytes, or why not: out of the (local) tree, too large, unreadable."""
        if real_root is not None and not _inside(target := os.path.realpath(path), real_root):
            return f"outside the source tree: a symlink to {target}"
        try:
            with self.root.fs.open_input_file(path) as fh:
                size = fh.size()
                if size > self.max_bytes:
                    return f"too large: {size} bytes, over {self.max_bytes}"
                return fh.read(size)
        except OSError as exc:
            return f"unreadable file: {exc}"


def _local_images(root: str) -> list[str]:
    """Relative paths of the regular image files under ``root``, sorted; symlinked folders
    are not entered, hidden and ``_``-prefixed parts are skipped."""
    out = []
    for folder, dirs, files in os.walk(root, onerror=_unlistable):
        dirs[:] = [d for d in dirs if not d.startswith((".", "_"))]
        for name in files:
            path = os.path.join(folder, name)
            if (name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith((".", "_"))
                    and os.path.isfile(path)):
                out.append(os.path.relpath(path, root).replace(os.sep, "/"))
    return sorted(out)


def _unlistable(exc: OSError) -> None:
    raise StorageError(f"cannot list {exc.filename}: {exc.strerror}") from exc


def _printable_name(rel: str) -> str:
    """``rel`` itself when it is valid UTF-8, else with the bad bytes as ``\\xNN``."""
    try:
        rel.encode("utf-8")
        return rel
    except UnicodeEncodeError:
        return os.fsencode(rel).decode("utf-8", "backslashreplace")


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


class ZipSource:
    """Images inside a zip archive (local or S3); id = member name; label = parent folder."""

    def __init__(self, uri: str, s3: S3Config, labels_from_folders: bool = False,
                 max_bytes: int = MAX_IMAGE_BYTES):
        self.uri, self.loc = uri, fsx.locate(uri, s3)
        self.labels_from_folders, self.max_bytes = labels_from_folders, max_bytes

    def _open(self) -> zipfile.ZipFile:
        try:
            fh = self.loc.fs.open_input_file(self.loc.path)
        except FileNotFoundError as exc:
            raise SourceError(f"{self.uri}: no such zip file") from exc
        except OSError as exc:
            raise StorageError(f"cannot read {self.uri}: {exc}") from exc
        try:
            return zipfile.ZipFile(fh)
        except Exception as exc:  # noqa: BLE001 - a damaged archive fails in many ways
            fh.close()
            why = " ".join(str(exc).split())
            raise SourceError(f"{self.uri}: not a valid zip archive "
                              f"({type(exc).__name__}: {why})") from exc

    def items(self) -> list[dict[str, Any]]:
        with self._open() as archive:
            names = [n for n in archive.namelist()
                     if n.lower().endswith(IMAGE_EXTENSIONS) and not _hidden_member(n)]
        if not names:
            raise SourceError(f"{self.uri}: the archive holds no image files")
        rows = []
        for name in sorted(names):
            row: dict[str, Any] = {"id": name, "ref": name}
            if _unsafe_member(name):
                row["reason"] = "unsafe zip member name: absolute or '..' path"
            if self.labels_from_folders:
                row["label"] = _folder_label(name)
            rows.append(row)
        return rows

    def fetch(self, refs: list[Any]) -> Iterator[bytes | str]:
        with self._open() as archive:
            for name in refs:
                yield self._read(archive, name)

    def _read(self, archive: zipfile.ZipFile, name: str) -> bytes | str:
        """The member's bytes, or why not, in bounded memory even when the header lies.

        ``read(n)`` of a deflated or stored member inflates at most ``n`` bytes and stops at
        the declared size (the CRC is checked there), so with the declared size capped at
        ``max_bytes`` so is the memory. zipfile inflates bzip2 and LZMA members without such
        a bound (4 KB of bzip2 can hold gigabytes), so those are refused: images are
        stored or deflated in practice.
        """
        try:
            info = archive.getinfo(name)
            if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                return (f"unsupported zip compression: method {info.compress_type} "
                        "(only stored and deflated members are read)")
            if info.file_size > self.max_bytes:
                return (f"too large: zip member declares {info.file_size} bytes, "
                        f"over {self.max_bytes}")
            with archive.open(info) as member:
                return member.read(info.file_size)
        except Exception as exc:  # noqa: BLE001 - a damaged member of any kind is a reject
            return f"unreadable zip member: {type(exc).__name__}: {exc}"


def _hidden_member(name: str) -> bool:
    """Dot-files and macOS resource forks; ``..`` is no hidden name (it is quarantined)."""
    return any(part.startswith((".", "__MACOSX")) and part != ".." for part in name.split("/"))


def _unsafe_member(name: str) -> bool:
    """An absolute or drive path, or one with a ``..`` part: never a name to trust."""
    parts = name.replace("\\", "/").split("/")
    drive = name[:1].isalpha() and name[1:2] == ":"
    return name.startswith(("/", "\\")) or drive or ".." in parts


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

    def fetch(self, refs: list[Any]) -> Iterator[bytes | str]:
        return (png_bytes(self.images[int(i)]) for i in refs)


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
