"""Hostile inputs for the fuzz tests (``tests/fuzz``) and the fuzz benchmark (``bench/fuzz.py``).

Each target pairs a hypothesis strategy, which draws one case, with a runner, which feeds the
case to the pipeline in this process (no Ray) and names what became of it (:class:`Outcome`).
The rule the tests enforce and the benchmark counts: **never a traceback**. An input ends
decoded or stored, quarantined with a reason, refused in one line (``ConfigError``,
``SourceError``), or (report) rendered with every string escaped.

* ``decoder``: real images made with Pillow in every accepted format and odd mode (16-bit,
  LA, P with transparency, CMYK, 1-bit, animated), then truncated, bit-flipped, overwritten
  in the header, spliced, or given forged dimensions up to 2^32 - 1; decoded as the reader
  does (:func:`decode_batch`, next to a good row, which must survive).
* ``sources``: zip archives and local folders with hostile names (``..``, absolute,
  non-UTF-8, over 255 bytes), bombs, damaged or encrypted members, symlinks out of the tree
  and loops, FIFOs, empty files and folders named like images, written by the ingest's own
  per-shard writer; every item must end stored or quarantined, and nothing outside the tree
  may be read.
* ``config``: random YAML documents (valid, broken, non-UTF-8, alias bombs, deep nesting)
  and ``--set`` strings through :func:`resolve`; the only failure allowed is a one-line
  ``ConfigError``.
* ``report``: ids, labels, metrics, config text and the run's path carrying HTML and script,
  through :func:`render` and :func:`write_report`; the page is parsed, and its elements and
  attributes must be those of the same report made from harmless strings.

Nothing here imports Ray.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import struct
import tempfile
import traceback
import warnings
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from html.parser import HTMLParser
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import yaml
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from PIL import Image

from pipeline.config import Config, ConfigError, IngestConfig, S3Config, resolve
from pipeline.data import fs as fsx
from pipeline.data.decode import DecodeSpec, decode_batch
from pipeline.data.ingest import REJECTS, WriteShard, _plan
from pipeline.data.quarantine import read_rejects
from pipeline.data.sources import FileTreeSource, Source, ZipSource
from pipeline.dotted import flat
from pipeline.errors import SourceError

# --------------------------------------------------------------------------------------------
# Outcomes.


@dataclass(frozen=True)
class Outcome:
    """What became of one input.

    ``kind``: ``decoded`` (or stored), ``quarantined``, ``resolved``, ``config_error``,
    ``source_error``, ``escaped`` (a report page that passed every check), ``traceback`` (an
    exception escaped) or ``violation`` (no exception, but a rule broken: a file outside the
    tree read, a row lost, a multi-line error, an injected element). ``detail``: the reason's
    prefix when quarantined, what went wrong for the last two.
    """

    kind: str
    detail: str = ""

    @property
    def bad(self) -> bool:
        return self.kind in ("traceback", "violation")


def quarantined(reason: str) -> Outcome:
    """The outcome of a reject: its reason up to the first colon (``too large``, ...)."""
    return Outcome("quarantined", reason.split(":", 1)[0].strip())


def guarded(run: Callable[[], list[Outcome]]) -> list[Outcome]:
    """``run()``, with any exception that escapes it as one ``traceback`` outcome."""
    try:
        return run()
    except Exception as exc:  # noqa: BLE001 - the very thing we count
        return [Outcome("traceback", "".join(traceback.format_exception(exc))[-4000:])]


def one_line_error(kind: str, exc: Exception) -> Outcome:
    """A user error is fine when it is one non-empty line of bounded length."""
    text = str(exc)
    if not text or "\n" in text or "\r" in text or len(text) > 1000:
        return Outcome("violation", f"{type(exc).__name__} is not one short line: {text[:300]!r}")
    return Outcome(kind)


# --------------------------------------------------------------------------------------------
# Decoder: real images, then damaged.

FORMAT_MODES: dict[str, tuple[str, ...]] = {
    "JPEG": ("RGB", "L", "CMYK"),
    "PNG": ("RGB", "L", "LA", "RGBA", "P", "P+trns", "1", "I;16"),
    "WEBP": ("RGB", "RGBA"),
    "GIF": ("P", "L"),
    "TIFF": ("RGB", "L", "CMYK", "1", "I;16", "RGBA", "LA"),
    "BMP": ("RGB", "L", "P", "1"),
}
ANIMATED = ("GIF", "PNG", "WEBP", "TIFF")
# Forged widths/heights: zero, a pixel, just under FUZZ_MAX_PIXELS when square, 16-bit
# limits, and the 32-bit ones that overflow signed arithmetic.
HUGE = (0, 1, 2047, 60000, 65535, 2**31 - 1, 2**31, 2**32 - 1)
FUZZ_MAX_PIXELS = 2**22  # lower than the default, so a forged 8000x8000 JPEG is not decoded


@dataclass(frozen=True)
class ImageSpec:
    """A real image: format, Pillow mode (``P+trns``: palette with a transparent index),
    size and frames (animated when > 1), pixels from ``seed``."""

    fmt: str
    mode: str
    width: int
    height: int
    frames: int = 1
    seed: int = 0


@dataclass(frozen=True)
class Mutation:
    """One damage: ``none``, ``truncate`` (at ``at``), ``flip`` (bits at ``edits``: (offset,
    bit)), ``header`` (bytes in the first 64: (offset, value)), ``splice`` (``extra`` inserted
    at ``at``) or ``forge`` (declared ``size`` written into the format's header). Offsets are
    taken modulo the length."""

    kind: str = "none"
    at: int = 0
    edits: tuple[tuple[int, int], ...] = ()
    extra: bytes = b""
    size: tuple[int, int] = (0, 0)


@dataclass(frozen=True)
class ImageCase:
    """Damaged bytes of a real image, decoded to ``channels`` x ``size`` x ``size``."""

    image: ImageSpec
    mutation: Mutation
    channels: int
    size: int
    data: bytes = field(repr=False, default=b"")


def encode(spec: ImageSpec) -> bytes:
    """The encoded bytes of ``spec``, by Pillow."""
    frames = [_frame(spec, i) for i in range(spec.frames)]
    options: dict[str, Any] = {"transparency": 0} if spec.mode == "P+trns" else {}
    if spec.frames > 1:
        options.update(save_all=True, append_images=frames[1:])
    buf = io.BytesIO()
    frames[0].save(buf, format=spec.fmt, **options)
    return buf.getvalue()


def _frame(spec: ImageSpec, index: int) -> Image.Image:
    rng = np.random.default_rng(spec.seed + index)
    shape = (spec.height, spec.width)
    if spec.mode == "I;16":
        return Image.fromarray(rng.integers(0, 2**16, shape, dtype=np.uint16))
    rgb = Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8))
    return rgb.convert("P" if spec.mode == "P+trns" else spec.mode)


def mutate(data: bytes, fmt: str, m: Mutation) -> bytes:
    """``data`` with the damage ``m`` done to it."""
    out = bytearray(data)
    n = max(1, len(out))
    if m.kind == "truncate":
        del out[m.at % n:]
    elif m.kind == "flip":
        for offset, bit in m.edits:
            out[offset % n] ^= 1 << (bit % 8)
    elif m.kind == "header":
        for offset, value in m.edits:
            out[offset % min(n, 64)] = value % 256
    elif m.kind == "splice":
        out[m.at % n:m.at % n] = m.extra
    elif m.kind == "forge":
        out = bytearray(FORGERS[fmt](bytes(out), *m.size))
    return bytes(out)


def _forge_png(data: bytes, w: int, h: int) -> bytes:
    """IHDR width and height, with a correct CRC so the parser believes them."""
    out = bytearray(data)
    struct.pack_into(">II", out, 16, w & 0xFFFFFFFF, h & 0xFFFFFFFF)
    struct.pack_into(">I", out, 29, zlib.crc32(bytes(out[12:29])))
    return bytes(out)


def _forge_jpeg(data: bytes, w: int, h: int) -> bytes:
    """The first SOF segment's height and width (16 bits each)."""
    out = bytearray(data)
    for marker in (b"\xff\xc0", b"\xff\xc1", b"\xff\xc2"):
        i = data.find(marker)
        if i >= 0:
            struct.pack_into(">HH", out, i + 5, h & 0xFFFF, w & 0xFFFF)
            break
    return bytes(out)


def _forge_gif(data: bytes, w: int, h: int) -> bytes:
    """The logical screen size (16 bits each)."""
    out = bytearray(data)
    struct.pack_into("<HH", out, 6, w & 0xFFFF, h & 0xFFFF)
    return bytes(out)


def _forge_webp(data: bytes, w: int, h: int) -> bytes:
    """The VP8X canvas (24 bits) or the VP8 frame size (14 bits)."""
    out = bytearray(data)
    if (i := data.find(b"VP8X")) >= 0:
        out[i + 12:i + 18] = ((w - 1) & 0xFFFFFF).to_bytes(3, "little") + \
            ((h - 1) & 0xFFFFFF).to_bytes(3, "little")
    elif (i := data.find(b"\x9d\x01\x2a")) >= 0:
        struct.pack_into("<HH", out, i + 3, w & 0x3FFF, h & 0x3FFF)
    return bytes(out)


def _forge_tiff(data: bytes, w: int, h: int) -> bytes:
    """ImageWidth (256) and ImageLength (257) of the first IFD, as LONGs."""
    out = bytearray(data)
    (ifd,) = struct.unpack_from("<I", data, 4)
    (count,) = struct.unpack_from("<H", data, ifd)
    for entry in range(ifd + 2, ifd + 2 + 12 * count, 12):
        (tag,) = struct.unpack_from("<H", data, entry)
        if tag in (256, 257):
            value = w if tag == 256 else h
            struct.pack_into("<HHII", out, entry, tag, 4, 1, value & 0xFFFFFFFF)
    return bytes(out)


def _forge_bmp(data: bytes, w: int, h: int) -> bytes:
    """The info header's width and height (signed 32 bits: 2^31 is a top-down -2^31)."""
    out = bytearray(data)
    struct.pack_into("<II", out, 18, w & 0xFFFFFFFF, h & 0xFFFFFFFF)
    return bytes(out)


FORGERS: dict[str, Callable[[bytes, int, int], bytes]] = {
    "PNG": _forge_png, "JPEG": _forge_jpeg, "GIF": _forge_gif, "WEBP": _forge_webp,
    "TIFF": _forge_tiff, "BMP": _forge_bmp}


@st.composite
def image_specs(draw: st.DrawFn) -> ImageSpec:
    """Any format in any of its modes, 1-24 px a side, animated sometimes."""
    fmt = draw(st.sampled_from(sorted(FORMAT_MODES)))
    mode = draw(st.sampled_from(FORMAT_MODES[fmt]))
    animated = fmt in ANIMATED and mode != "I;16"
    frames = draw(st.integers(1, 3)) if animated else 1
    return ImageSpec(fmt, mode, draw(st.integers(1, 24)), draw(st.integers(1, 24)), frames,
                     draw(st.integers(0, 2**16)))


offsets = st.integers(0, 2**20)
mutations = st.one_of(
    st.just(Mutation()),
    st.builds(Mutation, kind=st.just("truncate"), at=offsets),
    st.builds(Mutation, kind=st.just("flip"),
              edits=st.lists(st.tuples(offsets, st.integers(0, 7)), min_size=1, max_size=8)
              .map(tuple)),
    st.builds(Mutation, kind=st.just("header"),
              edits=st.lists(st.tuples(st.integers(0, 63), st.integers(0, 255)), min_size=1,
                             max_size=4).map(tuple)),
    st.builds(Mutation, kind=st.just("splice"), at=offsets, extra=st.binary(min_size=1, max_size=32)),
    st.builds(Mutation, kind=st.just("forge"),
              size=st.tuples(st.sampled_from(HUGE), st.sampled_from(HUGE))),
)


@st.composite
def image_cases(draw: st.DrawFn) -> ImageCase:
    """A real image, damaged once, and the decode it goes through."""
    spec, mutation = draw(image_specs()), draw(mutations)
    data = mutate(encode(spec), spec.fmt, mutation)
    return ImageCase(spec, mutation, draw(st.sampled_from((1, 3))),
                     draw(st.sampled_from((8, 16))), data)


def companion(size: int) -> bytes:
    """A good greyscale PNG of exactly ``size`` x ``size`` (decoded without a resize)."""
    return encode(ImageSpec("PNG", "L", size, size))


def decode_outcomes(case: ImageCase) -> list[Outcome]:
    """Decode the case next to a good row, as the reader's UDF decodes a block."""
    return guarded(lambda: _decode(case))


def _decode(case: ImageCase) -> list[Outcome]:
    spec = DecodeSpec(channels=case.channels, size=case.size, max_pixels=FUZZ_MAX_PIXELS)
    batch = decode_batch([case.data, companion(case.size)], spec)
    reasons = dict(batch.rejects)
    expected = (len(batch.ok), case.channels, case.size, case.size)
    if any(r.startswith("decode failed:") for r in reasons.values()):
        return [Outcome("traceback", f"caught by decode_batch's catch-all: {reasons}")]
    if batch.ok[-1:] != [1] or tuple(batch.pixels.shape) != expected \
            or batch.pixels.dtype != torch.uint8:
        return [Outcome("violation", f"bad batch: ok={batch.ok} {batch.pixels.dtype} "
                                     f"{tuple(batch.pixels.shape)}")]
    return [Outcome("decoded") if 0 in batch.ok else quarantined(reasons[0])]


# --------------------------------------------------------------------------------------------
# Sources: written by the ingest's per-shard writer, in this process.

SECRET = encode(ImageSpec("PNG", "RGB", 5, 5, seed=12345))  # lives outside every tree


def ingest_outcomes(source: Source, workdir: str, forbidden: bytes = SECRET) -> list[Outcome]:
    """List ``source`` and write all its items as one shard with :class:`WriteShard`; one
    outcome per item (stored, or quarantined with its reason). Lost rows, stored bytes equal
    to ``forbidden`` (read from outside the tree) and unsafe stored ids are violations."""
    try:
        items = source.items()
    except SourceError as exc:
        return [one_line_error("source_error", exc)]
    staging = fsx.locate(os.path.join(workdir, "out"))
    fsx.make_dirs(staging)
    labelled = "label" in items[0]
    fields = [("id", pa.string()), ("image", pa.binary())] + ([("label", pa.string())]
                                                             if labelled else [])
    writer = WriteShard(source, staging, pa.schema(fields), IngestConfig(row_group_size=4))
    writer(pa.Table.from_pylist([_plan(0, items, labelled)]))
    return _accounted(items, staging, forbidden)


def _accounted(items: list[dict[str, Any]], staging: fsx.Location,
               forbidden: bytes) -> list[Outcome]:
    shard = staging.join("part-00000.parquet").path
    stored = pq.read_table(shard).to_pylist() if os.path.exists(shard) else []
    images = {row["id"]: row["image"] for row in stored}
    reasons = {r["id"]: r["reason"] for r in read_rejects(staging.join(REJECTS)).to_pylist()}
    out = []
    for item in items:
        if item["id"] in images:
            out.append(_stored(item["id"], images[item["id"]], forbidden))
        elif reasons.get(item["id"]):
            out.append(quarantined(reasons[item["id"]]))
        else:
            out.append(Outcome("violation", f"row lost: {item['id']!r}"))
    return out


def _stored(image_id: str, data: bytes, forbidden: bytes) -> Outcome:
    if data == forbidden:
        return Outcome("violation", f"read from outside the source: {image_id!r}")
    if image_id.startswith("/") or ".." in image_id.split("/"):
        return Outcome("violation", f"unsafe id stored: {image_id!r}")
    return Outcome("decoded")


# Zip archives -------------------------------------------------------------------------------

HOSTILE_NAMES = (
    "../evil.png", "../../etc/evil.png", "/abs/evil.png", "cats/../../evil.png", "C:/evil.png",
    "C:\\evil.png", "\\\\server\\evil.png", "cats/./ok.png", "cats//double.png",
    "noparent.png", "cats/.hidden.png", "__MACOSX/cats/x.png", "cats/x.png/", "dir.jpg/",
    "cats/<script>alert(1)</script>.png", "cats/\"><img onerror=x>.png", "cats/\u202eevil.png",
)
MEMBER_KINDS = ("image", "image", "image", "empty", "random", "bomb", "liar", "encrypted",
                "bzip2", "lzma", "method99")
NOT_UTF8_MARK = "\x01\x02\x03\x04"  # replaced by invalid UTF-8 in the written name


@dataclass(frozen=True)
class Member:
    """One zip entry: its name and what is in it (:data:`MEMBER_KINDS`, or ``not_utf8``: an
    image whose name is flagged UTF-8 and is not, which makes the whole archive unreadable)."""

    name: str
    kind: str
    seed: int = 0


@dataclass(frozen=True)
class ZipCase:
    """A zip archive of ``members``, maybe damaged as a whole, ingested with or without
    labels from folders."""

    members: tuple[Member, ...]
    damage: Mutation = Mutation()
    labels: bool = False


name_text = st.text(st.characters(codec="utf-8", exclude_characters="/\\\x00"),
                    min_size=1, max_size=12)
member_names = st.one_of(
    st.builds(lambda d, n, e: f"{d}/{n}{e}", st.sampled_from(("cats", "dogs", "ünï", "x.png")),
              name_text, st.sampled_from((".png", ".jpg", ".PNG", ".gif", ".webp", ".tiff"))),
    st.sampled_from(HOSTILE_NAMES),
    st.integers(130, 300).map(lambda n: "cats/" + "é" * n + ".png"),  # > 255 bytes
)


@st.composite
def zip_cases(draw: st.DrawFn) -> ZipCase:
    """2-7 members of mixed kinds; now and then (so that most archives open) a name that is
    not UTF-8, a damage to the whole archive, labels from folders."""
    members = draw(st.lists(st.builds(Member, member_names, st.sampled_from(MEMBER_KINDS),
                                      st.integers(0, 2**16)), min_size=1, max_size=6))
    members.append(Member("cats/good.png", "image"))
    if draw(st.integers(0, 9)) == 0:
        members.append(Member("cats/bad", "not_utf8"))
    damage = draw(st.one_of(st.just(Mutation()), st.just(Mutation()),
                            mutations.filter(lambda m: m.kind != "forge")))
    return ZipCase(tuple(members), damage, draw(st.integers(0, 3)) == 0)


def build_zip(case: ZipCase) -> bytes:
    """The archive's bytes: members written by zipfile, then headers forged per kind."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as archive, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate names are one of the cases
        for member in case.members:
            _write_member(archive, member)
    data = bytearray(buf.getvalue())
    for member, where in zip(case.members, _headers(bytes(data)), strict=True):
        _forge_member(data, member, where)
    return mutate(bytes(data), "ZIP", case.damage)


def _write_member(archive: zipfile.ZipFile, member: Member) -> None:
    name = member.name + NOT_UTF8_MARK if member.kind == "not_utf8" else member.name
    info = zipfile.ZipInfo(name)
    info.compress_type = {"bzip2": zipfile.ZIP_BZIP2, "lzma": zipfile.ZIP_LZMA,
                          "image": zipfile.ZIP_STORED}.get(member.kind, zipfile.ZIP_DEFLATED)
    archive.writestr(info, _member_bytes(member))


def _member_bytes(member: Member) -> bytes:
    rng = np.random.default_rng(member.seed)
    if member.kind == "empty":
        return b""
    if member.kind == "random":
        return rng.bytes(int(rng.integers(1, 2000)))
    if member.kind == "liar":
        return bytes(2**21)  # 2 MB of zeros, declared as 1,000 bytes below
    return encode(ImageSpec("PNG", "RGB", 8, 8, seed=member.seed))


def _headers(data: bytes) -> list[tuple[int, int]]:
    """(local header offset, central directory entry offset) of each member, in order."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        infos, position = archive.infolist(), archive.start_dir
    out = []
    for info in infos:
        out.append((info.header_offset, position))
        name, extra, comment = struct.unpack_from("<HHH", data, position + 28)
        position += 46 + name + extra + comment
    return out


# (offset in the local header, offset in the central directory entry, struct format)
_FIELDS = {"flags": (6, 8, "<H"), "method": (8, 10, "<H"), "size": (22, 24, "<I")}


def _forge_member(data: bytearray, member: Member, where: tuple[int, int]) -> None:
    """Lie in both headers: a huge or small declared size, encryption, method 99, a name
    flagged UTF-8 that is not."""
    forged = {"bomb": ("size", 2**32 - 1), "liar": ("size", 1000), "method99": ("method", 99)}
    if member.kind in forged:
        _patch(data, where, *forged[member.kind])
    elif member.kind == "encrypted":
        _patch(data, where, "flags", 0x1)
    elif member.kind == "not_utf8":
        _patch(data, where, "flags", 0x800)
        for start in (where[0] + 30, where[1] + 46):
            i = data.index(NOT_UTF8_MARK.encode(), start)
            data[i:i + 4] = b"\xff\xfe\xfd\xfc"


def _patch(data: bytearray, where: tuple[int, int], name: str, value: int) -> None:
    local, central = where
    in_local, in_central, fmt = _FIELDS[name]
    struct.pack_into(fmt, data, local + in_local, value)
    struct.pack_into(fmt, data, central + in_central, value)


def zip_outcomes(case: ZipCase) -> list[Outcome]:
    """Ingest the archive of ``case`` (one outcome per listed member)."""
    def run() -> list[Outcome]:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "images.zip")
            with open(path, "wb") as fh:
                fh.write(build_zip(case))
            return ingest_outcomes(ZipSource(path, S3Config(), case.labels), tmp)
    return guarded(run)


