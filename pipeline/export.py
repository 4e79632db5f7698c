"""``jobs/export.py``: a finished run's cluster members as image files, in their original bytes.

Output, under ``--output`` (local or ``s3://``)::

    <cluster>/<safe name>   the image exactly as stored in the input shard (never re-encoded)
    manifest.csv            cluster, id, file (relative to the output), distance[, label]

Two passes keep memory at O(selected ids + one row group); no cluster's bytes are ever held:

1. **Select** from the assignment files, reading only ``id, cluster, distance`` (plus
   ``label`` when present and ``outlier`` for ``--outliers``), batch by batch: every member
   of the chosen clusters, or per cluster the N smallest distances (one bounded max-heap per
   cluster, ties broken by id, so the choice is deterministic).
2. **Stream** the input shards that hold a selected row, row group by row group: the ``id``
   column first, the ``image`` column only for a row group with a hit; each hit is written
   atomically (:func:`pipeline.data.fs.write_bytes_atomic`) as soon as it is read.

Which input: both assigning jobs mirror their input, so ``assignments/<rel>.parquet`` holds
the rows of input shard ``<rel>.parquet``. For the run's own ``assignments/`` that input is
the run's ``data.input``; a ``jobs/assign.py`` output does not record its input
(``_assign.json`` holds only the run and model), so it needs ``input_uri`` (``--input``).

Names (:func:`safe_name`) are derived from the id alone: a cleaned stem (letters, digits,
``-`` and ``_``; at most :data:`NAME_BYTES` bytes in all), 8 hex digits of the id's SHA-1, and
the id's extension when it is a known image type, else one sniffed from the bytes. So no name
can leave its cluster folder, and the same id always gets the same file. A re-run skips files
that already exist with the same size and rewrites only the manifest.
"""

from __future__ import annotations

import csv
import hashlib
import heapq
import io
import json
import logging
import math
import os
import posixpath
import re
import unicodedata
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.assign import ASSIGNMENTS, IO_THREADS, _rel
from pipeline.assign_job import CLAIM
from pipeline.config import Config, ConfigError, S3Config, resolve
from pipeline.data import fs as fsx
from pipeline.data.fs import Location, StorageError
from pipeline.data.publish import is_complete
from pipeline.data.reader import InputError, Shards, check_schema, find_shards
from pipeline.outputs import DEMO_INPUT, RunPaths, load_run_config

log = logging.getLogger(__name__)

MANIFEST = "manifest.csv"
DEFAULT_NEAREST = 32  # per cluster: enough to judge a cluster by eye, small enough to browse
NAME_BYTES = 150  # bound on a file name in UTF-8 bytes (file systems allow 255, S3 keys 1024)
TAG_HEX = 8  # SHA-1 hex digits in a name; an id that clashes within its cluster gets all 40
KNOWN_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff")
MAX_EXT = max(len(e) for e in KNOWN_EXTENSIONS)  # room kept for the extension in a name
MAGIC = ((b"\x89PNG\r\n\x1a\n", ".png"), (b"\xff\xd8\xff", ".jpg"), (b"GIF87a", ".gif"),
         (b"GIF89a", ".gif"), (b"BM", ".bmp"), (b"II*\x00", ".tif"), (b"MM\x00*", ".tif"))
REQUIRED = ("id", "cluster", "distance")  # assignment columns every selection reads


# --------------------------------------------------------------------------------------------
# What to export.


