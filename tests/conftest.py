"""Shared fixtures: one local Ray cluster per session and a real S3 endpoint (moto server)."""

from __future__ import annotations

import os
import tempfile

from pipeline.distributed.runtime import TRAIN_POLL_ENV, TRAIN_POLL_S

# Set before Ray starts (RAY_NOTES: local cluster, tests and CI).
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")
os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="ray-tests-"))
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
# The product's Train poll interval (pipeline/distributed/runtime.py) for the suite's own
# cluster and the `ray start` heads of tests, which do not start through init_ray.
os.environ.setdefault(TRAIN_POLL_ENV, TRAIN_POLL_S)
# The moto test keys, in the environment (the standard AWS chain) before any Ray cluster
# starts: with s3.credentials=worker (the default) every Ray worker resolves the chain itself,
# and workers inherit the raylet's environment as it was at ray.init. Set, not defaulted, so
# a developer's real keys never travel to the test endpoint.
os.environ.update(AWS_ACCESS_KEY_ID="testing-key-id", AWS_SECRET_ACCESS_KEY="testing-secret",
                  AWS_REGION="us-east-1", AWS_DEFAULT_REGION="us-east-1")
os.environ.pop("AWS_SESSION_TOKEN", None)
os.environ.pop("AWS_PROFILE", None)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from pipeline.config import S3Config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "datasets"
TEST_KEY = os.environ["AWS_ACCESS_KEY_ID"]
TEST_SECRET = os.environ["AWS_SECRET_ACCESS_KEY"]  # moto accepts any credentials


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 * 1024**2,
                 _node_ip_address="127.0.0.1")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible HTTP endpoint on 127.0.0.1, reached through the AWS chain."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    # Credentials come from the environment (set at the top of this file), i.e. the standard
    # AWS chain, as in production.
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh bucket; returns (bucket name, S3Config pointing at the endpoint)."""
    import boto3

    name = "b-" + request.node.name.lower().replace("_", "-")[:40].strip("-")
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1",
                          aws_access_key_id=TEST_KEY, aws_secret_access_key=TEST_SECRET)
    client.create_bucket(Bucket=name)
    return name, S3Config(endpoint_url=s3_server, region="us-east-1")


def shared_dataset(*parts: str) -> Path:
    """Path into ../shared/datasets, or skip the test with the reason."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real dataset not available: {path} is absent (see ../shared/datasets)")
    return path
