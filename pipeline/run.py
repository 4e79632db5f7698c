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

import json
import logging
import time
from typing import Any

from pipeline import __version__, manifest, methods
from pipeline.config import Config, IngestConfig, dump_yaml
from pipeline.data import fs as fsx
from pipeline.data.publish import SUCCESS, is_complete
from pipeline.data.reader import Shards, find_shards
from pipeline.lock import LOCK_NAME, OutputLock
from pipeline.outputs import DEMO_INPUT, RunPaths, TrainedModel, load_trained, save_trained

log = logging.getLogger(__name__)


def prepare_demo_input() -> str:
    """Ingest scikit-learn's digits into ``work/digits`` once (DESIGN §6)."""
    from pipeline.data.ingest import ingest

    result = ingest(IngestConfig(source="sklearn-digits", output=DEMO_INPUT))
    log.info("demo input: %d digits in %s", result.rows, DEMO_INPUT)
    return DEMO_INPUT


def run(cfg: Config, overwrite: bool = False) -> dict[str, Any]:
    """Run every stage of a clustering run; returns the metrics written to metrics.json.
    An existing run under ``data.output`` resumes if its ``run.json`` matches ``cfg``
    (:mod:`pipeline.manifest`), else stops; ``overwrite`` deletes it first. The run holds
    the output's writer lock throughout (:mod:`pipeline.lock`)."""
    start = time.perf_counter()
    cfg.version = __version__
    method = methods.get(cfg.method)
    for key in methods.ignored_settings(cfg):
        log.warning("%s is set but method %s does not use it", key, method.name)
    if cfg.data.input:
        find_shards(cfg.data.input, cfg.s3)  # fail fast, before Ray starts
    preflight = method.check_fn()
    if preflight is not None:
        preflight(cfg)  # the method's own inputs (multiview's views), before any work
    paths = RunPaths(fsx.locate(cfg.data.output, cfg.s3))
    with OutputLock(paths.root, ttl_s=cfg.scale.lease_ttl_s):  # a second writer stops here
        return _run_locked(cfg, paths, overwrite, start)


def _run_locked(cfg: Config, paths: RunPaths, overwrite: bool, start: float) -> dict[str, Any]:
    from pipeline.distributed.runtime import init_ray

    if overwrite:
        log.info("--overwrite: deleting the existing run in %s", paths.root.uri)
        fsx.remove_contents(paths.root, keep=(LOCK_NAME,))
    manifest.claim(paths, cfg)  # a different config in the same --output stops here
    init_ray()
    input_uri = cfg.data.input or prepare_demo_input()
    shards = find_shards(input_uri, cfg.s3)
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
                           wall_s=time.perf_counter() - start, assign_s=assign_s,
                           results=trained.results)
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
    trained = methods.get(cfg.method).train_fn()(cfg, input_uri, paths)
    save_trained(cfg, trained, paths)
    manifest.record_model(paths, trained)
    return trained


def _assign_stage(cfg: Config, shards: Shards, trained: TrainedModel, paths: RunPaths) -> None:
    """Assign every training image, shard by shard (resumable), then mark the stage done."""
    from pipeline.assign import assign_shards, plan_shards
    from pipeline.assign_job import claim_output
    from pipeline.distributed.assign import settings_of

    claim_output(paths.assignments, paths.root.uri, trained)  # tied to this model
    plan = plan_shards(shards, paths.root)
    if plan.done:
        log.info("assign: %d of %d shards already assigned; resuming", len(plan.done),
                 plan.total)
    assign_shards(plan.todo, shards, paths.root, trained, settings_of(cfg), thresholds=None)
    fsx.write_bytes_atomic(paths.assignments.join(SUCCESS),
                           json.dumps({"shards": plan.total}).encode())