@dataclass(frozen=True)
class Selection:
    """Which assignment rows to export."""

    clusters: frozenset[int] | None = None  # None = every cluster
    nearest: int | None = DEFAULT_NEAREST  # per cluster, smallest distances; None = all
    outliers: bool = False  # only rows with outlier == true (jobs/assign.py outputs)

    @staticmethod
    def of(clusters: str | None, nearest: int | None, every: bool,
           outliers: bool) -> Selection:
        """From the command line: ``--clusters 3,17``, ``--nearest N`` or ``--all``."""
        if nearest is not None and nearest < 1:
            raise ConfigError(f"--nearest {nearest}: must be at least 1")
        return Selection(parse_clusters(clusters) if clusters else None,
                         None if every else (nearest or DEFAULT_NEAREST), outliers)

    def check(self, k: int) -> None:
        """Refuse cluster ids the run does not have."""
        bad = sorted(c for c in self.clusters or () if c >= k)
        if bad:
            raise ConfigError(f"--clusters: {bad[0]} is not a cluster of this run "
                              f"(k={k}, ids 0..{k - 1})")

    def describe(self) -> str:
        which = ("all clusters" if self.clusters is None
                 else "clusters " + ",".join(map(str, sorted(self.clusters))))
        rows = "every member" if self.nearest is None else f"nearest {self.nearest}"
        return f"{rows} of {which}" + (", outliers only" if self.outliers else "")


