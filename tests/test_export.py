"""jobs/export.py: selected cluster members out as files in their original bytes.

A finished run is built by hand (config.yaml, input shards with real PNG/JPEG images,
assignment Parquet files), locally and on a moto S3 server, written through the project's
fs layer; no Ray and no model are involved.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import Config, ConfigError, S3Config, dump_yaml, resolve
from pipeline.data import fs as fsx
from pipeline.data.reader import InputError
from pipeline.export import NAME_BYTES, Selection, export_job, safe_name, select, sniff_extension
from tests.conftest import REPO
from tests.images import encode, rgb

K = 3
SHARDS = {"day0/part-0.parquet": 7, "day1/part-1.parquet": 6}  # rel -> rows


def put_table(uri: str, table: pa.Table, s3: S3Config | None = None) -> None:
    """Write a Parquet file (row groups of 2 rows) through the project's fs layer."""
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf, row_group_size=2)
    fsx.write_bytes_atomic(fsx.locate(uri, s3), buf.getvalue().to_pybytes())


def image(seed: int) -> bytes:
    return encode(rgb(seed, 16), "PNG") if seed % 2 else encode(rgb(seed, 16), "JPEG")


def make_rows() -> dict[str, list[dict]]:
    """rel -> rows with id, image, label, cluster, distance (all distinct), outlier."""
    rng = np.random.default_rng(0)
    distances = iter(rng.permutation(100)[:20] / 10.0)
    rows: dict[str, list[dict]] = {}
    seed = 0
    for rel, n in SHARDS.items():
        rows[rel] = []
        for i in range(n):
            ext = ".png" if seed % 2 else ".jpg"
            rows[rel].append({"id": f"{rel.split('/')[0]}/img-{i:02d}{ext}", "image": image(seed),
                              "label": seed % 4, "cluster": seed % K,
                              "distance": float(next(distances)), "outlier": seed % 3 == 0})
            seed += 1
    return rows


def write_input(root: str, rows: dict[str, list[dict]], s3: S3Config | None = None) -> None:
    for rel, items in rows.items():
        put_table(f"{root}/{rel}", pa.table({
            "id": [r["id"] for r in items], "label": [r["label"] for r in items],
            "image": pa.array([r["image"] for r in items], pa.binary())}), s3)


def write_assignments(folder: str, rows: dict[str, list[dict]], s3: S3Config | None = None,
                      outlier: bool = False) -> None:
    for rel, items in rows.items():
        cols = {"id": [r["id"] for r in items],
                "cluster": pa.array([r["cluster"] for r in items], pa.int32()),
                "distance": pa.array([r["distance"] for r in items], pa.float32()),
                "margin": pa.array([0.1] * len(items), pa.float32()),
                "label": [r["label"] for r in items]}
        if outlier:
            cols["outlier"] = [r["outlier"] for r in items]
        put_table(f"{folder}/{rel}", pa.table(cols), s3)


def make_run(root: str, input_uri: str, rows: dict[str, list[dict]],
             s3: S3Config | None = None) -> None:
    """A finished run as the export needs it: config.yaml and assignments/."""
    cfg = resolve(Config, overrides=[f"cluster.k={K}", f"data.input={input_uri}",
                                     f"data.output={root}"])
    fsx.write_bytes_atomic(fsx.locate(f"{root}/config.yaml", s3), dump_yaml(cfg).encode())
    write_input(input_uri, rows, s3)
    write_assignments(f"{root}/assignments", rows, s3)
    fsx.write_bytes_atomic(fsx.locate(f"{root}/assignments/_SUCCESS", s3), b"{}")


@pytest.fixture
def run_dir(tmp_path: Path) -> tuple[Path, dict[str, list[dict]]]:
    rows = make_rows()
    make_run(str(tmp_path / "run"), str(tmp_path / "in"), rows)
    return tmp_path / "run", rows


def all_rows(rows: dict[str, list[dict]]) -> list[dict]:
    return [r for items in rows.values() for r in items]