# Local folders ------------------------------------------------------------------------------

ENTRY_KINDS = ("image", "image", "empty", "random", "folder", "link_out_file", "link_out_dir",
               "link_loop", "link_inside", "dangling", "fifo", "big", "hidden")
TREE_MAX_BYTES = 2**16  # the ``big`` kind is a sparse file just over it


@dataclass(frozen=True)
class TreeEntry:
    """A path under the root (folders, then a name; ``\\udcff`` is a non-UTF-8 byte) and
    what is there (:data:`ENTRY_KINDS`)."""

    parts: tuple[str, ...]
    kind: str
    seed: int = 0


@dataclass(frozen=True)
class TreeCase:
    """A local folder of ``entries`` (plus ``base/ok.png``), next to ``outside/``."""

    entries: tuple[TreeEntry, ...]
    labels: bool = False


tree_part = st.one_of(name_text.map(lambda s: s.strip(". ") or "x"),
                      st.sampled_from(("cats", "a\udcffb", "<b>x</b>", "é" * 60, "x.png")))
tree_names = st.builds(lambda stem, ext: stem + ext, tree_part,
                       st.sampled_from((".png", ".JPG", ".gif", ".tiff", "\udcfe.png")))


@st.composite
def tree_cases(draw: st.DrawFn) -> TreeCase:
    """1-6 entries, 0-2 folders deep."""
    entries = draw(st.lists(st.builds(
        TreeEntry, st.tuples(st.lists(tree_part, max_size=2), tree_names)
        .map(lambda t: (*t[0], t[1])), st.sampled_from(ENTRY_KINDS), st.integers(0, 2**16)),
        min_size=1, max_size=6))
    return TreeCase(tuple(entries), draw(st.integers(0, 3)) == 0)


