"""multiview without Ray: view parsing and its errors, the extractors and branch shapes, the
DEC and co-association math against hand-computed cases, and the fusion stages on the
reference runner."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save as st_save

from pipeline.config import Config, ConfigError, resolve
from pipeline.methods import multiview as mv
from pipeline.metrics import nmi
from pipeline.models import zoo


def cfg_with(views: list[str], *extra: str) -> Config:
    return resolve(Config, overrides=["method=multiview", f"multiview.views={json.dumps(views)}",
                                      *extra])


# ------------------------------------------------------------------------------------------
# Views.


@pytest.mark.parametrize("entry, kind, source, weights", [
    ("runs/online", "run", "runs/online", None),
    ("s3://bucket/runs/dc", "run", "s3://bucket/runs/dc", None),
    ("resnet18", "arch", "resnet18", None),
    ("resnet50:s3://bucket/r50.safetensors", "arch", "resnet50", "s3://bucket/r50.safetensors"),
    ("vit_b_16:/w/vit.pt", "arch", "vit_b_16", "/w/vit.pt"),
    ("noise:32", "noise", "", None),
])
def test_entries_parse(entry, kind, source, weights):
    spec = mv.parse_view(entry)
    assert (spec.kind, spec.source, spec.weights) == (kind, source, weights)


def test_options_override_the_input():
    spec = mv.parse_view("densenet121:/w.safetensors#size=64,mean=0.5/0.5/0.5,std=0.2/0.2/0.2")
    assert spec.weights == "/w.safetensors" and spec.size == 64
    assert spec.mean == (0.5, 0.5, 0.5) and spec.std == (0.2, 0.2, 0.2)
    assert mv.parse_view("noise:16").dim == 16
    spec = mv.parse_view("resnet50:/dino.pth#key=teacher,prefix=backbone.,size=96")
    assert (spec.key, spec.prefix, spec.size) == ("teacher", "backbone.", 96)


@pytest.mark.parametrize("entry, message", [
    ("resnet19:/w.pt", "unknown architecture 'resnet19'; known: resnet18"),
    ("resnet18#size=0", "bad option 'size=0'"),
    ("resnet18#colour=1", "bad option 'colour=1'"),
    ("noise:x", "noise\\[:DIM\\] needs DIM >= 1"),
    ("resnet18#key=teacher", "key= and prefix= say where an ARCH:WEIGHTS checkpoint"),
    ("runs/online#prefix=module.", "key= and prefix= say where"),
])
def test_bad_entries_are_named(entry, message):
    with pytest.raises(ConfigError, match=f"multiview.views: '{entry}': {message}"):
        mv.parse_view(entry)


def test_names_are_short_and_unique():
    specs = [mv.parse_view(e) for e in ("/runs/online/", "resnet18", "resnet18#size=32",
                                        "noise")]
    assert mv.view_names(specs) == ["online", "resnet18", "resnet18-2", "noise64"]


def test_preflight_names_a_missing_run(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(ConfigError, match=f"'{missing}': neither a finished run"):
        mv.check(cfg_with(["resnet18#size=16", missing]))


def test_preflight_refuses_weights_of_another_architecture(tmp_path):
    path = tmp_path / "r18.safetensors"
    path.write_bytes(st_save(zoo.build("resnet18").state_dict()))
    with pytest.raises(ConfigError, match=r"'densenet121:.*r18.safetensors'.*fill 0% of the "
                                          "architecture's tensors"):
        mv.check(cfg_with([f"densenet121:{path}"]))
    with pytest.raises(ConfigError, match="cannot load|not a valid"):
        bad = tmp_path / "junk.pt"
        bad.write_bytes(b"not weights")
        mv.check(cfg_with([f"resnet18:{bad}"]))


def test_weights_load_from_a_full_torchvision_checkpoint(tmp_path):
    """A classification checkpoint (fc included, weights-only torch.save) fills the trunk."""
    from torchvision.models import resnet18

    full = resnet18(weights=None)
    buf = io.BytesIO()
    torch.save(full.state_dict(), buf)
    path = tmp_path / "r18.pt"
    path.write_bytes(buf.getvalue())
    net, arch = mv.resolve_view(mv.parse_view(f"resnet18:{path}#size=32"), cfg_with(["x"]))
    assert torch.equal(net.extractor.conv1.weight, full.conv1.weight)
    assert arch["feature_dim"] == 512 and arch["size"] == 32
    # a self-supervised checkpoint: the teacher's backbone, pinned by the entry's options
    other = resnet18(weights=None)
    buf = io.BytesIO()
    torch.save({"student": {f"backbone.{k}": v for k, v in full.state_dict().items()},
                "teacher": {f"backbone.{k}": v for k, v in other.state_dict().items()}}, buf)
    (tmp_path / "dino.pth").write_bytes(buf.getvalue())
    net, _ = mv.resolve_view(mv.parse_view(f"resnet18:{tmp_path}/dino.pth#key=teacher"),
                             cfg_with(["x"]))
    assert torch.equal(net.extractor.conv1.weight, other.conv1.weight)


def test_every_architecture_gives_its_penultimate_features():
    x = torch.rand(2, 3, 32, 32)
    for name, entry in zoo.ZOO.items():
        net = zoo.build(name, 32).eval()
        with torch.no_grad():
            assert net(x).flatten(1).shape == (2, entry.dim), name


def test_a_view_maps_the_run_input_to_its_own():
    """Grey 16 px images under the run's normalisation -> RGB at the view's size under the
    view's; checked through an extractor that returns its input."""
    cfg = cfg_with(["x"], "data.channels=1", "data.image_size=16", "data.mean=[0.5]",
                   "data.std=[0.25]")
    _, arch = mv.resolve_view(mv.parse_view("resnet18#size=8,mean=0/0/0,std=1/1/1"), cfg)
    view = mv.ViewNet(arch)
    view.extractor = torch.nn.Identity()
    pixels = torch.full((1, 1, 16, 16), 0.6)  # raw 0.5 + 0.25 * 0.6 = 0.65
    out = view(pixels).reshape(1, 3, 8, 8)
    torch.testing.assert_close(out, torch.full((1, 3, 8, 8), 0.65))