def read_manifest(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def exported(out: Path) -> dict[str, bytes]:
    """Relative path -> bytes of every exported image (manifest excluded)."""
    return {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*")
            if p.is_file() and p.name != "manifest.csv"}


# --------------------------------------------------------------------------------------------
# Selection.


def test_nearest_picks_the_n_smallest_distances_in_original_bytes(run_dir, tmp_path):
    run, rows = run_dir
    out = tmp_path / "out"
    result = export_job(str(run), str(run), str(out), Selection(clusters=None, nearest=2))
    manifest = read_manifest((out / "manifest.csv").read_text())
    by_id = {r["id"]: r for r in all_rows(rows)}
    for c in range(K):
        members = sorted((r for r in all_rows(rows) if r["cluster"] == c),
                         key=lambda r: r["distance"])
        got = [m["id"] for m in manifest if m["cluster"] == str(c)]
        assert got == [r["id"] for r in members[:2]]  # the two nearest, nearest first
    assert result.exported == 2 * K and result.present == 0 and result.missing == 0
    for m in manifest:
        assert (out / m["file"]).read_bytes() == by_id[m["id"]]["image"]  # never re-encoded
        assert m["file"].startswith(f"{m['cluster']}/")
        assert int(m["label"]) == by_id[m["id"]]["label"]
        assert float(m["distance"]) == pytest.approx(by_id[m["id"]]["distance"], rel=1e-6)
    assert set(exported(out)) == {m["file"] for m in manifest}


def test_all_with_cluster_filter(run_dir, tmp_path):
    run, rows = run_dir
    out = tmp_path / "out"
    export_job(str(run), str(run / "assignments"), str(out),
               Selection.of("0, 2", None, True, False))
    manifest = read_manifest((out / "manifest.csv").read_text())
    want = {r["id"] for r in all_rows(rows) if r["cluster"] in (0, 2)}
    assert {m["id"] for m in manifest} == want and len(manifest) == len(want)
    assert sorted(p.name for p in out.iterdir()) == ["0", "2", "manifest.csv"]
    assert list(manifest[0]) == ["cluster", "id", "file", "distance", "label"]


def test_outliers_of_an_assign_job_output_need_its_input(run_dir, tmp_path):
    run, rows = run_dir
    assigned = tmp_path / "assigned"
    write_assignments(str(assigned / "assignments"), rows, outlier=True)
    (assigned / "_assign.json").write_text(json.dumps({"run": str(run), "model": "x"}))
    sel = Selection(nearest=None, outliers=True)
    with pytest.raises(InputError, match="_assign.json does not record its input.*--input"):
        export_job(str(run), str(assigned), str(tmp_path / "out"), sel)
    out = tmp_path / "out"
    export_job(str(run), str(assigned), str(out), sel, input_uri=str(tmp_path / "in"))
    manifest = read_manifest((out / "manifest.csv").read_text())
    assert {m["id"] for m in manifest} == {r["id"] for r in all_rows(rows) if r["outlier"]}
    with pytest.raises(InputError, match=r"part-0\.parquet: no 'outlier' column"):
        export_job(str(run), str(run), str(tmp_path / "o2"), sel)


def test_bad_selection_and_mismatched_input_fail_in_one_line(run_dir, tmp_path):
    run, _ = run_dir
    with pytest.raises(ConfigError, match="--clusters: 7 is not a cluster of this run"):
        export_job(str(run), str(run), str(tmp_path / "o"), Selection.of("1,7", 4, False, False))
    with pytest.raises(ConfigError, match="--clusters 'a,b'"):
        Selection.of("a,b", None, False, False)
    (tmp_path / "other").mkdir()
    put_table(str(tmp_path / "other" / "x.parquet"),
              pa.table({"id": ["a"], "image": pa.array([b"1"], pa.binary())}))
    with pytest.raises(InputError, match=r"other/day0/part-0\.parquet: no such input shard"):
        export_job(str(run), str(run), str(tmp_path / "o"), Selection(),
                   input_uri=str(tmp_path / "other"))
    assert not (tmp_path / "o").exists()


def test_nearest_across_files_with_ties_matches_a_full_sort(tmp_path):
    """The bounded heaps and per-batch cutoffs give exactly the sorted top N (ties by id)."""
    rng = np.random.default_rng(1)
    expected = []
    for f in range(5):
        ids = [f"f{f}-{i:03d}" for i in rng.permutation(100)]
        cluster = rng.integers(0, K, 100)
        distance = rng.integers(0, 6, 100).astype(np.float32)  # many ties
        put_table(str(tmp_path / "a" / f"{f}.parquet"), pa.table(
            {"id": ids, "cluster": cluster, "distance": distance}))
        expected += list(zip(cluster.tolist(), distance.tolist(), ids, strict=True))
    picks, has_label = select(fsx.locate(str(tmp_path / "a")),
                              Selection(clusters=frozenset({0, 2}), nearest=7))
    want = [row for c in (0, 2) for row in sorted(r for r in expected if r[0] == c)[:7]]
    assert [(p.cluster, p.distance, p.image_id) for p in picks] == want and not has_label


def test_ids_missing_from_the_input_are_reported_not_listed(run_dir, tmp_path):
    run, rows = run_dir
    shard = tmp_path / "in" / "day0" / "part-0.parquet"
    pq.write_table(pq.read_table(shard).slice(1), shard)  # drop the first row
    out = tmp_path / "out"
    result = export_job(str(run), str(run), str(out), Selection(nearest=None))
    listed = {m["id"] for m in read_manifest((out / "manifest.csv").read_text())}
    assert result.missing == 1 and rows["day0/part-0.parquet"][0]["id"] not in listed
    assert len(listed) == len(all_rows(rows)) - 1


# --------------------------------------------------------------------------------------------
# Hostile ids.

HOSTILE = ["../../etc/passwd", "/abs/path.png", "a/../../b.jpg", "<script>alert(1)</script>",
           "line\nbreak.png", "tab\tand\x07bell\x1b[31m.jpg", "x" * 600 + ".png",
           "ünïcødé/猫の写真.jpeg", "a/b.png", "a_b.png", "A_B.png", ".hidden", "..", "-rf",
           "C:\\Windows\\system32\\evil.png", "\u202egnp.exe", "CON", ""]


def test_hostile_ids_stay_inside_output_with_distinct_names(tmp_path):
    run, inp, out = tmp_path / "run", tmp_path / "in", tmp_path / "out"
    rows = {"s.parquet": [{"id": i, "image": image(n), "label": 0, "cluster": 0,
                           "distance": n / 10, "outlier": False}
                          for n, i in enumerate(HOSTILE)]}
    make_run(str(run), str(inp), rows)
    export_job(str(run), str(run), str(out), Selection(nearest=None))
    manifest = read_manifest((out / "manifest.csv").read_text())
    assert [m["id"] for m in manifest] == HOSTILE  # the manifest keeps ids verbatim
    files = [m["file"] for m in manifest]
    assert len(set(files)) == len(HOSTILE) == len({f.casefold() for f in files})
    assert sorted(exported(out)) == sorted(files)
    for m, row in zip(manifest, rows["s.parquet"], strict=True):
        folder, name = m["file"].split("/")
        path = (out / m["file"]).resolve()
        assert folder == "0" and path.parent == (out / "0").resolve()
        assert name.isprintable() and not name.startswith((".", "-")) and "\\" not in name
        assert len(name.encode()) <= NAME_BYTES and ".." not in name
        assert path.read_bytes() == row["image"]
    assert files[HOSTILE.index("/abs/path.png")].endswith(".png")
    assert files[HOSTILE.index("../../etc/passwd")].endswith(".jpg")  # sniffed: JPEG bytes
    assert "猫の写真" in files[HOSTILE.index("ünïcødé/猫の写真.jpeg")]


def test_duplicate_ids_across_shards_get_distinct_files(tmp_path):
    run, inp, out = tmp_path / "run", tmp_path / "in", tmp_path / "out"
    rows = {rel: [{"id": "dup.png", "image": image(n), "label": 0, "cluster": 0,
                   "distance": 0.5, "outlier": False}]
            for n, rel in enumerate(["a.parquet", "b.parquet"])}
    make_run(str(run), str(inp), rows)
    export_job(str(run), str(run), str(out), Selection(nearest=None))
    manifest = read_manifest((out / "manifest.csv").read_text())
    files = [m["file"] for m in manifest]
    assert len(set(files)) == 2 and sorted(map(len, files)) == [18, 50]  # 8 and 40 hex
    got = {(out / f).read_bytes() for f in files}
    assert got == {rows["a.parquet"][0]["image"], rows["b.parquet"][0]["image"]}


def test_names_are_deterministic_and_sniffed():
    png, jpeg = encode(rgb(1, 8), "PNG"), encode(rgb(1, 8), "JPEG")
    assert safe_name("a/b", png) == safe_name("a/b", png)
    assert safe_name("a/b", png).startswith("a_b-") and safe_name("a/b", png).endswith(".png")
    assert safe_name("a/b", jpeg).endswith(".jpg") and safe_name("a/b.PNG", jpeg).endswith(".png")
    assert safe_name("a/b", png) != safe_name("a_b", png)
    assert sniff_extension(b"RIFF\0\0\0\0WEBPVP8 ") == ".webp"
    assert sniff_extension(b"not an image") == ".bin"


# --------------------------------------------------------------------------------------------
# Re-runs and the command line.


def export_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "jobs" / "export.py"), *args],
                          capture_output=True, text=True, timeout=120, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def test_rerun_writes_nothing_new(run_dir, tmp_path, caplog):
    run, _ = run_dir
    out = tmp_path / "out"
    first = export_job(str(run), str(run), str(out), Selection(nearest=3))
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    manifest = (out / "manifest.csv").read_bytes()
    with caplog.at_level(logging.INFO, logger="pipeline.export"):
        again = export_job(str(run), str(run), str(out), Selection(nearest=3))
    assert (again.exported, again.present) == (0, first.exported) and first.exported == 3 * K
    assert "0 exported, 9 already present" in caplog.text
    cli = export_cli("--run", str(run), "--assignments", str(run), "--output", str(out),
                     "--nearest", "3")
    assert cli.returncode == 0, cli.stderr
    assert "0 exported, 9 already present" in cli.stdout
    for path, mtime in mtimes.items():
        if path.name != "manifest.csv":
            assert path.stat().st_mtime_ns == mtime, path
    assert (out / "manifest.csv").read_bytes() == manifest


