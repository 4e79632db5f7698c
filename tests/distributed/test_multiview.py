"""multiview on Ray, end to end on the embedded digits with two views (a finished run of
ours and a torchvision architecture): the main job with 2 workers (one killed in a fusion
stage), the assign job, the report, per-view resume, and the reference runner's agreement."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import Config, resolve
from pipeline.data.fs import locate
from pipeline.distributed.runner import load_per_id
from pipeline.methods import multiview as mv
from tests.distributed import assert_assigned_as
from tests.test_cluster_job import SMALL, digits_shards  # noqa: F401  (fixture)

FUSION = ["method=multiview", "cluster.k=10", "data.image_size=16", "multiview.batch_size=64",
          "multiview.pretrain_epochs=4", "multiview.starts=2", "train.epochs=4",
          "scale.cpus_per_worker=0.5",
          "scale.checkpoint_every_steps=8", "report.sample_rows=2000", "report.map_points=300"]


@pytest.fixture(scope="module")
def view_run(tmp_path_factory):
    """A finished run of ours as the first view: an untrained ``online`` model written by
    the code every run's training stage ends with (``save_trained``: ``model/`` published
    with its ``_SUCCESS``), so the test pays for no training."""
    from pipeline.data.fs import locate as loc
    from pipeline.methods.arch import build_model, model_arch
    from pipeline.models.weights import save_bytes
    from pipeline.outputs import RunPaths, TrainedModel, save_trained

    out = str(tmp_path_factory.mktemp("view") / "online")
    cfg = resolve(Config, None, SMALL, {"data.output": out})
    torch.manual_seed(0)
    model = build_model(cfg)
    save_trained(cfg, TrainedModel(save_bytes(model), model_arch(cfg),
                                   np.zeros((5, 16), np.float32)), RunPaths(loc(out)))
    return out


def multiview_cfg(shards: str, out: str, views: list[str], *extra: str) -> Config:
    cfg: Config = resolve(Config, overrides=[*FUSION, f"multiview.views={json.dumps(views)}",
                                             *extra],
                          flags={"data.input": shards, "data.output": out})
    return cfg


def training_clusters(out: str, trained_model: Path) -> dict[str, int]:
    """The method's clusters as training left them: the saved whitened views through the
    exported fusion network, nearest centroid (argmax q)."""
    from safetensors.torch import load as st_load

    views = [load_per_id(locate(str(p))) for p in sorted(Path(out, "stages").glob("view-*.npz"))]
    table = mv.combine(views)
    arch = json.loads(Path(trained_model, "model.json").read_text())
    net = mv.FusionNet(arch["fusion"])
    state = st_load(Path(trained_model, "model.safetensors").read_bytes())
    net.load_state_dict({k.removeprefix("fusion."): v for k, v in state.items()
                         if k.startswith("fusion.")})
    q = mv.soft_assign(net, mv.fused(net, table))
    return dict(zip(table.ids.tolist(), q.argmax(axis=1).tolist(), strict=True))


def test_multiview_job_assign_job_report_and_resume(digits_shards, view_run, tmp_path):  # noqa: F811
    from pipeline.assign_job import assign_job
    from pipeline.run import run

    out = str(tmp_path / "run")
    views = [view_run, "resnet18#size=16"]
    cfg = multiview_cfg(digits_shards, out, views, "scale.workers=2",
                        "debug.kill_worker_at_step=30")
    metrics = run(cfg)
    assert os.path.exists(os.path.join(out, "checkpoints", "_fault-worker"))  # it was killed
    assert metrics["method"] == "multiview" and metrics["n_images"] == 1797
    rows = {r["view"]: r for r in metrics["views"]}
    assert set(rows) == {"online", "resnet18", "concatenation", "co-association", "multiview"}
    assert all({"nmi", "acc", "ari"} <= set(r) for r in rows.values())
    assert rows["online"]["weight"] + rows["resnet18"]["weight"] == pytest.approx(1.0)
    history = metrics["epochs"]
    # 1,797 // 64 = 28 steps an epoch: the kill at step 30 is in the second pretrain epoch
    assert history[0]["stage"] == "pretrain" and history[0]["resumed_from_step"] in (8, 16, 24, 28)
    assert [row["start"] for row in history[:2]] == [0, 1]  # two pretraining starts, one kept
    assert len(metrics["starts"]) == 2 and history[metrics["kept_start"]]["kept"]
    assert metrics["cluster_sizes"]["empty"] == 0

    # the assignments are the method's clusters, and so are the assign job's
    method = training_clusters(out, Path(out, "model"))
    assert_assigned_as(os.path.join(out, "assignments"), method)
    assert metrics["nmi"] == pytest.approx(rows["multiview"]["nmi"], abs=1e-4)
    assign_job(out, digits_shards, str(tmp_path / "assigned"))
    assert_assigned_as(str(tmp_path / "assigned"), method)
    report = Path(out, "report.html").read_text()
    assert "<table id=views>" in report and "co-association" in report

    # per-view resume: with only view 0's pass left, a re-run recomputes view 1 alone
    first = Path(out, "stages", "view-00-online.npz")
    mtime = first.stat().st_mtime_ns
    for path in Path(out).iterdir():
        if path.name not in ("stages", "run.json", "config.yaml", ".lock"):
            _remove(path)
    for path in Path(out, "stages").iterdir():
        if path != first:
            _remove(path)
    again = run(multiview_cfg(digits_shards, out, views, "scale.workers=2"))
    assert first.stat().st_mtime_ns == mtime and Path(out, "stages", "view-01-resnet18.npz").exists()
    assert again["views"][:2] == [{**r, "embed_s": again["views"][i]["embed_s"]}
                                  for i, r in enumerate(metrics["views"][:2])]


def test_view_passes_run_on_an_actor_pool_before_any_trainer(digits_shards, tmp_path):  # noqa: F811
    """A view pass (``Embed(pool=True)``) posted before any train stage runs on a Ray Data
    actor pool, starts no Ray Train run, and gives the reference runner's features."""
    from pipeline.distributed.runner import RayRunner
    from pipeline.methods.base import Embed
    from pipeline.methods.reference import LocalRunner
    from pipeline.models.weights import save_bytes
    from pipeline.outputs import RunPaths

    cfg = multiview_cfg(digits_shards, str(tmp_path / "run"), ["resnet18#size=16"],
                        "scale.workers=2")
    net, arch = mv.resolve_view(mv.parse_view("resnet18#size=16"), cfg)
    stage = Embed("view-00-resnet18", save_bytes(net), arch, pool=True)
    runner = RayRunner(cfg, digits_shards, RunPaths(locate(str(tmp_path / "run"))))
    try:
        found = runner.embed(stage)
        assert not runner.trainer.started
    finally:
        runner.close()
    ref = LocalRunner(cfg, digits_shards).embed(stage)
    assert found.ids.tolist() == ref.ids.tolist() and len(found.ids) == 1797
    assert found.labels is not None and ref.labels is not None
    assert found.labels.tolist() == ref.labels.tolist()
    np.testing.assert_allclose(found.arrays["feature"], ref.arrays["feature"], atol=1e-4)


