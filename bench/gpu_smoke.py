"""GPU path check without a Ray cluster: the online train step and the assignment actor on CUDA.

    python -m bench gpu_smoke

Runs OnlineWorker (drift compensation, consistency view) against the in-process CentroidStore
and AssignActor's batch function on the GPU, and prints images/s for each. Writes
bench/results/gpu_smoke.json. Exits 0 with a message when no GPU is present.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from bench.common import write_result


def train_rate(backbone: str, size: int, channels: int, batch: int, steps: int = 20) -> float:
    from pipeline.data.augment import AugmentSpec
    from pipeline.kmeans.store import CentroidStore
    from pipeline.methods.online import OnlineLossSpec, OnlineWorker, make_optimizer
    from pipeline.models.backbones import build_embedder

    dev = torch.device("cuda")
    model = build_embedder(backbone, channels, 128).to(dev).to(memory_format=torch.channels_last)
    store = CentroidStore(np.random.default_rng(0).normal(size=(100, 128)).astype(np.float32))
    worker = OnlineWorker(model, make_optimizer(model, "adam", 1e-3, 0.9, 0), store,
                          OnlineLossSpec(), AugmentSpec(flip=True), dev)
    x = torch.randn(batch, channels, size, size, device=dev)
    for _ in range(3):
        worker.train_step(x, True)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        worker.train_step(x, True)
    torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - start)


def assign_rate(backbone: str, size: int, batch: int, steps: int = 20) -> float:
    from pipeline.distributed.assign import AssignActor
    from pipeline.models.arch import build_from_arch
    from pipeline.models.weights import save_bytes

    arch = {"backbone": backbone, "in_channels": 3, "feature_dim": 128, "normalize": True,
            "width": 32, "mean": [0.5], "std": [0.25]}
    actor = AssignActor(save_bytes(build_from_arch(arch)), arch,
                        np.random.default_rng(0).normal(size=(1000, 128)).astype(np.float32))
    pixels = np.random.default_rng(1).normal(size=(batch, 3, size, size)).astype(np.float32)
    batch_in = {"id": np.array([str(i) for i in range(batch)], dtype=object), "pixels": pixels}
    actor(batch_in)
    start = time.perf_counter()
    for _ in range(steps):
        out = actor(batch_in)
    assert out["cluster"].shape == (batch,) and (out["margin"] >= 0).all()
    return batch * steps / (time.perf_counter() - start)


def main(argv: list[str]) -> int:
    if not torch.cuda.is_available():
        print("gpu_smoke: no CUDA device; nothing to check")
        return 0
    results = {
        "train_small_cnn_32px_b512": train_rate("small_cnn", 32, 3, 512),
        "train_resnet18_224px_b128": train_rate("resnet18", 224, 3, 128, steps=10),
        # AssignActor runs under fp16 autocast on CUDA (the train steps above are fp32)
        "assign_resnet50_224px_b256_fp16": assign_rate("resnet50", 224, 256, steps=10),
    }
    results = {k: round(v, 1) for k, v in results.items()}
    # No target exists for these rates, so no verdict: meets is None, not True.
    headline = {"name": "gpu_online_train_resnet18_images_per_s",
                "value": results["train_resnet18_224px_b128"], "target": None, "meets": None}
    write_result("gpu_smoke", headline, {"images_per_s": results,
                                         "precision": {"train": "fp32, no autocast",
                                                       "assign": "fp16 autocast"}})
    print("gpu_smoke:", results)
    return 0
