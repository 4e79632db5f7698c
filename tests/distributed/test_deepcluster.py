"""DeepCluster on Ray: sharded k-means against its single-process reference, the memory
guard, and a whole run with a worker killed mid-epoch and a driver re-run."""

from __future__ import annotations

import os

import numpy as np
import pytest

from pipeline.config import Config, resolve
from pipeline.data.reader import InputError
from pipeline.distributed.features import check_feature_memory
from pipeline.distributed.runner import RemoteShards
from pipeline.kmeans.shards import LocalShard, cluster, lloyd
from tests.test_cluster_job import digits_shards, run_job  # noqa: F401  (fixture)


def test_sharded_kmeans_on_actors_equals_the_local_reference(ray_cluster):
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(3000, 16)) + rng.integers(0, 6, (3000, 1)) * 3).astype(np.float32)
    local = [LocalShard(part) for part in np.array_split(x, 3)]
    remote = RemoteShards(LocalShard, np.array_split(x, 3))
    try:
        c_local, h_local = lloyd(local, 12, niter=8, seed=5)
        c_remote, h_remote = lloyd(remote, 12, niter=8, seed=5)
        np.testing.assert_allclose(c_remote, c_local, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(h_remote, h_local, rtol=1e-9)
        _, labels = cluster(remote, 12, 8, seed=5, faiss_local=False)
        assert len(labels) == 3000 and np.bincount(labels, minlength=12).min() > 0
    finally:
        remote.close()


def test_feature_memory_guard_names_the_sizes_and_the_fix():
    cfg = resolve(Config, overrides=["deepcluster.max_feature_memory_fraction=0.5"])
    assert check_feature_memory(1000, 64, cfg, available=10**9) == 1000 * 64 * 4 * 2
    with pytest.raises(InputError, match=r"10,000,000 images x 512 features.*float16"):
        check_feature_memory(10_000_000, 512, cfg, available=8 * 2**30)


# One epoch (CI time): multi-epoch re-clustering runs in tests/methods/test_deepcluster.py, and
# a stage after a restarted worker group's in tests/distributed/test_depict.py.
DC = ["method=deepcluster", "cluster.k=10", "deepcluster.pca_dim=8", "deepcluster.passes=1",
      "model.feature_dim=16", "train.lr=0.003", "train.epochs=1"]


def mtime(*parts: str) -> float:
    return os.path.getmtime(os.path.join(*parts))


def test_deepcluster_run_survives_a_killed_worker_and_resumes_without_recomputing(
        digits_shards, tmp_path):  # noqa: F811
    out = str(tmp_path / "run")
    metrics = run_job(digits_shards, out, DC + ["debug.kill_worker_at_step=10"])
    assert os.path.exists(os.path.join(out, "checkpoints", "_fault-worker"))
    assert metrics["method"] == "deepcluster" and metrics["n_images"] == 1797
    assert metrics["cluster_sizes"]["empty"] == 0 and metrics["nmi"] > 0.3
    epochs = metrics["epochs"]
    assert [e["epoch"] for e in epochs] == [0] and epochs[0]["empty_clusters"] == 0
    resumed = epochs[0]["resumed_from_step"]  # a checkpoint (every 4 steps) before step 10
    assert resumed in (4, 8), resumed
    for name in ("centroids.npy", "assignments/_SUCCESS", "report.html",
                 "stages/epoch-000-clustering.npz", "stages/epoch-000-training/meta.json",
                 "stages/final-clustering.npz"):
        assert os.path.exists(os.path.join(out, name)), name
    centroids = np.load(os.path.join(out, "centroids.npy"))
    assert centroids.shape == (10, 8)  # in the whitened space the saved model outputs

    # The driver dies during the epoch's training: its clustering is saved, its model is not.
    before = {"epoch-000-clustering.npz": mtime(out, "stages", "epoch-000-clustering.npz")}
    for name in ("model", "stages/epoch-000-training", "stages/final-clustering.npz",
                 "assignments", "metrics.json"):
        os.system(f"rm -rf '{os.path.join(out, name)}'")  # noqa: S605 (test-only, our tmp path)
    again = run_job(digits_shards, out, DC)
    assert {name: mtime(out, "stages", name) for name in before} == before
    assert os.path.exists(os.path.join(out, "stages/epoch-000-training/meta.json"))
    assert again["n_images"] == 1797 and len(again["epochs"]) == 1
    assert again["cluster_sizes"]["empty"] == 0