def parse_clusters(text: str) -> frozenset[int]:
    """``"3,17"`` -> {3, 17}; ConfigError naming the flag otherwise."""
    try:
        ids = frozenset(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        ids = frozenset({-1})
    if not ids or min(ids) < 0:
        raise ConfigError(f"--clusters {text!r}: expected comma-separated cluster ids, "
                          "e.g. 3,17")
    return ids


@dataclass(frozen=True, slots=True)
class Pick:
    """One selected assignment row."""

    cluster: int
    distance: float
    image_id: str
    rel: str  # its assignment file (= its input shard) relative to the folder
    label: Any = None

    @property
    def rank(self) -> tuple[int, float, str, str]:
        """Manifest and tie-break order: cluster, distance, id."""
        return (self.cluster, self.distance, self.image_id, self.rel)


class _Farthest:
    """Heap entry ordered so the heap's root is the farthest pick (a bounded max-heap)."""

    __slots__ = ("pick",)

    def __init__(self, pick: Pick):
        self.pick = pick

    def __lt__(self, other: _Farthest) -> bool:
        return self.pick.rank > other.pick.rank


class Picker:
    """Selected rows per cluster: every one offered, or the ``nearest`` smallest distances
    (ties by id) in a heap of at most ``nearest`` entries per cluster."""

    def __init__(self, nearest: int | None):
        self.nearest = nearest
        self.chosen: dict[int, list[_Farthest]] = {}

    def cutoff(self, cluster: int) -> float:
        """Distance beyond which no row of ``cluster`` can be chosen any more."""
        heap = self.chosen.get(cluster, [])
        if self.nearest is None or len(heap) < self.nearest:
            return math.inf
        return heap[0].pick.distance

    def offer(self, pick: Pick) -> None:
        heap = self.chosen.setdefault(pick.cluster, [])
        entry = _Farthest(pick)
        if self.nearest is None:
            heap.append(entry)
        elif len(heap) < self.nearest:
            heapq.heappush(heap, entry)
        elif heap[0] < entry:  # the root is farther than this pick
            heapq.heapreplace(heap, entry)

    def picks(self) -> list[Pick]:
        return sorted((e.pick for heap in self.chosen.values() for e in heap),
                      key=lambda p: p.rank)


# --------------------------------------------------------------------------------------------
# Pass 1: select from the assignment files.


def select(folder: Location, sel: Selection) -> tuple[list[Pick], bool]:
    """The selected rows of every assignment file under ``folder``, in manifest order, and
    whether the files carry labels."""
    files = fsx.list_files(folder, (".parquet",))
    if not files:
        raise InputError(f"{folder.uri}: no assignment files (*.parquet)")
    picker, has_label = Picker(sel.nearest), False
    for item in files:
        rel = posixpath.relpath(item.path, folder.path)
        loc = folder.join(rel)
        names = _schema(loc).names
        _check_columns(names, loc.uri, sel)
        columns = [*REQUIRED, *(["label"] if "label" in names else []),
                   *(["outlier"] if sel.outliers else [])]
        for batch in _batches(loc, columns):
            _offer_batch(batch, rel, sel, picker)
        has_label = has_label or "label" in names
    return picker.picks(), has_label


def _schema(loc: Location) -> pa.Schema:
    try:
        return pq.read_schema(loc.path, filesystem=loc.fs)
    except (OSError, pa.ArrowInvalid) as exc:
        raise InputError(f"{loc.uri}: not a readable Parquet file ({exc})") from exc


def _batches(loc: Location, columns: list[str]) -> Iterator[pa.RecordBatch]:
    """The file's rows, a bounded batch at a time; read errors name the file."""
    try:
        with loc.fs.open_input_file(loc.path) as fh:
            yield from pq.ParquetFile(fh).iter_batches(columns=columns)
    except (OSError, pa.ArrowInvalid) as exc:
        raise InputError(f"{loc.uri}: cannot read ({exc})") from exc


def _check_columns(names: list[str], uri: str, sel: Selection) -> None:
    missing = [c for c in REQUIRED if c not in names]
    if missing:
        raise InputError(f"{uri}: not an assignment file (no column {missing[0]!r}; "
                         f"found {sorted(names)})")
    if sel.outliers and "outlier" not in names:
        raise InputError(f"{uri}: no 'outlier' column, so --outliers cannot apply (outliers "
                         "are flagged by jobs/assign.py, not in a run's own assignments)")


def _offer_batch(batch: pa.RecordBatch, rel: str, sel: Selection, picker: Picker) -> None:
    """Filter one batch by cluster and outlier flag, drop rows beyond the clusters' current
    cutoffs (vectorised), and offer the rest to ``picker``."""
    mask = pa.array(np.ones(batch.num_rows, bool))
    if sel.clusters is not None:
        value_set = pa.array(sorted(sel.clusters), batch.schema.field("cluster").type)
        mask = pc.and_(mask, pc.is_in(batch.column("cluster"), value_set=value_set))
    if sel.outliers:
        mask = pc.and_(mask, pc.fill_null(batch.column("outlier"), False))
    rows = batch.filter(mask)
    clusters = rows.column("cluster").to_numpy(zero_copy_only=False).astype(np.int64)
    distance = rows.column("distance").to_numpy(zero_copy_only=False).astype(np.float64)
    if not len(clusters):
        return
    uniq, inverse = np.unique(clusters, return_inverse=True)
    cutoffs = np.array([picker.cutoff(int(c)) for c in uniq])[inverse]
    keep = np.flatnonzero(distance <= cutoffs)
    ids = rows.column("id").take(pa.array(keep)).to_pylist()
    labels = (rows.column("label").take(pa.array(keep)).to_pylist()
              if "label" in rows.schema.names else [None] * len(keep))
    for j, image_id, label in zip(keep, ids, labels, strict=True):
        picker.offer(Pick(int(clusters[j]), float(distance[j]), str(image_id), rel, label))


# --------------------------------------------------------------------------------------------
# Safe, unique, deterministic file names.


def safe_name(image_id: str, data: bytes, tag_hex: int = TAG_HEX) -> str:
    """``<clean stem>-<sha1(id)[:tag_hex]><ext>``: one path component, printable, at most
    :data:`NAME_BYTES` UTF-8 bytes, never starting with a dot or a dash.

    The stem keeps the id's letters and digits (any script, NFC), ``-`` and ``_``; every
    other run of characters (``/``, ``\\``, dots, spaces, controls, markup) becomes one
    ``_``. The extension is the id's own when it is in :data:`KNOWN_EXTENSIONS`, else it is
    sniffed from the image's magic bytes (``.bin`` when unknown).
    """
    return name_base(image_id, tag_hex) + (_id_extension(image_id) or sniff_extension(data))


def name_base(image_id: str, tag_hex: int = TAG_HEX, salt: str = "") -> str:
    """The name without its extension (what must be unique within a cluster); the tag is
    the SHA-1 of ``salt + image_id``."""
    ext = _id_extension(image_id)
    stem = _clean(image_id[: -len(ext)] if ext else image_id)
    digest = hashlib.sha1((salt + image_id).encode("utf-8", "surrogatepass")).hexdigest()
    tag = digest[:tag_hex]
    room = NAME_BYTES - len(tag) - 1 - MAX_EXT
    stem = stem.encode()[:room].decode("utf-8", "ignore").rstrip("_-") or "image"
    return f"{stem}-{tag}"


def _clean(text: str) -> str:
    text = unicodedata.normalize("NFC", text)
    kept = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in text)
    return re.sub(r"_+", "_", kept).strip("_-")


