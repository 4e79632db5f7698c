"""(Re)generate the HTML cluster report of a finished run.

    python jobs/report.py runs/demo
    python jobs/report.py s3://bucket/runs/r1 --set report.page_size=100

Writes RUN/report.html: one self-contained page (no network, images embedded) with
per-cluster montages, the cluster-size histogram, training curves, the clusters x labels
matrix when labels exist, the metrics and the resolved config.
"""

from __future__ import annotations

import argparse
import sys

from pipeline.cli import job_main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("run", help="run directory or s3:// prefix")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="e.g. --set report.sample_rows=100000 --set s3.endpoint_url=...")
    p.add_argument("--verbose", action="store_true")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    from pipeline.config import Config, resolve
    from pipeline.report import write_report

    s3 = resolve(Config, overrides=args.set).s3
    print(write_report(args.run, s3, args.set))
    return 0


def main(argv: list[str] | None = None) -> int:
    return job_main(parse_args(argv), run)


if __name__ == "__main__":
    sys.exit(main())
