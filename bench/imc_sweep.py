"""``imc``'s training step alone, in memory, under a few settings side by side: how its
defaults were chosen (issue 15). Not the product's path (no Ray, no decode, no
calibration): the numbers compare settings with each other, ``python -m bench imc`` gives
the product's.

    python -m bench imc_sweep            # 10,000 MNIST test digits, imc's 18 epochs,
                                         # 5 variants (two at a time, one core each; ~45 min)
    python -m bench imc_sweep --quick    # 2,000 digits, 3 epochs (< 3 min)

Every variant starts from the same seeded network and draws the same batches: the
:class:`~pipeline.methods.imc.ImcProgram` of ``method=imc`` plus its settings trains on
the digits, normalised as the main job's decode does, in batches of its
``train.batch_size`` from one seeded permutation per epoch. After each epoch: the NMI of
the head's argmax on every whole digit (eval mode, BatchNorm's running statistics; the
main job recalibrates them, so its NMI can differ).

Headline: the defaults' last-epoch NMI minus the reference settings' (``imc.lr`` 5e-4,
batch 256, decay ×0.4 at 30/60/80 %, reference crop scales, λ = 4, no rotation): > 0 means
the defaults learn more in the same number of epochs.
"""

from __future__ import annotations

import argparse
import os
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from bench.common import SHARED, need, write_result

REFERENCE = ["imc.lr=0.0005", "train.batch_size=256", "imc.decay_at=[0.3,0.6,0.8]",
             "imc.decay_gamma=0.4", "imc.global_scale=[0.2,1.0]", "imc.local_scale=[0.08,0.4]",
             "imc.entropy_weight=4", "imc.rotate=0"]
VARIANTS: dict[str, list[str]] = {
    "defaults": [],
    "reference": REFERENCE,
    "constant_lr": ["imc.decay_at=[]"],
    "entropy_weight_4": ["imc.entropy_weight=4"],  # the reference's lambda
    "no_rotation": ["imc.rotate=0"],
}


def train(name: str, settings: list[str], n: int, epochs: int) -> dict[str, Any]:
    """One variant: per epoch its cumulative seconds and the head's NMI on all n digits."""
    import numpy as np
    import torch
    from sklearn.metrics import normalized_mutual_info_score

    from pipeline.config import Config, resolve
    from pipeline.data.sources import read_idx
    from pipeline.methods.arch import initial_model
    from pipeline.methods.base import Context
    from pipeline.methods.imc import ImcNet, ImcProgram

    torch.set_num_threads(1)
    root = need(SHARED / "mnist")
    x = read_idx(str(root / "t10k-images-idx3-ubyte.gz"))[:n].astype(np.float32) / 255.0
    y = read_idx(str(root / "t10k-labels-idx1-ubyte.gz"))[:n]
    cfg = resolve(Config, overrides=["method=imc", f"train.epochs={epochs}", *settings])
    pixels = torch.from_numpy((x - cfg.data.mean[0]) / cfg.data.std[0]).unsqueeze(1)
    net = initial_model(cfg)
    assert isinstance(net, ImcNet)
    program, batch = ImcProgram(cfg, net), cfg.train.batch_size
    ctx = Context(steps_per_epoch=n // batch)
    program.setup(ctx)
    order, start, rows = torch.Generator().manual_seed(cfg.train.seed), time.time(), []
    for epoch in range(epochs):
        program.start(epoch, ctx)
        perm = torch.randperm(n, generator=order)
        for step in range(n // batch):
            torch.manual_seed(cfg.train.seed * 100_003 + epoch * 1009 + step)
            program.step({"pixels": pixels[perm[step * batch:(step + 1) * batch]]}, ctx)
        lr = program.end_epoch(epoch, ctx)["lr"]
        net.eval()
        with torch.no_grad():
            found = torch.cat([net(pixels[i:i + 1000]) for i in range(0, n, 1000)]).argmax(1)
        net.train()
        rows.append({"epoch": epoch + 1, "seconds": round(time.time() - start, 1), "lr": lr,
                     "nmi": round(float(normalized_mutual_info_score(y, found.numpy())), 4)})
        print(f"  {name} epoch {epoch + 1}: NMI {rows[-1]['nmi']:.3f}", flush=True)
    return {"settings": settings, "epochs": rows, "nmi": rows[-1]["nmi"]}


def default_epochs() -> int:
    from pipeline.config import Config, resolve

    return resolve(Config, overrides=["method=imc"]).train.epochs


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench imc_sweep")
    p.add_argument("--quick", action="store_true", help="2,000 digits, 3 epochs")
    p.add_argument("--epochs", type=int, default=None, help="default: imc's own")
    args = p.parse_args(argv)
    n, epochs = (2000, 3) if args.quick else (10_000, args.epochs or default_epochs())
    need(SHARED / "mnist")
    with ProcessPoolExecutor(max_workers=max(1, min(len(VARIANTS), os.cpu_count() or 1))) as pool:
        jobs = {name: pool.submit(train, name, s, n, epochs) for name, s in VARIANTS.items()}
        results = {name: job.result() for name, job in jobs.items()}
    gain = round(results["defaults"]["nmi"] - results["reference"]["nmi"], 4)
    head = {"name": "mnist_imc_step_nmi_defaults_minus_reference", "value": gain,
            "target": 0.0, "meets": gain > 0}
    path = write_result("imc_sweep" + ("-quick" if args.quick else ""), head,
                        {"images": n, "epochs": epochs, "variants": results})
    print("imc_sweep: " + ", ".join(f"{k} {v['nmi']:.3f}" for k, v in results.items())
          + f" -> {path}")
    return 0