def build_tree(case: TreeCase, tmp: str) -> str:
    """Make ``tmp/root`` (the source) and ``tmp/outside`` (which must never be read);
    entries that cannot be made (a name taken, a parent that is a file) are left out."""
    root, outside = os.path.join(tmp, "root"), os.path.join(tmp, "outside")
    os.makedirs(os.path.join(root, "base"))
    os.makedirs(os.path.join(outside, "more"))
    for path in (os.path.join(outside, "secret.png"), os.path.join(outside, "more", "s.png")):
        _write(path, SECRET)
    _write(os.path.join(root, "base", "ok.png"), encode(ImageSpec("PNG", "L", 6, 6)))
    for entry in case.entries:
        try:
            _make_entry(entry, root, outside)
        except (OSError, ValueError):
            continue
    return root


def _write(path: str, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)


def _make_entry(entry: TreeEntry, root: str, outside: str) -> None:
    path = os.path.join(root, *entry.parts)
    if entry.kind == "hidden":
        path = os.path.join(os.path.dirname(path), "." + os.path.basename(path))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if os.path.lexists(path):
        return  # never write through an earlier entry (it may be a FIFO or a link)
    links = {"link_out_file": os.path.join(outside, "secret.png"), "link_out_dir": outside,
             "link_loop": root, "link_inside": os.path.join(root, "base", "ok.png"),
             "dangling": os.path.join(outside, "nowhere.png")}
    if entry.kind in links:
        os.symlink(links[entry.kind], path)
    elif entry.kind == "folder":
        os.makedirs(os.path.join(path, "inner"))
        _write(os.path.join(path, "inner", "in.png"), encode(ImageSpec("PNG", "L", 4, 4)))
    elif entry.kind == "fifo":
        os.mkfifo(path)
    elif entry.kind == "big":
        _write(path, b"")
        os.truncate(path, TREE_MAX_BYTES + 1)
    else:
        _write(path, _member_bytes(Member("", entry.kind, entry.seed)))


