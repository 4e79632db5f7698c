"""GPU assignment throughput, ResNet-50 at 224 px with fp16 autocast, for a machine without Ray.

    python -m bench gpu_throughput             # 6,000 synthetic 224 px JPEGs
    python -m bench gpu_throughput --quick     # 1,500

The lent GPU machine has no Ray (it cannot reach PyPI, and Ray's compiled wheel neither fits
nor matches the Python carried from here), so this measures the same stages as
``python -m bench throughput`` with Ray Data replaced by a process pool:

  (a) bare decode images/s: ``decode_batch`` in one process per core;
  (b) bare ResNet-50 forward images/s on pre-decoded tensors: fp16 autocast, channels_last;
  (c) the pipeline without Ray: one process per core reads Parquet shards row group by row
      group and decodes to uint8 (``ReadShards`` + ``DecodeImages``, the Ray Data UDFs
      called directly), and the main process runs ``AssignActor`` (the Ray Data actor's
      batch function: normalisation on the GPU, channels_last, fp16 autocast, assignment)
      and writes each shard's assignments to Parquet.

Reference points (published, other hardware): Ray Data ResNet-50 batch inference from
Parquet on S3 at about 290 images/s per T4; NVIDIA's ResNet-50 inference at about 2.9k
images/s per A100 with TensorRT FP16 (MLPerf-style offline, batch 128+).
Headline: (c) images/s; target none (recorded next to the references).
"""

from __future__ import annotations

import argparse
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import REPO, write_result
from bench.throughput import bare_decode, bare_forward, synthetic_jpegs, write_shards

WORK = REPO / "work" / "bench" / "gpu_throughput"
ARCH = {"backbone": "resnet50", "in_channels": 3, "feature_dim": 128, "normalize": True,
        "width": 32, "image_size": 224, "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225]}
SHARD_ROWS, BATCH, K = 250, 256, 1000


def _decode_shard(path: str) -> list[dict[str, Any]]:
    import pyarrow.fs as pafs

    from pipeline.data.reader import DecodeImages
    from pipeline.distributed.assign import ReadShards, decode_spec_of
    from pipeline.distributed.runtime import pin_threads

    pin_threads(1)
    decode = DecodeImages(decode_spec_of(ARCH, 50_000_000), normalized=False,
                          inline_rejects=True)
    return [decode(group) for group in ReadShards(pafs.LocalFileSystem(), False)(
        {"path": [path]})]


def read_decode_only(shards: list[Path]) -> float:
    """Images/s of the pipeline's read + decode stage alone (the same process pool)."""
    workers = max(1, (os.cpu_count() or 2) - 1)
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_decode_shard, [str(shards[0])] * workers))
        start = time.perf_counter()
        rows = sum(len(g["id"]) for groups in pool.map(_decode_shard, map(str, shards))
                   for g in groups)
    return rows / (time.perf_counter() - start)


def pipeline_no_ray(shards: list[Path], out: Path) -> float:
    """Images/s from the first shard submitted to the last shard written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.distributed.assign import AssignActor
    from pipeline.models.arch import build_from_arch
    from pipeline.models.weights import save_bytes

    out.mkdir(parents=True, exist_ok=True)
    centroids = np.random.default_rng(0).normal(size=(K, ARCH["feature_dim"]))
    actor = AssignActor(save_bytes(build_from_arch(ARCH)), ARCH, centroids.astype(np.float32),
                        threads=2)
    workers = max(1, (os.cpu_count() or 2) - 1)
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_decode_shard, [str(shards[0])] * workers))  # start and import
        start, rows = time.perf_counter(), 0
        for path, groups in zip(shards, pool.map(_decode_shard, map(str, shards)), strict=True):
            parts = []
            for group in groups:
                for i in range(0, len(group["id"]), BATCH):
                    parts.append(actor({key: value[i:i + BATCH] for key, value in group.items()}))
            table = pa.Table.from_pydict({key: np.concatenate([p[key] for p in parts])
                                          for key in ("id", "cluster", "distance", "margin")})
            pq.write_table(table, out / path.name)
            rows += table.num_rows
    return rows / (time.perf_counter() - start)


def main(argv: list[str]) -> int:
    import torch

    p = argparse.ArgumentParser(prog="python -m bench gpu_throughput")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_throughput: no CUDA device; nothing to measure")
        return 0
    n = 1500 if args.quick else 6000
    images = synthetic_jpegs(500)
    images = [images[i % len(images)] for i in range(n)]
    shards_dir = WORK / "shards"
    write_shards(shards_dir, images, None, SHARD_ROWS)
    decode = bare_decode(images, 3, 224)
    forward = bare_forward(ARCH, 20 * BATCH, BATCH, "cuda")
    files = sorted(shards_dir.glob("*.parquet"))
    stage = read_decode_only(files)
    piped = pipeline_no_ray(files, WORK / "out")
    bound = min(decode, forward)
    row = {"images": n, "decode_images_per_s": round(decode, 1),
           "forward_resnet50_fp16_images_per_s": round(forward, 1),
           "pipeline_no_ray_images_per_s": round(piped, 1),
           "read_decode_stage_images_per_s": round(stage, 1),
           "ratio_vs_min": round(piped / bound, 3), "batch": BATCH,
           "cpu_processes": os.cpu_count(),
           "references": {"ray_data_resnet50_t4_images_per_s": 290,
                          "nvidia_resnet50_a100_trt_fp16_images_per_s": 2900}}
    # No target exists (the references are other hardware), so no verdict: meets is None.
    headline = {"name": "gpu_assign_resnet50_fp16_images_per_s", "value": row[
        "pipeline_no_ray_images_per_s"], "target": None, "meets": None}
    path = write_result("gpu_throughput" + ("-quick" if args.quick else ""), headline, row)
    print(f"gpu_throughput: decode {decode:,.0f}/s, ResNet-50 fp16 forward {forward:,.0f}/s, "
          f"read+decode stage {stage:,.0f}/s, pipeline without Ray {piped:,.0f}/s (c/min(a,b) = {row['ratio_vs_min']:.2f}) "
          f"-> {path}")
    return 0
