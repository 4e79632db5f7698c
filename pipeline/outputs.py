"""A run's outputs: where each file lives (:class:`RunPaths`) and the trained model record.

Every stage, job and report reads and writes a run through this module, which imports no
stage: so ``run``, ``distributed``, ``evaluate``, ``report`` and the jobs depend on it and
never on each other (DESIGN §8 is the file contract).
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import yaml

from pipeline.config import Config
from pipeline.data import fs as fsx
from pipeline.data.fs import Location
from pipeline.data.publish import publish, staging_for
from pipeline.models.weights import arch_json

DEMO_INPUT = "work/digits"  # where the zero-setup demo ingests scikit-learn's digits


class RunPaths:
    """Predictable output locations of one run under ``root`` (DESIGN §8)."""

    def __init__(self, root: Location):
        self.root = root
        self.config = root.join("config.yaml")
        self.manifest = root.join("run.json")
        self.checkpoints = root.join("checkpoints")
        self.model = root.join("model")
        self.centroids = root.join("centroids.npy")
        self.centroids_json = root.join("centroids.json")
        self.assignments = root.join("assignments")
        self.rejects = root.join("rejects")
        self.metrics = root.join("metrics.json")
        self.history = root.join("history.json")
        self.results = root.join("results.json")  # a method's own tables (multiview's views)
        self.outliers = root.join("outliers.json")
        self.report = root.join("report.html")
        self.server_state = root.join("checkpoints", "centroid_server_state.npz")


@dataclass
class TrainedModel:
    """A method's export: the model and centroids such that nearest-centroid assignment of
    the model's features is the method's own cluster rule."""

    model_bytes: bytes  # safetensors
    arch: dict[str, Any]  # model/model.json: how to rebuild the model and feed it images
    centroids: np.ndarray  # (k, d) float32
    history: list[dict[str, Any]] = field(default_factory=list)
    # The method's own results, JSON-able, merged into metrics.json (multiview: "views").
    results: dict[str, Any] = field(default_factory=dict)


def model_fingerprint(trained: TrainedModel) -> str:
    """16 hex digits over the weights and the centroids: what assignments are tied to."""
    buf = io.BytesIO()
    np.save(buf, trained.centroids.astype(np.float32))
    digest = hashlib.sha256()
    for blob in (trained.model_bytes, buf.getvalue()):
        digest.update(hashlib.sha256(blob).digest())
    return digest.hexdigest()[:16]


def save_trained(cfg: Config, trained: TrainedModel, paths: RunPaths) -> None:
    """Centroids, their metadata, the history, then ``model/`` (published whole, last)."""
    buf = io.BytesIO()
    np.save(buf, trained.centroids.astype(np.float32))
    fsx.write_bytes_atomic(paths.centroids, buf.getvalue())
    k, d = trained.centroids.shape
    meta = {"k": k, "d": d, "metric": "euclidean",
            "feature_normalization": "l2" if trained.arch.get("normalize")
            or trained.arch.get("whiten_from") else "none",
            "method": cfg.method, "backbone": cfg.model.backbone}
    fsx.write_bytes_atomic(paths.centroids_json, json.dumps(meta, indent=2).encode())
    fsx.write_bytes_atomic(paths.history, json.dumps(trained.history, indent=2).encode())
    if trained.results:
        fsx.write_bytes_atomic(paths.results, json.dumps(trained.results, indent=2).encode())
    staging = staging_for(paths.model)
    fsx.make_dirs(staging)
    fsx.write_bytes_atomic(staging.join("model.safetensors"), trained.model_bytes)
    fsx.write_bytes_atomic(staging.join("model.json"), arch_json(**trained.arch))
    publish(staging, paths.model, b"{}")


def load_trained(paths: RunPaths) -> TrainedModel:
    """Model bytes and centroids of a finished run (also used by ``jobs/assign.py``)."""
    model_bytes = fsx.read_bytes(paths.model.join("model.safetensors"))
    arch = json.loads(fsx.read_bytes(paths.model.join("model.json")))
    centroids = np.load(io.BytesIO(fsx.read_bytes(paths.centroids)), allow_pickle=False)
    history = json.loads(fsx.read_bytes(paths.history)) if fsx.exists(paths.history) else []
    results = json.loads(fsx.read_bytes(paths.results)) if fsx.exists(paths.results) else {}
    return TrainedModel(model_bytes, arch, centroids.astype(np.float32), history, results)


def load_run_config(paths: RunPaths, overrides: list[str] | None = None) -> Config:
    """A run's saved ``config.yaml`` with ``--set`` overrides on top (assign job, report)."""
    from pipeline.config import resolve
    from pipeline.data.reader import InputError

    if not fsx.exists(paths.config):
        raise InputError(f"{paths.root.uri}: not a run directory (no config.yaml)")
    saved = yaml.safe_load(fsx.read_bytes(paths.config)) or {}
    cfg: Config = resolve(Config, overrides=overrides, loaded=saved)
    return cfg