def tree_outcomes(case: TreeCase) -> list[Outcome]:
    """Ingest the folder of ``case`` (one outcome per listed file)."""
    def run() -> list[Outcome]:
        with tempfile.TemporaryDirectory() as tmp:
            root = build_tree(case, tmp)
            source = FileTreeSource(root, S3Config(), case.labels, max_bytes=TREE_MAX_BYTES)
            return ingest_outcomes(source, tmp)
    return guarded(run)


def source_outcomes(case: ZipCase | TreeCase) -> list[Outcome]:
    """The ``sources`` target: a zip or a folder."""
    return zip_outcomes(case) if isinstance(case, ZipCase) else tree_outcomes(case)


# --------------------------------------------------------------------------------------------
# Config.

RUN_KEYS = sorted(flat(Config()))
INGEST_KEYS = sorted(flat(IngestConfig()))
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=6) | st.integers(), inner, max_size=3),
                      max_leaves=8)
dotted_keys = st.one_of(st.sampled_from(RUN_KEYS + INGEST_KEYS), st.text(max_size=16),
                        st.builds(lambda k, s: f"{k}.{s}", st.sampled_from(RUN_KEYS), name_text))
# Documents that random generation would hardly ever write: alias bombs, nesting past the
# parser's recursion limit, Python tags, several documents, a BOM, tabs, impossible dates,
# merge keys and aliases inside their own anchor.
_LAUGHS = "[" + ", ".join(["&a [l,l,l,l,l,l,l,l,l]"] + [
    f"&{c} [" + ",".join([f"*{p}"] * 9) + "]" for p, c in zip("abcdefg", "bcdefgh", strict=True)
]) + "]"
TEMPLATES = (
    f"data:\n  input: {_LAUGHS}\n", f"cluster:\n  k: {_LAUGHS}\n", "train: {lr: " + "[" * 500,
    "[" * 500 + "]" * 500, "!!python/object/apply:os.system ['true']\n", "--- 1\n--- 2\n",
    "\ufefftrain:\n  lr: 0.1\n", "train:\n\tlr: 1\n", "train: {seed: 2021-02-30}\n",
    "%YAML 9.9\n---\na: 1\n", "? [a, b]\n: 1\n", "<<: {train: 1}\n", "train: &t {lr: *t}\n",
)


