"""S3 faults and credentials, end to end: the three jobs as real subprocesses through a
fault-injecting proxy (tests/s3_faults.py) in front of the moto server.

One chain serves every assertion here, to keep CI time down:

1. ``jobs/ingest.py`` of scikit-learn's digits to ``s3://BUCKET/shards``;
2. ``jobs/cluster_imagenet.py`` into ``s3://BUCKET/runs/r1``; the proxy goes down when Ray
   Train writes its checkpoint list for the second time, and stays down longer than the run's
   retry budget: the run fails in one line naming an ``s3://`` URI; the endpoint comes back,
   and a re-run resumes from the first checkpoint on S3 and finishes;
3. ``jobs/assign.py`` into ``s3://BUCKET/assigned``: the same outage at its second shard
   output, then a re-run that assigns only the shards still missing.

Throughout, the proxy answers a seeded 8 % of requests with ``503 SlowDown``, resets 8 % of
connections and delays 5 %, each request at most 3 times in a row: more than pyarrow's
3-attempt default survives, so every process and path must carry the ``s3.max_attempts``
budget. Every job has a recognisable fake secret in its environment (the AWS chain), its own
``RAY_TMPDIR`` and ``TMPDIR``, and Ray spilling every object it can. The jobs run with
``s3.credentials`` at its default, ``worker``, and afterwards no log, output, bucket object,
Ray session file or spill file may hold their secret; the failing assign job alone runs with
the opt-in ``driver`` and a second secret, and the test reports where that one went.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.config import S3Config
from pipeline.data import fs as fsx
from tests.conftest import REPO, TEST_KEY, TEST_SECRET
from tests.leaks import SpillWatch, files_containing, objects_containing
from tests.s3_faults import FaultProxy, FaultRates

pytestmark = pytest.mark.slow

RATES = FaultRates(slowdown=0.08, reset=0.08, latency=0.05, latency_s=0.1, max_consecutive=3)
SEED = 18
LEASE_TTL_S = 2.0  # the writer lease a failed run leaves behind expires this fast
TRAIN = ["cluster.k=5", "train.epochs=1", "train.warmup_epochs=0", "train.batch_size=64",
         "data.image_size=16", "model.feature_dim=16", "model.width=8",
         "scale.cpus_per_worker=0.5", "scale.checkpoint_every_steps=4",
         "cluster.persist_every=2", "report.map_points=100", "train.precise_bn_images=0",
         f"scale.lease_ttl_s={LEASE_TTL_S}"]
RESULT_ENV = "S3_FAULTS_RESULT"  # where the chain's figures go, for bench/s3_faults.py
SHORT_BUDGET = ["s3.max_attempts=4"]  # 0.35 s of backoff: the outage outlasts it


@dataclass
class Job:
    name: str
    returncode: int
    stdout: str
    stderr: str
    wall_s: float


@dataclass
class Chain:
    """Everything the chain did: jobs, fault counts, where it wrote, the secret."""

    bucket: str
    tmp: Path  # TMPDIR (pipeline-PID.log), the jobs' stdout and stderr
    ray_tmp: Path  # RAY_TMPDIR: short, Ray's socket paths must stay under 108 bytes
    driver_ray_tmp: Path  # RAY_TMPDIR of the one job with s3.credentials=driver
    secret: str
    driver_secret: str
    jobs: dict[str, Job] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    findings: dict[str, object] = field(default_factory=dict)  # what the tests measured
    spill: SpillWatch | None = None
    driver_spill: SpillWatch | None = None

    def job(self, name: str) -> Job:
        return self.jobs[name]


def job_env(tmp: Path, ray_tmp: Path, secret: str) -> dict[str, str]:
    """The jobs' environment: the fake secret in the AWS chain, private temp dirs, and Ray
    spilling every object it can (so spill files exist to be searched)."""
    (tmp / "tmp").mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, AWS_ACCESS_KEY_ID="AKIAFAKE" + uuid.uuid4().hex[:8].upper(),
               AWS_SECRET_ACCESS_KEY=secret, RAY_TMPDIR=str(ray_tmp),
               TMPDIR=str(tmp / "tmp"), RAY_object_spilling_threshold="0.0",
               RAY_min_spilling_size="0")
    env.pop("RAY_ADDRESS", None)
    return env


def run_job(chain: Chain, env: dict[str, str], name: str, script: str, *args: str) -> Job:
    """Run ``jobs/SCRIPT`` to the end; its stdout and stderr are kept under the chain's tmp
    (and searched for the secret with everything else)."""
    start = time.monotonic()
    result = subprocess.run([sys.executable, str(REPO / "jobs" / script), *args], env=env,
                            capture_output=True, text=True, timeout=600, cwd=REPO)
    job = Job(name, result.returncode, result.stdout, result.stderr,
              time.monotonic() - start)
    (chain.tmp / "logs").mkdir(exist_ok=True)
    (chain.tmp / "logs" / f"{name}.out").write_text(result.stdout)
    (chain.tmp / "logs" / f"{name}.err").write_text(result.stderr)
    chain.jobs[name] = job
    return job


def sets(*values: str) -> list[str]:
    return [arg for value in values for arg in ("--set", value)]


def run_chain(chain: Chain, proxy: FaultProxy, env: dict[str, str],
              driver_env: dict[str, str]) -> None:
    """Ingest, train (outage, re-run), assign (outage, re-run): the module docstring."""
    b = chain.bucket
    s3 = sets(f"s3.endpoint_url={proxy.url}", "s3.region=us-east-1")
    run_job(chain, env, "ingest", "ingest.py", "--source", "sklearn-digits",
            "--output", f"s3://{b}/shards", *s3, *sets("rows_per_file=400", "row_group_size=200"))
    train = ["--input", f"s3://{b}/shards", "--output", f"s3://{b}/runs/r1", *s3, *sets(*TRAIN)]
    # The second write of Ray Train's checkpoint list: the first (naming the first
    # checkpoint, step 4) is on S3, so a re-run has a checkpoint to resume from.
    proxy.trip_on_upload(rf"/{b}/runs/r1/checkpoints/stages/checkpoint_manager_snapshot\.json",
                         after=2)
    run_job(chain, env, "train-outage", "cluster_imagenet.py", *train,
            *sets(*SHORT_BUDGET, "scale.max_failures=0"))
    back_up(proxy)
    run_job(chain, env, "train", "cluster_imagenet.py", *train)
    assign = ["--run", f"s3://{b}/runs/r1", "--input", f"s3://{b}/shards",
              "--output", f"s3://{b}/assigned", *s3, *sets(f"scale.lease_ttl_s={LEASE_TTL_S}")]
    proxy.trip_on_upload(f"/{b}/assigned/assignments/", after=2)
    run_job(chain, driver_env, "assign-outage", "assign.py", *assign,
            *sets(*SHORT_BUDGET, "s3.credentials=driver"))
    chain.counts["assignment_files_before_rerun"] = len(ids_under(b, "assigned/assignments"))
    back_up(proxy)
    run_job(chain, env, "assign", "assign.py", *assign)


def back_up(proxy: FaultProxy) -> None:
    """End the outage, after the failed run's writer lease has expired."""
    time.sleep(LEASE_TTL_S + 0.5)
    proxy.up()


