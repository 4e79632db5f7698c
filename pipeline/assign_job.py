"""``jobs/assign.py``: assign new shards to the clusters of a finished run (DESIGN §1, §8).

The scheduled batch job (e.g. nightly over a bucket prefix). Everything that can be checked
is checked before Ray starts: the run has a finished model and centroids of the model's
dimension, every shard to do follows the data contract, and the output was not started
with a different run. Then only the shards without an output file are assigned
(:mod:`pipeline.assign`), so re-running the same command is safe and cheap.

Output, under ``--output``::

    assignments/<shard>.parquet  id, cluster, distance, margin, outlier[, label]
    rejects/<shard>.parquet      id, source, reason
    _assign.json                 the run and model fingerprint this output belongs to
    _last_run.json               counts and throughput of the latest invocation
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.assign import AssignStats, assign_shards, cluster_thresholds, plan_shards
from pipeline.config import Config, resolve
from pipeline.data import fs as fsx
from pipeline.data.fs import Location
from pipeline.data.publish import is_complete
from pipeline.data.reader import InputError, Shards, find_shards
from pipeline.lock import OutputLock
from pipeline.outputs import (
    RunPaths,
    TrainedModel,
    load_run_config,
    load_trained,
    model_fingerprint,
)

log = logging.getLogger(__name__)

CLAIM, LAST_RUN = "_assign.json", "_last_run.json"


@dataclass
class AssignResult:
    """What one invocation did; ``stats`` is None when there was nothing to do."""

    output: str
    shards_total: int
    shards_skipped: int
    stats: AssignStats | None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"output": self.output, "shards_total": self.shards_total,
                               "shards_skipped": self.shards_skipped}
        out.update(self.stats.as_dict() if self.stats else {"shards": 0, "rows": 0})
        return out


def assign_job(run_uri: str, input_uri: str, output_uri: str,
               overrides: list[str] | None = None) -> AssignResult:
    """Assign every not-yet-assigned shard under ``input_uri`` with the run at ``run_uri``."""
    s3 = resolve(Config, overrides=overrides).s3  # where this job runs decides the endpoint
    paths = RunPaths(fsx.locate(run_uri, s3))
    cfg = load_run_config(paths, overrides)
    cfg.s3 = s3
    trained = load_checked(paths)
    thresholds = load_thresholds(paths, cfg)
    shards = find_shards(input_uri, s3)
    out = fsx.locate(output_uri, s3)
    with OutputLock(out, ttl_s=cfg.scale.lease_ttl_s):  # a second writer stops here
        return _assign_locked(cfg, trained, thresholds, shards, out, run_uri)


def _assign_locked(cfg: Config, trained: TrainedModel, thresholds: np.ndarray,
                   shards: Shards, out: Location, run_uri: str) -> AssignResult:
    input_uri, output_uri = shards.location.uri, out.uri
    claim_output(out, run_uri, trained)
    plan = plan_shards(shards, out)
    if not plan.todo:
        log.info("all %d shards under %s are already assigned in %s; nothing to do",
                 plan.total, input_uri, output_uri)
        return AssignResult(output_uri, plan.total, len(plan.done), None)
    log.info("assigning %d of %d shards (%d already done) into %s", len(plan.todo),
             plan.total, len(plan.done), output_uri)
    from pipeline.distributed.assign import settings_of
    from pipeline.distributed.runtime import init_ray

    init_ray()
    stats = assign_shards(plan.todo, shards, out, trained, settings_of(cfg), thresholds,
                          kill_after_shards=cfg.debug.kill_assign_after_shards)
    result = AssignResult(output_uri, plan.total, len(plan.done), stats)
    summary = {**result.as_dict(), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                time.gmtime())}
    fsx.write_bytes_atomic(out.join(LAST_RUN), json.dumps(summary, indent=2).encode())
    return result


def load_checked(paths: RunPaths) -> TrainedModel:
    """The run's model and centroids, refusing an unfinished run or mismatched dimensions."""
    if not is_complete(paths.model):
        raise InputError(f"{paths.model.uri}: no finished model (model/_SUCCESS missing); "
                         "is the run complete?")
    if not fsx.exists(paths.centroids):
        raise InputError(f"{paths.centroids.uri}: missing; the run has no centroids")
    trained = load_trained(paths)
    k, d = trained.centroids.shape
    model_dim = int(trained.arch["feature_dim"])
    if d != model_dim:
        raise InputError(f"{paths.centroids.uri}: centroids are {k}x{d} but the model in "
                         f"{paths.model.uri} outputs {model_dim}-d features")
    meta = json.loads(fsx.read_bytes(paths.centroids_json))
    if (meta.get("k"), meta.get("d")) != (k, d):
        raise InputError(f"{paths.centroids_json.uri}: says k={meta.get('k')}, "
                         f"d={meta.get('d')} but centroids.npy is {k}x{d}")
    return trained


def load_thresholds(paths: RunPaths, cfg: Config) -> np.ndarray:
    """Per-cluster outlier thresholds (k,), from ``outliers.json`` or the run's assignments."""
    k = cfg.cluster.k
    if fsx.exists(paths.outliers):
        values = np.asarray(json.loads(fsx.read_bytes(paths.outliers))["thresholds"],
                            np.float32)
    elif is_complete(paths.assignments):
        from pipeline.evaluate import read_assignments

        log.info("%s missing; deriving thresholds from the run's assignments", paths.outliers.uri)
        table = read_assignments(paths, ["cluster", "distance"])
        values = cluster_thresholds(table.column("cluster").to_numpy(),
                                    table.column("distance").to_numpy(), k,
                                    cfg.cluster.outlier_quantile, cfg.cluster.outlier_min_members)
    else:
        raise InputError(f"{paths.root.uri}: neither outliers.json nor complete assignments; "
                         "cannot derive outlier thresholds")
    if values.shape != (k,):
        raise InputError(f"{paths.outliers.uri}: {values.shape[0]} thresholds for k={k}")
    return values


def claim_output(out: Location, run_uri: str, trained: TrainedModel) -> None:
    """Tie ``out`` to this run's model; refuse an output started with a different one."""
    model = model_fingerprint(trained)
    claim = out.join(CLAIM)
    if fsx.exists(claim):
        owner = json.loads(fsx.read_bytes(claim))
        if owner.get("model") != model:
            raise InputError(f"{out.uri} holds assignments made with another model "
                             f"(run {owner.get('run')}, model {owner.get('model')}; this is "
                             f"{model}); choose a new --output")
        return
    fsx.write_bytes_atomic(claim, json.dumps({"run": run_uri, "model": model}).encode())
