"""Ingest images into Parquet shards under the data contract (DESIGN §3, §8).

Local:
    python jobs/ingest.py --source sklearn-digits --output data/digits
    python jobs/ingest.py --source ../shared/datasets/cifar10/cifar10-train.zip \
        --output data/cifar10 --labels-from-folders
    python jobs/ingest.py --source idx:../shared/datasets/mnist --output data/mnist
On a cluster:
    ray job submit --working-dir . -- python jobs/ingest.py \
        --source s3://bucket/raw-images/ --output s3://bucket/shards/ --labels-from-folders
"""

from __future__ import annotations

import argparse
import sys

from pipeline.cli import add_address, job_main
from pipeline.config import IngestConfig, resolve


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--source", help="DIR | FILE.zip | s3://bucket/prefix | idx:DIR | sklearn-digits")
    p.add_argument("--output", help="Parquet output directory or s3:// prefix")
    p.add_argument("--labels-from-folders", action="store_true", default=None)
    p.add_argument("--overwrite", action="store_true", default=None)
    p.add_argument("--keep-order", action="store_true", default=None,
                   help="write rows in the source's order (default: a seeded random order)")
    p.add_argument("--seed", type=int, default=None, help="seed of the row order (default 0)")
    p.add_argument("--config", help="YAML file with IngestConfig fields")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    add_address(p)
    p.add_argument("--verbose", action="store_true")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    flags = {"source": args.source, "output": args.output,
             "labels_from_folders": args.labels_from_folders, "overwrite": args.overwrite,
             "keep_order": args.keep_order, "seed": args.seed}
    cfg = resolve(IngestConfig, args.config, args.set, flags)
    from pipeline.data.ingest import ingest
    from pipeline.distributed.runtime import init_ray

    init_ray()
    result = ingest(cfg)
    state = "already complete, nothing done" if result.skipped else \
        f"{result.images_per_s:.0f} images/s"
    print(f"{result.output}: {result.rows} rows, {result.rejects} rejects, "
          f"{len(result.label_counts)} labels ({state})")
    return 0


def main(argv: list[str] | None = None) -> int:
    return job_main(parse_args(argv), run)


if __name__ == "__main__":
    sys.exit(main())
