"""DeepCluster's fixed cost per epoch on Ray, against the same work done bare in one process.

    python -m bench epoch_overhead            # the digits (1,797), 5 epochs
    python -m bench epoch_overhead --quick    # 3 epochs
    python -m bench epoch_overhead --name epoch_overhead-before   # label a run of old code

Side by side in one run:

(a) **bare**, in this process with the same torch thread count as a train worker: one
    forward pass over every image (the feature pass), then the epoch's training steps (CNN +
    fresh head, pseudo-labels, the same batch size, passes and augmentation);
(b) **pipeline**: ``python -m pipeline``'s training stage with ``method=deepcluster``; its
    history gives each epoch's wall ``seconds`` and the driver's own k-means time.

Overhead per epoch = (b)'s epoch seconds - k-means seconds - (a)'s feature pass and training
seconds: everything that is neither computing features, nor clustering, nor training
(starting trainers and actor pools, shipping weights, checkpoints, and the streaming input:
``embed_s`` and ``train_loop_s`` show the feature pass and the training loop as the
pipeline timed them). Headline: its median
over the epochs after the first. Digits are small on purpose: the compute is a few seconds,
so the fixed cost is what the figure shows.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from typing import Any

from bench.common import write_result

SETTINGS = ["method=deepcluster", "cluster.k=10", "data.image_size=16", "model.width=16",
            "model.feature_dim=32", "deepcluster.pca_dim=8", "deepcluster.passes=1",
            "train.batch_size=64", "scale.cpus_per_worker=1", "report.sample_rows=500"]


def bare_epoch(cfg: Any, pixels: Any, threads: int) -> dict[str, float]:
    """(a): the feature pass and one epoch's training steps, in this process."""
    import torch

    from pipeline.data.augment import AugmentSpec, augment
    from pipeline.methods.arch import build_model
    from pipeline.methods.deepcluster import new_head, pseudo_label_loss
    from pipeline.methods.online import make_optimizer

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model(cfg)
    t0 = time.perf_counter()
    model.eval()
    with torch.inference_mode():
        for x in pixels.split(cfg.cluster.assign_batch_size):
            model(x)
    features_s = time.perf_counter() - t0
    net = torch.nn.Sequential(model, new_head(cfg.model.feature_dim, cfg.cluster.k, 0)).train()
    t = cfg.train
    opt = make_optimizer(net, t.optimizer, t.lr, t.momentum, t.weight_decay)
    y = torch.randint(0, cfg.cluster.k, (len(pixels),))
    w = torch.ones(cfg.cluster.k)
    batch, steps = t.batch_size, len(pixels) // t.batch_size * cfg.deepcluster.passes
    t1 = time.perf_counter()
    for s in range(steps):
        lo = (s * batch) % (len(pixels) - batch + 1)
        x = pixels[lo:lo + batch]
        if cfg.deepcluster.augment:
            x = augment(x, AugmentSpec(flip=cfg.data.channels == 3))
        loss = pseudo_label_loss(net(x), y[lo:lo + batch], w)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return {"features_s": features_s, "train_s": time.perf_counter() - t1, "steps": steps}


def main(argv: list[str]) -> int:
    import torch

    from pipeline.config import Config, IngestConfig, resolve
    from pipeline.data.ingest import ingest
    from pipeline.methods.reference import _decode_all
    from pipeline.run import run

    parser = argparse.ArgumentParser(prog="python -m bench epoch_overhead")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--name", default=None, help="result name (default epoch_overhead)")
    args = parser.parse_args(argv)
    epochs = 3 if args.quick else 5
    work = tempfile.mkdtemp(prefix="epoch-overhead-")
    shards = os.path.join(work, "digits")
    ingest(IngestConfig(source="sklearn-digits", output=shards))
    cfg = resolve(Config, None, SETTINGS + [f"train.epochs={epochs}"],
                  {"data.input": shards, "data.output": os.path.join(work, "run")})
    _, pixels, _ = _decode_all(cfg, shards)
    threads = cfg.scale.threads_per_worker or int(cfg.scale.cpus_per_worker)
    bare = [bare_epoch(cfg, pixels, threads) for _ in range(2)]
    bare_s = min(b["features_s"] + b["train_s"] for b in bare)
    torch.set_num_threads(os.cpu_count() or 1)
    t0 = time.perf_counter()
    metrics = run(cfg)
    wall = time.perf_counter() - t0
    rows = []
    for e in metrics["epochs"]:
        overhead = e["seconds"] - e.get("kmeans_s", 0.0) - bare_s
        trained = len(pixels) // cfg.train.batch_size * cfg.train.batch_size
        rows.append({"epoch": e["epoch"], "seconds": e["seconds"],
                     "kmeans_s": e.get("kmeans_s"), "overhead_s": overhead,
                     # where the time went, as the pipeline saw it (absent before the port):
                     "embed_s": e.get("embed_s"),  # the feature pass, post to result
                     "train_loop_s": trained * cfg.deepcluster.passes / e["images_per_s"]})
    later = [r["overhead_s"] for r in rows[1:]] or [rows[0]["overhead_s"]]
    value = statistics.median(later)
    name = args.name or ("epoch_overhead-quick" if args.quick else "epoch_overhead")
    write_result(name, {"name": "deepcluster_overhead_s_per_epoch", "value": round(value, 2),
                        "target": None, "meets": None},
                 {"n_images": int(len(pixels)), "epochs": rows, "settings": SETTINGS,
                  "bare": bare, "bare_epoch_s": bare_s, "run_wall_s": wall,
                  "nmi": metrics.get("nmi"), "images_per_epoch": int(len(pixels))})
    print(f"deepcluster: {value:.1f} s of overhead per epoch (median of epochs 2-{epochs}); "
          f"bare epoch {bare_s:.1f} s; epochs {[round(r['seconds'], 1) for r in rows]}")
    return 0
