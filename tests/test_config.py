"""Layered config: defaults < YAML < flags < --set, validated with the field named."""

from __future__ import annotations

import pytest

from pipeline.config import Config, ConfigError, IngestConfig, dump_yaml, resolve


def test_layers_apply_in_order(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("cluster:\n  k: 20\ntrain:\n  lr: 0.01\n  epochs: 5\n")
    cfg = resolve(Config, str(path), ["train.lr=0.02", "model.backbone=resnet18"],
                  {"cluster.k": 30, "train.epochs": None})
    assert cfg.cluster.k == 30  # flag beats file
    assert cfg.train.lr == 0.02  # --set beats file
    assert cfg.train.epochs == 5  # unset flag keeps the file's value
    assert cfg.model.backbone == "resnet18"
    assert cfg.train.batch_size == Config().train.batch_size  # default


def test_exponent_notation_is_a_float_where_a_float_is_expected():
    """YAML 1.1 reads ``1e-6`` (no dot) as a string; a float field takes it as the number."""
    cfg = resolve(Config, None, ["train.lr=1e-3", "train.time_budget_s=2E+2",
                                 "train.weight_decay=.5e-4"])
    assert (cfg.train.lr, cfg.train.time_budget_s, cfg.train.weight_decay) == (1e-3, 200.0, 5e-5)
    with pytest.raises(ConfigError, match="train.lr: must be float"):
        resolve(Config, None, ["train.lr=1e"])
    with pytest.raises(ConfigError, match="cluster.k: must be int"):
        resolve(Config, None, ["cluster.k=1e2"])


def test_dump_round_trips(tmp_path):
    cfg = resolve(Config, None, ["cluster.k=7", "data.mean=[0.1, 0.2, 0.3]",
                                 "data.std=[1, 1, 1]", "data.channels=3"])
    path = tmp_path / "config.yaml"
    path.write_text(dump_yaml(cfg))
    assert resolve(Config, str(path)) == cfg


@pytest.mark.parametrize("override, message", [
    ("method=kmeans", "method: 'kmeans' is not a method; available: online, deepcluster"),
    ("model.backbone=vit", "model.backbone: must be one of 'small_cnn', 'resnet18', 'resnet50'"),
    ("train.lr=-1", "train.lr: must be > 0"),
    ("train.lr=fast", "train.lr: must be float"),
    ("cluster.k=1", "cluster.k: must be >= 2"),
    ("cluster.k=2.5", "cluster.k: must be int"),
    ("data.channels=2", "data.channels: must be 1 or 3"),
    ("online.augment=maybe", "online.augment: must be true or false"),
    ("train.colour=red", "train.colour: unknown key; allowed keys here: epochs"),
    ("bogus=1", "bogus: unknown key"),
    ("data.std=[0.5, 0]", "data.std"),
    ("cluster.drift_smoothing=2", "cluster.drift_smoothing: must be in [0, 1]"),
    ("cluster.centroid_window=-1", "cluster.centroid_window: must be >= 0"),
    ("train.batch_size=255", "train.batch_size: must be divisible by scale.workers"),
    ("imc.prototypes=0", "imc.prototypes: must be > 0"),
    ("imc.eps=0", "imc.eps: must be > 0"),
    ("imc.local_crops=-1", "imc.local_crops: must be >= 0"),
    ("imc.global_scale=[0.5]", "imc.global_scale: needs 2 values, each in (0, 1]"),
    ("imc.local_scale=[0.4, 0.08]", "imc.local_scale: needs [min, max] with min <= max"),
    ("imc.jitter=[0.4, 0.4, 0.4, 0.7]", "imc.jitter: needs 4 values"),
    ("imc.grey_p=1.5", "imc.grey_p: must be in [0, 1]"),
    ("imc.betas=[0.9, 1.0]", "imc.betas: needs 2 values, each in"),
    ("imc.decay_gamma=0", "imc.decay_gamma: must be in (0, 1]"),
    ("imc.flip=maybe", "imc.flip: must be true or false"),
    ("imc.warmup_steps=-1", "imc.warmup_steps: must be >= 0"),
    ("imc.warmup_steps=0.1", "imc.warmup_steps: must be int"),
    ("imc.global_size=64", "imc.global_size: must be <= data.image_size=28"),
    ("online.colour_crop_scale=[0, 1]", "online.colour_crop_scale: needs 2 values, each in (0, 1]"),
    ("online.colour_crop_scale=[0.9, 0.2]", "online.colour_crop_scale: needs [min, max] with"),
])
def test_bad_values_name_the_field(override, message):
    overrides = [override] + (["scale.workers=2"] if "divisible" in message else [])
    if override.startswith("data.std"):
        overrides += ["data.channels=3", "data.mean=[0.5]"]
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        resolve(Config, None, overrides)


def test_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match="--config .*missing.yaml"):
        resolve(Config, str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  optimiser: sgd\n")
    with pytest.raises(ConfigError, match="train.optimiser: unknown key"):
        resolve(Config, str(bad))
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        resolve(Config, None, ["train.lr"])


def test_ingest_config_validates():
    with pytest.raises(ConfigError, match="row_group_size: must be > 0"):
        resolve(IngestConfig, None, ["row_group_size=0"])