def _id_extension(image_id: str) -> str | None:
    last = re.split(r"[/\\]", image_id)[-1]
    ext = posixpath.splitext(last)[1].lower()
    return ext if ext in KNOWN_EXTENSIONS else None


def sniff_extension(data: bytes) -> str:
    """The image type from its first bytes: ``.png``, ``.jpg``, ... or ``.bin``."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    return next((ext for magic, ext in MAGIC if data.startswith(magic)), ".bin")


def base_names(picks: list[Pick]) -> dict[tuple[int, str, str], str]:
    """(cluster, rel, id) -> name base, unique within each cluster even on a case-insensitive
    file system: a pick whose short name is taken (a duplicate id in another shard, or a
    SHA-1 prefix clash) gets the full SHA-1 of its shard and id. Deterministic for a given
    selection, as picks come in manifest order."""
    names: dict[tuple[int, str, str], str] = {}
    taken: set[tuple[int, str]] = set()
    for p in picks:
        base = name_base(p.image_id)
        if (p.cluster, base.casefold()) in taken:
            base = name_base(p.image_id, 40, salt=f"{p.rel}\0")
        taken.add((p.cluster, base.casefold()))
        names[(p.cluster, p.rel, p.image_id)] = base
    return names


# --------------------------------------------------------------------------------------------
# Pass 2: stream the input shards and write the selected images.


@dataclass
class Written:
    """Outcome of pass 2: manifest rows and counts."""

    rows: list[tuple[Pick, str]] = field(default_factory=list)  # (pick, file under out)
    exported: int = 0
    present: int = 0
    missing: list[Pick] = field(default_factory=list)  # selected but absent from the input


@dataclass(frozen=True)
class Target:
    """Where the images go: the output root, the names, and what is there already."""

    out: Location
    names: dict[tuple[int, str, str], str]
    existing: dict[str, int]  # file relative to out -> size

    def write(self, pick: Pick, data: bytes) -> tuple[Pick, str, bool]:
        """Write one image unless the same size is there; (pick, file, written)."""
        name = self.names[(pick.cluster, pick.rel, pick.image_id)]
        name += _id_extension(pick.image_id) or sniff_extension(data)
        file = f"{pick.cluster}/{name}"
        if self.existing.get(file) == len(data):
            return pick, file, False
        fsx.write_bytes_atomic(self.out.join(str(pick.cluster), name), data)
        return pick, file, True


def export_picks(picks: list[Pick], shards: Shards, target: Target) -> Written:
    """Stream the shards holding selected rows and write each selected image once found."""
    by_rel: dict[str, dict[str, list[Pick]]] = {}
    for p in picks:
        by_rel.setdefault(p.rel, {}).setdefault(p.image_id, []).append(p)
    sources = {_rel(shards, path): path for path in shards.files}
    for rel in sorted(by_rel):
        if rel not in sources:
            raise InputError(f"{_shard_uri(shards, rel)}: no such input shard, but the "
                             f"assignments have {rel}; is the input the one these "
                             "assignments were made from? (--input)")
    written = Written()
    with ThreadPoolExecutor(IO_THREADS) as pool:
        for rel in sorted(by_rel):
            loc = Location(shards.location.fs, sources[rel], _shard_uri(shards, rel))
            _export_shard(loc, by_rel[rel], target, pool, written)
    return written


def _shard_uri(shards: Shards, rel: str) -> str:
    root = shards.location
    single = len(shards.files) == 1 and shards.files[0] == root.path
    return root.uri if single else f"{root.uri.rstrip('/')}/{rel}"


def _export_shard(loc: Location, wanted: dict[str, list[Pick]], target: Target,
                  pool: ThreadPoolExecutor, written: Written) -> None:
    """Write the shard's selected images, a row group's hits at a time (in parallel, as S3
    PUTs are latency-bound); stop reading once all of them are found."""
    for hits in _hits(loc, set(wanted)):
        jobs = [(p, data) for image_id, data in hits if data is not None
                for p in wanted.pop(image_id, [])]
        for pick, file, wrote in pool.map(lambda job: target.write(*job), jobs):
            written.rows.append((pick, file))
            written.exported += wrote
            written.present += not wrote
        if not wanted:
            return
    written.missing.extend(p for picks in wanted.values() for p in picks)


def _hits(loc: Location, wanted: set[str]) -> Iterator[list[tuple[str, bytes | None]]]:
    """Per row group of the shard: the (id, image bytes) rows whose id is wanted. Only the
    ``id`` column is read for row groups without a hit."""
    try:
        with loc.fs.open_input_file(loc.path) as fh:
            shard = pq.ParquetFile(fh)
            check_schema(shard.schema_arrow, loc.uri)
            value_set = pa.array(sorted(wanted), shard.schema_arrow.field("id").type)
            for i in range(shard.num_row_groups):
                ids = shard.read_row_group(i, columns=["id"]).column("id").combine_chunks()
                hit = pc.indices_nonzero(pc.is_in(ids, value_set=value_set))
                if len(hit):
                    images = shard.read_row_group(i, columns=["image"]).column("image")
                    yield list(zip(ids.take(hit).to_pylist(),
                                   images.take(hit).to_pylist(), strict=True))
    except (OSError, pa.ArrowInvalid) as exc:
        raise InputError(f"{loc.uri}: cannot read input shard ({exc})") from exc


def existing_files(out: Location) -> dict[str, int]:
    """Every file under ``out`` (relative path -> size); {} when it does not exist yet."""
    selector = pafs.FileSelector(out.path, recursive=True, allow_not_found=True)
    try:
        infos = out.fs.get_file_info(selector)
    except OSError as exc:
        raise StorageError(f"cannot list {out.uri}: {exc}") from exc
    root = out.path.rstrip("/")
    return {posixpath.relpath(i.path, root): int(i.size or 0) for i in infos
            if i.type == pafs.FileType.File}


def manifest_csv(rows: list[tuple[Pick, str]], has_label: bool) -> bytes:
    """``cluster,id,file,distance[,label]``, in cluster then distance order."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["cluster", "id", "file", "distance"] + (["label"] if has_label else []))
    for pick, file in sorted(rows, key=lambda r: r[0].rank):
        label = [pick.label] if has_label else []
        writer.writerow([pick.cluster, pick.image_id, file, f"{pick.distance:.9g}", *label])
    return buf.getvalue().encode()


