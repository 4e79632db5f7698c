"""The HTML cluster report of a run (``report.html``, DESIGN §3).

``write_report(run_uri)`` gathers the run's outputs (:mod:`.data`), renders one
self-contained page (:mod:`.html`, montages from :mod:`.montage`) and writes it atomically
next to them. ``python jobs/report.py RUN_DIR`` regenerates it.
"""

from __future__ import annotations

import logging

from pipeline.config import S3Config
from pipeline.data import fs as fsx

log = logging.getLogger(__name__)


def write_report(run_uri: str, s3: S3Config | None = None,
                 overrides: list[str] | None = None) -> str:
    """Build ``RUN/report.html``; returns its URI."""
    from pipeline.outputs import RunPaths, load_run_config
    from pipeline.report.data import gather
    from pipeline.report.html import render

    paths = RunPaths(fsx.locate(run_uri, s3))
    cfg = load_run_config(paths, overrides)
    if s3 is not None:
        cfg.s3 = s3
    data = gather(paths, cfg)
    page = render(data, cfg.report.page_size, cfg.report.thumb_px, cfg.report.map_legend)
    fsx.write_bytes_atomic(paths.report, page.encode())
    log.info("report: %d clusters, %.1f MB, %s", len(data.sizes), len(page) / 1e6,
             paths.report.uri)
    return paths.report.uri
