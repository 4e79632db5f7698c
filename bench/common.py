"""Shared benchmark plumbing: machine facts, result JSON (DESIGN §8), dataset paths."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
SHARED = REPO.parent / "shared" / "datasets"


def machine() -> dict[str, Any]:
    import numpy
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    try:
        import ray
        ray_version = ray.__version__
    except ImportError:  # pragma: no cover
        ray_version = None
    return {"cpus": os.cpu_count(), "gpu": gpu, "platform": platform.platform(),
            "python": sys.version.split()[0], "torch": torch.__version__,
            "numpy": numpy.__version__, "ray": ray_version}


def write_result(name: str, headline: dict[str, Any], details: dict[str, Any]) -> Path:
    """bench/results/<name>.json with ``headline`` {name, value, target, meets} + machine."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"headline": headline, "machine": machine(), "created_unix": time.time(),
               **details}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, path)
    return path


def need(path: Path) -> Path:
    if not path.exists():
        raise SystemExit(f"skipped: {path} is absent (the shared datasets are needed)")
    return path


def fresh_run(shards: str, out: Path, settings: list[str],
              before: Callable[[], None] | None = None) -> tuple[Any, dict[str, Any], float]:
    """The main job (``pipeline.run``) from scratch on ``shards`` into ``out`` with ``settings``
    -> (its resolved config, its metrics, its wall seconds). ``before``: called once ``out``
    is emptied (to place stage results the run should reuse)."""
    from pipeline.config import Config, resolve
    from pipeline.data import fs as fsx
    from pipeline.run import run

    fsx.remove_tree(fsx.locate(str(out)))  # a benchmark measures a fresh run
    if before is not None:
        before()
    cfg = resolve(Config, None, settings, {"data.input": shards, "data.output": str(out)})
    start = time.perf_counter()
    metrics = run(cfg)
    return cfg, metrics, round(time.perf_counter() - start, 1)


def if_present(make: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``make()``, or ``{"skipped": reason}`` when it needs a shared dataset that is absent
    (:func:`need`)."""
    try:
        return make()
    except SystemExit as absent:
        print(absent, flush=True)
        return {"skipped": str(absent)}
