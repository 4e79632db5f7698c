"""``deepcluster`` against ``online`` under equal wall-time budgets, next to raw-pixel k-means.

    python -m bench deepcluster            # MNIST test (10,000) and CIFAR-10 (10,000), 300 s each
    python -m bench deepcluster --quick    # MNIST, 3,000 images, 30 s budgets (< 3 min)

The CIFAR-10 subset is drawn at random across classes and stored sorted by class (the
stress case for the training stream's shuffle). Both methods train from scratch on this
machine with the same ``train.time_budget_s``
(each stops after the epoch in which the budget ran out), then run the same assignment pass
and metrics; both wall times are reported. Raw-pixel k-means (scikit-learn ``KMeans``,
k = 10, 10 restarts, on pixels scaled to [0, 1]) runs in the same script.

Headline: DeepCluster's NMI minus raw-pixel k-means' NMI on CIFAR-10 (MNIST with --quick);
the issue's floor is > 0 on both sets. Reference: the paper-era DeepCluster reaches 0.374
ACC on CIFAR-10 from scratch (on GPUs, for hundreds of epochs).
"""

from __future__ import annotations

import argparse
import io
import os
import time
import zipfile
from typing import Any

import numpy as np

from bench.common import REPO, SHARED, need, write_result

WORK = REPO / "work" / "bench" / "deepcluster"
COMMON = ["cluster.k=10", "model.width=16", "data.cache_decoded=true", "train.epochs=200",
          "scale.threads_per_worker=2", "report.sample_rows=2000"]
METHODS = {
    "online": ["method=online"],
    # pca_dim 16 and 3 passes per clustering: tried on 3,000 MNIST digits with a 90 s budget,
    # NMI 0.33 (pca 32, 4 passes) -> 0.41 (pca 16) -> 0.46 (+ batch-statistics features at
    # epoch 0); 1 pass per clustering reached 0.28 on 10,000 in 240 s.
    "deepcluster": ["method=deepcluster", "model.feature_dim=64", "deepcluster.pca_dim=16",
                    "deepcluster.passes=3"],
}
DATASETS = {
    "mnist": {"settings": ["data.image_size=28", "data.channels=1"], "extra": {}},
    "cifar10": {"settings": ["data.image_size=32", "data.channels=3",
                             "data.mean=[0.49,0.48,0.45]", "data.std=[0.25,0.24,0.26]"],
                "extra": {"deepcluster": ["deepcluster.sobel=true"]}},
}


def mnist_shards(n: int) -> tuple[str, np.ndarray, np.ndarray]:
    """Ingest the first n MNIST test digits; -> (shards, raw pixels (n, 784), labels)."""
    from pipeline.data.sources import read_idx

    root = need(SHARED / "mnist")
    x = read_idx(str(root / "t10k-images-idx3-ubyte.gz"))[:n]
    y = read_idx(str(root / "t10k-labels-idx1-ubyte.gz"))[:n]
    images = []
    from PIL import Image

    for img in x:
        buf = io.BytesIO()
        Image.fromarray(img.astype(np.uint8), mode="L").save(buf, format="PNG")
        images.append(buf.getvalue())
    out = WORK / f"mnist-{n}"
    write(out, images, [str(v) for v in y])
    return str(out), x.reshape(n, -1) / 255.0, y


def cifar_shards(n: int) -> tuple[str, np.ndarray, np.ndarray]:
    """n CIFAR-10 training JPEGs drawn at random across all 50,000 (seed 0), stored sorted by
    class as a folder ingest with --keep-order would; -> (shards, raw pixels, labels)."""
    from PIL import Image

    with zipfile.ZipFile(need(SHARED / "cifar10" / "cifar10-train.zip")) as z:
        names = sorted(m for m in z.namelist() if m.endswith(".jpg"))
        pick = np.random.default_rng(0).choice(len(names), size=min(n, len(names)),
                                               replace=False)
        names = [names[i] for i in np.sort(pick)]  # path order = class order
        images = [z.read(m) for m in names]
    labels = [m.split("/")[-2] for m in names]
    pixels = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in images])
    out = WORK / f"cifar10-{n}"
    write(out, images, labels)
    return str(out), pixels.reshape(n, -1) / 255.0, np.array(labels)


