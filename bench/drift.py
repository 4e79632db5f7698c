"""Why feature drift compensation does not help ``online`` (issue 13): its training step, in
memory, on the MNIST test digits, with compensation off and on side by side, and per epoch
the figures that explain the result. Not the product's path (no Ray, no decode, no export):
``python -m bench quality --seeds 3`` gives the product's NMI for both modes.

    python -m bench drift            # 10,000 digits, 10 epochs, off and on (two processes,
                                     # one core each; ~3 min)
    python -m bench drift --quick    # 2,000 digits, 3 epochs (< 1 min)

Both modes start from the same seeded network and centroids and draw the same batches: the
:class:`~pipeline.methods.online.OnlineProgram` of the default config plus the bench's
MNIST settings (``bench.quality.MNIST_SETTINGS``), against an in-process
:class:`~pipeline.kmeans.store.CentroidStore`. At each epoch's start and end every digit is
embedded as the training steps embed a batch (train mode, BatchNorm from each batch of
``train.batch_size`` digits of one fixed permutation, running statistics untouched), which
is the space the centroids live in. Per CNN epoch, averaged over clusters j:

* ``feature_move``: the mean distance each digit's feature moved over the epoch;
* ``true_drift``: the mean displacement, start to end, of the digits nearest c_j at the
  start: what Hsu & Lin's compensation should add to c_j over the epoch;
* ``applied`` (only when shifts were applied): the sum of the shifts the store applied to
  c_j (the probe's estimate); ``cos`` and ``ratio`` (|applied| / |true_drift|) compare the
  two per cluster;
* ``lag``: |c_j − μ_j| at the end, μ_j the mean of the digits nearest c_j: how far each
  centroid is from the cluster it stands for (what compensation is meant to shrink);
* ``spread``: the mean distance between centroids, and ``nmi``, the training-time
  assignments' NMI over the epoch.
"""

from __future__ import annotations

import argparse
import os
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np

from bench.common import SHARED, need, write_result
from pipeline.kmeans.store import CentroidStore

MODES = {"off": ["cluster.drift_compensation=false"],
         "on": ["cluster.drift_compensation=true"]}


class RecordingStore(CentroidStore):
    """The in-process store, also summing per centroid the drift shifts it applies (k, d)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.applied = np.zeros(self.centroids.shape, np.float64)

    def _apply(self, entry: dict[str, Any]) -> None:
        if entry["drift"] is not None and self.drift_smoothing:
            rows, counts = entry["rows"], entry["drift_counts"][entry["rows"]]
            hit = counts > 0
            self.applied[rows[hit]] += (self.drift_smoothing * entry["drift"][hit]
                                        / counts[hit, None])
        super()._apply(entry)


def embed_all(model: Any, pixels: Any, batch: int, order: np.ndarray) -> np.ndarray:
    """Features (n, d) of every image, as a training step computes them (module docstring)."""
    import torch

    from pipeline.methods.online import running_stats_frozen

    parts = []
    model.train()
    with torch.no_grad(), running_stats_frozen(model):
        for start in range(0, len(order), batch):
            parts.append(model(pixels[order[start:start + batch]]).numpy())
    feats = np.concatenate(parts)
    back = np.empty_like(feats)
    back[order] = feats
    return back


def nearest(f: np.ndarray, c: np.ndarray) -> np.ndarray:
    return ((f ** 2).sum(1)[:, None] - 2 * f @ c.T + (c ** 2).sum(1)).argmin(1)


def cluster_means(f: np.ndarray, labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-cluster mean rows (k, d) and counts (k,)."""
    sums = np.zeros((k, f.shape[1]))
    np.add.at(sums, labels, f)
    counts = np.bincount(labels, minlength=k)
    return sums / np.maximum(counts, 1)[:, None], counts


def epoch_figures(f0: np.ndarray, f1: np.ndarray, c0: np.ndarray, c1: np.ndarray,
                  applied: np.ndarray) -> dict[str, float]:
    """The per-epoch figures of the module docstring, from the start/end features (n, d),
    centroids (k, d) and the compensation applied over the epoch (k, d)."""
    k = c0.shape[0]
    true, counts = cluster_means(f1 - f0, nearest(f0, c0), k)
    means, now = cluster_means(f1, nearest(f1, c1), k)
    ok = (counts > 0) & (now > 0)
    tn, an = np.linalg.norm(true, axis=1), np.linalg.norm(applied, axis=1)
    cos = (true * applied).sum(1) / np.maximum(tn * an, 1e-12)
    gaps = np.linalg.norm(c1[:, None] - c1[None], axis=-1)[np.triu_indices(k, 1)]
    out = {"true_drift": float(tn[ok].mean()),
           "lag": float(np.linalg.norm(c1 - means, axis=1)[ok].mean()),
           "spread": float(gaps.mean()),
           "feature_move": float(np.linalg.norm(f1 - f0, axis=1).mean())}
    if an[ok].any():  # compensation applied shifts this epoch
        out |= {"applied": float(an[ok].mean()), "cos": float(cos[ok].mean()),
                "ratio": float((an[ok] / np.maximum(tn[ok], 1e-12)).mean())}
    return out