# --------------------------------------------------------------------------------------------
# The job.


@dataclass
class ExportResult:
    output: str
    selection: str
    clusters: int  # clusters with at least one exported image
    exported: int  # written now
    present: int  # already there with the same size
    missing: int  # selected but not found in the input shards
    manifest: str

    def rows(self) -> list[tuple[str, str]]:
        """The summary table (:func:`pipeline.summary.print_table`)."""
        rows = [("output", self.output), ("selection", self.selection),
                ("clusters", f"{self.clusters:,}"),
                ("images", f"{self.exported:,} exported, {self.present:,} already present")]
        if self.missing:
            rows.append(("missing", f"{self.missing:,} selected ids not in the input"))
        return rows + [("manifest", self.manifest)]


def export_job(run_uri: str, assignments_uri: str, output_uri: str, selection: Selection,
               input_uri: str | None = None,
               overrides: list[str] | None = None) -> ExportResult:
    """Export the selected members of a finished run's clusters to ``output_uri``."""
    s3 = resolve(Config, overrides=overrides).s3  # where this job runs decides the endpoint
    paths = RunPaths(fsx.locate(run_uri, s3))
    cfg = load_run_config(paths, overrides)
    selection.check(cfg.cluster.k)
    folder = assignments_folder(assignments_uri, s3)
    shards = find_shards(input_for(folder, paths, cfg, input_uri), s3)
    picks, has_label = select(folder, selection)
    out = fsx.locate(output_uri, s3)
    target = Target(out, base_names(picks), existing_files(out))
    written = export_picks(picks, shards, target)
    _report_leftovers(written, target)
    manifest = out.join(MANIFEST)
    fsx.write_bytes_atomic(manifest, manifest_csv(written.rows, has_label))
    log.info("export: %d exported, %d already present, into %s", written.exported,
             written.present, out.uri)
    return ExportResult(out.uri, selection.describe(),
                        len({p.cluster for p, _ in written.rows}), written.exported,
                        written.present, len(written.missing), manifest.uri)