_direct: dict[str, str] = {}  # the moto endpoint, for reading back without the proxy


def ids_under(bucket: str, prefix: str) -> dict[str, list[str]]:
    """Parquet file -> its ids, for every ``*.parquet`` under ``s3://bucket/prefix``,
    read straight from the store (not through the proxy)."""
    loc = fsx.locate(f"s3://{bucket}/{prefix}", S3Config(endpoint_url=_direct["url"]))
    if not fsx.exists(loc):
        return {}
    return {f.path: pq.read_table(f.path, filesystem=loc.fs, columns=["id"])["id"].to_pylist()
            for f in fsx.list_files(loc, (".parquet",))}


@pytest.fixture(scope="module")
def chain(s3_server, tmp_path_factory) -> Iterator[Chain]:
    import boto3

    _direct["url"] = s3_server
    bucket = "faults-" + uuid.uuid4().hex[:8]
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1",
                          aws_access_key_id=TEST_KEY, aws_secret_access_key=TEST_SECRET)
    client.create_bucket(Bucket=bucket)
    tmp = tmp_path_factory.mktemp("s3chain")
    ray_tmps = [Path(tempfile.mkdtemp(prefix="s3f-")) for _ in range(2)]
    result = Chain(bucket, tmp, *ray_tmps, secret="FAKESECRET-" + uuid.uuid4().hex,
                   driver_secret="FAKESECRET-DRIVER-" + uuid.uuid4().hex)
    env = job_env(tmp, ray_tmps[0], result.secret)
    driver_env = job_env(tmp, ray_tmps[1], result.driver_secret)
    start = time.monotonic()
    with FaultProxy(s3_server, RATES, seed=SEED) as proxy, \
            SpillWatch(ray_tmps[0], result.secret.encode()) as spill, \
            SpillWatch(ray_tmps[1], result.driver_secret.encode()) as driver_spill:
        run_chain(result, proxy, env, driver_env)
    result.counts.update(proxy.counts, wall_s=round(time.monotonic() - start))
    result.spill, result.driver_spill = spill, driver_spill
    summary = {"faults": result.counts, "spill_files": len(spill.seen), "tmp": str(tmp),
               "jobs": {n: [j.returncode, round(j.wall_s, 1)] for n, j in result.jobs.items()}}
    print("\nS3 fault chain:", json.dumps(summary))
    (tmp / "summary.json").write_text(json.dumps(summary, indent=1))
    yield result
    if os.environ.get(RESULT_ENV):  # python -m bench s3_faults collects what was measured
        Path(os.environ[RESULT_ENV]).write_text(json.dumps(
            {**summary, "findings": result.findings}, indent=1, default=str))
    for path in ray_tmps:
        shutil.rmtree(path, ignore_errors=True)


