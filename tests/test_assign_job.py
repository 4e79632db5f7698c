"""jobs/assign.py: per-shard, idempotent, resumable assignment with a finished run.

The finished run is built directly (a seeded model, centroids, outlier thresholds and the
files a real run writes), so these tests exercise the assign job alone; the main job's
tests cover training. Input shards are real Parquet files, locally and on a moto S3
server, and the assignment goes through the shared local Ray cluster.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.assign import cluster_thresholds
from pipeline.assign_job import assign_job
from pipeline.config import Config, dump_yaml, resolve
from pipeline.data.decode import DecodeSpec, decode_batch, normalize
from pipeline.data.reader import InputError
from pipeline.kmeans.stats import assign
from pipeline.methods.arch import build_model, model_arch
from pipeline.models.arch import load_model
from pipeline.models.weights import arch_json, save_bytes
from tests.conftest import REPO
from tests.images import bad_images, encode

K, ROWS = 4, 12
RUN_SETTINGS = ["cluster.k=4", "data.image_size=16", "model.feature_dim=8", "model.width=8",
                "data.channels=1", "data.mean=[0.5]", "data.std=[0.5]"]


def make_run(root: Path) -> Config:
    """A finished run directory as the main job leaves it (model, centroids, thresholds)."""
    cfg = resolve(Config, overrides=RUN_SETTINGS + [f"data.output={root}"])
    torch.manual_seed(0)
    model = build_model(cfg)
    (root / "model").mkdir(parents=True)
    (root / "model" / "model.safetensors").write_bytes(save_bytes(model))
    (root / "model" / "model.json").write_bytes(arch_json(**model_arch(cfg)))
    (root / "model" / "_SUCCESS").write_text("{}")
    centroids = np.random.default_rng(0).normal(size=(K, 8)).astype(np.float32)
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    buf = io.BytesIO()
    np.save(buf, centroids)
    (root / "centroids.npy").write_bytes(buf.getvalue())
    (root / "centroids.json").write_text(json.dumps({"k": K, "d": 8}))
    (root / "outliers.json").write_text(json.dumps({"thresholds": [1.0, 1.1, 1.2, 1.3]}))
    (root / "config.yaml").write_text(dump_yaml(cfg))
    return cfg


def digit_images(n: int, seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [encode(rng.integers(0, 256, (20, 20), dtype=np.uint8), "PNG") for _ in range(n)]


def write_shard(path: Path, prefix: str, seed: int, corrupt: int = 0) -> list[str]:
    """A shard of ROWS images (``corrupt`` of them broken); returns its ids."""
    images = digit_images(ROWS, seed)
    bad = [data for data, _ in bad_images().values()]
    images[:corrupt] = bad[:corrupt]
    ids = [f"{prefix}/{i:03d}" for i in range(ROWS)]
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": ids, "image": pa.array(images, pa.binary()),
                             "label": [i % 3 for i in range(ROWS)]}), path, row_group_size=5)
    return ids


def make_input(root: Path, shards: range) -> dict[str, list[str]]:
    """Shards in two sub-folders (partitioned input); shard 1 holds two corrupt images."""
    return {f"day{i % 2}/part-{i}.parquet":
            write_shard(root / f"day{i % 2}" / f"part-{i}.parquet", f"s{i}", i,
                        corrupt=2 if i == 1 else 0) for i in shards}


@pytest.fixture
def run_dir(tmp_path):
    root = tmp_path / "run"
    make_run(root)
    return root


def outputs(out: Path, kind: str = "assignments") -> pa.Table:
    files = sorted((out / kind).rglob("*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files]) if files else None


def mtimes(out: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime_ns for p in (out / "assignments").rglob("*.parquet")}


def test_matches_single_process_reference(ray_cluster, run_dir, tmp_path):
    ids = make_input(tmp_path / "in", range(3))
    out = tmp_path / "out"
    result = assign_job(str(run_dir), str(tmp_path / "in"), str(out))
    assert result.stats is not None and result.stats.shards == 3
    got = outputs(out)
    assert set(got.column_names) == {"id", "cluster", "distance", "margin", "label", "outlier"}
    rejected = outputs(out, "rejects")
    assert sorted(rejected["id"].to_pylist()) == ["s1/000", "s1/001"]
    assert set(rejected["source"].to_pylist()) == {"day1/part-1.parquet"}
    assert sorted(got["id"].to_pylist()) == sorted(
        i for v in ids.values() for i in v if i not in ("s1/000", "s1/001"))
    ref = reference(run_dir, tmp_path / "in")
    rows = {r["id"]: r for r in got.to_pylist()}
    for image_id, (cluster, distance) in ref.items():
        assert rows[image_id]["cluster"] == cluster
        assert rows[image_id]["distance"] == pytest.approx(distance, abs=1e-4)
        assert rows[image_id]["outlier"] == (distance > [1.0, 1.1, 1.2, 1.3][cluster])
    assert (out / "_last_run.json").exists()


def reference(run_dir: Path, input_dir: Path) -> dict[str, tuple[int, float]]:
    """Single-process assignment: decode, embed and assign every image in a plain loop."""
    arch = json.loads((run_dir / "model" / "model.json").read_text())
    model = load_model((run_dir / "model" / "model.safetensors").read_bytes(), arch,
                       torch.device("cpu"))
    centroids = torch.from_numpy(np.load(run_dir / "centroids.npy"))
    spec = DecodeSpec(channels=1, size=16, mean=(0.5,), std=(0.5,))
    out = {}
    for path in sorted(input_dir.rglob("*.parquet")):
        table = pq.read_table(path)
        decoded = decode_batch(table["image"].to_pylist(), spec)
        with torch.inference_mode():
            labels, sqdist, _ = assign(model(normalize(decoded.pixels, spec)), centroids)
        ids = [table["id"][i].as_py() for i in decoded.ok]
        out.update({i: (int(c), float(d) ** 0.5) for i, c, d in zip(ids, labels, sqdist,
                                                                    strict=True)})
    return out


def assign_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "jobs" / "assign.py"), *args],
                          capture_output=True, text=True, timeout=240, cwd=REPO,
                          env={**os.environ, **(env or {})})


def test_killed_halfway_then_rerun_has_no_duplicates_or_gaps(ray_cluster, run_dir, tmp_path):
    ids = make_input(tmp_path / "in", range(6))
    out = tmp_path / "out"
    address = ray_cluster.get_runtime_context().gcs_address
    args = ["--run", str(run_dir), "--input", str(tmp_path / "in"), "--output", str(out)]
    killed = assign_cli(*args, "--set", "debug.kill_assign_after_shards=2",
                        env={"RAY_ADDRESS": address})
    assert killed.returncode == -9, killed.stderr[-2000:]  # a real SIGKILL of the driver
    done = len(list((out / "assignments").rglob("*.parquet")))
    assert 2 <= done < 6
    for shard in (out / "assignments").rglob("*.parquet"):  # every visible shard is whole
        rel = shard.relative_to(out / "assignments")
        rejects = out / "rejects" / rel
        n_bad = pq.read_metadata(rejects).num_rows if rejects.exists() else 0
        assert pq.read_metadata(shard).num_rows + n_bad == ROWS
    pq.read_table(out / "assignments")  # directory readers see no half-written file
    again = assign_cli(*args, env={"RAY_ADDRESS": address})
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"{6 - done:,} assigned now, {done:,} already done" in again.stdout
    got = outputs(out)["id"].to_pylist()
    rejected = outputs(out, "rejects")["id"].to_pylist()
    expected = [i for v in ids.values() for i in v]
    assert len(got) + len(rejected) == len(expected) == 6 * ROWS
    assert len(set(got)) == len(got)  # no duplicates
    assert sorted(got + rejected) == sorted(expected)  # none missing


def test_rerun_over_finished_shards_does_nothing(ray_cluster, run_dir, tmp_path, caplog):
    make_input(tmp_path / "in", range(2))
    out = tmp_path / "out"
    assign_job(str(run_dir), str(tmp_path / "in"), str(out))
    before = mtimes(out)
    caplog.set_level("INFO", logger="pipeline")
    result = assign_job(str(run_dir), str(tmp_path / "in"), str(out))
    assert result.stats is None and result.shards_skipped == 2
    assert "already assigned" in caplog.text and "nothing to do" in caplog.text
    assert mtimes(out) == before


def test_appended_shards_are_the_only_ones_processed(ray_cluster, run_dir, tmp_path):
    make_input(tmp_path / "in", range(2))
    out = tmp_path / "out"
    assign_job(str(run_dir), str(tmp_path / "in"), str(out))
    before = mtimes(out)
    new = make_input(tmp_path / "in", range(2, 4))
    result = assign_job(str(run_dir), str(tmp_path / "in"), str(out))
    assert result.stats is not None and result.stats.shards == 2 and result.shards_skipped == 2
    assert {k: v for k, v in mtimes(out).items() if k in before} == before
    got = outputs(out)["id"].to_pylist()
    assert set(i for v in new.values() for i in v) <= set(got) and len(got) == 4 * ROWS - 2


def test_s3_input_and_output(ray_cluster, run_dir, tmp_path, s3_bucket):
    import pyarrow.fs as pafs

    bucket, s3 = s3_bucket
    make_input(tmp_path / "in", range(2))
    fs = pafs.S3FileSystem(endpoint_override=s3.endpoint_url, region="us-east-1")
    pafs.copy_files(str(tmp_path / "in"), f"{bucket}/in", destination_filesystem=fs)
    sets = [f"s3.endpoint_url={s3.endpoint_url}", "s3.region=us-east-1"]
    result = assign_job(str(run_dir), f"s3://{bucket}/in", f"s3://{bucket}/out", sets)
    assert result.stats is not None and result.stats.assigned == 2 * ROWS - 2
    listed = fs.get_file_info(pafs.FileSelector(f"{bucket}/out/assignments", recursive=True))
    assert sorted(i.path.split("/out/assignments/")[1] for i in listed if i.is_file) == [
        "day0/part-0.parquet", "day1/part-1.parquet"]
    again = assign_job(str(run_dir), f"s3://{bucket}/in", f"s3://{bucket}/out", sets)
    assert again.stats is None


# --------------------------------------------------------------------------------------------
# Bad input: a clear error before any work starts.


def test_missing_model_fails_before_work(run_dir, tmp_path):
    make_input(tmp_path / "in", range(1))
    (run_dir / "model" / "_SUCCESS").unlink()
    with pytest.raises(InputError, match="no finished model"):
        assign_job(str(run_dir), str(tmp_path / "in"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_centroid_dimension_mismatch_fails_before_work(run_dir, tmp_path):
    make_input(tmp_path / "in", range(1))
    np.save(run_dir / "centroids.npy", np.zeros((K, 5), np.float32))
    with pytest.raises(InputError, match="centroids are 4x5 but the model .* 8-d"):
        assign_job(str(run_dir), str(tmp_path / "in"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_schema_mismatch_names_the_shard(run_dir, tmp_path):
    make_input(tmp_path / "in", range(2))
    pq.write_table(pa.table({"id": ["x"], "pixels": [b"1"]}), tmp_path / "in" / "odd.parquet")
    with pytest.raises(InputError, match=r"odd\.parquet.*'id' and 'image'"):
        assign_job(str(run_dir), str(tmp_path / "in"), str(tmp_path / "out"))
    assert not (tmp_path / "out" / "assignments").exists()


def test_output_of_another_run_is_refused(ray_cluster, run_dir, tmp_path):
    make_input(tmp_path / "in", range(1))
    out = tmp_path / "out"
    assign_job(str(run_dir), str(tmp_path / "in"), str(out))
    other = tmp_path / "other"
    make_run(other)
    np.save(other / "centroids.npy", np.ones((K, 8), np.float32))
    with pytest.raises(InputError, match="another model"):
        assign_job(str(other), str(tmp_path / "in"), str(out))


def test_cli_error_is_one_line(tmp_path):
    result = assign_cli("--run", str(tmp_path / "nope"), "--input", str(tmp_path),
                        "--output", str(tmp_path / "o"))
    assert result.returncode == 2
    assert "not a run directory" in result.stderr and "Traceback" not in result.stderr


def test_cluster_thresholds_per_cluster_and_small_cluster_fallback():
    rng = np.random.default_rng(0)
    clusters = np.r_[np.zeros(1000, int), np.ones(5, int)]
    distances = np.r_[rng.uniform(0, 1, 1000), [10.0] * 5]
    t = cluster_thresholds(clusters, distances, k=3, quantile=0.99, min_members=20)
    assert t[0] == pytest.approx(np.quantile(distances[:1000], 0.99))
    overall = np.quantile(distances, 0.99)
    assert t[1] == pytest.approx(overall) and t[2] == pytest.approx(overall)
