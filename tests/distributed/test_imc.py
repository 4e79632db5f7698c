"""IMC-SwAV on Ray, end to end on the embedded digits: the main job with 2 workers (DDP, and
Sinkhorn's and the MI marginal's sums through the real gloo all-reduce), the assign job and
the report. On every image, ``assignments/`` and the assign job give the argmax of the
exported head, computed here from the network's parts in this process."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load as st_load

from pipeline.config import Config, resolve
from pipeline.methods.base import Embed
from pipeline.methods.imc import ImcNet, imc_arch
from pipeline.methods.reference import LocalRunner
from pipeline.models.weights import save_bytes
from pipeline.outputs import RunPaths, load_trained
from tests.distributed import assert_assigned_as
from tests.test_cluster_job import digits_shards  # noqa: F401  (fixture)

SETTINGS = ["method=imc", "cluster.k=10", "data.image_size=16", "train.epochs=2",
            "train.batch_size=128", "model.width=16", "imc.prototypes=100",
            "imc.head_hidden=128", "scale.workers=2",
            "scale.cpus_per_worker=0.5", "report.sample_rows=2000", "report.map_points=300"]


def head_argmax(cfg: Config, out: str, input_uri: str) -> dict[str, int]:
    """The method's cluster of every image: the exported network's last hidden layer in this
    process, times the head's last layer, argmax."""
    from pipeline.data.fs import locate

    trained = load_trained(RunPaths(locate(out)))
    net = ImcNet({**trained.arch, "output": "hidden"})
    net.load_state_dict(st_load(trained.model_bytes))
    hidden = LocalRunner(cfg, input_uri).embed(Embed("z", save_bytes(net),
                                                     imc_arch(cfg, "hidden")))
    last = net.last
    logits = torch.from_numpy(hidden.arrays["feature"]) @ last.weight.detach().T \
        + last.bias.detach()
    return dict(zip(hidden.ids.tolist(), logits.argmax(dim=1).tolist(), strict=True))


def test_imc_job_assign_job_and_report(digits_shards, tmp_path):  # noqa: F811
    """The warm-up is the default one, sized from the steps per epoch that the Ray runner
    sends the 2 workers (1,797 // 128 = 14: 3 of the 28 updates)."""
    from pipeline.assign_job import assign_job
    from pipeline.run import run

    out = str(tmp_path / "run")
    cfg: Config = resolve(Config, overrides=SETTINGS,
                          flags={"data.input": digits_shards, "data.output": out})
    metrics = run(cfg)
    assert metrics["method"] == "imc" and metrics["n_images"] == 1797
    stages = [h["stage"] for h in metrics["epochs"]]
    assert stages == ["train", "train", "calibration"]
    assert all(h["swav"] > 0 and h["marginal"] > 0 for h in metrics["epochs"][:2])
    assert all(0 <= h["nmi"] <= 1 and 0 <= h["acc"] <= 1 for h in metrics["epochs"][:2])

    method = head_argmax(cfg, out, digits_shards)
    assert len(method) == 1797
    assert_assigned_as(os.path.join(out, "assignments"), method)
    assert metrics["nmi"] > 0.03  # 2 short epochs; a collapsed head scores 0

    assign_job(out, digits_shards, str(tmp_path / "assigned"))
    assert_assigned_as(str(tmp_path / "assigned"), method)
    report = Path(out, "report.html").read_text()
    assert "imc" in report and "cluster-0" in report