def test_jobs_complete_through_injected_faults(chain: Chain) -> None:
    for name in ("ingest", "train", "assign"):
        job = chain.job(name)
        assert job.returncode == 0, f"{name} failed:\n{job.stderr[-3000:]}"
    # The seeded draws inject every kind, many times (counts are in the printed summary).
    assert chain.counts["slowdown"] >= 20 and chain.counts["reset"] >= 20, chain.counts
    assert chain.counts["latency"] >= 10, chain.counts


def test_every_input_row_exactly_once(chain: Chain) -> None:
    """Nothing lost, nothing duplicated: every ingested id is in the assign job's output (or
    its rejects) exactly once, and in the training run's own assignments."""
    shards = ids_under(chain.bucket, "shards")
    rows = [i for ids in shards.values() for i in ids]
    assert len(rows) == 1797 and len(set(rows)) == 1797  # scikit-learn's digits, once each
    for prefix in ("assigned", "runs/r1"):
        out = [i for ids in ids_under(chain.bucket, f"{prefix}/assignments").values()
               for i in ids]
        out += [i for ids in ids_under(chain.bucket, f"{prefix}/rejects").values() for i in ids]
        seen = Counter(out)
        chain.findings[prefix] = {"rows_in": len(rows),
                                  "lost": sum(1 for i in set(rows) if i not in seen),
                                  "duplicated": sum(n - 1 for n in seen.values() if n > 1)}
        assert seen == Counter(rows), prefix
    manifest = json.loads(fsx.read_bytes(fsx.locate(
        f"s3://{chain.bucket}/shards/_SUCCESS", S3Config(endpoint_url=_direct["url"]))))
    assert manifest["rows"] == 1797 and manifest["rejects"] == 0


def error_lines(job: Job) -> list[str]:
    return [line for line in job.stderr.splitlines() if line.startswith("error:")]


def test_outage_longer_than_the_budget_fails_in_one_line_naming_the_uri(chain: Chain) -> None:
    bucket = re.escape(chain.bucket)
    for name in ("train-outage", "assign-outage"):
        job = chain.job(name)
        assert job.returncode != 0, name
        errors = error_lines(job)
        chain.findings[f"{name}_error"] = errors
        assert len(errors) == 1, (name, job.stderr[-3000:])
        assert re.search(rf"s3://{bucket}/\S+", errors[0]), errors[0]
        assert "Could not connect" in errors[0] or "cannot reach" in errors[0], errors[0]
    assert chain.counts["tripped"] == 2


