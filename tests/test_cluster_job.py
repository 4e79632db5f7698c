"""End-to-end: the main job on real Parquet shards, through a real local Ray cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.config import Config, IngestConfig, resolve
from pipeline.data.ingest import ingest
from tests.conftest import REPO

SMALL = ["cluster.k=5", "train.epochs=2", "train.warmup_epochs=1", "train.batch_size=64",
         "data.image_size=16", "model.feature_dim=16", "scale.cpus_per_worker=0.5",
         "scale.checkpoint_every_steps=4", "cluster.persist_every=2"]


@pytest.fixture(scope="module")
def digits_shards(tmp_path_factory, ray_cluster):
    out = str(tmp_path_factory.mktemp("digits") / "shards")
    ingest(IngestConfig(source="sklearn-digits", output=out, row_group_size=200,
                        rows_per_file=400))
    return out


def run_job(input_uri: str, output: str, extra: list[str] = ()) -> dict:
    from pipeline.run import run

    cfg = resolve(Config, None, SMALL + list(extra), {"data.input": input_uri,
                                                       "data.output": output})
    return run(cfg)


def test_outputs_metrics_and_resume(digits_shards, tmp_path):
    out = str(tmp_path / "run")
    metrics = run_job(digits_shards, out)
    for name in ("config.yaml", "centroids.npy", "centroids.json", "metrics.json",
                 "model/model.safetensors", "model/model.json", "assignments/_SUCCESS",
                 "outliers.json", "report.html", "history.json"):
        assert os.path.exists(os.path.join(out, name)), name
    assert metrics["n_images"] == 1797 and metrics["k"] == 5 and metrics["rejects"] == 0
    assert set(metrics["cluster_sizes"]) >= {"min", "median", "max", "empty"}
    assert 0 <= metrics["nmi"] <= 1 and 0 <= metrics["acc"] <= 1 and "ari" in metrics
    assert json.load(open(os.path.join(out, "metrics.json")))["n_images"] == 1797
    table = pq.read_table(os.path.join(out, "assignments"))
    assert set(table.column_names) >= {"id", "cluster", "distance", "margin", "label"}
    assert table.num_rows == 1797 and len(set(table["id"].to_pylist())) == 1797
    assert min(table["margin"].to_pylist()) >= 0
    shards = sorted(p.name for p in Path(digits_shards).glob("*.parquet"))
    assert sorted(p.name for p in Path(out, "assignments").glob("*.parquet")) == shards
    assert len(metrics["epochs"]) == 2 and "nmi" in metrics["epochs"][-1]  # per-epoch NMI
    assert metrics["epochs"][-1]["images"] > 0
    mtime = os.path.getmtime(os.path.join(out, "model", "model.safetensors"))
    again = run_job(digits_shards, out)  # re-run: finished stages are skipped
    assert os.path.getmtime(os.path.join(out, "model", "model.safetensors")) == mtime
    assert again["nmi"] == metrics["nmi"]


def test_killed_worker_resumes_from_checkpoint(digits_shards, tmp_path):
    out = str(tmp_path / "run")
    metrics = run_job(digits_shards, out, ["debug.kill_worker_at_step=30",
                                          "cluster.drift_compensation=true"])
    assert os.path.exists(os.path.join(out, "checkpoints", "_fault-worker"))
    assert metrics["n_images"] == 1797
    assert len(metrics["epochs"]) == 2  # both epochs completed after the restart


def test_sharded_centroid_servers_train_to_the_same_outputs(digits_shards, tmp_path):
    out = str(tmp_path / "run")
    metrics = run_job(digits_shards, out, ["scale.centroid_shards=2"])
    assert metrics["n_images"] == 1797 and metrics["cluster_sizes"]["empty"] == 0
    assert len(metrics["epochs"]) == 2 and metrics["nmi"] > 0.3
    assert os.path.exists(os.path.join(out, "checkpoints", "centroid_server_state.npz.shard1"))


def test_killed_centroid_server_restarts_with_its_state(digits_shards, tmp_path):
    out = str(tmp_path / "run")
    metrics = run_job(digits_shards, out, ["debug.kill_server_at_round=20"])
    assert os.path.exists(os.path.join(out, "checkpoints", "centroid_server_state.npz.fault"))
    assert metrics["n_images"] == 1797 and metrics["cluster_sizes"]["empty"] == 0


def job(*args: str, timeout: int = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "jobs" / "cluster_imagenet.py"), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)


def test_bad_config_fails_before_ray_starts(tmp_path):
    result = job("--output", str(tmp_path / "o"), "--set", "cluster.k=0")
    assert result.returncode == 2
    assert "cluster.k: must be > 0" in result.stderr
    assert "Started a local Ray" not in result.stderr + result.stdout
    assert not (tmp_path / "o").exists()
    result = job("--set", "train.optimiser=sgd")
    assert result.returncode == 2 and "train.optimiser: unknown key" in result.stderr


def test_unreadable_input_fails_fast_naming_the_uri(tmp_path):
    result = job("--input", "s3://no-such-bucket/shards", "--output", str(tmp_path / "o"),
                 "--set", "s3.endpoint_url=http://127.0.0.1:9", "--set", "s3.connect_timeout_s=1")
    assert result.returncode == 2
    assert "s3://no-such-bucket/shards" in result.stderr
    assert "Traceback" not in result.stderr
