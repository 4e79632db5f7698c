"""``run.json``: a run directory resumes only with the config that made it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline import manifest
from pipeline.config import Config, ConfigError, resolve
from pipeline.data import fs as fsx
from pipeline.outputs import RunPaths, TrainedModel, model_fingerprint


def cfg_with(tmp_path, *settings: str) -> Config:
    return resolve(Config, overrides=list(settings), flags={"data.output": str(tmp_path)})


def paths_of(tmp_path) -> RunPaths:
    return RunPaths(fsx.locate(str(tmp_path)))


def test_a_new_run_records_its_fingerprint_and_version(tmp_path):
    manifest.claim(paths_of(tmp_path), cfg_with(tmp_path))
    saved = json.loads((tmp_path / "run.json").read_text())
    assert saved["config_fingerprint"] == manifest.fingerprint(saved["config"])
    assert saved["package_version"] and saved["method"] == "online"
    assert "scale." in saved["fingerprint_excludes"] and "train.lr" in saved["config"]
    assert "scale.workers" not in saved["config"]


def test_the_same_config_resumes_and_resumable_keys_may_change(tmp_path):
    paths = paths_of(tmp_path)
    manifest.claim(paths, cfg_with(tmp_path))
    manifest.claim(paths, cfg_with(tmp_path))
    manifest.claim(paths, cfg_with(tmp_path, "scale.workers=2", "train.time_budget_s=60",
                                   "report.nearest=4", "debug.kill_worker_at_step=3"))


def test_a_different_config_stops_naming_the_fields(tmp_path):
    paths = paths_of(tmp_path)
    manifest.claim(paths, cfg_with(tmp_path))
    with pytest.raises(ConfigError) as err:
        manifest.claim(paths, cfg_with(tmp_path, "train.lr=0.01", "cluster.k=20"))
    message = str(err.value)
    assert "\n" not in message and "--overwrite" in message
    assert "cluster.k: 10 -> 20" in message and "train.lr: 0.001 -> 0.01" in message


def test_centroid_shards_shape_the_saved_state(tmp_path):
    paths = paths_of(tmp_path)
    manifest.claim(paths, cfg_with(tmp_path))
    with pytest.raises(ConfigError, match="scale.centroid_shards: 1 -> 2"):
        manifest.claim(paths, cfg_with(tmp_path, "scale.centroid_shards=2"))


def test_a_run_from_before_manifests_is_not_silently_resumed(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(ConfigError, match="no run.json"):
        manifest.claim(paths_of(tmp_path), cfg_with(tmp_path))


def test_the_model_fingerprint_covers_weights_and_centroids(tmp_path):
    paths = paths_of(tmp_path)
    manifest.claim(paths, cfg_with(tmp_path))
    a = TrainedModel(b"weights", {}, np.zeros((2, 3), np.float32))
    manifest.record_model(paths, a)
    saved = json.loads((tmp_path / "run.json").read_text())
    assert saved["model_fingerprint"] == model_fingerprint(a)
    b = TrainedModel(b"weights", {}, np.ones((2, 3), np.float32))
    assert model_fingerprint(b) != model_fingerprint(a)


def test_run_stops_before_any_work(tmp_path):
    """The demo config (no input) into a run made with another k: refused before Ray starts
    and before the demo input is prepared."""
    from pipeline.run import run

    manifest.claim(paths_of(tmp_path), cfg_with(tmp_path, "cluster.k=7"))
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(ConfigError, match="cluster.k: 7 -> 10"):
        run(cfg_with(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == before == ["run.json"]
