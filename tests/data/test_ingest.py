"""Ingest -> Parquet -> streaming read, through a real local Ray cluster and a real S3 endpoint."""

from __future__ import annotations

import json
import os
import zipfile

import pyarrow.parquet as pq
import pytest

from pipeline.config import IngestConfig, S3Config
from pipeline.data import fs as fsx
from pipeline.data.decode import DecodeSpec
from pipeline.data.ingest import ingest
from pipeline.data.quarantine import read_rejects
from pipeline.data.reader import InputError, find_shards, read_images
from pipeline.data.sources import SourceError
from tests.images import bad_images, good_images


def make_tree(root) -> tuple[dict[str, bytes], dict[str, str]]:
    """cats/ and dogs/ with every good kind, plus every bad kind under cats/."""
    good, bad = {}, {}
    for label in ("cats", "dogs"):
        for name, data in good_images().items():
            good[f"{label}/{name}"] = data
    for name, (data, word) in bad_images().items():
        bad[f"cats/bad_{name}"] = word
        good_or_bad = root / "cats" / f"bad_{name}"
        good_or_bad.parent.mkdir(parents=True, exist_ok=True)
        good_or_bad.write_bytes(data)
    for rel, data in good.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    (root / "README.txt").write_text("not an image: ignored by extension")
    return good, bad


def read_all(uri: str, s3: S3Config | None = None, **kw) -> list[dict]:
    ds = read_images(uri, DecodeSpec(channels=3, size=16), s3=s3, **kw)
    return ds.take_all()


def check_output(out_uri: str, good: dict[str, bytes], bad: dict[str, str], s3=None) -> None:
    loc = fsx.locate(out_uri, s3)
    manifest = json.loads(fsx.read_bytes(loc.join("_SUCCESS")))
    assert manifest["rows"] == len(good) and manifest["rejects"] == len(bad)
    assert manifest["label_counts"] == {"cats": len(good) // 2, "dogs": len(good) // 2}
    shards = find_shards(out_uri, s3)
    table = pq.ParquetDataset(shards.files, filesystem=loc.fs).read()
    stored = dict(zip(table["id"].to_pylist(), table["image"].to_pylist(), strict=True))
    assert stored == good  # the original bytes, not re-encoded; ids are relative paths
    rejects = read_rejects(loc.join("_rejects")).to_pylist()
    assert {r["id"]: r["reason"] for r in rejects}.keys() == bad.keys()
    for r in rejects:
        assert bad[r["id"]] in r["reason"] and r["source"].endswith(r["id"])


def test_folder_ingest_round_trip_local(ray_cluster, tmp_path):
    good, bad = make_tree(tmp_path / "src")
    out = str(tmp_path / "shards")
    result = ingest(IngestConfig(source=str(tmp_path / "src"), output=out,
                                 labels_from_folders=True, row_group_size=5))
    assert not result.skipped
    check_output(out, good, bad)
    for f in find_shards(out).files:
        meta = pq.ParquetFile(f).metadata
        assert all(meta.row_group(i).num_rows <= 5 for i in range(meta.num_row_groups))
    rows = read_all(out)
    assert sorted(r["id"] for r in rows) == sorted(good)
    assert all(r["pixels"].shape == (3, 16, 16) for r in rows)
    assert {r["label"] for r in rows} == {"cats", "dogs"}


def test_rerun_is_a_noop_and_overwrite_replaces(ray_cluster, tmp_path):
    good, _ = make_tree(tmp_path / "src")
    out = tmp_path / "shards"
    cfg = IngestConfig(source=str(tmp_path / "src"), output=str(out), labels_from_folders=True)
    ingest(cfg)
    before = sorted(os.listdir(out))
    again = ingest(cfg)
    assert again.skipped and again.rows == len(good)
    assert sorted(os.listdir(out)) == before
    for rel in list(good)[:4]:
        (tmp_path / "src" / rel).unlink()
    cfg.overwrite = True
    replaced = ingest(cfg)
    assert not replaced.skipped and replaced.rows == len(good) - 4
    stored = pq.ParquetDataset(find_shards(str(out)).files).read().column("id").to_pylist()
    assert sorted(stored) == sorted(list(good)[4:])  # the old shards' rows are gone
    assert [p for p in os.listdir(tmp_path) if "staging" in p or ".old-" in p] == []


def test_incomplete_output_is_refused_without_overwrite(ray_cluster, tmp_path):
    make_tree(tmp_path / "src")
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "part-0.parquet").write_bytes(b"half-written")
    with pytest.raises(fsx.StorageError, match="not a complete ingest"):
        ingest(IngestConfig(source=str(tmp_path / "src"), output=str(tmp_path / "shards")))