def test_rerun_after_the_outage_resumes(chain: Chain) -> None:
    history = json.loads(fsx.read_bytes(fsx.locate(
        f"s3://{chain.bucket}/runs/r1/history.json", S3Config(endpoint_url=_direct["url"]))))
    resumed = [row["resumed_from_step"] for row in history if "resumed_from_step" in row]
    assert resumed and resumed[0] >= 4 and resumed[0] % 4 == 0, history  # a checkpoint's step
    done = chain.counts["assignment_files_before_rerun"]
    chain.findings["resumed"] = {"train_from_step": resumed[0] if resumed else None,
                                 "assign_shards_done_before_rerun": done}
    assert 1 <= done < 5, done
    summary = chain.job("assign").stdout
    assert re.search(rf"{5 - done} assigned now, {done} already done, 5 in total", summary), summary


def test_secret_is_nowhere_on_disk_or_in_the_bucket(chain: Chain) -> None:
    """``s3.credentials=worker``: logs (pipeline-PID.log under TMPDIR, stdout/stderr),
    outputs, Ray's session directories (logs, spilled objects) and every object in the
    bucket hold no trace of the secret."""
    secret = chain.secret.encode()
    roots = (chain.tmp, chain.ray_tmp, chain.driver_ray_tmp)
    on_disk = [hit for root in roots for hit in files_containing(root, secret)]
    logs = list((chain.tmp / "tmp").glob("pipeline-*.log"))
    sessions = list(chain.ray_tmp.glob("*/session_2*"))
    n_files = sum(len(f) for root in roots for _, _, f in os.walk(root))
    searched, in_bucket = objects_containing(direct_client(), chain.bucket, secret)
    assert chain.spill is not None
    print(f"\nsecret search (worker mode): {n_files} files on disk ({len(logs)} pipeline logs, "
          f"{len(sessions)} Ray sessions), {len(chain.spill.seen)} spill files, {searched} "
          f"bucket objects: {len(on_disk) + len(chain.spill.hits) + len(in_bucket)} found")
    chain.findings["worker_mode"] = {
        "files_searched": n_files, "spill_files_watched": len(chain.spill.seen),
        "bucket_objects_searched": searched,
        "secrets_found": len(on_disk) + len(chain.spill.hits) + len(in_bucket)}
    assert len(logs) == 5 and len(sessions) == 4 and searched > 50
    assert not on_disk and not chain.spill.hits and not in_bucket


def test_driver_mode_keys_stay_inside_rays_session_directory(chain: Chain) -> None:
    """``s3.credentials=driver`` (the failing assign job, which ships its filesystem to the
    assign actors): the secret is reported wherever it shows up; it must not reach logs,
    outputs or the bucket, only Ray's own files (the spilled objects that carry the pickled
    filesystem): the risk the README documents."""
    secret = chain.driver_secret.encode()
    assert chain.driver_spill is not None
    job = chain.job("assign-outage")
    assert chain.driver_secret not in job.stdout + job.stderr
    assert not files_containing(chain.tmp, secret)  # pipeline-PID.log, stdout, stderr
    _, in_bucket = objects_containing(direct_client(), chain.bucket, secret)
    assert not in_bucket
    places = sorted(set(files_containing(chain.driver_ray_tmp, secret)) | chain.driver_spill.hits)
    print(f"\ns3.credentials=driver: the secret is in {len(places)} file(s) of the job's Ray "
          f"session directory ({len(chain.driver_spill.seen)} spill files watched):")
    shown = [place.replace(str(chain.driver_ray_tmp), "$RAY_TMPDIR") for place in places]
    for place in shown:
        print("   ", place)
    chain.findings["driver_mode"] = {"secret_found_in": shown}
    assert all("spilled" in place for place in places), places


def direct_client() -> object:
    import boto3

    return boto3.client("s3", endpoint_url=_direct["url"], region_name="us-east-1")