def write(folder: Any, images: list[bytes], labels: list[str]) -> None:
    from bench.throughput import write_shards

    write_shards(folder, images, labels, rows=2000)


def raw_pixel_kmeans(x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    from sklearn.cluster import KMeans

    from pipeline.metrics import score

    start = time.perf_counter()
    pred = KMeans(10, n_init=10, random_state=0).fit_predict(x.astype(np.float32))
    return {**score(y, pred), "wall_s": round(time.perf_counter() - start, 2)}


def method_run(shards: str, dataset: str, method: str, budget: float) -> dict[str, Any]:
    from pipeline.config import Config, resolve
    from pipeline.data import fs as fsx
    from pipeline.run import run

    out = str(WORK / "runs" / f"{dataset}-{method}")
    fsx.remove_tree(fsx.locate(out))  # a benchmark measures a fresh run
    spec = DATASETS[dataset]
    settings = [*COMMON, *spec["settings"], *METHODS[method], *spec["extra"].get(method, []),
                f"train.time_budget_s={budget}"]
    cfg = resolve(Config, None, settings, {"data.input": shards, "data.output": out})
    start = time.perf_counter()
    metrics = run(cfg)
    return {"nmi": round(metrics["nmi"], 4), "acc": round(metrics["acc"], 4),
            "ari": round(metrics["ari"], 4), "epochs": len(metrics["epochs"]),
            "train_budget_s": budget, "wall_s": round(time.perf_counter() - start, 1),
            "empty_clusters": metrics["cluster_sizes"]["empty"], "settings": settings}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench deepcluster")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--budget", type=float, default=None, help="training seconds per run")
    args = p.parse_args(argv)
    budget = args.budget or (30.0 if args.quick else 300.0)
    from pipeline.distributed.runtime import init_ray

    init_ray(num_cpus=os.cpu_count())
    loaders = {"mnist": lambda: mnist_shards(3000 if args.quick else 10_000)}
    if not args.quick:
        loaders["cifar10"] = lambda: cifar_shards(10_000)
    results: dict[str, Any] = {}
    for dataset, load in loaders.items():
        shards, raw, labels = load()
        row = {"images": len(labels), "raw_pixel_kmeans": raw_pixel_kmeans(raw, labels)}
        for method in ("online", "deepcluster"):
            row[method] = method_run(shards, dataset, method, budget)
            print(f"  {dataset} {method}: NMI {row[method]['nmi']:.3f} ACC "
                  f"{row[method]['acc']:.3f} ARI {row[method]['ari']:.3f} "
                  f"({row[method]['epochs']} epochs, {row[method]['wall_s']:.0f} s)", flush=True)
        raw_row = row["raw_pixel_kmeans"]
        print(f"  {dataset} raw-pixel k-means: NMI {raw_row['nmi']:.3f} ACC {raw_row['acc']:.3f}"
              f" ARI {raw_row['ari']:.3f}", flush=True)
        results[dataset] = row
    key = "mnist" if args.quick else "cifar10"
    margin = results[key]["deepcluster"]["nmi"] - results[key]["raw_pixel_kmeans"]["nmi"]
    floors = {d: r["deepcluster"]["nmi"] > r["raw_pixel_kmeans"]["nmi"]
              for d, r in results.items()}
    headline = {"name": f"{key}_deepcluster_nmi_minus_raw_pixel_kmeans",
                "value": round(margin, 4), "target": 0.0, "meets": all(floors.values()),
                "floor_met_per_dataset": floors,
                "cifar10_acc_reference_paper": 0.374}
    path = write_result("deepcluster" + ("-quick" if args.quick else ""), headline,
                        {"datasets": results, "budget_s": budget, "quick": args.quick})
    print(f"deepcluster: NMI over raw-pixel k-means on {key} {margin:+.3f}; floor met on "
          f"{sum(floors.values())}/{len(floors)} sets -> {path}")
    return 0
