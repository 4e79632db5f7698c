"""Multiview's view passes on a Ray Data actor pool against the Ray Train workers' split, and
against the bare forward pass, side by side in one call.

    python -m bench view_passes              # MNIST test + CIFAR-10 subset (10,000 each)
    python -m bench view_passes --no-cifar   # MNIST only

Needs ``python -m bench multiview`` first: its runs' saved configs give the five views
(finished ``online``, ``deepcluster``, ``depict`` and ``imc`` runs and a random ResNet-18 at
64 px) and the input. For each dataset, every view's pass is made three ways:

(a) **pool**: the runner's ``Embed(pool=True)`` before any trainer, as the method posts it: a
    Ray Data actor pool of 1 to ``scale.workers`` actors per view (1 in these runs);
(b) **trainer**: the same stages with ``pool=False``, on the long-lived Ray Train run's
    workers over the ``embed`` split (the path before the pool; its first pass pays for
    starting the Ray Train run);
(c) **bare**: the forward pass alone over the decoded images held in this process, with
    every core's torch threads (no decode, no Ray): the machine's limit for the pass.

Each pass's seconds (``embed_s``, as the runner times it), their sums, the ratios pool /
trainer and pool / bare, and the largest difference between (a)'s and (b)'s features (the
same model in eval mode: only float rounding may differ). Headline: the CIFAR-10 (else
MNIST) sum of pool seconds over trainer seconds.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import write_result
from bench.multiview import WORK, run_config

RUNS = {"mnist": "mnist-10000-b420", "cifar10": "cifar10-10000-b420"}


def view_stages(cfg: Any, pool: bool) -> list[Any]:
    """Every view of ``cfg`` as the Embed stage the method posts (reduce left out: the
    features themselves are compared)."""
    from pipeline.methods import multiview as mv
    from pipeline.methods.base import Embed
    from pipeline.models.weights import save_bytes

    specs = [mv.parse_view(entry) for entry in cfg.multiview.views]
    stages = []
    for v, (spec, name) in enumerate(zip(specs, mv.view_names(specs), strict=True)):
        net, arch = mv.resolve_view(spec, cfg)
        stages.append(Embed(f"view-{v:02d}-{name}", save_bytes(net), arch, pool=pool))
    return stages


def on_ray(cfg: Any, out: Path, pool: bool) -> tuple[dict[str, float], list[Any], float]:
    """Every view's pass through the Ray runner -> (seconds by view, features, wall s)."""
    from pipeline.data.fs import locate
    from pipeline.distributed.runner import RayRunner
    from pipeline.outputs import RunPaths

    start = time.perf_counter()
    runner = RayRunner(cfg, cfg.data.input, RunPaths(locate(str(out))))
    seconds, found = {}, []
    try:
        for stage in view_stages(cfg, pool):
            table = runner.embed(stage)
            seconds[stage.name] = round(table.facts["embed_s"], 1)
            found.append(table)
        assert runner.trainer.started != pool, "the pass ran on the wrong path"
    finally:
        runner.close()
    return seconds, found, round(time.perf_counter() - start, 1)


def bare(cfg: Any) -> tuple[dict[str, float], float]:
    """Every view's forward pass over the decoded images in this process -> (seconds by
    view, the decode's seconds, which no pass pays here)."""
    import torch

    from pipeline.methods.reference import LocalRunner, embed_pixels

    torch.set_num_threads(os.cpu_count() or 1)
    t0 = time.perf_counter()
    local = LocalRunner(cfg, cfg.data.input)
    decode_s = round(time.perf_counter() - t0, 1)
    seconds = {}
    for stage in view_stages(cfg, pool=True):
        t0 = time.perf_counter()
        embed_pixels(stage, local.pixels, cfg.cluster.assign_batch_size)
        seconds[stage.name] = round(time.perf_counter() - t0, 1)
    return seconds, decode_s


def dataset(name: str) -> dict[str, Any]:
    from pipeline.distributed.runtime import init_ray

    run = WORK / "runs" / RUNS[name]
    if not (run / "config.yaml").exists():
        raise SystemExit(f"skipped: {run} is absent (run `python -m bench multiview` first)")
    init_ray()
    with tempfile.TemporaryDirectory(prefix="view-passes-") as tmp:
        cfg = run_config(run, [f"data.output={tmp}/run"])
        pool_s, pool_found, pool_wall = on_ray(cfg, Path(tmp, "pool"), pool=True)
        trainer_s, trainer_found, trainer_wall = on_ray(cfg, Path(tmp, "trainer"), pool=False)
    bare_s, decode_s = bare(cfg)
    diff = max(float(np.max(np.abs(a.arrays["feature"].astype(np.float32)
                                   - b.arrays["feature"].astype(np.float32))))
               for a, b in zip(pool_found, trainer_found, strict=True))
    same_ids = all(np.array_equal(a.ids, b.ids) for a, b in zip(pool_found, trainer_found,
                                                                 strict=True))
    total = {k: round(sum(v.values()), 1) for k, v in
             (("pool", pool_s), ("trainer", trainer_s), ("bare", bare_s))}
    row = {"images": len(pool_found[0].ids), "views": list(cfg.multiview.views),
           "pool_s": pool_s, "trainer_s": trainer_s, "bare_s": bare_s, "total_s": total,
           "wall_s": {"pool": pool_wall, "trainer": trainer_wall},
           "bare_decode_s": decode_s,
           "pool_over_trainer": round(total["pool"] / total["trainer"], 2),
           "pool_over_bare": round(total["pool"] / total["bare"], 2),
           "max_feature_diff": diff, "same_ids": same_ids}
    print(name, row, flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench view_passes")
    parser.add_argument("--no-cifar", action="store_true")
    args = parser.parse_args(argv)
    names = ["mnist"] + ([] if args.no_cifar else ["cifar10"])
    rows: dict[str, Any] = {}
    for name in names:
        try:
            rows[name] = dataset(name)
        except SystemExit as absent:
            print(absent, flush=True)
            rows[name] = {"skipped": str(absent)}
    measured = [n for n in reversed(names) if "pool_over_trainer" in rows[n]]
    value = rows[measured[0]]["pool_over_trainer"] if measured else None
    headline = {"name": "view passes, seconds on the actor pool / on the trainer's split "
                        f"({measured[0] if measured else '-'})",
                "value": value, "target": None, "meets": None}
    path = write_result("view_passes", headline, {"datasets": rows})
    print(path)
    return 0
