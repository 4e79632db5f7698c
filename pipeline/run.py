"""The main clustering run: input shards -> train -> assign -> metrics (DESIGN §1, §3, §6).

Each stage writes a predictable output and skips itself when that output is complete, so
re-running the same command resumes (STYLE lesson 7):

==============  ===========================================  ==============================
stage           output under ``--output``                    done when
==============  ===========================================  ==============================
config          ``config.yaml``                              always rewritten
train           ``checkpoints/`` then ``model/``, centroids  ``model/_SUCCESS``
assign          ``assignments/``, ``rejects/`` (per shard)   ``assignments/_SUCCESS``
outliers        ``outliers.json`` (per-cluster thresholds)   always recomputed
metrics         ``metrics.json``                             always recomputed
report          ``report.html``                              always rewritten
==============  ===========================================  ==============================

The assign stage is the same per-shard engine as ``jobs/assign.py`` (:mod:`pipeline.assign`),
so an interrupted assignment pass also resumes shard by shard.
"""

from __future__ import annotations

import io
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import yaml

from pipeline import __version__
from pipeline.config import Config, IngestConfig, dump_yaml
from pipeline.data import fs as fsx
from pipeline.data.fs import Location
from pipeline.data.publish import SUCCESS, is_complete, publish, staging_for
from pipeline.data.reader import Shards, find_shards
from pipeline.models.weights import arch_json

log = logging.getLogger(__name__)

DEMO_INPUT = "work/digits"


@dataclass
class RunPaths:
    """Predictable output locations of one run."""

    root: Location

    def __getattr__(self, name: str) -> Location:
        names = {"config": "config.yaml", "checkpoints": "checkpoints", "model": "model",
                 "centroids": "centroids.npy", "centroids_json": "centroids.json",
                 "assignments": "assignments", "rejects": "rejects",
                 "metrics": "metrics.json", "history": "history.json",
                 "outliers": "outliers.json", "report": "report.html",
                 "server_state": "checkpoints/centroid_server_state.npz"}
        if name not in names:
            raise AttributeError(name)
        return self.root.join(names[name])


@dataclass
class TrainedModel:
    model_bytes: bytes
    arch: dict[str, Any]  # model/model.json: how to rebuild the model and feed it images
    centroids: np.ndarray  # (k, d) float32
    history: list[dict[str, Any]] = field(default_factory=list)


def prepare_demo_input() -> str:
    """Ingest scikit-learn's digits into ``work/digits`` once (DESIGN §6)."""
    from pipeline.data.ingest import ingest

    result = ingest(IngestConfig(source="sklearn-digits", output=DEMO_INPUT))
    log.info("demo input: %d digits in %s", result.rows, DEMO_INPUT)
    return DEMO_INPUT


def run(cfg: Config) -> dict[str, Any]:
    """Run every stage of a clustering run; returns the metrics written to metrics.json."""
    from pipeline.distributed.runtime import init_ray

    start = time.perf_counter()
    cfg.version = __version__
    if cfg.data.input:
        find_shards(cfg.data.input, cfg.s3)  # fail fast, before Ray starts
    init_ray()
    input_uri = cfg.data.input or prepare_demo_input()
    shards = find_shards(input_uri, cfg.s3)
    paths = RunPaths(fsx.locate(cfg.data.output, cfg.s3))
    fsx.write_bytes_atomic(paths.config, dump_yaml(cfg).encode())
    trained = _train_stage(cfg, input_uri, paths)
    t_assign = time.perf_counter()
    if not is_complete(paths.assignments):
        _assign_stage(cfg, shards, trained, paths)
    else:
        log.info("assignments already complete in %s; skipping", paths.assignments.uri)
    assign_s = time.perf_counter() - t_assign
    from pipeline.evaluate import evaluate_run, write_outlier_thresholds

    write_outlier_thresholds(cfg, paths)
    metrics = evaluate_run(cfg, paths, shards.has_label, trained.history,
                           wall_s=time.perf_counter() - start, assign_s=assign_s)
    fsx.write_bytes_atomic(paths.metrics, json.dumps(metrics, indent=2).encode())
    _report_stage(paths, cfg)
    return metrics


