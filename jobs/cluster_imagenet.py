"""Cluster images: train a CNN jointly with k-means, assign every image, score, report.

Local (no --input runs the embedded scikit-learn digits demo end to end, ~2 min on 2 cores):
    python jobs/cluster_imagenet.py
    python jobs/cluster_imagenet.py --input data/mnist --output runs/mnist --k 10 --epochs 20

On a Ray cluster (the driver joins it through RAY_ADDRESS, set by `ray job submit`):
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/cluster_imagenet.py --input s3://bucket/imagenet/ \
        --output s3://bucket/runs/r1 --method online --k 1000 --workers 8 --gpu \
        --set model.backbone=resnet50 --set data.image_size=224 --set data.channels=3

Re-running the same command with the same --output resumes from the last checkpoint and
skips finished stages.
"""

from __future__ import annotations

import argparse
import sys

from pipeline import methods
from pipeline.cli import add_address, job_main
from pipeline.config import Config, resolve

# The embedded demo (no --input): scikit-learn's 8x8 digits need neither 28 px nor a wide net;
# these settings finish in about two minutes on 2 cores. Any flag or --set still wins.
DEMO = {"data.image_size": 16, "model.width": 16, "train.epochs": 12,
        "data.cache_decoded": True, "scale.threads_per_worker": 2, "data.output": "runs/demo"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", help="YAML file with Config fields (see pipeline/config.py)")
    p.add_argument("--input", help="Parquet shards dir or s3:// prefix (default: digits demo)")
    p.add_argument("--output", help="run directory or s3:// prefix")
    p.add_argument("--method", help=" | ".join(methods.available()))
    p.add_argument("--k", type=int, help="number of clusters")
    p.add_argument("--epochs", type=int)
    p.add_argument("--workers", type=int, help="Ray Train workers")
    p.add_argument("--gpu", action="store_true", default=None, help="one GPU per worker")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any config field, e.g. --set train.lr=0.01")
    p.add_argument("--overwrite", action="store_true",
                   help="delete an existing run in --output first (else it resumes, or stops "
                        "when it was made with a different config)")
    add_address(p)
    p.add_argument("--verbose", action="store_true")
    return p.parse_args(argv)


def load_config(args: argparse.Namespace) -> Config:
    flags = {"data.input": args.input, "data.output": args.output, "method": args.method,
             "cluster.k": args.k, "train.epochs": args.epochs, "scale.workers": args.workers,
             "scale.gpu": args.gpu}
    demo = args.input is None and not _input_in(args)
    cfg: Config = resolve(Config, args.config, args.set, flags, base=DEMO if demo else None)
    return cfg  # resolve() refuses a method that is not in the registry


def _input_in(args: argparse.Namespace) -> bool:
    """Whether --config or --set names an input (then this is not the demo)."""
    if any(s.startswith("data.input=") for s in args.set):
        return True
    return bool(args.config and resolve(Config, args.config).data.input)


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args)  # a bad config fails here, before Ray starts
    from pipeline.run import run as run_clustering
    from pipeline.summary import print_summary

    print_summary(run_clustering(cfg, overwrite=args.overwrite), cfg.data.output)
    return 0


def main(argv: list[str] | None = None) -> int:
    return job_main(parse_args(argv), run)


if __name__ == "__main__":
    sys.exit(main())
