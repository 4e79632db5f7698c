"""The method seam: a method that is one module plus a registry line runs through both
runners, the single-process reference and the Ray stage runner, and they agree."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipeline import methods
from pipeline.config import Config, resolve
from pipeline.methods.base import Context, Embed, PerId, Train, drive, steps_per_epoch
from pipeline.metrics import nmi
from tests.test_cluster_job import digits_shards  # noqa: F401  (fixture)

TINY = methods.staged("tiny-kmeans", "tests only", "tests.methods.tiny_kmeans")
# 599 divides the 1,797 digits: neither runner drops a last partial batch, so both sum the
# same rows every Lloyd iteration (with 64 they dropped different rows: NMI 0.985).
SETTINGS = ["method=tiny-kmeans", "cluster.k=10", "train.epochs=4", "train.batch_size=599",
            "data.image_size=16", "model.width=8", "model.feature_dim=16",
            "scale.cpus_per_worker=0.5", "report.map_points=300"]


@pytest.fixture()
def tiny(monkeypatch):
    monkeypatch.setitem(methods.REGISTRY, "tiny-kmeans", TINY)


def cfg_of(input_uri: str, output: str, *extra: str) -> Config:
    cfg: Config = resolve(Config, overrides=SETTINGS + list(extra),
                          flags={"data.input": input_uri, "data.output": output})
    return cfg


def test_drive_sends_each_result_back():
    def stages(_):
        got = yield "a"
        got2 = yield got + "b"
        return got2

    class Echo:
        def embed(self, stage):  # pragma: no cover - never an Embed here
            raise AssertionError

        def train(self, stage):
            return stage + "!"

    assert drive(stages(None), Echo()) == "a!b!"


def test_per_id_lookup_refuses_unknown_ids():
    table = PerId(np.array(["a", "c"]), {"x": np.array([1, 3])})
    assert table.take(np.array(["c", "a"]), "x").tolist() == [3, 1]
    with pytest.raises(KeyError):
        table.take(np.array(["b"]), "x")


def test_lloyd_program_is_lloyds_algorithm():
    """Two batches, one epoch: the centroids move to their members' means."""
    from tests.methods.tiny_kmeans import Lloyd

    program = Lloyd(np.array([[0.0, 0.0], [10.0, 10.0]], np.float32))
    ctx = Context()
    program.setup(ctx)
    for rows in ([[1, 1], [9, 9]], [[3, 3], [11, 11]]):
        program.step({"feature": torch.tensor(rows, dtype=torch.float32)}, ctx)
    parts = program.end_epoch(0, ctx)
    assert program.module.centroids.tolist() == [[2.0, 2.0], [10.0, 10.0]]
    assert parts == {"sqdist": pytest.approx((2 + 2 + 18 + 2) / 4), "images": 4}