def test_noise_features_are_deterministic_and_carry_nothing():
    noise = mv.NoiseFeatures(64, seed=0)
    x = torch.rand(500, 1, 8, 8)
    torch.testing.assert_close(noise(x), noise(x.clone()))
    f = noise(x)
    corr = np.corrcoef(f.numpy().T)
    assert np.abs(corr[~np.eye(64, dtype=bool)]).max() < 0.25
    assert abs(float(np.corrcoef(f[:, 0].numpy(), x.mean(dim=(1, 2, 3)).numpy())[0, 1])) < 0.2


# ------------------------------------------------------------------------------------------
# The math.


def test_student_t_by_hand():
    z = torch.tensor([[0.0, 0.0]])
    mu = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    # (1 + 1)^-1 = 0.5 and (1 + 4)^-1 = 0.2 -> 5/7, 2/7
    torch.testing.assert_close(mv.student_t(z, mu), torch.tensor([[5 / 7, 2 / 7]]))


def test_dec_target_by_hand():
    q = np.array([[0.8, 0.2], [0.4, 0.6]])
    f = np.array([1.2, 0.8])
    row0 = np.array([0.64 / f[0], 0.04 / f[1]])
    row1 = np.array([0.16 / f[0], 0.36 / f[1]])
    expected = np.stack([row0 / row0.sum(), row1 / row1.sum()])
    np.testing.assert_allclose(mv.dec_target(q), expected)
    p = torch.tensor(expected)
    assert float(mv.kl_loss(p, p)) == pytest.approx(0.0, abs=1e-9)
    assert float(mv.kl_loss(p, torch.tensor(q))) > 0


