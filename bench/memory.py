"""Flat memory at scale: peak memory of every Ray process for N and 4N images (DESIGN §7).

    python -m bench memory            # N = 200,000 and 4N = 800,000 synthetic 28 px images
    python -m bench memory --quick    # N = 20,000 and 4N = 80,000

Each size runs ``jobs/assign.py``, the production assignment pipeline (Ray Data read ->
decode -> small CNN -> assign -> per-shard Parquet write), in a fresh process that starts
its own local Ray instance. A sampler in this process walks that job's whole process tree
(driver, GCS, raylet, Ray Data tasks, assignment actors) every ``SAMPLE_S`` seconds and sums
two measures: RSS, and PSS (proportional set size, which counts each shared page, such as
the object store's, once in total instead of once per process that maps it). Throughput
comes from the finished output shards over time: each is ``SHARD_ROWS`` images.

The 4N input is 4x the N input's shards (hard links to the same files plus three times as
many more), so both runs see identical data per shard. Images are 4,096 distinct random
28 px greyscale JPEGs repeated under unique ids; Parquet dictionary encoding is off so the
repeats are stored, read and decoded in full.

Headline: peak PSS(4N) / peak PSS(N), target <= 1.2. Also reported: the images/s in each
tenth of the 4N stream, and the ratio of its last to its first half (1.0 = steady).
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import REPO, write_result
from bench.throughput import TUNED, make_run

WORK = REPO / "work" / "bench" / "memory"
SHARD_ROWS, DISTINCT, SAMPLE_S = 2000, 4096, 0.5
RUN = ["data.image_size=28", "data.channels=1", "model.backbone=small_cnn", "model.width=16",
       "model.feature_dim=32"]


def small_jpegs(n: int, px: int = 28) -> list[bytes]:
    """``n`` random greyscale scenes (smooth blobs + noise) as JPEG quality 90."""
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:px, 0:px] / px
    out = []
    for _ in range(n):
        img = np.sin(xx * rng.uniform(2, 9) + yy * rng.uniform(2, 9) + rng.uniform(0, 6))
        img = ((img * 0.5 + 0.5) * 220 + rng.normal(0, 10, (px, px))).clip(0, 255)
        buf = io.BytesIO()
        Image.fromarray(img.astype(np.uint8), mode="L").save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def write_inputs(n: int) -> tuple[Path, Path]:
    """Shard folders for N and 4N images; the N folder hard-links the first quarter."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pool = small_jpegs(DISTINCT)
    small, large = WORK / "input-n", WORK / "input-4n"
    for folder in (small, large):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    for shard in range(4 * n // SHARD_ROWS):
        start = shard * SHARD_ROWS
        ids = [f"img-{i:08d}" for i in range(start, start + SHARD_ROWS)]
        images = [pool[i % DISTINCT] for i in range(start, start + SHARD_ROWS)]
        path = large / f"part-{shard:05d}.parquet"
        pq.write_table(pa.table({"id": ids, "image": pa.array(images, pa.binary())}), path,
                       row_group_size=SHARD_ROWS // 4, use_dictionary=False)
        if start < n:
            os.link(path, small / path.name)
    return small, large


class Sampler(threading.Thread):
    """Every SAMPLE_S: summed RSS and PSS of ``pid``'s process tree, and finished shards."""

    def __init__(self, pid: int, out: Path):
        super().__init__(daemon=True)
        self.pid, self.out, self.stop = pid, out, threading.Event()
        self.samples: list[tuple[float, int, int, int, int]] = []  # t, rss, pss, procs, shards

    def run(self) -> None:
        import psutil

        start = time.perf_counter()
        while not self.stop.wait(SAMPLE_S):
            try:
                root = psutil.Process(self.pid)
                procs = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            rss = pss = 0
            for proc in procs:
                try:
                    mem = proc.memory_full_info()
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                rss, pss = rss + mem.rss, pss + mem.pss
            done = assignments_done(self.out)
            self.samples.append((time.perf_counter() - start, rss, pss, len(procs), done))


def assignments_done(out: Path) -> int:
    folder = out / "assignments"
    if not folder.exists():
        return 0
    return sum(1 for p in folder.iterdir() if p.suffix == ".parquet" and
               not p.name.startswith("."))


def run_job(run: Path, shards: Path, label: str) -> dict[str, Any]:
    """``jobs/assign.py`` in a fresh process (own Ray instance), sampled throughout."""
    out = WORK / f"out-{label}"
    shutil.rmtree(out, ignore_errors=True)
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    cmd = [sys.executable, str(REPO / "jobs" / "assign.py"), "--run", str(run), "--input",
           str(shards), "--output", str(out)]
    for setting in TUNED + ["cluster.assign_batch_size=1000"]:
        cmd += ["--set", setting]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    sampler = Sampler(proc.pid, out)
    sampler.start()
    log, _ = proc.communicate()
    sampler.stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"assign job for {label} failed ({proc.returncode}):\n{log[-3000:]}")
    return summarise(np.array(sampler.samples, dtype=np.float64), time.perf_counter() - start,
                     assignments_done(out))


def summarise(s: np.ndarray, wall: float, shards: int) -> dict[str, Any]:
    """Peaks, and images/s per tenth of the span from the first to the last finished shard."""
    t, rss, pss, procs, done = s.T
    streaming = np.flatnonzero(done > 0)
    t0, t1 = t[streaming[0]], t[streaming[-1]]
    edges = np.linspace(t0, t1, 11)
    rate = [float((np.interp(b, t, done) - np.interp(a, t, done)) * SHARD_ROWS / (b - a))
            for a, b in zip(edges[:-1], edges[1:], strict=True)]
    half = len(rate) // 2
    return {"images": shards * SHARD_ROWS, "wall_s": round(wall, 1),
            "peak_pss_mib": round(pss.max() / 2**20, 1),
            "peak_rss_sum_mib": round(rss.max() / 2**20, 1),
            "pss_at_first_shard_mib": round(pss[streaming[0]] / 2**20, 1),
            "max_processes": int(procs.max()), "stream_s": round(t1 - t0, 1),
            "images_per_s_by_tenth": [round(r, 1) for r in rate],
            "images_per_s": round((done[-1] - done[streaming[0]]) * SHARD_ROWS / (t1 - t0), 1),
            "late_over_early_rate": round(float(np.mean(rate[half:]) / np.mean(rate[:half])), 3),
            "pss_timeline_mib": [[round(a, 1), round(b / 2**20, 1)] for a, b in
                                 zip(t[::4], pss[::4], strict=True)]}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench memory")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--n", type=int, default=None, help="N images (default 200,000; quick 20,000)")
    args = p.parse_args(argv)
    n = args.n or (20_000 if args.quick else 200_000)
    n -= n % SHARD_ROWS
    small, large = write_inputs(n)
    run = WORK / "run"
    make_run(run, RUN, k=100)
    results = {"n": run_job(run, small, "n"), "4n": run_job(run, large, "4n")}
    for label, r in results.items():
        print(f"  {label:>2}: {r['images']:,} images, peak PSS {r['peak_pss_mib']:,.0f} MiB "
              f"(RSS sum {r['peak_rss_sum_mib']:,.0f} MiB), {r['images_per_s']:,.0f} images/s, "
              f"late/early rate {r['late_over_early_rate']:.2f}", flush=True)
    ratio = float(results["4n"]["peak_pss_mib"] / results["n"]["peak_pss_mib"])
    headline = {"name": "peak_pss_4n_over_n", "value": round(ratio, 3), "target": 1.2,
                "meets": bool(ratio <= 1.2)}
    path = write_result("memory" + ("-quick" if args.quick else ""), headline,
                        {"runs": results, "shard_rows": SHARD_ROWS, "model": RUN,
                         "settings": TUNED, "quick": args.quick})
    print(f"memory: peak PSS(4N)/peak PSS(N) = {ratio:.2f} (target <= 1.2), "
          f"4N rate late/early {results['4n']['late_over_early_rate']:.2f} -> {path}")
    shutil.rmtree(WORK / "out-n", ignore_errors=True)
    shutil.rmtree(WORK / "out-4n", ignore_errors=True)
    return 0