@dataclass(frozen=True)
class ConfigCase:
    """``resolve(cls, document file, overrides)``; ``document`` None means no file."""

    ingest: bool
    document: bytes | None
    overrides: tuple[str, ...]


def _nested_doc(pairs: list[tuple[str, Any]]) -> dict[Any, Any]:
    doc: dict[Any, Any] = {}
    for key, value in pairs:
        *parents, leaf = key.split(".")
        node = doc
        for part in parents:
            child = node.setdefault(part, {})
            node = child if isinstance(child, dict) else {}
        node[leaf] = value
    return doc


def _flow(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).removesuffix("\n...\n") \
        .strip()


structured_docs = st.lists(st.tuples(dotted_keys, values), max_size=6).map(
    lambda pairs: yaml.safe_dump(_nested_doc(pairs), allow_unicode=True).encode())
documents = st.one_of(
    st.none(), structured_docs, st.text(max_size=80).map(str.encode), st.binary(max_size=80),
    st.sampled_from(TEMPLATES).map(str.encode),
    st.tuples(structured_docs, offsets).map(lambda t: t[0][:t[1] % (len(t[0]) + 1)]),
)
overrides = st.one_of(
    st.builds(lambda k, v: f"{k}={_flow(v)}", dotted_keys, values),
    st.builds(lambda k, v: f"{k}={v}", dotted_keys, st.text(max_size=20)),
    st.builds(lambda k, t: f"{k}={t}", st.sampled_from(RUN_KEYS), st.sampled_from(TEMPLATES)),
    st.text(max_size=30),
)
config_cases = st.builds(ConfigCase, st.booleans(), documents,
                         st.lists(overrides, max_size=4).map(tuple))


