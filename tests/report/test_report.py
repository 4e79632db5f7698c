"""The HTML report: built from a run directory, checked in a real headless Chromium.

The run directory is written directly (input shards, per-shard assignments, metrics,
history, config), so these tests need no training. The browser test uses Debian's
``chromium`` through Playwright; CI installs it and sets ``REQUIRE_BROWSER=1`` so the test
cannot silently skip there.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import Config, dump_yaml, resolve
from pipeline.report import write_report
from pipeline.report.data import confusion
from tests.conftest import REPO
from tests.images import encode

K, PAGE = 30, 12
SCREENSHOT = REPO / "artifacts" / "report.png"


def write_run(root: Path, k: int = K, per_cluster: int = 6, corrupt_id: str | None = None) -> None:
    """Shards of k * per_cluster small images, two per cluster label-consistent."""
    rng = np.random.default_rng(0)
    ids, images, labels, clusters = [], [], [], []
    for c in range(k):
        for j in range(per_cluster + c % 3):  # unequal sizes
            ids.append(f"img-{c}-{j}")
            pixels = np.full((24, 24, 3), (c * 8) % 256, np.uint8)
            pixels[rng.integers(0, 24, 40), rng.integers(0, 24, 40)] = 255
            images.append(encode(pixels, "JPEG" if j % 2 else "PNG"))
            labels.append(f"class{c % 7}")
            clusters.append(c)
    if corrupt_id:
        images[ids.index(corrupt_id)] = b"not an image"
    n = len(ids)
    half = n // 2
    for part, sl in (("a.parquet", slice(0, half)), ("sub/b.parquet", slice(half, n))):
        (root / "input" / part).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"id": ids[sl], "image": pa.array(images[sl], pa.binary()),
                                 "label": labels[sl]}), root / "input" / part)
        (root / "run" / "assignments" / part).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({
            "id": ids[sl], "cluster": pa.array(clusters[sl], pa.int32()),
            "distance": pa.array(rng.uniform(0, 1, n)[sl], pa.float32()),
            "margin": pa.array(rng.uniform(0, 1, n)[sl], pa.float32()),
            "label": labels[sl]}), root / "run" / "assignments" / part)
    cfg = resolve(Config, overrides=[f"cluster.k={k}", f"data.input={root / 'input'}",
                                     f"report.page_size={PAGE}"])
    run = root / "run"
    (run / "config.yaml").write_text(dump_yaml(cfg))
    (run / "metrics.json").write_text(json.dumps({"n_images": n, "k": k, "method": "online",
                                                  "nmi": 0.5, "cluster_sizes": {"min": 6}}))
    (run / "history.json").write_text(json.dumps(
        [{"epoch": e, "loss": 2.0 / (e + 1), "sqdist": 0.5 - 0.01 * e, "nmi": 0.1 * e,
          "acc": 0.1 * e} for e in range(5)]))
    (run / "outliers.json").write_text(json.dumps({"thresholds": [0.9] * k}))


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("report")
    write_run(root, corrupt_id="img-3-1")
    write_report(str(root / "run"))
    return root / "run" / "report.html"


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("REQUIRE_BROWSER") == "1":
            pytest.fail("REQUIRE_BROWSER=1 but no chromium executable on PATH")
        pytest.skip("no chromium on PATH (apt-get install chromium; .ci/run does)")
    return found


def test_report_in_headless_chromium(report):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        errors: list[str] = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("request", lambda r: errors.append(f"network: {r.url}")
                if not r.url.startswith(("file:", "data:")) else None)
        page.goto(report.as_uri())
        images = page.evaluate("[...document.images].map(i => i.complete && i.naturalWidth)")
        assert len(images) == K and all(images), images  # every montage decoded
        assert page.locator("section.cluster").count() == K
        assert page.locator("section.cluster:visible").count() == PAGE
        SCREENSHOT.parent.mkdir(exist_ok=True)
        page.screenshot(path=str(SCREENSHOT), full_page=True)
        page.click("#next")
        visible = page.locator("section.cluster:visible")
        assert visible.count() == PAGE
        assert visible.first.get_attribute("data-cluster") != "29"  # paged past page one
        page.fill("#search", "7")
        assert page.locator("section.cluster:visible").count() == 1
        page.fill("#search", "class3")  # by label: clusters whose top label is class3
        assert page.locator("section.cluster:visible").count() == len(range(3, K, 7))
        assert "page 1 of 1" in page.inner_text("#pageinfo")
        browser.close()
    assert errors == []


def test_report_is_self_contained_and_complete(report):
    text = report.read_text()
    assert "Content-Security-Policy" in text
    assert not re.search(r"(src|href)=['\"]?https?:", text)
    assert text.count("<section class=cluster") == K
    assert "id=sizes" in text and "id=confusion" in text and "id=metrics" in text
    for key in ("loss", "sqdist", "nmi", "acc"):
        assert f"data-key={key}" in text
    assert "method: online" in text  # the resolved config


def test_sections_are_largest_first(report):
    order = re.findall(r"data-cluster=(\d+)", report.read_text())
    sizes = [6 + int(c) % 3 for c in order]
    assert sizes == sorted(sizes, reverse=True)


def test_confusion_counts():
    clusters = np.array([0, 0, 1, 1, 1, 2])
    labels = np.array(["b", "a", "a", "a", None], dtype=object)
    labels = np.append(labels, "b")
    c = confusion(clusters, labels, np.bincount(clusters, minlength=3))
    assert c.clusters == [1, 0, 2] and c.labels == ["a", "b"]
    assert c.counts.tolist() == [[2, 0], [1, 1], [0, 1]]


def test_jobs_report_cli_regenerates(tmp_path):
    import subprocess
    import sys

    write_run(tmp_path, k=4)
    result = subprocess.run([sys.executable, str(REPO / "jobs" / "report.py"),
                             str(tmp_path / "run")], capture_output=True, text=True,
                            timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "run" / "report.html").stat().st_size > 1000