def test_a_pool_with_no_room_fails_naming_the_stage(digits_shards, tmp_path, monkeypatch):  # noqa: F811
    """A pool whose actor cannot start (here 3 CPUs on the suite's 2-CPU cluster; on a real
    one, no free GPU) fails in one line naming the stage, instead of Ray Data's endless
    wait."""
    from pipeline.distributed import runner as runner_mod
    from pipeline.methods.base import Embed
    from pipeline.models.weights import save_bytes
    from pipeline.outputs import RunPaths

    monkeypatch.setattr(runner_mod, "POOL_START_TIMEOUT_S", 5)
    cfg = multiview_cfg(digits_shards, str(tmp_path / "run"), ["noise:8"],
                        "scale.cpus_per_worker=3")
    net, arch = mv.resolve_view(mv.parse_view("noise:8"), cfg)
    runner = runner_mod.RayRunner(cfg, digits_shards, RunPaths(locate(str(tmp_path / "run"))))
    with pytest.raises(RuntimeError, match=r"stage view-00-noise8: no actor of its pool "
                                           r"\(3.0 CPU\) started within 5 s"):
        runner.embed(Embed("view-00-noise8", save_bytes(net), arch, pool=True))
    assert not runner.trainer.started


def _remove(path: Path) -> None:
    import shutil

    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()


def test_ray_and_reference_runner_agree(digits_shards, view_run, tmp_path):  # noqa: F811
    """One worker, the same views: the Ray runner's fusion (arrays drawn by the same
    permutation, Train(inputs="arrays")) ends where the reference runner's does."""
    from pipeline.data.fs import locate as loc
    from pipeline.distributed.runner import train_stages
    from pipeline.methods.reference import run_reference
    from pipeline.outputs import RunPaths

    cfg = multiview_cfg(digits_shards, str(tmp_path / "run"), [view_run, "noise:16"])
    on_ray = train_stages(cfg, digits_shards, RunPaths(loc(str(tmp_path / "run"))))
    ref = run_reference(cfg, digits_shards)
    ray_rows = {r["view"]: r for r in on_ray.results["views"]}
    ref_rows = {r["view"]: r for r in ref.results["views"]}
    assert ray_rows["noise16"]["weight"] == ref_rows["noise16"]["weight"] == 0
    for name in ray_rows:
        assert ray_rows[name]["nmi"] == pytest.approx(ref_rows[name]["nmi"], abs=0.01), name
    np.testing.assert_allclose(on_ray.centroids, ref.centroids, atol=2e-3)