def config_outcomes(case: ConfigCase) -> list[Outcome]:
    """Resolve the case: a config, or one line of ``ConfigError``."""
    def run() -> list[Outcome]:
        with tempfile.TemporaryDirectory() as tmp:
            path = None
            if case.document is not None:
                path = os.path.join(tmp, "config.yaml")
                _write(path, case.document)
            try:
                resolve(IngestConfig if case.ingest else Config, path, list(case.overrides))
            except ConfigError as exc:
                return [one_line_error("config_error", exc)]
            return [Outcome("resolved")]
    return guarded(run)


# --------------------------------------------------------------------------------------------
# Report.

PAYLOADS = (
    "<script>alert(1)</script>", "\"><img src=x onerror=alert(1)>", "'><svg onload=alert(1)>",
    "</textarea><script>alert(1)</script>", "</script><script>alert(1)</script>",
    "</SCRIPT ><p>x", "<!--", "-->", "]]>", "</style><b>x</b>", "&lt;&amp;&#x27;",
    "javascript:alert(1)", "\u2028\u2029", "\u202eevil", "<x-xss/>", "{{7*7}}", "${alert(1)}",
    "\\u003c/script\\u003e", "a' data-x='1", "a\" onmouseover=\"alert(1)", "<a href=//x>",
)
hostile = st.one_of(
    st.sampled_from(PAYLOADS),
    st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=16),
    st.tuples(st.sampled_from(PAYLOADS), st.text(max_size=6, alphabet="<>&'\"/= x")).map("".join),
)


