"""Assign new images to the clusters of a finished run: the scheduled batch job.

    python jobs/assign.py --run runs/demo --input data/new-shards --output runs/demo-new
    ray job submit --working-dir . -- python jobs/assign.py \
        --run s3://bucket/runs/r1 --input s3://bucket/incoming/ --output s3://bucket/assigned/r1

Each input shard gets its own output file, written atomically once the whole shard is
done, so re-running the same command (nightly, after a crash) skips finished shards,
completes interrupted ones and picks up new shards appended to --input. Each image gets
id, cluster, distance, margin and outlier (farther than the run's per-cluster
cluster.outlier_quantile of training distances); undecodable images go to rejects/.
"""

from __future__ import annotations

import argparse
import sys

from pipeline.cli import add_address, job_main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--run", required=True, help="finished run directory or s3:// prefix")
    p.add_argument("--input", required=True, help="Parquet shards dir or s3:// prefix")
    p.add_argument("--output", required=True, help="output directory or s3:// prefix")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="e.g. --set scale.assign_actors=4 --set scale.gpu=true "
                        "--set s3.endpoint_url=...")
    add_address(p)
    p.add_argument("--verbose", action="store_true")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    from pipeline.assign_job import assign_job
    from pipeline.summary import assign_rows, print_table

    result = assign_job(args.run, args.input, args.output, args.set)
    print_table(assign_rows(result.as_dict()))
    return 0


def main(argv: list[str] | None = None) -> int:
    return job_main(parse_args(argv), run)


if __name__ == "__main__":
    sys.exit(main())
