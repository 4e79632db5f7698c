"""The run manifest, ``run.json``: what a run directory was made with (DESIGN §8).

It records the config fingerprint, the model fingerprint once trained, and the package
version. Re-running into an existing ``--output`` resumes only when the config that shapes
the results is the same; otherwise the run stops before any work, naming the fields that
differ (``--overwrite`` replaces the run).

Settings that may change on resume (:data:`RESUMABLE`) are left out of the fingerprint:
where the run lives and how it is reached (``data.output``, ``s3.*``), the resources and
fault handling (``scale.*`` except ``scale.centroid_shards``, which shapes the server's
saved state), ``train.time_budget_s`` (a deadline per attempt), the assignment pass's batch
size and everything computed after training from the saved model (``cluster.outlier_*``,
``report.*``), fault injection (``debug.*``) and the version (recorded separately).
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

from pipeline import __version__
from pipeline.config import Config, ConfigError
from pipeline.data import fs as fsx
from pipeline.dotted import flat, matches
from pipeline.outputs import RunPaths, TrainedModel, model_fingerprint

RESUMABLE = ("data.output", "data.decode_batch_size", "s3.", "scale.", "train.time_budget_s",
             "cluster.assign_batch_size", "cluster.outlier_quantile",
             "cluster.outlier_min_members", "deepcluster.max_feature_memory_fraction",
             "report.", "debug.", "version")
KEEP = ("scale.centroid_shards",)


def shaping(cfg: Config) -> dict[str, Any]:
    """The settings that shape a run's results: all but :data:`RESUMABLE`."""
    return {k: v for k, v in flat(cfg).items() if matches(k, KEEP) or not matches(k, RESUMABLE)}


def fingerprint(settings: dict[str, Any]) -> str:
    blob = json.dumps(settings, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def claim(paths: RunPaths, cfg: Config) -> None:
    """Write ``run.json`` for a new run, or check that ``cfg`` may resume the existing one.
    Raises ConfigError (one line, naming the differing fields) when it may not."""
    settings = shaping(cfg)
    if fsx.exists(paths.manifest):
        saved = json.loads(fsx.read_bytes(paths.manifest))
        if saved["config_fingerprint"] != fingerprint(settings):
            raise ConfigError(f"{paths.root.uri} holds a run made with a different config ("
                              f"{_differences(saved['config'], settings)}); pass --overwrite "
                              "to replace it, or choose another --output")
        return
    if fsx.exists(paths.model) or fsx.exists(paths.checkpoints):
        raise ConfigError(f"{paths.root.uri} holds a run with no run.json (made before "
                          "manifests existed); pass --overwrite to replace it, or choose "
                          "another --output")
    manifest = {"config_fingerprint": fingerprint(settings), "config": settings,
                "fingerprint_excludes": list(RESUMABLE), "package_version": __version__,
                "method": cfg.method, "created_unix": time.time(), "model_fingerprint": None}
    _write(paths, manifest)


def record_model(paths: RunPaths, trained: TrainedModel) -> None:
    """Add the trained model's fingerprint (weights and centroids) to ``run.json``."""
    manifest = json.loads(fsx.read_bytes(paths.manifest))
    manifest.update(model_fingerprint=model_fingerprint(trained),
                    model_package_version=__version__)
    _write(paths, manifest)


def _write(paths: RunPaths, manifest: dict[str, Any]) -> None:
    fsx.write_bytes_atomic(paths.manifest, json.dumps(manifest, indent=2, default=str).encode())


def _differences(saved: dict[str, Any], now: dict[str, Any]) -> str:
    keys = sorted(k for k in saved.keys() | now.keys() if saved.get(k) != now.get(k))
    shown = [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in keys[:6]]
    return "; ".join(shown) + (f"; and {len(keys) - 6} more" if len(keys) > 6 else "")
