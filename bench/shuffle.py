"""What the training stream's randomness gives and costs, on CIFAR-10 stored sorted by class.

    python -m bench shuffle            # all 50,000 CIFAR-10 JPEGs, 10 one-class shards
    python -m bench shuffle --quick    # 10,000 of them (< 3 min)

The images are written the way a folder ingest with ``--keep-order`` writes them: in path
order, i.e. class order, 5,000-row one-class shards. For each order (``stored``: the shards'
order with a 4-batch local buffer, the code before ``data.shuffle`` existed; ``stream``;
``global``; and the default, ``auto``) two epochs run through the exact path a Ray Train worker
reads (``streaming_split`` -> ``iter_batches`` with the run's arguments), with no training step,
so the figure is the data path's own ceiling. Reported per order: images/s of epoch 2 (the
steady state), the ratio to ``stored``, the mean per-batch label entropy over the marginal's
(1.0 = every batch looks like the whole set), and whether epoch 2's order differs from
epoch 1's. It also scores the initial-centroid draw: how many of the 10 classes k = 10 seeds
cover, for the old rule (the first k rows of a random block) and the new one.

Headline: the default's per-batch entropy ratio (target >= 0.9, the shuffle test's bar).
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import numpy as np

from bench.common import REPO, write_result
from bench.throughput import cifar_images, write_shards

WORK = REPO / "work" / "bench" / "shuffle"
BATCH = 256


def entropy(labels: Any) -> float:
    _, counts = np.unique(np.asarray(labels), return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


def two_epochs(shard: Any, kwargs_of: Any) -> dict[str, Any]:
    orders, rates, ratio = [], [], 0.0
    for epoch in range(2):
        start, labels, ids = time.perf_counter(), [], []
        for b in shard.iter_batches(batch_size=BATCH, **kwargs_of(epoch)):
            labels.append(b["label"])
            ids.extend(b["id"].tolist())
        rates.append(sum(map(len, labels)) / (time.perf_counter() - start))
        orders.append(ids)
        if epoch == 0:
            whole = entropy(np.concatenate(labels))
            ratio = float(np.mean([entropy(x) for x in labels]) / whole)
    return {"images_per_s_epoch2": round(rates[1], 1), "images_per_s_epoch1": round(rates[0], 1),
            "entropy_ratio": round(ratio, 4), "new_order_each_epoch": orders[0] != orders[1]}


def stored_order(uri: str, cfg: Any) -> dict[str, Any]:
    """The pre-shuffle path: stored order, a 4-batch local buffer seeded by the epoch."""
    from pipeline.data.reader import decode_spec, read_images

    ds = read_images(uri, decode_spec(cfg)).select_columns(["id", "pixels", "label"])
    return two_epochs(ds.streaming_split(1)[0], lambda e: {
        "batch_format": "numpy", "drop_last": True, "local_shuffle_buffer_size": 4 * BATCH,
        "local_shuffle_seed": e})


def shuffled(uri: str, cfg: Any) -> dict[str, Any]:
    from pipeline.data.reader import find_shards
    from pipeline.distributed.job import training_images
    from pipeline.distributed.train import epoch_batches_kwargs

    ds = training_images(cfg, uri, find_shards(uri), ["id", "pixels"])
    return two_epochs(ds.streaming_split(1)[0], lambda e: epoch_batches_kwargs(cfg, e))


def init_coverage(uri: str, cfg: Any) -> dict[str, int]:
    """Classes hit by k = 10 initial centroids: old rule against the new one."""
    from pipeline.data.reader import decode_spec, find_shards, read_images
    from pipeline.distributed.job import initial_pool
    from pipeline.kmeans.init import seed_centroids
    from pipeline.methods.arch import initial_model

    old = read_images(uri, decode_spec(cfg)).select_columns(["label"]) \
        .randomize_block_order(seed=cfg.train.seed).limit(10).take_all()
    rows, pool = initial_pool(cfg, find_shards(uri), initial_model(cfg))
    seeds = seed_centroids(pool, 10, cfg.train.seed)
    chosen = np.argmin(((seeds[:, None] - pool[None]) ** 2).sum(-1), axis=1)
    return {"old_first_k_of_a_random_block": len({r["label"] for r in old}),
            "new_kmeans_pp_over_uniform_pool": len({str(rows[i]["label"]) for i in chosen}),
            "new_first_k_of_uniform_pool": len({str(r["label"]) for r in rows[:10]})}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench shuffle")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    from pipeline.config import Config, resolve
    from pipeline.distributed.runtime import init_ray

    init_ray(num_cpus=os.cpu_count())
    n = 10_000 if args.quick else 50_000
    images, labels = cifar_images(n)
    order = np.argsort(labels, kind="stable")  # class order, as --keep-order stores a tree
    uri = str(WORK / f"cifar10-{n}-sorted")
    write_shards(WORK / f"cifar10-{n}-sorted", [images[i] for i in order],
                 [labels[i] for i in order], rows=n // 10)

    def cfg_of(*settings: str) -> Any:
        return resolve(Config, overrides=["data.image_size=32", "data.channels=3",
                                          f"train.batch_size={BATCH}", "cluster.k=10",
                                          *settings], flags={"data.input": uri})

    rows = {"stored": stored_order(uri, cfg_of())}
    for mode in ("stream", "global", "auto"):
        rows[mode] = shuffled(uri, cfg_of(f"data.shuffle={mode}"))
    for mode, row in rows.items():
        row["vs_stored"] = round(row["images_per_s_epoch2"] / rows["stored"]["images_per_s_epoch2"], 3)
        print(f"  {mode:7s} {row['images_per_s_epoch2']:8,.0f} images/s ({row['vs_stored']:.2f}x"
              f" stored)  entropy ratio {row['entropy_ratio']:.3f}  new order each epoch: "
              f"{row['new_order_each_epoch']}", flush=True)
    coverage = init_coverage(uri, cfg_of())
    print(f"  initial centroids, classes covered of 10: {coverage}")
    value = rows["auto"]["entropy_ratio"]
    headline = {"name": "default_order_per_batch_entropy_ratio", "value": value,
                "target": 0.9, "meets": bool(value >= 0.9)}
    path = write_result("shuffle" + ("-quick" if args.quick else ""), headline,
                        {"images": n, "batch": BATCH, "orders": rows,
                         "initial_centroid_classes": coverage})
    print(f"shuffle: default per-batch entropy ratio {value:.3f} (target 0.9) -> {path}")
    return 0
