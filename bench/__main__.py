"""Dispatch ``python -m bench <name> [args]`` to ``bench/<name>.py:main``."""

from __future__ import annotations

import importlib
import sys

NAMES = ("quality", "ingest", "gpu_smoke", "throughput", "kmeans", "centroid_server", "memory",
         "gpu_throughput", "deepcluster", "depict", "imc", "imc_sweep", "multiview", "multiview_sets", "view_passes", "shuffle", "epoch_overhead", "report",
         "table", "train_throughput", "chaos", "fuzz", "s3_faults", "drift")


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in NAMES:
        print(f"usage: python -m bench {{{'|'.join(NAMES)}}} [--quick] [...]", file=sys.stderr)
        return 2
    module = importlib.import_module(f"bench.{sys.argv[1]}")
    return module.main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
