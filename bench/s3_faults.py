"""S3 faults and credentials, as figures: the end-to-end chain of ``tests/test_s3_faults.py``.

    python -m bench s3_faults          # the chain: ingest, train, assign through the proxy
    python -m bench s3_faults --quick  # the retry-budget checks alone (seconds)

The chain runs the three jobs as subprocesses through a fault-injecting proxy in front of a
local moto server (seeded 503 SlowDown, connection resets and latency, plus two outages
longer than the retry budget), with a recognisable fake secret in the AWS chain. This
command runs that test module and records what it measured: faults injected per kind, rows
in and out (lost, duplicated), each outage's one error line, where the re-runs resumed, and
where the secret was found (nowhere in the default ``worker`` mode).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.common import REPO, write_result

TESTS = {False: "tests/test_s3_faults.py", True: "tests/data/test_s3_retries.py"}


def run_tests(path: str, result_file: Path) -> int:
    env = {**os.environ, "S3_FAULTS_RESULT": str(result_file)}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           path], cwd=REPO, env=env).returncode


def headline(rc: int, chain: dict[str, Any]) -> dict[str, Any]:
    findings = chain.get("findings", {})
    lost = sum(findings.get(p, {}).get("lost", 0) + findings.get(p, {}).get("duplicated", 0)
               for p in ("assigned", "runs/r1"))
    secrets = findings.get("worker_mode", {}).get("secrets_found", 0)
    return {"name": "rows lost or duplicated + secrets found, through S3 faults",
            "value": lost + secrets, "target": 0, "meets": rc == 0 and lost + secrets == 0}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench s3_faults", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the retry-budget checks only")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        result_file = Path(tmp) / "chain.json"
        rc = run_tests(TESTS[args.quick], result_file)
        chain = json.loads(result_file.read_text()) if result_file.exists() else {}
    name = "s3_faults-quick" if args.quick else "s3_faults"
    path = write_result(name, headline(rc, chain), {"tests": TESTS[args.quick],
                                                     "tests_passed": rc == 0, **chain})
    print(f"s3_faults: tests {'passed' if rc == 0 else 'FAILED'}, "
          f"faults {chain.get('faults')} -> {path}")
    return rc