def assignments_folder(uri: str, s3: S3Config | None) -> Location:
    """The folder holding the assignment files: ``uri/assignments`` when it exists, else
    ``uri`` itself."""
    loc = fsx.locate(uri, s3)
    child = loc.join(ASSIGNMENTS)
    if fsx.info(child).type == pafs.FileType.Directory:
        return child
    kind = fsx.info(loc).type
    if kind != pafs.FileType.Directory:
        what = "is a file" if kind == pafs.FileType.File else "no such directory or prefix"
        raise InputError(f"{uri}: {what}; expected a folder of assignment Parquet files")
    return loc


def input_for(folder: Location, paths: RunPaths, cfg: Config, input_uri: str | None) -> str:
    """The input shards the assignments in ``folder`` were made from (module docstring)."""
    from_assign_job = _check_claim(folder, paths)
    if input_uri:
        return input_uri
    if folder.is_s3 == paths.root.is_s3 and folder.path == paths.assignments.path:
        if not is_complete(folder):
            log.warning("%s is incomplete (no _SUCCESS); exporting what is there", folder.uri)
        return cfg.data.input or DEMO_INPUT
    what = ("a jobs/assign.py output, whose _assign.json does not record its input"
            if from_assign_job else f"not the assignments of the run {paths.root.uri}")
    raise InputError(f"{folder.uri}: {what}; pass --input with the shards it was assigned from")


def _check_claim(folder: Location, paths: RunPaths) -> bool:
    """Whether ``folder`` is a jobs/assign.py output (its parent has ``_assign.json``); warns
    when that output was made with another run than ``paths``."""
    parent_path = posixpath.dirname(folder.path.rstrip("/"))
    if not parent_path:  # an S3 bucket's root has no parent
        return False
    claim = Location(folder.fs, parent_path, folder.uri.rstrip("/").rsplit("/", 1)[0]).join(CLAIM)
    if not fsx.exists(claim):
        return False
    owner = str(json.loads(fsx.read_bytes(claim)).get("run", ""))
    where = owner.rstrip("/")[len("s3://"):] if fsx.is_s3(owner) else os.path.abspath(owner)
    if owner and (fsx.is_s3(owner), where) != (paths.root.is_s3, paths.root.path):
        log.warning("%s says these assignments were made with run %s, not %s", claim.uri,
                    owner, paths.root.uri)
    return True


def _report_leftovers(written: Written, target: Target) -> None:
    if written.missing:
        first = written.missing[0]
        log.warning("%d selected ids were not found in their input shards (first: %r in %s); "
                    "they are not in the manifest", len(written.missing), first.image_id,
                    first.rel)
    current = {file for _, file in written.rows} | {MANIFEST}
    stale = [f for f in target.existing if f not in current and not fsx._hidden(f)]
    if stale:
        log.info("%d files under %s are not part of this export (an earlier selection); "
                 "%s lists this one", len(stale), target.out.uri, MANIFEST)
