"""Training throughput of ``online`` against its limit, side by side in one run.

    python -m bench train_throughput            # MNIST test split, 1 warm-up + 3 CNN epochs
    python -m bench train_throughput --quick    # 1 + 1 epochs

(a) **bare**: the method's own train step (:class:`pipeline.methods.online.OnlineWorker`:
    CNN forward, augmented view, loss, backward, Adam step, assignment and statistics, the
    centroid update) in a plain PyTorch loop in this one process, with every core's
    threads, on pre-decoded normalised tensors in memory, shuffled batches of
    ``train.batch_size``, against an in-process ``CentroidStore``. No Ray, no decode, no
    stream: the machine's best for this step.
(b) **pipeline**: ``python -m pipeline``'s whole training job with the same config (Ray Data
    stream, Ray Train worker, DDP wrapper, the centroid-server actor, checkpoints). Its
    history gives each CNN epoch's images/s; the end-to-end figure divides every image
    trained by the job's wall time (Ray start-up, the initial pool, the assignment pass,
    the report).

Headline: median CNN-epoch images/s of (b) / (a); goal >= 0.8.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

from bench.common import write_result
from bench.quality import MNIST_SETTINGS, WORK, ingest_mnist, mnist_pixels


def config(shards: str, out: str, epochs: int, extra: list[str]) -> Any:
    from pipeline.config import Config, resolve

    return resolve(Config, None, [*MNIST_SETTINGS, *extra],
                   {"data.input": shards, "data.output": out, "train.epochs": epochs,
                    "cluster.k": 10})


def bare(cfg: Any, pixels: Any, steps: int) -> dict[str, float]:
    """(a): ``steps`` CNN train steps after 3 untimed ones, images/s."""
    import torch

    from pipeline.distributed.runtime import pin_threads
    from pipeline.kmeans.store import CentroidStore, store_kwargs
    from pipeline.methods.arch import initial_model
    from pipeline.methods.online import (
        OnlineWorker,
        augment_spec,
        initial_centroids,
        loss_spec,
        make_optimizer,
    )

    pin_threads(os.cpu_count() or 1)
    torch.manual_seed(cfg.train.seed)
    t = cfg.train
    model = initial_model(cfg)
    pool = pixels[torch.randperm(len(pixels))[:cfg.cluster.k]]
    store = CentroidStore(initial_centroids(model, pool), **store_kwargs(cfg))
    worker = OnlineWorker(
        model=model, optimizer=make_optimizer(model, t.optimizer, t.lr, t.momentum,
                                              t.weight_decay),
        store=store, loss_spec=loss_spec(cfg), augment_spec=augment_spec(cfg),
        device=torch.device("cpu"), drift_compensation=cfg.cluster.drift_compensation,
        sync_every=cfg.cluster.sync_every, max_staleness=cfg.cluster.max_staleness)
    worker.refresh()
    b = t.batch_size
    order = torch.randperm(len(pixels))

    def batch(i: int) -> Any:
        start = (i * b) % (len(pixels) - b)
        return pixels[order[start:start + b]]

    for i in range(3):
        worker.train_step(batch(i), train_cnn=True)
    start = time.perf_counter()
    for i in range(steps):
        worker.train_step(batch(3 + i), train_cnn=True)
    wall = time.perf_counter() - start
    return {"steps": steps, "batch": b, "threads": torch.get_num_threads(),
            "wall_s": wall, "images_per_s": steps * b / wall}


def pipeline_run(cfg: Any) -> dict[str, Any]:
    """(b): the training job, fresh; its CNN epochs' images/s and the end-to-end figure."""
    from pipeline.data import fs as fsx
    from pipeline.run import run

    fsx.remove_tree(fsx.locate(cfg.data.output))
    start = time.perf_counter()
    metrics = run(cfg)
    wall = time.perf_counter() - start
    epochs = metrics["epochs"]
    cnn = [e for e in epochs[cfg.train.warmup_epochs:]]
    trained = sum(e["images"] for e in epochs)
    return {"epoch_images_per_s": [e["images_per_s"] for e in epochs],
            "cnn_epoch_images_per_s": statistics.median(e["images_per_s"] for e in cnn),
            "warmup_epoch_images_per_s": [e["images_per_s"] for e in
                                          epochs[:cfg.train.warmup_epochs]],
            "images_trained": trained, "job_wall_s": wall,
            "end_to_end_images_per_s": trained / wall, "nmi": metrics["nmi"]}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench train_throughput")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for both sides (diagnosis; the JSON records it)")
    p.add_argument("--name", default=None, help="result name (default train_throughput)")
    args = p.parse_args(argv)
    cnn_epochs = 1 if args.quick else 3
    from pipeline.distributed.runtime import init_ray

    init_ray(num_cpus=os.cpu_count())
    shards = ingest_mnist()
    pixels, _ = mnist_pixels(shards)
    cfg = config(shards, str(WORK / "runs" / "train-throughput"), 1 + cnn_epochs, args.set)
    steps = 40 if args.quick else 120
    a = bare(cfg, pixels, steps)
    b = pipeline_run(cfg)
    ratio = b["cnn_epoch_images_per_s"] / a["images_per_s"]
    headline = {"name": "online_train_images_per_s_vs_bare_loop", "value": round(ratio, 3),
                "target": 0.8, "meets": ratio >= 0.8}
    name = args.name or ("train_throughput-quick" if args.quick else "train_throughput")
    path = write_result(name, headline, {
        "dataset": "mnist-test-10k", "settings": [*MNIST_SETTINGS, *args.set],
        "workers": cfg.scale.workers, "batch_size": cfg.train.batch_size, "bare": a,
        "pipeline": b, "ratio": ratio, "quick": args.quick})
    print(f"train_throughput: pipeline {b['cnn_epoch_images_per_s']:.0f} images/s in CNN "
          f"epochs against the bare loop's {a['images_per_s']:.0f} -> {ratio:.2f} "
          f"(end to end {b['end_to_end_images_per_s']:.0f}) -> {path}")
    return 0