@dataclass(frozen=True)
class ReportCase:
    """Hostile strings for one report: ``ids`` (one per image), ``labels`` (one per image),
    metric keys/values, the config text and the run's folder name. ``full``: build a real
    run directory and call ``write_report`` (slower) instead of ``render``."""

    ids: tuple[str, ...]
    labels: tuple[str, ...]
    metrics: tuple[tuple[str, str], ...]
    text: str
    folder: str
    full: bool = False


def report_cases(full: bool | None = None) -> st.SearchStrategy[ReportCase]:
    """Hostile report strings; ``full``: always (True), never (False) or one case in eight
    (None) through ``write_report`` rather than ``render``."""
    return st.builds(
        ReportCase,
        ids=st.lists(hostile, min_size=2, max_size=8, unique=True).map(tuple),
        labels=st.lists(hostile, min_size=8, max_size=8).map(tuple),
        metrics=st.lists(st.tuples(hostile, hostile), max_size=3).map(tuple),
        text=hostile,
        folder=hostile.map(lambda s: s.replace("/", "_")[:60].strip(". ") or "run"),
        full=st.integers(0, 7).map(lambda i: i == 0) if full is None else st.just(full),
    )


def twin(case: ReportCase) -> ReportCase:
    """The same report with every distinct string replaced by a distinct harmless one."""
    names: dict[str, str] = {}

    def safe(text: str) -> str:
        return names.setdefault(text, f"s{len(names)}")
    return dataclasses.replace(
        case, ids=tuple(map(safe, case.ids)), labels=tuple(map(safe, case.labels)),
        metrics=tuple((safe(k), safe(v)) for k, v in case.metrics), text=safe(case.text),
        folder=safe(case.folder))


