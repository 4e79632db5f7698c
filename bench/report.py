"""The report's size, build time and memory as N and k grow: its stated bounds, measured.

    python -m bench report            # (N, k) = (10k, 100), (100k, 1000), (1M, 1000) x2
    python -m bench report --quick    # (10k, 100), (100k, 1000)

Each case is a complete run directory, built here in seconds instead of trained: input
shards of N small greyscale PNGs (10 files; 512 distinct 16x16 images repeated under unique
ids, with 10 labels; noise, the worst case for the montages' JPEG, or digits), the assignments the assign stage would write for them (clusters with
Zipf-like sizes, so there are giant and tiny clusters, and distances), a saved model
(the default small CNN at 16 px, untrained: the map's cost does not depend on the weights)
with k centroids, config, metrics and history. ``write_report`` then builds ``report.html``
exactly as ``jobs/report.py`` does, in this process; we record its seconds, the page's
bytes and the process's peak RSS growth.

Headline: report bytes at (1M, 1000) over report bytes at (100k, 1000): the page does not
grow with N (target <= 1.1).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import tempfile
import time
from typing import Any

import numpy as np

from bench.common import write_result

# (N, k, thumbnails): "noise" images are JPEG's worst case (incompressible), so the page's
# size is an upper bound; "digits" (scikit-learn's, upscaled) are a compressible case.
CASES = [(10_000, 100, "noise"), (100_000, 1_000, "noise"), (1_000_000, 1_000, "noise"),
         (1_000_000, 1_000, "digits")]
FILES = 10


def pngs(count: int, seed: int, kind: str) -> list[bytes]:
    """``count`` 16x16 greyscale PNGs: uniform noise, or scikit-learn's digits upscaled."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    if kind == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits().images[:count] * (255 / 16)
        arrays = [np.kron(d, np.ones((2, 2))).astype(np.uint8) for d in digits]
    else:
        arrays = [rng.integers(0, 256, (16, 16), dtype=np.uint8) for _ in range(count)]
    out = []
    for a in arrays:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def make_run(root: str, n: int, k: int, kind: str) -> str:
    """A run directory for N images in k clusters; returns its path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.config import Config, dump_yaml, resolve
    from pipeline.data.fs import locate
    from pipeline.methods.arch import initial_model, model_arch
    from pipeline.models.weights import save_bytes
    from pipeline.outputs import RunPaths, TrainedModel, save_trained

    rng = np.random.default_rng(n + k)
    shards, run = os.path.join(root, "shards"), os.path.join(root, "run")
    os.makedirs(shards)
    os.makedirs(os.path.join(run, "assignments"))
    images = pngs(512, 0, kind)
    sizes = 1.0 / np.arange(1, k + 1) ** 0.8  # Zipf-like cluster sizes
    cluster = rng.choice(k, size=n, p=sizes / sizes.sum()).astype(np.int32)
    labels = (cluster % 10).astype(str)
    for f, rows in enumerate(np.array_split(np.arange(n), FILES)):
        name = f"part-{f:05d}.parquet"
        ids = pa.array([f"img-{i:08d}" for i in rows], pa.string())
        pq.write_table(pa.table({"id": ids,
                                 "image": pa.array([images[i % 512] for i in rows], pa.binary()),
                                 "label": pa.array(labels[rows])}),
                       os.path.join(shards, name), row_group_size=20_000)
        distance = rng.gamma(4.0, 0.25, len(rows)).astype(np.float32)
        pq.write_table(pa.table({"id": ids, "cluster": pa.array(cluster[rows]),
                                 "distance": pa.array(distance),
                                 "margin": pa.array(rng.random(len(rows), np.float32)),
                                 "label": pa.array(labels[rows])}),
                       os.path.join(run, "assignments", name))
    cfg: Config = resolve(Config, None, [f"cluster.k={k}", "data.image_size=16",
                                         "data.channels=1", "model.feature_dim=32"],
                          {"data.input": shards, "data.output": run})
    paths = RunPaths(locate(run))
    with open(os.path.join(run, "config.yaml"), "w") as fh:
        fh.write(dump_yaml(cfg))
    centroids = rng.normal(size=(k, cfg.model.feature_dim)).astype(np.float32)
    save_trained(cfg, TrainedModel(save_bytes(initial_model(cfg)), model_arch(cfg), centroids,
                                   [{"epoch": 0, "loss": 1.0}]), paths)
    with open(os.path.join(run, "metrics.json"), "w") as fh:
        json.dump({"method": "online", "k": k, "n_images": n}, fh)
    return run


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(n: int, k: int, kind: str) -> dict[str, Any]:
    from pipeline.report import write_report

    with tempfile.TemporaryDirectory(prefix="bench-report-") as root:
        t0 = time.perf_counter()
        run = make_run(root, n, k, kind)
        made = time.perf_counter() - t0
        rss0 = peak_rss_mb()
        t1 = time.perf_counter()
        write_report(run)
        seconds = time.perf_counter() - t1
        size = os.path.getsize(os.path.join(run, "report.html"))
    case = {"n_images": n, "k": k, "thumbnails": kind, "report_bytes": size, "report_mb": size / 1e6,
            "build_s": seconds, "peak_rss_growth_mb": peak_rss_mb() - rss0,
            "peak_rss_mb": peak_rss_mb(), "setup_s": made}
    print(f"N={n:,} k={k} {kind}: report {size / 1e6:.2f} MB in {seconds:.1f} s "
          f"(peak RSS {case['peak_rss_mb']:.0f} MB)")
    return case


def main(argv: list[str]) -> int:
    import torch

    parser = argparse.ArgumentParser(prog="python -m bench report")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    cases = CASES[:2] if args.quick else CASES
    results = {f"n{n}_k{k}_{kind}": measure(n, k, kind) for n, k, kind in cases}
    mid = results["n100000_k1000_noise"]
    last = results.get("n1000000_k1000_noise", mid)
    ratio = last["report_bytes"] / mid["report_bytes"]
    name = "report-quick" if args.quick else "report"
    write_result(name, {"name": "report_bytes_1m_over_100k_at_k1000", "value": round(ratio, 3),
                        "target": 1.1, "meets": ratio <= 1.1},
                 {"cases": results, "files": FILES,
                  "defaults": {"report.map_points": 3000, "report.sample_rows": 50_000,
                               "report.max_montages": 2000, "report.page_size": 50}})
    return 0