def _report_stage(paths: RunPaths, cfg: Config) -> None:
    from pipeline.report import write_report

    write_report(paths.root.uri, cfg.s3)
    log.info("report: %s", paths.report.uri)


def _train_stage(cfg: Config, input_uri: str, paths: RunPaths) -> TrainedModel:
    if is_complete(paths.model):
        log.info("model already trained in %s; skipping training", paths.model.uri)
        return load_trained(paths)
    if cfg.method == "deepcluster":
        from pipeline.distributed.deepcluster import train_deepcluster

        trained = train_deepcluster(cfg, input_uri, paths)
    else:
        from pipeline.distributed.job import train_online

        trained = train_online(cfg, input_uri, paths)
    save_trained(cfg, trained, paths)
    return trained


def save_trained(cfg: Config, trained: TrainedModel, paths: RunPaths) -> None:
    buf = io.BytesIO()
    np.save(buf, trained.centroids.astype(np.float32))
    fsx.write_bytes_atomic(paths.centroids, buf.getvalue())
    k, d = trained.centroids.shape
    meta = {"k": k, "d": d, "metric": "euclidean",
            "feature_normalization": ("l2" if cfg.model.normalize_features
                                      or cfg.method == "deepcluster" else "none"),
            "method": cfg.method, "backbone": cfg.model.backbone}
    fsx.write_bytes_atomic(paths.centroids_json, json.dumps(meta, indent=2).encode())
    fsx.write_bytes_atomic(paths.history, json.dumps(trained.history, indent=2).encode())
    staging = staging_for(paths.model)
    fsx.make_dirs(staging)
    fsx.write_bytes_atomic(staging.join("model.safetensors"), trained.model_bytes)
    fsx.write_bytes_atomic(staging.join("model.json"), arch_json(**trained.arch))
    publish(staging, paths.model, b"{}")


def load_run_config(paths: RunPaths, overrides: list[str] | None = None) -> Config:
    """A run's saved ``config.yaml`` with ``--set`` overrides on top (assign job, report)."""
    from pipeline.config import resolve
    from pipeline.data.reader import InputError

    if not fsx.exists(paths.config):
        raise InputError(f"{paths.root.uri}: not a run directory (no config.yaml)")
    saved = yaml.safe_load(fsx.read_bytes(paths.config)) or {}
    cfg: Config = resolve(Config, overrides=overrides, loaded=saved)
    return cfg


def load_trained(paths: RunPaths) -> TrainedModel:
    """Model bytes and centroids of a finished run (also used by ``jobs/assign.py``)."""
    model_bytes = fsx.read_bytes(paths.model.join("model.safetensors"))
    arch = json.loads(fsx.read_bytes(paths.model.join("model.json")))
    centroids = np.load(io.BytesIO(fsx.read_bytes(paths.centroids)), allow_pickle=False)
    history = json.loads(fsx.read_bytes(paths.history)) if fsx.exists(paths.history) else []
    return TrainedModel(model_bytes, arch, centroids.astype(np.float32), history)


def _assign_stage(cfg: Config, shards: Shards, trained: TrainedModel, paths: RunPaths) -> None:
    """Assign every training image, shard by shard (resumable), then mark the stage done."""
    from pipeline.assign import assign_shards, plan_shards
    from pipeline.distributed.assign import settings_of

    plan = plan_shards(shards, paths.root)
    if plan.done:
        log.info("assign: %d of %d shards already assigned; resuming", len(plan.done),
                 plan.total)
    assign_shards(plan.todo, shards, paths.root, trained, settings_of(cfg), thresholds=None)
    fsx.write_bytes_atomic(paths.assignments.join(SUCCESS),
                           json.dumps({"shards": plan.total}).encode())