def test_cli_missing_run_is_one_line_exit_2(tmp_path):
    result = export_cli("--run", str(tmp_path / "nope"), "--assignments", str(tmp_path),
                        "--output", str(tmp_path / "o"))
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "nope: not a run directory" in errors[0]
    assert "Traceback" not in result.stderr and not (tmp_path / "o").exists()


# --------------------------------------------------------------------------------------------
# S3 in and out.


def test_s3_in_and_out(s3_bucket):
    bucket, s3 = s3_bucket
    rows = make_rows()
    run = f"s3://{bucket}/runs/r1"
    make_run(run, f"s3://{bucket}/in", rows, s3)
    sets = [f"s3.endpoint_url={s3.endpoint_url}", "s3.region=us-east-1"]
    out = f"s3://{bucket}/exports/r1"
    result = export_job(run, f"{run}/assignments", out, Selection(clusters=frozenset({1}),
                        nearest=2), overrides=sets)
    assert (result.exported, result.present) == (2, 0)
    manifest = read_manifest(fsx.read_bytes(fsx.locate(f"{out}/manifest.csv", s3)).decode())
    by_id = {r["id"]: r for r in all_rows(rows)}
    assert [m["cluster"] for m in manifest] == ["1", "1"]
    for m in manifest:
        assert fsx.read_bytes(fsx.locate(f"{out}/{m['file']}", s3)) == by_id[m["id"]]["image"]
    again = export_job(run, run, out, Selection(clusters=frozenset({1}), nearest=2),
                       overrides=sets)
    assert (again.exported, again.present) == (0, 2)
