"""Ingest and read-back throughput on the full CIFAR-10 zip (50,000 JPEGs) plus 3 corrupt files.

    python -m bench ingest            # all 50,000 images
    python -m bench ingest --quick    # the first 5,000

Checks the contract on the way: 5,000 good rows per class and exactly 3 rejects.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
import zipfile

from bench.common import REPO, SHARED, need, write_result

WORK = REPO / "work" / "bench"


def corrupted_zip(limit: int | None) -> str:
    """A copy of the CIFAR-10 zip (or its first ``limit`` members) with 3 corrupt JPEGs."""
    import numpy as np

    source = need(SHARED / "cifar10" / "cifar10-train.zip")
    target = WORK / f"cifar10-corrupt-{limit or 'all'}.zip"
    WORK.mkdir(parents=True, exist_ok=True)
    if limit is None:
        shutil.copyfile(source, target)
    else:
        with zipfile.ZipFile(source) as zin, zipfile.ZipFile(target, "w") as zout:
            names = sorted(n for n in zin.namelist() if n.endswith(".jpg"))
            for name in names[::len(names) // limit][:limit]:  # every class represented
                zout.writestr(name, zin.read(name))
    with zipfile.ZipFile(source) as zin:
        jpeg = zin.read(next(n for n in zin.namelist() if n.endswith(".jpg")))
    data = {"train/cat/corrupt-truncated.jpg": jpeg[: len(jpeg) // 3],
            "train/dog/corrupt-random.jpg": np.random.default_rng(0).bytes(2000),
            "train/ship/corrupt-empty.jpg": b""}
    with zipfile.ZipFile(target, "a") as zout:
        for name, payload in data.items():
            zout.writestr(name, payload)
    return str(target)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench ingest")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    from pipeline.config import IngestConfig
    from pipeline.data.decode import DecodeSpec
    from pipeline.data.reader import read_images
    from pipeline.distributed.runtime import init_ray

    init_ray(num_cpus=os.cpu_count())
    archive = corrupted_zip(5000 if args.quick else None)
    out = str(WORK / "cifar10-shards")
    from pipeline.data.ingest import ingest

    result = ingest(IngestConfig(source=archive, output=out, labels_from_folders=True,
                                 overwrite=True))
    start = time.perf_counter()
    rows = read_images(out, DecodeSpec(channels=3, size=32)).count()
    read_s = time.perf_counter() - start
    expected = 5000 if args.quick else 50_000
    ok = rows == result.rows == expected and result.rejects == 3
    per_class = sorted(set(result.label_counts.values()))
    headline = {"name": "cifar10_ingest_images_per_s", "value": round(result.images_per_s, 1),
                "target": None, "meets": ok}
    details = {"rows": result.rows, "rejects": result.rejects, "read_rows": rows,
               "per_class_counts": per_class, "ingest_s": round(result.seconds, 2),
               "ingest_images_per_s": round(result.images_per_s, 1),
               "read_decode_images_per_s": round(rows / read_s, 1), "read_s": round(read_s, 2),
               "quick": args.quick}
    path = write_result("ingest", headline, details)
    print(f"ingest: {result.rows} rows + {result.rejects} rejects in {result.seconds:.1f} s "
          f"({result.images_per_s:.0f} images/s); read+decode {rows} rows at "
          f"{rows / read_s:.0f} images/s; per-class {per_class}; contract ok={ok} -> {path}")
    return 0 if ok else 1