def train(mode: str, n: int, epochs: int) -> dict[str, Any]:
    """One mode's run: a row per epoch (module docstring)."""
    import torch

    from bench.quality import MNIST_SETTINGS
    from pipeline.config import Config, resolve
    from pipeline.data.sources import read_idx
    from pipeline.kmeans.init import pool_size, seed_centroids
    from pipeline.kmeans.store import store_kwargs
    from pipeline.methods.arch import initial_model
    from pipeline.methods.base import Context, seed_step
    from pipeline.methods.online import OnlineProgram

    torch.set_num_threads(1)
    root = need(SHARED / "mnist")
    x = read_idx(str(root / "t10k-images-idx3-ubyte.gz"))[:n].astype(np.float32) / 255.0
    y = read_idx(str(root / "t10k-labels-idx1-ubyte.gz"))[:n]
    cfg = resolve(Config, overrides=["method=online", f"train.epochs={epochs}",
                                     *MNIST_SETTINGS, *MODES[mode]])
    pixels = torch.from_numpy((x - cfg.data.mean[0]) / cfg.data.std[0]).unsqueeze(1)
    torch.manual_seed(cfg.train.seed)
    cnn, c, batch = initial_model(cfg), cfg.cluster, cfg.train.batch_size
    rng = np.random.default_rng(cfg.train.seed)
    fixed = rng.permutation(n)
    pool = fixed[:pool_size(c.k, c.init_pool, c.init_pool_max)]
    init = seed_centroids(embed_all(cnn, pixels, batch, np.arange(n))[pool], c.k,
                          cfg.train.seed, c.init)
    store = RecordingStore(init, **store_kwargs(cfg))
    program = OnlineProgram(cfg, cnn)
    ctx = Context(centroids=store, steps_per_epoch=n // batch)
    program.setup(ctx)
    rows, step = [], 0
    for epoch in range(epochs):
        program.start(epoch, ctx)
        f0, c0 = embed_all(cnn, pixels, batch, fixed), store.centroids.astype(np.float64)
        store.applied[:] = 0.0
        perm = np.random.default_rng(cfg.train.seed + 1000 * epoch).permutation(n)
        for start in range(0, n - batch + 1, batch):
            seed_step(cfg.train.seed, 0, step)
            step += 1
            rows_ = perm[start:start + batch]
            program.step({"pixels": pixels[rows_], "label": y[rows_]}, ctx)
        row = program.end_epoch(epoch, ctx)
        figures = epoch_figures(f0, embed_all(cnn, pixels, batch, fixed), c0,
                                store.centroids.astype(np.float64), store.applied)
        rows.append({"epoch": epoch + 1, "nmi": round(row.get("nmi", float("nan")), 4),
                     **{key: round(v, 5) for key, v in figures.items()}})
        print(f"  drift {mode} epoch {epoch + 1}: " + ", ".join(
            f"{key} {v}" for key, v in rows[-1].items() if key != "epoch"), flush=True)
    return {"settings": MODES[mode], "epochs": rows}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench drift")
    p.add_argument("--quick", action="store_true", help="2,000 digits, 3 epochs")
    p.add_argument("--epochs", type=int, default=10)
    args = p.parse_args(argv)
    n, epochs = (2000, 3) if args.quick else (10_000, args.epochs)
    need(SHARED / "mnist")
    with ProcessPoolExecutor(max_workers=max(1, min(2, os.cpu_count() or 1))) as pool:
        jobs = {mode: pool.submit(train, mode, n, epochs) for mode in MODES}
        results = {mode: job.result() for mode, job in jobs.items()}
    last = {mode: r["epochs"][-1] for mode, r in results.items()}
    gain = round(last["on"]["lag"] - last["off"]["lag"], 5)
    head = {"name": "mnist_online_centroid_lag_on_minus_off", "value": gain, "target": 0.0,
            "meets": gain < 0}
    path = write_result("drift" + ("-quick" if args.quick else ""), head,
                        {"images": n, "epochs": epochs, "modes": results})
    print("drift: " + ", ".join(f"{m} lag {v['lag']:.4f} NMI {v['nmi']:.3f}"
                                for m, v in last.items()) + f" -> {path}")
    return 0