def test_coassociation_equals_spectral_clustering_of_the_explicit_matrix():
    rng = np.random.default_rng(0)
    truth = np.repeat(np.arange(4), 30)
    parts = []
    for _ in range(3):  # three noisy copies of the truth
        p = truth.copy()
        flip = rng.random(len(p)) < 0.15
        p[flip] = rng.integers(0, 4, flip.sum())
        parts.append(rng.permutation(4)[p])  # relabelled: labels are arbitrary
    got = mv.coassociation(parts, 4, seed=0)
    # explicit: C_ij = share of partitions agreeing; top-4 eigenvectors of D^-1/2 C D^-1/2
    c = np.mean([p[:, None] == p[None, :] for p in parts], axis=0)
    d = c.sum(axis=1)
    values, vectors = np.linalg.eigh(c / np.sqrt(np.outer(d, d)))
    u = vectors[:, np.argsort(values)[::-1][:4]]
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    expected = mv.kmeans_inertia(u.astype(np.float32), 4, 0, 30)[1]
    assert nmi(expected, got) == pytest.approx(1.0)
    assert nmi(truth, got) > max(nmi(truth, p) for p in parts)


def test_the_gap_tells_structure_from_noise():
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((3000, 32)).astype(np.float32)
    centres = rng.standard_normal((10, 32)) * 3
    blobs = (centres[rng.integers(0, 10, 3000)] + rng.standard_normal((3000, 32))).astype(np.float32)
    assert abs(mv.structure_gap(noise, 10, 0)) < 0.02
    assert mv.structure_gap(blobs, 10, 0) > 0.2


def test_view_weights():
    assert mv.view_weights([0.3, 0.1, 0.001], "gap", 0.05) == pytest.approx([0.75, 0.25, 0])
    assert mv.view_weights([0.3, 0.1, 0.001], "gated", 0.05) == pytest.approx([0.5, 0.5, 0])
    assert mv.view_weights([0.3, 0.001], "uniform", 0.05) == [0.5, 0.5]
    assert mv.view_weights([0.01, 0.0], "gap", 0.05) == [0.5, 0.5]  # none passes: all equal


def test_starts_need_a_pretraining_to_compare():
    with pytest.raises(ConfigError, match="multiview.starts: .*multiview.pretrain_epochs > 0"):
        cfg_with(["resnet18"], "multiview.starts=2", "multiview.pretrain_epochs=0")
    with pytest.raises(ConfigError, match="multiview.starts"):
        cfg_with(["resnet18"], "multiview.starts=0")
    assert cfg_with(["resnet18"], "multiview.starts=1", "multiview.pretrain_epochs=0")


