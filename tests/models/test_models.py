"""Backbones and safe weight loading (safetensors / weights-only, never arbitrary pickles)."""

from __future__ import annotations

import io
import pickle

import pytest
import torch
from safetensors.torch import save_file
from torchvision import models as tvm

from pipeline.models import zoo
from pipeline.models.backbones import build_embedder
from pipeline.models.loading import load_pretrained
from pipeline.models.weights import WeightsError, fit, read_tables, save_bytes


@pytest.mark.parametrize("backbone, channels, size", [("small_cnn", 1, 28), ("small_cnn", 3, 32),
                                                      ("resnet18", 3, 64), ("resnet18", 1, 32)])
def test_embedder_shapes_and_unit_norm(backbone, channels, size):
    model = build_embedder(backbone, channels, 24).eval()
    with torch.no_grad():
        f = model(torch.randn(4, channels, size, size))
    assert f.shape == (4, 24)
    assert torch.allclose(f.norm(dim=1), torch.ones(4), atol=1e-5)


def test_torchvision_resnet_state_dict_loads_into_the_trunk(tmp_path):
    reference = tvm.resnet18(weights=None)
    path = tmp_path / "resnet18.pt"
    torch.save(reference.state_dict(), path)  # a weights-only checkpoint incl. fc.*
    model = build_embedder("resnet18", 3, 16)
    assert load_pretrained(model, str(path)) == "trunk"
    assert torch.equal(model.trunk.conv1.weight, reference.conv1.weight)


def test_safetensors_whole_model_round_trip(tmp_path):
    model = build_embedder("small_cnn", 1, 8)
    (tmp_path / "m.safetensors").write_bytes(save_bytes(model))
    other = build_embedder("small_cnn", 1, 8)
    assert load_pretrained(other, str(tmp_path / "m.safetensors")) == "model"
    for a, b in zip(model.state_dict().values(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_pickles_and_garbage_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"x": Evil()}))
    with pytest.raises(WeightsError, match="weights-only"):
        load_pretrained(build_embedder("small_cnn", 1, 8), str(tmp_path / "evil.pt"))
    save_file({"unrelated": torch.zeros(3)}, tmp_path / "other.safetensors")
    with pytest.raises(WeightsError, match="no tensor matches"):
        load_pretrained(build_embedder("small_cnn", 1, 8), str(tmp_path / "other.safetensors"))
    with pytest.raises(WeightsError, match="missing.pt"):
        load_pretrained(build_embedder("small_cnn", 1, 8), str(tmp_path / "missing.pt"))


