r"""Export a finished run's clusters as image files, in their original bytes, with a manifest.

    python jobs/export.py --run runs/demo --assignments runs/demo --output exports/demo
    python jobs/export.py --run runs/demo --assignments runs/demo-new --input data/new-shards \
        --output exports/new --clusters 3,17 --all --outliers
    ray job submit --working-dir . -- python jobs/export.py --run s3://bucket/runs/r1 \
        --assignments s3://bucket/assigned/r1 --input s3://bucket/incoming/ \
        --output s3://bucket/exports/r1 --nearest 64

Writes OUT/<cluster>/<safe name> (the bytes stored in the input shard, never re-encoded) and
OUT/manifest.csv (cluster, id, file, distance[, label]). --assignments is the run's own
assignments (RUN or RUN/assignments; the images come from the run's data.input) or a
jobs/assign.py output (which needs --input, the shards it assigned). Per cluster it exports
the --nearest N images (default 32) or --all members; --outliers keeps only rows that
jobs/assign.py flagged. Re-running skips files already there with the same size. No Ray.
"""

from __future__ import annotations

import argparse
import sys

from pipeline.cli import job_main


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--run", required=True, help="finished run directory or s3:// prefix")
    p.add_argument("--assignments", required=True, metavar="DIR",
                   help="RUN, RUN/assignments, a jobs/assign.py --output or its assignments/")
    p.add_argument("--input", metavar="DIR",
                   help="shards the assignments were made from (required for a jobs/assign.py "
                        "output; default: the run's data.input)")
    p.add_argument("--output", required=True, help="output directory or s3:// prefix")
    p.add_argument("--clusters", metavar="IDS", help="comma-separated cluster ids, e.g. 3,17 "
                                                     "(default: all clusters)")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--nearest", type=_positive, metavar="N",
                     help="per cluster, the N images nearest the centroid (default 32)")
    how.add_argument("--all", action="store_true", help="every member of each cluster")
    p.add_argument("--outliers", action="store_true",
                   help="only images flagged outlier (jobs/assign.py outputs)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="e.g. --set s3.endpoint_url=http://127.0.0.1:9000")
    p.add_argument("--verbose", action="store_true")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    from pipeline.export import Selection, export_job
    from pipeline.summary import print_table

    selection = Selection.of(args.clusters, args.nearest, args.all, args.outliers)
    result = export_job(args.run, args.assignments, args.output, selection,
                        input_uri=args.input, overrides=args.set)
    print_table(result.rows())
    return 0


def main(argv: list[str] | None = None) -> int:
    return job_main(parse_args(argv), run)


if __name__ == "__main__":
    sys.exit(main())