def test_fusion_net_shapes_and_whitening():
    arch = {"in_dims": [12, 5], "dims": [6, 3], "weights": [0.7, 0.3], "hidden": 16,
            "embed_dim": 4, "k": 3, "alpha": 1.0}
    net = mv.FusionNet(arch)
    rng = np.random.default_rng(0)
    raw = [rng.standard_normal((8, 12)).astype(np.float32),
           rng.standard_normal((8, 5)).astype(np.float32)]
    for v, (d, p) in enumerate(((12, 6), (5, 3))):
        mean, proj = rng.standard_normal(d).astype(np.float32), rng.standard_normal(
            (d, p)).astype(np.float32)
        getattr(net, f"mean{v}").copy_(torch.from_numpy(mean))
        getattr(net, f"proj{v}").copy_(torch.from_numpy(proj))
        whitened = net.whiten([None] * v + [torch.from_numpy(raw[v])])[v]
        np.testing.assert_allclose(whitened.numpy(), mv.scaled_whitening(raw[v], mean, proj),
                                   rtol=1e-5, atol=1e-5)
    xs = net.whiten([torch.from_numpy(r) for r in raw])
    z = net.embed(xs)
    assert z.shape == (8, 4) and [x.shape for x in xs] == [(8, 6), (8, 3)]
    assert net.reconstruction(z, xs).shape == ()
    assert mv.student_t(z, net.mu).shape == (8, 3)
    # adding a view leaves the other branches' initial weights as they were
    more = mv.FusionNet({**arch, "in_dims": [12, 5, 7], "dims": [6, 3, 2],
                         "weights": [0.7, 0.3, 0.0]})
    for v in range(2):
        for a, b in zip([*net.encoders[v].parameters(), *net.decoders[v].parameters()],
                        [*more.encoders[v].parameters(), *more.decoders[v].parameters()],
                        strict=True):
            assert torch.equal(a, b)
    # a view of weight 0 is left out of z: changing it changes nothing
    net.view_w.copy_(torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(net.embed([xs[0], xs[1] * 5]), net.embed([xs[0], None]))


def test_the_reference_runner_fuses_views_of_the_digits(tmp_path):
    """Two views of the demo digits, one of them pure noise: the noise view's weight is 0,
    the table holds every baseline, and multiview's clusters are the nearest centroids of
    the exported composite model on raw images."""
    from pipeline.methods.arch import load_model
    from pipeline.methods.reference import LocalRunner, run_reference
    from pipeline.run import prepare_demo_input

    uri = prepare_demo_input()
    # 5 pretraining epochs (50 by default) leave z too raw for DEC's own start from it
    # (NMI 0.21 here against 0.65 at 50, measured once): start from the concatenation.
    cfg = cfg_with(["resnet18#size=16", "noise:16"], "data.image_size=16",
                   "multiview.pretrain_epochs=5", "train.epochs=4", "multiview.init=concat")
    trained = run_reference(cfg, uri)
    rows = {r["view"]: r for r in trained.results["views"]}
    assert set(rows) == {"resnet18", "noise16", "concatenation", "co-association", "multiview"}
    # three pretraining starts (the default), each its own branches; the lowest
    # reconstruction is kept, and it is the network DEC trained on
    starts, kept = trained.results["starts"], trained.results["kept_start"]
    losses = [s["reconstruction"] for s in starts]
    assert len(starts) == 3 and len(set(losses)) == 3 and kept == int(np.argmin(losses))
    assert starts[0]["seed"] == cfg.train.seed and len({s["seed"] for s in starts}) == 3
    pre = [row for row in trained.history if row["stage"] == "pretrain"]
    assert [row["kept"] for row in pre] == [r == kept for r in range(3)]
    assert [row["reconstruction"] for row in pre] == losses
    assert rows["noise16"]["weight"] == 0 and rows["resnet18"]["weight"] == 1
    assert rows["noise16"]["nmi"] < 0.1 and rows["multiview"]["nmi"] > 0.4
    model = load_model(trained.model_bytes, trained.arch, torch.device("cpu"))
    local = LocalRunner(cfg, uri)
    with torch.no_grad():
        z = model(local.pixels)
    clusters = mv.student_t(z, torch.from_numpy(trained.centroids)).argmax(dim=1)
    assert trained.centroids.shape == (10, cfg.multiview.embed_dim)
    assert nmi(np.asarray(local.labels), clusters.numpy()) == pytest.approx(
        rows["multiview"]["nmi"], abs=0.01)


def test_weights_and_runs_come_from_s3(s3_bucket):
    """ARCH:s3://… weights through the same S3 client as the data (a real endpoint)."""
    import boto3

    bucket, s3 = s3_bucket
    state = zoo.build("resnet18").state_dict()
    client = boto3.client("s3", endpoint_url=s3.endpoint_url, region_name=s3.region)
    client.put_object(Bucket=bucket, Key="w/r18.safetensors", Body=st_save(state))
    cfg = cfg_with(["x"])
    cfg.s3 = s3
    net, _ = mv.resolve_view(mv.parse_view(f"resnet18:s3://{bucket}/w/r18.safetensors"), cfg)
    assert torch.equal(net.extractor.conv1.weight, state["conv1.weight"])
    with pytest.raises(ConfigError, match=f"s3://{bucket}/runs/none.*neither a finished run"):
        mv.check(_with_s3(cfg_with([f"s3://{bucket}/runs/none"]), s3))


def _with_s3(cfg: Config, s3) -> Config:
    cfg.s3 = s3
    return cfg
