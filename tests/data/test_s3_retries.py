"""The S3 retry budget and the fast-fail probe (pipeline/data/fs.py), through the
fault-injecting proxy (tests/s3_faults.py) in front of the moto server. No Ray, except where a
worker process must see the budget; seconds in all."""

from __future__ import annotations

import os
import pickle
import time

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from pipeline.config import S3Config
from pipeline.data import fs as fsx
from pipeline.errors import StorageError
from tests.s3_faults import FaultProxy, FaultRates

DEAD = "http://127.0.0.1:9"  # nothing listens on the discard port


@pytest.fixture
def proxy(s3_server):
    with FaultProxy(s3_server, FaultRates(), seed=3) as p:
        yield p


def exercise(fs: pafs.FileSystem, bucket: str, n: int) -> None:
    """Writes and reads of every kind the pipeline does: small and multi-part-sized objects,
    whole and ranged reads, listings, Parquet."""
    big = os.urandom(300_000)
    for i in range(n):
        with fs.open_output_stream(f"{bucket}/o{i}") as fh:
            fh.write(big if i % 2 else b"{}")  # small objects: leases, manifests, meta.json
        with fs.open_input_stream(f"{bucket}/o{i}") as fh:
            assert fh.read() == (big if i % 2 else b"{}")
        if i % 2:
            with fs.open_input_file(f"{bucket}/o{i}") as fh:
                assert fh.read_at(1000, 5000) == big[5000:6000]
        pq.write_table(pa.table({"x": list(range(100))}), f"{bucket}/t{i}.parquet", filesystem=fs)
        assert pq.read_table(f"{bucket}/t{i}.parquet", filesystem=fs).num_rows == 100
    listed = fs.get_file_info(pafs.FileSelector(bucket, recursive=True))
    assert len(listed) >= 2 * n


def test_budget_survives_throttling_resets_and_latency(s3_bucket, proxy):
    """Every request may fail up to 4 times in a row (503 SlowDown, a reset before the
    response or halfway through a GET's body): the default budget (10 attempts) absorbs it."""
    bucket, s3 = s3_bucket
    proxy.set_rates(FaultRates(slowdown=0.15, reset=0.15, latency=0.1, latency_s=0.05,
                               max_consecutive=4))
    fs = fsx.s3_filesystem(S3Config(endpoint_url=proxy.url))
    exercise(fs, bucket, 12)
    counts = proxy.counts
    print(f"\ninjected through the retry budget: {counts}")
    assert counts["slowdown"] >= 10 and counts["reset"] >= 10 and counts["latency"] >= 5


def test_pyarrow_default_budget_does_not(s3_bucket, proxy):
    """The contrast: pyarrow's default (standard mode, 3 attempts), which a Ray worker got
    before the budget survived pickling, fails on the same faults."""
    bucket, _ = s3_bucket
    proxy.set_rates(FaultRates(slowdown=0.15, reset=0.15, max_consecutive=4))
    fs = pafs.S3FileSystem(endpoint_override=proxy.url.split("://")[1], scheme="http",
                           region="us-east-1")
    with pytest.raises(OSError):
        exercise(fs, bucket, 12)


def test_small_object_read_survives_a_slowdown(s3_bucket, proxy):
    """pyarrow (the AWS SDK) gives up on a 503 whose XML body is larger than a small object's
    range ("INTERNAL_FAILURE: Failed to flush response stream"); our stream retries it."""
    bucket, s3 = s3_bucket
    fsx.write_bytes_atomic(fsx.locate(f"s3://{bucket}/lease", s3), b'{"token": "t"}')
    proxy.set_rates(FaultRates(slowdown=1.0, max_consecutive=3))
    loc = fsx.locate(f"s3://{bucket}/lease", S3Config(endpoint_url=proxy.url))
    assert fsx.read_bytes(loc) == b'{"token": "t"}'
    plain = pafs.S3FileSystem(endpoint_override=proxy.url.split("://")[1], scheme="http",
                              region="us-east-1",
                              retry_strategy=pafs.AwsDefaultS3RetryStrategy(max_attempts=10))
    with pytest.raises(OSError, match="INTERNAL_FAILURE"):
        with plain.open_input_stream(f"{bucket}/lease") as fh:
            fh.read()


def test_dead_endpoint_fails_within_a_second_naming_the_uri():
    """The probe (2 attempts) answers long before the budget would (10 attempts, ~25 s)."""
    start = time.monotonic()
    with pytest.raises(StorageError, match=r"cannot reach s3://no-such-bucket/x: .*connect"):
        fsx.locate("s3://no-such-bucket/x", S3Config(endpoint_url=DEAD))
    assert time.monotonic() - start < 2.0


def test_outage_fails_fast_then_recovers(s3_bucket, proxy):
    bucket, _ = s3_bucket
    cfg = S3Config(endpoint_url=proxy.url, max_attempts=3)
    proxy.down()
    start = time.monotonic()
    with pytest.raises(StorageError, match=f"cannot reach s3://{bucket}/a"):
        fsx.locate(f"s3://{bucket}/a", cfg)
    assert time.monotonic() - start < 2.0
    proxy.up()
    loc = fsx.locate(f"s3://{bucket}/a", cfg)  # reachable again: remembered from now on
    fsx.write_bytes_atomic(loc, b"x")
    proxy.down()  # a later outage is the retry budget's: it fails naming the URI
    with pytest.raises(StorageError, match=f"cannot read s3://{bucket}/a: .*connect"):
        fsx.read_bytes(loc)
    proxy.up()
    assert fsx.read_bytes(loc) == b"x"


def test_budget_survives_pickling_into_a_ray_worker(ray_cluster):
    fs = fsx.s3_filesystem(S3Config(endpoint_url=DEAD, max_attempts=7))
    copy = pickle.loads(pickle.dumps(fs))
    assert isinstance(copy, fsx.RetryingS3FileSystem) and copy.max_attempts == 7

    @ray_cluster.remote(num_cpus=0)
    def budget(loc: fsx.Location) -> tuple[str, int]:
        return type(loc.fs).__name__, loc.fs.max_attempts

    loc = fsx.Location(fs, "b/x", "s3://b/x")
    assert ray_cluster.get(budget.remote(loc)) == ("RetryingS3FileSystem", 7)


def test_s3_errors_name_the_uri():
    raw = OSError("When uploading part for key 'runs/r1/checkpoints/meta.json' in bucket 'bk': "
                  "AWS Error NETWORK_CONNECTION during UploadPart operation: curlCode: 7")

    class Wrapped(Exception):  # as Ray Train's ControllerError or a RayTaskError
        pass

    outer = Wrapped("Traceback (most recent call last):\n  ...\n" + str(raw))
    outer.__cause__ = raw
    error = fsx.s3_error(outer)
    assert error is not None and "\n" not in str(error)
    assert str(error).startswith("When uploading part for s3://bk/runs/r1/checkpoints/meta.json")
    assert fsx.s3_error(ValueError("not S3")) is None