def render_page(case: ReportCase) -> str:
    """``render`` of report data holding the case's strings: two clusters, a confusion table,
    an embedding map, metrics, notes and config text."""
    from pipeline.report.data import ClusterView, Confusion, ReportData
    from pipeline.report.embedding import EmbeddingMap
    from pipeline.report.html import render

    ids, labels = list(case.ids), list(case.labels[:len(case.ids)])
    clusters = [i % 2 for i in range(len(ids))]
    names = sorted(set(labels))
    counts = np.array([[sum(1 for c, lab in zip(clusters, labels, strict=True)
                            if c == row and lab == name) for name in names] for row in (0, 1)])
    views = [ClusterView(row, int(counts[row].sum()), 0.5, 0.9,
                         [(names[j], int(counts[row, j])) for j in np.argsort(-counts[row])[:3]],
                         nearest=THUMBS[:int(counts[row].sum())], sampled=True)
             for row in (0, 1)]
    emap = EmbeddingMap(np.random.default_rng(0).uniform(size=(len(ids), 2)), clusters, ids,
                        list(labels), [(0, i // 2) for i in range(len(ids))], "PCA", 0.0, 0.0)
    data = ReportData(case.folder, _metrics(case, len(ids)), case.text,
                      [{"epoch": e, "loss": 1.0 / (e + 1)} for e in range(3)],
                      counts.sum(axis=1), views, Confusion([0, 1], names, counts), case.text,
                      emap, case.text)
    return render(data, page_size=1, thumb_px=8, legend_cap=3)


THUMBS = [encode(ImageSpec("PNG", "L", 6, 6, seed=i)) for i in range(8)]


def _metrics(case: ReportCase, n: int) -> dict[str, Any]:
    """Hostile keys (prefixed, so none is one the page treats specially) and values."""
    return {**{f"x-{k}": v for k, v in case.metrics}, "n_images": n, "k": 2,
            "method": case.text, "cluster_sizes": {case.text: 1}}


def full_page(case: ReportCase) -> str:
    """``write_report`` on a run directory made for the case: the hostile folder name holds
    the input shards and the run; ids and labels are in both."""
    from pipeline.report import write_report

    with tempfile.TemporaryDirectory() as tmp:
        root = os.path.join(tmp, case.folder)
        run = os.path.join(root, "run")
        write_run(case, os.path.join(root, "input"), run)
        write_report(run)
        with open(os.path.join(run, "report.html"), encoding="utf-8") as fh:
            return fh.read()


def write_run(case: ReportCase, input_dir: str, run: str) -> None:
    """Input shard, assignments (two clusters), config, metrics, history and an untrained
    model with centroids: what ``write_report`` reads, as a finished run leaves it."""
    from pipeline.config import dump_yaml

    n = len(case.ids)
    labels = list(case.labels[:n])
    os.makedirs(input_dir)
    os.makedirs(os.path.join(run, "assignments"))
    pq.write_table(pa.table({"id": list(case.ids), "image": pa.array(THUMBS[:n], pa.binary()),
                             "label": labels}), os.path.join(input_dir, "a.parquet"))
    rng = np.random.default_rng(0)
    pq.write_table(pa.table({
        "id": list(case.ids), "cluster": pa.array([i % 2 for i in range(n)], pa.int32()),
        "distance": pa.array(rng.uniform(size=n), pa.float32()),
        "margin": pa.array(rng.uniform(size=n), pa.float32()), "label": labels}),
        os.path.join(run, "assignments", "a.parquet"))
    cfg = resolve(Config, base={"cluster.k": 2, "data.input": input_dir,
                                "report.map_points": 8, "model.width": 4})
    _write(os.path.join(run, "config.yaml"), dump_yaml(cfg).encode())
    _write(os.path.join(run, "metrics.json"), json.dumps(_metrics(case, n)).encode())
    _write(os.path.join(run, "history.json"), json.dumps(
        [{"epoch": e, "loss": 1.0 / (e + 1)} for e in range(3)]).encode())
    _write_model(cfg, run)


def _write_model(cfg: Config, run: str) -> None:
    import torch

    from pipeline.methods.arch import build_model, model_arch
    from pipeline.models.weights import arch_json, save_bytes

    torch.manual_seed(0)
    os.makedirs(os.path.join(run, "model"))
    _write(os.path.join(run, "model", "model.safetensors"), save_bytes(build_model(cfg)))
    _write(os.path.join(run, "model", "model.json"), arch_json(**model_arch(cfg)))
    centroids = np.random.default_rng(0).normal(size=(2, cfg.model.feature_dim))
    np.save(os.path.join(run, "centroids.npy"), centroids.astype(np.float32))


def report_outcomes(case: ReportCase) -> list[Outcome]:
    """Render the case's report and its harmless twin's; compare their structure."""
    make = full_page if case.full else render_page

    def run() -> list[Outcome]:
        ids = list(case.ids[:len(case.labels)])
        problems = page_problems(make(case), ids, make(twin(case)))
        return [Outcome("violation", "; ".join(problems))] if problems else [Outcome("escaped")]
    return guarded(run)


class _Page(HTMLParser):
    """Start tags with their attribute names, event-handler and external-reference
    attributes, the text of every ``<script>`` and that of the JSON data block apart."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: Counter[tuple[str, tuple[str, ...]]] = Counter()
        self.handlers: list[str] = []
        self.scripts: list[str] = []
        self.data_blocks: list[str] = []
        self._script: list[str] | None = None
        self._is_data = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags[(tag, tuple(sorted(name for name, _ in attrs)))] += 1
        self.handlers += [f"<{tag} {n}={v!r}>" for n, v in attrs if n.startswith("on")
                          or n in ("src", "href") and not (v or "").startswith(("data:", "#"))]
        if tag == "script":
            self._script, self._is_data = [], ("type", "application/json") in attrs

    def handle_data(self, data: str) -> None:
        if self._script is not None:
            self._script.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "script" and self._script is not None:
            (self.data_blocks if self._is_data else self.scripts).append("".join(self._script))
            self._script = None


def parse(page: str) -> _Page:
    parser = _Page()
    parser.feed(page)
    parser.close()
    return parser


def page_problems(page: str, ids: Sequence[str], clean: str) -> list[str]:
    """Injections in ``page``: elements or attributes its harmless twin ``clean`` lacks,
    event-handler or external ``src``/``href`` attributes, a tampered ``<script>``, or a map
    data block that no longer holds exactly ``ids`` (when it has a map)."""
    got, want = parse(page), parse(clean)
    problems = [f"elements differ: {sorted((got.tags - want.tags).items())[:3]} vs "
                f"{sorted((want.tags - got.tags).items())[:3]}"] if got.tags != want.tags else []
    problems += [f"handler or external reference {h}" for h in got.handlers]
    if got.scripts != want.scripts or len(got.data_blocks) != len(want.data_blocks):
        problems.append("scripts tampered")
    elif got.data_blocks and set(json.loads(got.data_blocks[0])["ids"]) - set(ids):
        problems.append("map ids altered")
    return problems


# --------------------------------------------------------------------------------------------
# The four targets, as the benchmark runs them.


@dataclass(frozen=True)
class Target:
    """A strategy of cases and the runner that turns one case into outcomes."""

    strategy: st.SearchStrategy[Any]
    run: Callable[[Any], list[Outcome]]


TARGETS = {
    "decoder": Target(image_cases(), decode_outcomes),
    "sources": Target(st.one_of(zip_cases(), tree_cases()), source_outcomes),
    "config": Target(config_cases, config_outcomes),
    "report": Target(report_cases(), report_outcomes),
}


def fuzz_settings(max_examples: int, derandomize: bool = True) -> settings:
    """Bounded and reproducible: no deadline (the first decode imports torchvision, ~2 s),
    no example database, no health checks that a loaded 2-core machine trips."""
    return settings(max_examples=max_examples, deadline=None, derandomize=derandomize,
                    database=None, suppress_health_check=list(HealthCheck))
