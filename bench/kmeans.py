"""Our mini-batch k-means (the centroid store) against faiss.Kmeans and scikit-learn.

    python -m bench kmeans            # 200,000 x 128, k=1000; CIFAR-10 ResNet-18 features
    python -m bench kmeans --quick    # 50,000 x 64, k=200; 3,000 CIFAR-10 images

Same features, same machine, one run. Ours is ``pipeline.kmeans.reference.minibatch_kmeans``:
the ``CentroidStore`` driven over shuffled mini-batches exactly as the online method's
workers drive the centroid server (Sculley 2010 update, reservoir reseeding), with a frozen
model. faiss runs Lloyd's algorithm (20 iterations, every point); scikit-learn runs
``MiniBatchKMeans`` with the same batch size and number of passes as ours.

Headline: worst inertia(ours) / inertia(faiss) over the workloads; target <= 1.05.
"""

from __future__ import annotations

import argparse
import os
import time
import zipfile
from typing import Any

import numpy as np

from bench.common import SHARED, write_result

BATCH, EPOCHS = 4096, 10


def blobs(n: int, d: int, k: int, seed: int = 0) -> np.ndarray:
    """Gaussian mixture with overlapping components of unequal size: (n, d) float32."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, d)).astype(np.float32)
    weights = rng.dirichlet(np.full(k, 2.0))
    member = rng.choice(k, size=n, p=weights)
    scale = rng.uniform(0.3, 0.8, size=k).astype(np.float32)[member, None]
    return (centers[member] + scale * rng.normal(size=(n, d)).astype(np.float32)) / np.sqrt(d)


def cifar_features(n: int) -> np.ndarray:
    """Global-pooled features of a seeded, randomly initialised ResNet-18 trunk: (n, 512)."""
    import torch

    from pipeline.data.decode import DecodeSpec, decode_batch, normalize
    from pipeline.models.backbones import build_embedder

    path = SHARED / "cifar10" / "cifar10-train.zip"
    if not path.exists():
        raise SystemExit(f"skipped: {path} is absent (the shared datasets are needed)")
    with zipfile.ZipFile(path) as z:
        names = sorted(m for m in z.namelist() if m.endswith(".jpg"))
        names = names[:: max(1, len(names) // n)][:n]
        images = [z.read(m) for m in names]
    spec = DecodeSpec(channels=3, size=32)
    torch.manual_seed(0)
    model = build_embedder("resnet18", 3, 512, normalize=False).eval()
    feats = []
    with torch.inference_mode():
        for i in range(0, len(images), 512):
            x = normalize(decode_batch(images[i:i + 512], spec).pixels, spec)
            feats.append(model(x).numpy())
    return np.concatenate(feats).astype(np.float32)


def run_all(x: np.ndarray, k: int) -> dict[str, Any]:
    from sklearn.cluster import MiniBatchKMeans

    from pipeline.kmeans.reference import faiss_kmeans, inertia, minibatch_kmeans

    rows: dict[str, Any] = {}
    t = time.perf_counter()
    ref = faiss_kmeans(x, k, niter=20, seed=0)
    rows["faiss"] = {"seconds": time.perf_counter() - t, "inertia": inertia(x, ref)}
    t = time.perf_counter()
    ours = minibatch_kmeans(x, k, batch_size=BATCH, epochs=EPOCHS, seed=0).centroids
    rows["ours"] = {"seconds": time.perf_counter() - t, "inertia": inertia(x, ours)}
    t = time.perf_counter()
    sk = MiniBatchKMeans(k, batch_size=BATCH, max_iter=EPOCHS, n_init=1, random_state=0,
                         max_no_improvement=None, init="random").fit(x)
    rows["sklearn_minibatch"] = {"seconds": time.perf_counter() - t,
                                 "inertia": inertia(x, sk.cluster_centers_)}
    for row in rows.values():
        row["inertia_vs_faiss"] = round(row["inertia"] / rows["faiss"]["inertia"], 4)
        row["time_vs_faiss"] = round(row["seconds"] / rows["faiss"]["seconds"], 3)
        row["seconds"] = round(row["seconds"], 2)
    return rows


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench kmeans")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    from pipeline.distributed.runtime import pin_threads

    pin_threads(os.cpu_count() or 1)
    n, d, k = (50_000, 64, 200) if args.quick else (200_000, 128, 1000)
    n_img, k_img = (3000, 50) if args.quick else (10_000, 100)
    workloads = {f"blobs_{n}x{d}_k{k}": (blobs(n, d, k), k),
                 f"cifar10_resnet18_{n_img}x512_k{k_img}": (cifar_features(n_img), k_img)}
    results = {}
    for name, (x, kk) in workloads.items():
        results[name] = run_all(x, kk)
        r = results[name]
        print(f"  {name}: ours {r['ours']['inertia_vs_faiss']:.3f}x faiss inertia in "
              f"{r['ours']['time_vs_faiss']:.2f}x its time; sklearn MiniBatchKMeans "
              f"{r['sklearn_minibatch']['inertia_vs_faiss']:.3f}x in "
              f"{r['sklearn_minibatch']['time_vs_faiss']:.2f}x", flush=True)
    worst = max(r["ours"]["inertia_vs_faiss"] for r in results.values())
    headline = {"name": "minibatch_inertia_over_faiss", "value": worst, "target": 1.05,
                "meets": worst <= 1.05}
    path = write_result("kmeans" + ("-quick" if args.quick else ""), headline,
                        {"workloads": results, "batch_size": BATCH, "epochs": EPOCHS,
                         "faiss_niter": 20, "quick": args.quick})
    print(f"kmeans: worst inertia ratio to faiss = {worst:.3f} (target <= 1.05) -> {path}")
    return 0
