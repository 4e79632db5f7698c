"""Run metrics from the assignments Parquet (``metrics.json``, DESIGN §8)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow.compute as pc
import pyarrow.dataset as pads

from pipeline.config import Config
from pipeline.data import fs as fsx
from pipeline.data.quarantine import read_rejects
from pipeline.metrics import cluster_size_stats, score
from pipeline.outputs import RunPaths


def read_assignments(paths: RunPaths, columns: list[str]) -> Any:
    """The requested columns of every assignment row, as one pyarrow table."""
    loc = paths.assignments
    files = [f.path for f in fsx.list_files(loc, (".parquet",))]
    dataset = pads.dataset(files, filesystem=loc.fs, format="parquet")
    present = [c for c in columns if c in dataset.schema.names]
    return dataset.to_table(columns=present)


def evaluate_run(cfg: Config, paths: RunPaths, has_label: bool, history: list[dict[str, Any]],
                 wall_s: float, assign_s: float, results: dict[str, Any] | None = None
                 ) -> dict[str, Any]:
    """Image count, cluster sizes, inertia, NMI/ACC/ARI (with labels), throughput, rejects,
    and the method's own ``results`` (multiview's ``views`` table)."""
    table = read_assignments(paths, ["cluster", "distance", "label"])
    clusters = table.column("cluster").to_numpy()
    n = len(clusters)
    distance = table.column("distance").to_numpy().astype(np.float64)
    metrics: dict[str, Any] = {
        "n_images": n, "k": cfg.cluster.k, "method": cfg.method,
        "wall_s": round(wall_s, 3), "images_per_s": round(n / max(wall_s, 1e-9), 2),
        "assign_images_per_s": round(n / max(assign_s, 1e-9), 2),
        "rejects": read_rejects(paths.rejects).num_rows,
        "cluster_sizes": cluster_size_stats(clusters, cfg.cluster.k),
        "inertia": float((distance**2).sum()), "mean_distance": float(distance.mean()),
        "version": cfg.version,
    }
    if has_label and "label" in table.column_names:
        labels = table.column("label")
        valid = pc.invert(pc.is_null(labels)).to_numpy(zero_copy_only=False)
        truth = np.asarray(labels.to_pylist(), dtype=object)[valid]
        metrics.update(score(truth.astype(str), clusters[valid]))
    metrics.update(results or {})
    if history:
        metrics["epochs"] = history
    return metrics


def write_outlier_thresholds(cfg: Config, paths: RunPaths) -> np.ndarray:
    """Per-cluster distance thresholds from this run's assignments -> ``outliers.json``."""
    from pipeline.assign import cluster_thresholds, thresholds_json

    table = read_assignments(paths, ["cluster", "distance"])
    c = cfg.cluster
    thresholds = cluster_thresholds(table.column("cluster").to_numpy(),
                                    table.column("distance").to_numpy(), c.k,
                                    c.outlier_quantile, c.outlier_min_members)
    fsx.write_bytes_atomic(paths.outliers, thresholds_json(thresholds, c.outlier_quantile,
                                                          c.outlier_min_members))
    return thresholds
