"""DEPICT on Ray, end to end on the embedded digits: the main job with 2 workers (one killed
mid-pretraining), the assign job and the report. The exported model gives exactly the
method's cluster for every image, and the 2-worker frequencies equal the single-process
ones."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from pipeline.config import Config, resolve
from pipeline.data.fs import locate
from pipeline.distributed.runner import load_per_id
from pipeline.methods.base import Embed
from pipeline.methods.depict import DepictNet, depict_arch, softmax, targets
from pipeline.methods.reference import LocalRunner
from pipeline.models.weights import save_bytes
from tests.distributed import assert_assigned_as
from tests.test_cluster_job import digits_shards  # noqa: F401  (fixture)

SETTINGS = ["method=depict", "cluster.k=10", "data.image_size=16", "train.epochs=1",
            "depict.pretrain_epochs=1", "train.batch_size=64", "scale.workers=2",
            "scale.cpus_per_worker=0.5", "scale.checkpoint_every_steps=8",
            "report.sample_rows=2000", "report.map_points=300"]


def test_depict_job_assign_job_and_report(digits_shards, tmp_path):  # noqa: F811
    from pipeline.assign_job import assign_job
    from pipeline.run import run

    out = str(tmp_path / "run")
    cfg: Config = resolve(Config, overrides=SETTINGS + ["debug.kill_worker_at_step=20"],
                          flags={"data.input": digits_shards, "data.output": out})
    metrics = run(cfg)
    assert os.path.exists(os.path.join(out, "checkpoints", "_fault-worker"))  # it was killed
    assert metrics["method"] == "depict" and metrics["n_images"] == 1797
    history = metrics["epochs"]
    # resumed from the last checkpoint registered before the kill at step 20: step 16, or 8
    # when the kill outran the upload of 16
    assert history[0]["stage"] == "pretrain" and history[0]["resumed_from_step"] in (8, 16)
    assert [h["stage"] for h in history[1:]] == ["initial-clustering", "joint"]
    assert metrics["cluster_sizes"]["empty"] == 0

    # the export: the assign pass gives every image the method's own cluster, argmax p
    final = load_per_id(locate(str(sorted(Path(out, "stages").glob("round-*-targets.npz"))[-1])))
    method = dict(zip(final.ids.tolist(), final.arrays["cluster"].tolist(), strict=True))
    assert_assigned_as(os.path.join(out, "assignments"), method)
    assert metrics["nmi"] == history[-1]["nmi"] and metrics["nmi"] > 0.3

    # the assign job on the same images reproduces them
    assign_job(out, digits_shards, str(tmp_path / "assigned"))
    assert_assigned_as(str(tmp_path / "assigned"), method)
    report = Path(out, "report.html").read_text()
    assert "depict" in report and "cluster-0" in report

    # frequencies and targets of a 2-worker clean pass equal the single-process ones
    stage = load_per_id(locate(os.path.join(out, "stages", "round-000-targets.npz")))
    from safetensors.torch import load as st_load

    net = DepictNet(depict_arch(cfg))
    net.load_state_dict(st_load(Path(out, "stages", "round-000-training",
                                     "model.safetensors").read_bytes()))
    z = LocalRunner(cfg, digits_shards).embed(Embed("z", save_bytes(net), depict_arch(cfg)))
    assert np.array_equal(z.ids, stage.ids)
    p = softmax(z.arrays["feature"] @ stage.extra["head_w"].T + stage.extra["head_b"])
    np.testing.assert_allclose(p.sum(axis=0), stage.extra["frequency"], rtol=1e-4)
    np.testing.assert_allclose(targets(p, cfg.depict.target), stage.arrays["target"].astype(np.float64),
                               atol=2e-3)