def test_steps_per_epoch_is_the_same_on_any_number_of_workers():
    """W workers, each with an equal split of rows // W in batches of B / W (drop_last),
    take the steps of one worker over every row in batches of B."""
    for world in (1, 2, 3, 4, 8):
        for batch in range(world, 12 * world + 1, world):
            for rows in range(0, 6 * batch):
                stage = Train("t", 1, None, passes=2, batch_size=batch)  # type: ignore[arg-type]
                per_worker = (rows // world) // (batch // world) * 2
                assert steps_per_epoch(rows, stage, 256) == per_worker, (world, batch, rows)
    assert steps_per_epoch(1797, Train("t", 1, None), 256) == 7  # type: ignore[arg-type]


def test_reference_and_ray_runner_agree(tiny, digits_shards, tmp_path):  # noqa: F811
    """Same seed, 1 worker: the partitions of the digits agree (NMI >= 0.99), and the Ray
    run is a complete run (assignments, metrics, report) with no method-specific code, even
    though its worker is killed at step 5 (3 steps an epoch, a checkpoint every 2) and
    resumes from a checkpoint."""
    from pipeline.methods.reference import LocalRunner, run_reference
    from pipeline.run import run

    out = str(tmp_path / "run")
    ref = run_reference(cfg_of(digits_shards, out), digits_shards)
    # decoded once (data.cache_decoded): both of the runner's datasets share that copy
    metrics = run(cfg_of(digits_shards, out, "debug.kill_worker_at_step=5",
                         "scale.checkpoint_every_steps=2", "data.cache_decoded=true"))
    assert os.path.exists(os.path.join(out, "checkpoints", "_fault-worker"))  # it was killed
    assert metrics["method"] == "tiny-kmeans" and metrics["n_images"] == 1797
    for name in ("report.html", "run.json", "stages/frozen-features.npz",
                 "stages/lloyd/model.safetensors"):
        assert os.path.exists(os.path.join(out, name)), name
    ray_centroids = np.load(os.path.join(out, "centroids.npy"))
    features = LocalRunner(cfg_of(digits_shards, out), digits_shards).embed(
        Embed("f", ref.model_bytes, ref.arch))
    x = features.arrays["feature"]

    def labels(c: np.ndarray) -> np.ndarray:
        return ((x[:, None, :] - c[None]) ** 2).sum(-1).argmin(1)

    assert nmi(labels(ref.centroids), labels(ray_centroids)) >= 0.99
    assigned = pq.read_table(os.path.join(out, "assignments")).to_pandas()
    by_id = dict(zip(assigned["id"], assigned["cluster"], strict=True))
    ray_labels = np.array([by_id[i] for i in features.ids])
    assert nmi(labels(ray_centroids), ray_labels) >= 0.99  # the assign pass agrees
    with open(os.path.join(out, "history.json")) as fh:
        history = json.load(fh)
    assert [h["epoch"] for h in history] == [0, 1, 2, 3]
    # resumed in epoch 1 from the last checkpoint Ray Train had registered before the kill:
    # step 4 (mid-epoch) or, when the kill outran its upload, step 3 (epoch 0's end)
    resumed = [h.get("resumed_from_step") for h in history]
    assert resumed[0] is None and resumed[1] in (3, 4) and resumed[2:] == [None, None]
    assert history[-1]["sqdist"] <= history[0]["sqdist"]  # Lloyd never increases inertia
    # both runners tell the program the steps of an epoch it then takes: 1,797 // 599
    assert [h["steps_per_epoch"] for h in history] == [3] * 4
    assert [h["steps_per_epoch"] for h in ref.history] == [3] * 4
    assert {h["images"] for h in history + ref.history} == {3 * 599}
    assert metrics["nmi"] > 0.1  # random CNN features carry some digit identity (~0.19)


def test_array_batches_split_one_seeded_order_over_the_workers():
    """An ``inputs="arrays"`` stage: every worker draws from one permutation per (seed,
    epoch, pass), in equal shares, each row at most once, as many steps as
    steps_per_epoch says; the same call gives the same batches (a resume replays them)."""
    from pipeline.methods.base import array_batches

    ids = np.array([f"{i:03d}" for i in range(103)])
    table = PerId(ids, {"x": np.arange(103, dtype=np.float32)[:, None]}, ids.copy())
    stage = Train("t", 1, None, join={"x": table}, inputs="arrays", batch_size=20)  # type: ignore[arg-type]
    one = [b["id"] for b in array_batches(stage, 0, 1, 20, 0, 0, 0)]
    assert len(one) == steps_per_epoch(0, stage, 256) == 5
    two = [list(array_batches(stage, r, 2, 10, 0, 0, 0)) for r in range(2)]
    assert len(two[0]) == len(two[1]) == 5  # (103 // 2) // 10
    rows = np.concatenate([b["id"] for part in two for b in part])
    assert len(rows) == len(set(rows)) == 100
    assert all(np.array_equal(b["x"][:, 0].astype(int), b["id"].astype(int)) for b in two[0])
    assert all(np.array_equal(b["label"], b["id"]) for b in two[1])
    again = [b["id"] for b in array_batches(stage, 0, 1, 20, 0, 0, 0)]
    assert all(np.array_equal(a, b) for a, b in zip(one, again, strict=True))
    other = [b["id"] for b in array_batches(stage, 0, 1, 20, 0, 1, 0)]
    assert not all(np.array_equal(a, b) for a, b in zip(one, other, strict=True))
    with pytest.raises(ValueError, match="different ids"):
        Train("t", 1, None, join={"x": table, "y": PerId(ids[:5], {"y": ids[:5]})},  # type: ignore[arg-type]
              inputs="arrays").rows()


def test_a_stage_stops_after_the_epoch_in_which_its_budget_ran_out():
    """``train.time_budget_s``, or a stage's own ``budget_s`` (a share a method gives it),
    ends training at an epoch's end; 0 is no budget (both runners through ``Train.budget``)."""
    from torch import nn

    from pipeline.methods.base import Hooks
    from pipeline.methods.reference import LocalRunner

    class Idle(Hooks):
        module = nn.Linear(1, 1)

        def setup(self, ctx):
            return []

        def step(self, batch, ctx):
            return {}

        def end_epoch(self, epoch, ctx):
            return {}

    class Arrays(LocalRunner):
        def __init__(self, cfg):  # an arrays stage reads no image
            self.cfg, self.ids = cfg, np.array([], str)

    ids = np.array([f"{i:02d}" for i in range(40)])
    table = PerId(ids, {"x": np.zeros((40, 1), np.float32)})

    def epochs(budget_s, *overrides):
        cfg = resolve(Config, overrides=list(overrides))
        stage = Train("t", 3, Idle(), join={"x": table}, batch_size=10, inputs="arrays",
                      budget_s=budget_s)
        return len(Arrays(cfg).train(stage).history)

    assert epochs(None) == 3 and epochs(None, "train.time_budget_s=1e-6") == 1
    assert epochs(1e-6, "train.time_budget_s=600") == 1 and epochs(0.0, "train.time_budget_s=1e-6") == 3
