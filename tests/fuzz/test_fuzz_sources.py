"""Fuzzed ingest sources: every listed item ends stored or quarantined with a reason, a bad
archive or folder in one line of ``SourceError``, and nothing outside the source is ever read
(cases: tests/fuzz/cases.py). The fuzzing runs the ingest's per-shard writer in this process;
one test runs the real ingest through Ray."""

from __future__ import annotations

import io
import json
import tracemalloc
import zipfile

import pyarrow.parquet as pq
import pytest
from hypothesis import given

from pipeline.config import IngestConfig, S3Config
from pipeline.data import fs as fsx
from pipeline.data.ingest import ingest
from pipeline.data.quarantine import read_rejects
from pipeline.data.sources import FileTreeSource, Source, ZipSource
from pipeline.errors import SourceError
from tests.fuzz.cases import (
    SECRET,
    TREE_MAX_BYTES,
    Member,
    Outcome,
    TreeCase,
    TreeEntry,
    ZipCase,
    _headers,
    _patch,
    build_tree,
    build_zip,
    fuzz_settings,
    ingest_outcomes,
    tree_cases,
    tree_outcomes,
    zip_cases,
    zip_outcomes,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@fuzz_settings(max_examples=60)
@given(case=zip_cases())
def test_fuzzed_zip_archives_are_stored_or_quarantined(case):
    for outcome in zip_outcomes(case):
        assert not outcome.bad, outcome.detail


@fuzz_settings(max_examples=40)
@given(case=tree_cases())
def test_fuzzed_folders_are_stored_or_quarantined(case):
    for outcome in tree_outcomes(case):
        assert not outcome.bad, outcome.detail


def by_id(source: Source, workdir: str) -> dict[str, Outcome]:
    ids = [item["id"] for item in source.items()]
    return dict(zip(ids, ingest_outcomes(source, workdir), strict=True))


HOSTILE_ZIP = ZipCase((
    Member("../evil.png", "image"), Member("/abs/evil.png", "image"),
    Member("cats/../../evil.png", "image"), Member("cats/bomb.png", "bomb"),
    Member("cats/liar.png", "liar"), Member("cats/b.png", "bzip2"), Member("cats/x.png", "lzma"),
    Member("cats/locked.png", "encrypted"), Member("cats/m.png", "method99"),
    Member("cats/empty.png", "empty"), Member("cats/" + "é" * 200 + ".png", "image"),
    Member("dir.png/", "image"), Member("cats/ok.png", "image")))
EXPECTED_ZIP = {
    "../evil.png": "unsafe zip member name", "/abs/evil.png": "unsafe zip member name",
    "cats/../../evil.png": "unsafe zip member name", "cats/bomb.png": "too large",
    "cats/liar.png": "unreadable zip member", "cats/b.png": "unsupported zip compression",
    "cats/x.png": "unsupported zip compression", "cats/locked.png": "unreadable zip member",
    "cats/m.png": "unsupported zip compression", "cats/empty.png": "empty",
    "cats/" + "é" * 200 + ".png": "", "cats/ok.png": ""}


def test_hostile_zip_members_are_quarantined_with_their_reasons(tmp_path):
    path = tmp_path / "in.zip"
    path.write_bytes(build_zip(HOSTILE_ZIP))
    outcomes = by_id(ZipSource(str(path), S3Config()), str(tmp_path))
    assert {i: o.detail for i, o in outcomes.items()} == EXPECTED_ZIP  # no "dir.png/"
    assert all(outcomes[i].kind == ("quarantined" if why else "decoded")
               for i, why in EXPECTED_ZIP.items())


def test_lying_zip_member_is_read_in_bounded_memory(tmp_path):
    """64 MB of zeros declared as 1,000 bytes: zipfile's plain ``read()`` would inflate all
    of it before noticing; the source stops at the declared size (and the CRC fails)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("cats/liar.png", bytes(64 * 2**20))
    data = bytearray(buf.getvalue())
    _patch(data, _headers(bytes(data))[0], "size", 1000)
    (tmp_path / "in.zip").write_bytes(data)
    source = ZipSource(str(tmp_path / "in.zip"), S3Config())
    tracemalloc.start()
    try:
        (payload,) = source.fetch(["cats/liar.png"])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert isinstance(payload, str) and payload.startswith("unreadable zip member: BadZipFile")
    assert peak < 8 * 2**20, peak


def test_zip_with_a_name_that_is_not_utf8_fails_in_one_line(tmp_path):
    path = tmp_path / "in.zip"
    path.write_bytes(build_zip(ZipCase((Member("cats/a", "not_utf8"), Member("cats/ok.png",
                                                                               "image")))))
    with pytest.raises(SourceError, match="not a valid zip archive") as info:
        ZipSource(str(path), S3Config()).items()
    assert "\n" not in str(info.value)


def test_a_name_with_a_line_break_is_quoted_in_the_error(tmp_path):
    """The error named the file as is, so a newline in a name split it over two lines."""
    root = build_tree(TreeCase((TreeEntry(("\n.png",), "image"),)), str(tmp_path))
    with pytest.raises(SourceError, match="needs every image inside a folder") as info:
        FileTreeSource(root, S3Config(), labels_from_folders=True).items()
    assert str(info.value).startswith("'\\n.png'") and "\n" not in str(info.value)


HOSTILE_TREE = TreeCase((
    TreeEntry(("cats", "link.png"), "link_out_file"), TreeEntry(("cats", "out.png"), "link_out_dir"),
    TreeEntry(("cats", "loop"), "link_loop"), TreeEntry(("cats", "in.png"), "link_inside"),
    TreeEntry(("cats", "dangling.png"), "dangling"), TreeEntry(("cats", "fifo.png"), "fifo"),
    TreeEntry(("cats", "empty.png"), "empty"), TreeEntry(("cats", "dir.png"), "folder"),
    TreeEntry(("cats", "big.png"), "big"), TreeEntry(("cats", "bad\udcff.png"), "image"),
    TreeEntry(("cats", "secret.png"), "hidden"), TreeEntry(("cats", "é" * 120 + ".png"), "image")))
EXPECTED_TREE = {
    "base/ok.png": "", "cats/bad\\xff.png": "unusable file name", "cats/big.png": "too large",
    "cats/dir.png/inner/in.png": "", "cats/empty.png": "empty", "cats/in.png": "",
    "cats/link.png": "outside the source tree", "cats/" + "é" * 120 + ".png": ""}


def test_folder_symlinks_never_lead_out_of_the_tree(tmp_path):
    """Links out (file or folder) and loops are not followed, FIFOs and dangling links are
    not listed, a non-UTF-8 name and an oversized file are quarantined."""
    root = build_tree(HOSTILE_TREE, str(tmp_path))
    source = FileTreeSource(root, S3Config(), max_bytes=TREE_MAX_BYTES)
    outcomes = by_id(source, str(tmp_path))
    assert {i: o.detail for i, o in outcomes.items()} == EXPECTED_TREE


def test_ingest_of_hostile_sources_through_ray(ray_cluster, tmp_path):
    """The real ingest (Ray Data tasks, listing reasons carried in the shard plans)."""
    root = build_tree(HOSTILE_TREE, str(tmp_path / "tree"))
    (tmp_path / "in.zip").write_bytes(build_zip(HOSTILE_ZIP))
    for source, good in ((root, 4), (str(tmp_path / "in.zip"), 2)):
        out = tmp_path / f"out-{good}"
        result = ingest(IngestConfig(source=source, output=str(out), labels_from_folders=False,
                                     rows_per_file=3, row_group_size=2))
        rejects = read_rejects(fsx.locate(str(out / "_rejects"))).to_pylist()
        assert result.rows == good and result.rejects == len(rejects) > 0
        assert all(r["reason"] for r in rejects)
        assert json.loads((out / "_SUCCESS").read_text())["rows"] == good
        images = pq.read_table(sorted(map(str, out.glob("*.parquet")))).column("image")
        assert SECRET not in images.to_pylist()