def saved(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def prefixed(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in state.items()}


def test_weights_are_found_wherever_training_scripts_put_them():
    """The checkpoint layouts users hold: a table nested under a key, names under a prefix;
    the best place wins, one that fits as well is named, and key/prefix pin the choice."""
    net = zoo.build("resnet18")
    q, k = (tvm.resnet18(weights=None).state_dict() for _ in range(2))
    layouts = {  # checkpoint -> (key, prefix) the weights come from
        "moco": ({"epoch": 3, "state_dict": {**prefixed(q, "module.encoder_q."),
                                             **prefixed(k, "module.encoder_k.")}},
                 ("state_dict", "module.encoder_q.")),
        "torchvision scripts": ({"model": q, "optimizer": {"state": {}}, "epoch": 89},
                                ("model", "")),
        "torch.compile": (prefixed(q, "_orig_mod."), ("", "_orig_mod.")),
        "dino": ({"student": prefixed(k, "module.backbone."),
                  "teacher": prefixed(q, "backbone.")}, ("teacher", "backbone.")),
    }
    for name, (checkpoint, (key, prefix)) in layouts.items():
        net = zoo.build("resnet18")
        tables = read_tables(saved(checkpoint), f"{name}.pt")
        pinned = {"key": key} if name == "dino" else {}  # student and teacher both fit
        found = zoo.load_checked(net, tables, name, 0.9, pinned.get("key"))
        assert (found.coverage, found.table, found.prefix) == (1.0, key, prefix), name
        assert torch.equal(net.conv1.weight, q["conv1.weight"]), name
    moco = fit(net.state_dict(), read_tables(saved(layouts["moco"][0]), "m.pt"), "m.pt")
    assert moco.also == ("key 'state_dict', prefix 'module.encoder_k.'",)
    zoo.load_checked(net, read_tables(saved(layouts["moco"][0]), "m.pt"), "m.pt", 0.9,
                     prefix="module.encoder_k.")
    assert torch.equal(net.conv1.weight, k["conv1.weight"])
    dino = read_tables(saved(layouts["dino"][0]), "d.pt")
    first = fit(net.state_dict(), dino, "d.pt")  # the first that fits, the other named
    assert (first.table, first.also) == ("student", ("key 'teacher', prefix 'backbone.'",))
    with pytest.raises(WeightsError, match=r"d.pt: no table of tensors under key 'ema' "
                                           r"\(found: 'student', 'teacher'\)"):
        fit(net.state_dict(), dino, "d.pt", table="ema")
    with pytest.raises(WeightsError, match=r"fill 0% .*best at key 'teacher', prefix 'x\.'"):
        zoo.load_checked(net, dino, "d.pt", 0.9, "teacher", "x.")


def test_model_weights_key_and_prefix_pin_the_place_and_shapes_are_checked(tmp_path):
    """``model.weights_key``/``weights_prefix`` reach the loader; a backbone tensor of
    another shape (ImageNet resnet50 weights for a resnet18) is refused, not skipped."""
    from pipeline.config import Config, ConfigError, resolve
    from pipeline.methods.arch import initial_model

    student, teacher = tvm.resnet18(weights=None), tvm.resnet18(weights=None)
    path = tmp_path / "dino.pth"
    path.write_bytes(saved({"student": prefixed(student.state_dict(), "backbone."),
                            "teacher": prefixed(teacher.state_dict(), "backbone.")}))
    cfg = resolve(Config, overrides=["model.backbone=resnet18", "data.channels=3",
                                     f"model.weights={path}", "model.weights_key=teacher"])
    assert torch.equal(initial_model(cfg).trunk.conv1.weight, teacher.conv1.weight)
    with pytest.raises(ConfigError, match="model.weights_prefix: says where model.weights"):
        resolve(Config, overrides=["model.weights_prefix=backbone."])
    (tmp_path / "r50.pt").write_bytes(saved(tvm.resnet50(weights=None).state_dict()))
    with pytest.raises(WeightsError, match=r"r50.pt: does not fit the backbone: \d+ tensors "
                                           r"have another shape \(e.g. layer1.0.conv1.weight"):
        load_pretrained(build_embedder("resnet18", 3, 16), str(tmp_path / "r50.pt"))


def test_a_lightning_checkpoint_of_our_model_loads_whole(tmp_path):
    """``{"state_dict": {"model.<our names>": ...}}``: the whole model, under a prefix."""
    model = build_embedder("small_cnn", 1, 8)
    (tmp_path / "l.ckpt").write_bytes(saved({"state_dict": prefixed(model.state_dict(),
                                                                    "model.")}))
    other = build_embedder("small_cnn", 1, 8)
    assert load_pretrained(other, str(tmp_path / "l.ckpt")) == "model"
    for a, b in zip(model.state_dict().values(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_precise_bn_stats_are_the_average_of_the_batch_statistics():
    """recompute_bn_stats: each BatchNorm's running mean/var = the mean of its per-batch
    statistics (Wu & Johnson 2021), whatever momentum training used; momentum restored."""
    from pipeline.models.layers import recompute_bn_stats

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4, momentum=0.3))
    x = torch.randn(12, 3) * 2 + 1
    assert recompute_bn_stats(model, x, batch=4) == 3
    bn = model[1]
    h = model[0](x).detach().split(4)
    assert torch.allclose(bn.running_mean, torch.stack([b.mean(0) for b in h]).mean(0), atol=1e-6)
    assert torch.allclose(bn.running_var, torch.stack([b.var(0) for b in h]).mean(0), atol=1e-5)
    assert bn.momentum == 0.3 and not model.training
    # a trailing batch of one row is skipped (BatchNorm cannot normalise it)
    assert recompute_bn_stats(model, x[:9], batch=4) == 2
