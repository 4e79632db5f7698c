"""cluster.yaml validated offline: Ray's own schema, prepare_config and validate_config
(RAY_NOTES: cluster launcher), plus the properties the runbook relies on."""

from __future__ import annotations

import json
import os
import re
import tomllib

import pytest
import yaml

from tests.conftest import REPO

TEXT = (REPO / "cluster.yaml").read_text()
CFG = yaml.safe_load(TEXT)


def pins() -> dict[str, str]:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return {m.group(1): m.group(2) for d in deps if (m := re.match(r"([\w-]+)==([\d.]+)", d))}


def test_valid_against_rays_schema_and_validators():
    import copy

    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema_path = os.path.join(os.path.dirname(ray.autoscaler.__file__), "ray-schema.json")
    with open(schema_path) as fh:
        jsonschema.validate(CFG, json.load(fh))
    prepared = prepare_config(copy.deepcopy(CFG))
    validate_config(prepared)
    assert prepared["head_node_type"] == "head"


def test_head_runs_no_tasks_and_gpu_workers_autoscale():
    types = CFG["available_node_types"]
    assert types[CFG["head_node_type"]]["resources"] == {"CPU": 0}
    gpu = [t for t in types.values() if t["resources"].get("GPU")]
    assert gpu and all(isinstance(t["resources"]["GPU"], int) for t in gpu)
    assert any(t["min_workers"] == 0 and t["max_workers"] > 0 for t in gpu)
    assert any("GPU" not in t["resources"] and t["resources"].get("CPU", 0) > 0
               for name, t in types.items() if name != CFG["head_node_type"])


def test_setup_commands_pin_the_projects_versions():
    commands = " ".join(CFG["setup_commands"])
    for package, version in pins().items():  # torch, torchvision
        assert f"{package}=={version}" in commands, package
    ray_req = next(d for d in tomllib.loads((REPO / "pyproject.toml").read_text())
                   ["project"]["dependencies"] if d.startswith("ray"))
    low = re.search(r">=([\d.]+)", ray_req).group(1)
    pinned = re.search(r"ray\[[^\]]*\]==([\d.]+)", commands).group(1)
    assert pinned.startswith(low), (pinned, ray_req)
    assert "pip install -e" in commands and "pipeline" in commands


@pytest.mark.parametrize("pattern", [r"AKIA[0-9A-Z]{16}", r"aws_secret_access_key",
                                     r"aws_access_key_id"])
def test_no_credentials_in_the_file(pattern):
    assert not re.search(pattern, TEXT, re.IGNORECASE)


def test_dashboard_bound_to_localhost():
    assert "--dashboard-host=127.0.0.1" in " ".join(CFG["head_start_ray_commands"])
