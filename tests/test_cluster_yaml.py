"""cluster.yaml validated offline: Ray's own schema, prepare_config and validate_config
(RAY_NOTES: cluster launcher), plus the properties the runbook relies on. No cloud calls."""

from __future__ import annotations

import copy
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: pytest itself depends on tomli there
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
TEXT = (REPO / "cluster.yaml").read_text()
CFG: dict[str, Any] = yaml.safe_load(TEXT)
DEPS: list[str] = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]


def requirement(name: str) -> Requirement:
    return next(r for r in map(Requirement, DEPS) if r.name == name)


def setup_text() -> str:
    return "\n".join(CFG["setup_commands"])


def prepared() -> dict[str, Any]:
    from ray.autoscaler._private.util import prepare_config

    # Merges with ray/autoscaler/aws/defaults.yaml (a file read); no boto3 or network call.
    return prepare_config(copy.deepcopy(CFG))


def test_valid_against_rays_schema_and_validators() -> None:
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import validate_config

    schema_path = os.path.join(os.path.dirname(ray.autoscaler.__file__), "ray-schema.json")
    with open(schema_path) as fh:
        jsonschema.validate(CFG, json.load(fh))
    cfg = prepared()
    validate_config(cfg)  # needs the prepared config (cluster_synced_files comes from defaults)
    assert cfg["head_node_type"] == "head"


def test_defaults_do_not_install_a_nightly_ray() -> None:
    cfg = prepared()
    commands = "\n".join(cfg["head_setup_commands"] + cfg["worker_setup_commands"])
    assert "ray-wheels" not in commands and "dev0" not in commands


def test_head_runs_no_tasks() -> None:
    head = CFG["available_node_types"][CFG["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    assert head["max_workers"] == 0


def test_gpu_workers_autoscale_with_integer_resources() -> None:
    types = CFG["available_node_types"].values()
    assert all(type(v) is int for t in types for v in t["resources"].values())
    gpu = [t for t in types if t["resources"].get("GPU", 0) > 0]
    assert gpu and any(t["min_workers"] == 0 and t["max_workers"] > 0 for t in gpu)
    assert sum(t["max_workers"] for t in types) <= CFG["max_workers"]


@pytest.mark.parametrize("package", ["torch", "torchvision"])
def test_setup_commands_pin_pyprojects_versions(package: str) -> None:
    (spec,) = requirement(package).specifier  # pyproject pins it exactly
    assert spec.operator == "=="
    assert re.search(rf"(?<![\w-]){package}=={re.escape(spec.version)}(?![\w.])", setup_text())


def test_setup_commands_install_this_package() -> None:
    (remote,) = [dst for dst, src in CFG["file_mounts"].items() if src == "."]
    path = re.escape(remote.replace("~", "$HOME", 1))
    assert re.search(rf'pip install (-e|--editable) "?{path}\[gpu\]"?', setup_text())
    assert '"~' not in setup_text()  # neither the shell nor pip expands a quoted ~


def test_setup_commands_ray_agrees_with_pyproject() -> None:
    pins = re.findall(r"\bray(?:\[[\w,]*\])?==([\w.]+)", setup_text())
    assert pins, "pin ray exactly: `ray up` needs the same version locally and on the cluster"
    assert all(requirement("ray").specifier.contains(v) for v in pins), pins


def test_head_can_launch_aws_workers() -> None:
    assert "boto3" in "\n".join(prepared()["head_setup_commands"])  # the autoscaler needs it


@pytest.mark.parametrize(
    "pattern", [r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", r"aws_secret_access_key", r"aws_access_key_id"]
)
def test_no_credentials_in_the_file(pattern: str) -> None:
    assert not re.search(pattern, TEXT, re.IGNORECASE)


def test_nodes_get_credentials_from_instance_profiles() -> None:
    for node_type in CFG["available_node_types"].values():
        assert node_type["node_config"]["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::")


def test_dashboard_bound_to_localhost() -> None:
    commands = " ".join(CFG["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in commands and "0.0.0.0" not in commands


def test_rsync_skips_local_state() -> None:
    assert {".git", ".venv*", "/runs/", "/work/"} <= set(CFG["rsync_exclude"])
