"""The methods' registry: one refusal everywhere, and warnings for ignored settings."""

from __future__ import annotations

import logging

import pytest

from pipeline import methods
from pipeline.config import Config, ConfigError, resolve


def test_config_validation_refuses_multiview_without_views():
    with pytest.raises(ConfigError, match=r"multiview.views: --method multiview needs at least "
                                          r"one view"):
        resolve(Config, overrides=["method=multiview"])


def test_the_cli_refuses_it_before_any_work():
    import jobs.cluster_imagenet as job

    with pytest.raises(ConfigError, match="multiview.views"):
        job.load_config(job.parse_args(["--method", "multiview"]))


def test_run_refuses_a_config_built_without_validation(tmp_path):
    """``run()`` itself checks (the method's preflight): a Config made in code with a view
    that does not exist stops before any output is written."""
    from pipeline.run import run

    cfg = Config(method="multiview")
    cfg.multiview.views = [str(tmp_path / "no-such-run")]
    cfg.data.output = str(tmp_path / "out")
    with pytest.raises(ConfigError, match="no-such-run.*neither a finished run"):
        run(cfg)
    assert not (tmp_path / "out").exists()


def test_a_name_outside_the_registry_is_not_a_method():
    with pytest.raises(ConfigError, match="'kmeans' is not a method; available"):
        methods.get("kmeans")


def test_every_entry_loads_its_trainer_and_algorithm():
    import importlib

    for info in methods.REGISTRY.values():
        assert callable(info.train_fn())
        importlib.import_module(info.module)


@pytest.mark.parametrize("method, setting, ignored", [
    ("online", "train.lr_schedule=cosine", ["train.lr_schedule"]),
    ("online", "deepcluster.pca_dim=32", ["deepcluster.pca_dim"]),
    ("deepcluster", "online.temperature=0.5", ["online.temperature"]),
    ("deepcluster", "cluster.sync_every=4", ["cluster.sync_every"]),
    ("deepcluster", "train.lr_schedule=cosine", []),
    ("online", "cluster.sync_every=4", []),
    ("online", "cluster.centroid_window=0", []),
    ("imc", "cluster.centroid_window=64", ["cluster.centroid_window"]),
    ("online", "train.lr=0.01", []),  # shared settings are never "ignored"
    ("online", "imc.tau=0.2", ["imc.tau"]),
    ("imc", "depict.dropout=0.2", ["depict.dropout"]),
    ("imc", "train.precise_bn_images=0", []),
    ("imc", "imc.prototypes=300", []),
])
def test_ignored_settings_are_named(method, setting, ignored):
    cfg = resolve(Config, overrides=[f"method={method}", setting])
    assert methods.ignored_settings(cfg) == ignored


def test_run_warns_about_an_ignored_setting(tmp_path, caplog):
    from pipeline.run import run

    cfg = resolve(Config, overrides=["train.lr_schedule=cosine"],
                  flags={"data.input": str(tmp_path / "missing"), "data.output": str(tmp_path)})
    from pipeline.data.fs import StorageError
    from pipeline.data.reader import InputError

    with caplog.at_level(logging.WARNING, logger="pipeline.run"), \
            pytest.raises((InputError, StorageError)):
        run(cfg)  # stops at the missing input, after the warning
    assert "train.lr_schedule is set but method online does not use it" in caplog.text


def test_a_removed_setting_in_a_saved_config_is_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="pipeline.config"):
        cfg = resolve(Config, loaded={"online": {"passes": 3, "temperature": 0.2}})
    assert cfg.online.temperature == 0.2
    assert "online.passes is no longer a setting" in caplog.text


def test_the_paper_preset_resolves_to_the_papers_settings():
    from tests.conftest import REPO

    cfg = resolve(Config, str(REPO / "configs" / "deepcluster-paper.yaml"))
    assert cfg.method == "deepcluster" and cfg.deepcluster.pca_dim == 256
    assert cfg.deepcluster.passes == 1 and cfg.deepcluster.sobel
    default = resolve(Config, overrides=["method=deepcluster"]).deepcluster
    assert (default.pca_dim, default.passes) == (16, 3)  # what measures best here (README)


def test_a_method_default_sits_under_every_given_setting(tmp_path):
    """imc's own train.epochs (18) replaces the shared default (10), and anything given wins
    over it: a job's base, a file, the --epochs flag, --set; a saved config round-trips."""
    from pipeline.config import dump_yaml

    assert resolve(Config).train.epochs == 20  # online's own
    assert resolve(Config, overrides=["method=deepcluster"]).train.epochs == 10  # the shared
    imc = resolve(Config, overrides=["method=imc"])
    assert imc.train.epochs == 18
    assert resolve(Config, overrides=["method=imc"], base={"train.epochs": 12}).train.epochs == 12
    assert resolve(Config, overrides=["method=imc"], flags={"train.epochs": 3}).train.epochs == 3
    assert resolve(Config, overrides=["method=imc", "train.epochs=4"]).train.epochs == 4
    chosen = tmp_path / "imc.yaml"
    chosen.write_text("method: imc\n")
    assert resolve(Config, str(chosen)).train.epochs == 18
    assert resolve(Config, str(chosen), ["method=online"]).train.epochs == 20
    saved = tmp_path / "config.yaml"
    saved.write_text(dump_yaml(resolve(Config, overrides=["method=imc", "train.epochs=7"])))
    assert resolve(Config, str(saved)).train.epochs == 7
    assert resolve(Config, str(saved)) == resolve(Config, overrides=["method=imc",
                                                                     "train.epochs=7"])


def test_online_defaults_to_the_narrow_network_and_other_methods_keep_the_shared_width():
    assert resolve(Config).model.width == 16  # online, the default method
    assert resolve(Config, overrides=["method=deepcluster"]).model.width == 32
    assert resolve(Config, overrides=["model.width=32"]).model.width == 32
