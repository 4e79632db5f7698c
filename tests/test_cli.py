"""One-line failures of the job scripts (pipeline/cli.py run_main)."""

from __future__ import annotations

from pipeline.cli import run_main
from pipeline.config import ConfigError


def fail(exc: Exception):
    def main() -> int:
        raise exc
    return main


def test_an_s3_failure_from_inside_ray_names_its_uri(capsys, tmp_path):
    wrapped = RuntimeError("task failed")
    wrapped.__cause__ = OSError(
        "Traceback ...\nOSError: When reading information for key 'runs/r1/x.parquet' in "
        "bucket 'b1': AWS Error NETWORK_CONNECTION during HeadObject operation: curlCode: 7, "
        "Could not connect to server")
    assert run_main(fail(wrapped), False, str(tmp_path / "log")) == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("error: ") and "s3://b1/runs/r1/x.parquet" in lines[0], lines
    assert len([line for line in lines if line.startswith("error:")]) == 1


def test_user_errors_exit_2_and_others_1_with_their_root_cause(capsys, tmp_path):
    assert run_main(fail(ConfigError("cluster.k: must be > 0")), False, "log") == 2
    assert capsys.readouterr().err.startswith("error: cluster.k: must be > 0\n")
    inner = ValueError("the real cause")
    outer = RuntimeError("wrapper")
    outer.__cause__ = inner
    assert run_main(fail(outer), False, "log") == 1
    assert capsys.readouterr().err.startswith("error: ValueError: the real cause\n")