def test_zip_ingest(ray_cluster, tmp_path):
    good, bad = make_tree(tmp_path / "src")
    archive = tmp_path / "images.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted((tmp_path / "src").rglob("*")):
            if path.is_file():
                zf.write(path, path.relative_to(tmp_path / "src").as_posix())
    out = str(tmp_path / "shards")
    ingest(IngestConfig(source=str(archive), output=out, labels_from_folders=True))
    check_output(out, good, bad)


def test_s3_prefix_to_s3_round_trip(ray_cluster, tmp_path, s3_bucket):
    import pyarrow.fs as pafs

    bucket, s3 = s3_bucket
    good, bad = make_tree(tmp_path / "src")
    pafs.copy_files(str(tmp_path / "src"), f"{bucket}/raw",
                    destination_filesystem=fsx.s3_filesystem(s3))
    out = f"s3://{bucket}/shards"
    ingest(IngestConfig(source=f"s3://{bucket}/raw", output=out, labels_from_folders=True, s3=s3))
    check_output(out, good, bad, s3)
    rows = read_all(out, s3)
    assert sorted(r["id"] for r in rows) == sorted(good)
    assert ingest(IngestConfig(source=f"s3://{bucket}/raw", output=out, s3=s3)).skipped
    replaced = ingest(IngestConfig(source=f"s3://{bucket}/raw", output=out, s3=s3,
                                   labels_from_folders=True, overwrite=True))
    assert replaced.rows == len(good)
    assert len(read_all(out, s3)) == len(good)  # old shards are gone, nothing doubled
    staging = fsx.walk(fsx.locate(out, s3))
    assert not [p for p in staging if "_staging" in p]


def test_missing_and_empty_sources_name_the_source(ray_cluster, tmp_path):
    with pytest.raises(SourceError, match="nope"):
        ingest(IngestConfig(source=str(tmp_path / "nope"), output=str(tmp_path / "o")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="empty.*no image files"):
        ingest(IngestConfig(source=str(tmp_path / "empty"), output=str(tmp_path / "o")))
    with pytest.raises(SourceError, match="missing.zip"):
        ingest(IngestConfig(source=str(tmp_path / "missing.zip"), output=str(tmp_path / "o")))


def test_unreachable_bucket_fails_fast_naming_the_uri(ray_cluster):
    dead = S3Config(endpoint_url="http://127.0.0.1:9", connect_timeout_s=1.0)
    with pytest.raises(InputError, match="s3://no-such-bucket/x"):
        find_shards("s3://no-such-bucket/x", dead)


def test_reader_quarantines_bad_rows_without_failing(ray_cluster, tmp_path):
    import pyarrow as pa

    good = good_images()
    bad = bad_images()
    ids = [f"g/{n}" for n in good] + [f"b/{n}" for n in bad] + ["b/null"]
    images = list(good.values()) + [d for d, _ in bad.values()] + [None]
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"id": ids, "image": pa.array(images, pa.binary())}),
                   tmp_path / "in" / "part-0.parquet", row_group_size=4)
    rejects = fsx.locate(str(tmp_path / "rejects"))
    rows = read_all(str(tmp_path / "in"), rejects=rejects, batch_size=3)
    assert sorted(r["id"] for r in rows) == sorted(f"g/{n}" for n in good)
    got = {r["id"]: r["reason"] for r in read_rejects(rejects).to_pylist()}
    assert sorted(got) == sorted([f"b/{n}" for n in bad] + ["b/null"])
    for name, (_, word) in bad.items():
        assert word in got[f"b/{name}"]


def test_reader_rejects_shards_without_contract_columns(tmp_path):
    import pyarrow as pa

    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"path": ["a"]}), tmp_path / "in" / "x.parquet")
    with pytest.raises(InputError, match="'id' and 'image'"):
        find_shards(str(tmp_path / "in"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no Parquet shards"):
        find_shards(str(tmp_path / "empty"))
    with pytest.raises(InputError, match="no such directory"):
        find_shards(str(tmp_path / "absent"))
