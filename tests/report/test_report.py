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
from pipeline.methods.arch import build_model, model_arch
from pipeline.models.weights import arch_json, save_bytes
from pipeline.report import write_report
from pipeline.report.data import ClusterView, confusion
from pipeline.report.embedding import EmbeddingMap, plan_points, project, select
from pipeline.report.map_view import map_section
from tests.conftest import REPO
from tests.images import encode

K, PAGE = 30, 12
SCREENSHOT = REPO / "artifacts" / "report.png"
MAP_SCREENSHOT = REPO / "artifacts" / "report-map.png"
HOSTILE = ["<script>alert(1)</script>", "\"'><img src=x onerror=alert(1)>"]


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
    write_model(run, cfg)


def write_model(run: Path, cfg: Config) -> None:
    """An untrained (seeded) model and random centroids, as a finished run saves them."""
    import torch

    torch.manual_seed(0)
    (run / "model").mkdir(exist_ok=True)
    (run / "model" / "model.safetensors").write_bytes(save_bytes(build_model(cfg)))
    (run / "model" / "model.json").write_bytes(arch_json(**model_arch(cfg)))
    centroids = np.random.default_rng(0).normal(size=(cfg.cluster.k, cfg.model.feature_dim))
    np.save(run / "centroids.npy", centroids.astype(np.float32))


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
        check_map(page)
        browser.close()
    assert errors == []


N_POINTS = sum(6 + c % 3 for c in range(K)) - 1  # every montage image but the corrupt one

POINT_ON_TOP = """() => { const pts = [...document.querySelectorAll('#map circle.pt')];
  for (const p of pts) { const r = p.getBoundingClientRect();
    const x = r.left + r.width / 2, y = r.top + r.height / 2;
    if (document.elementFromPoint(x, y) === p) return [+p.dataset.i, x, y]; }
  return null; }"""


def check_map(page) -> None:
    """The embedding map: points, hover/click thumbnail + id, legend jump, label colours."""
    page.locator("#embedding").scroll_into_view_if_needed()
    assert page.locator("#map circle.pt").count() == N_POINTS
    data = json.loads(page.text_content("#map-data") or "")
    i, x, y = page.evaluate(POINT_ON_TOP)  # a point not covered by another one
    page.mouse.move(x, y)
    assert page.locator("#map-thumb").is_visible()
    assert page.eval_on_selector("#map-thumb", "t => t.style.backgroundImage").startswith(
        'url("data:image/jpeg;base64,')
    assert data["ids"][i] in page.inner_text("#map-cap")
    page.mouse.click(x, y)  # pin it, then leave: the pinned point stays shown
    page.mouse.move(1, 1)
    assert data["ids"][i] in page.inner_text("#map-cap")
    MAP_SCREENSHOT.parent.mkdir(exist_ok=True)
    page.locator("#embedding").screenshot(path=str(MAP_SCREENSHOT))
    fills = page.eval_on_selector_all("#map circle.pt", "ps => ps.map(p => p.getAttribute('fill'))")
    assert not page.locator("#map-label-legend").is_visible()
    page.check("#map-by-label")
    by_label = page.eval_on_selector_all("#map circle.pt",
                                         "ps => ps.map(p => p.getAttribute('fill'))")
    assert by_label == data["lcolor"] and by_label != fills
    assert page.locator("#map-label-legend").is_visible()
    assert not page.locator("#map-legend").is_visible()
    page.uncheck("#map-by-label")
    assert page.eval_on_selector_all("#map circle.pt",
                                     "ps => ps.map(p => p.getAttribute('fill'))") == fills
    assert page.locator("#map-legend a[data-c]").count() == K
    page.click("#map-legend a[data-c='3']")  # cluster 3 is on page 3 of the sections
    section = page.locator("#cluster-3")
    assert section.is_visible() and page.input_value("#search") == "3"
    top = section.evaluate("s => s.getBoundingClientRect().top")
    assert 0 <= top < page.viewport_size["height"]


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


def view(c: int, n_near: int, n_rand: int) -> ClusterView:
    v = ClusterView(c, n_near + n_rand, sampled=True)
    v.nearest_ids = [f"n{c}-{j}" for j in range(n_near)]
    v.random_ids = [f"r{c}-{j}" for j in range(n_rand)]
    v.nearest, v.random = [b"x"] * n_near, [b"x"] * n_rand
    return v


def test_map_sample_is_bounded_and_stratified():
    assert plan_points([16] * 1000, 3000) == [3] * 1000
    assert sum(plan_points([16] * 2000, 3000)) == 3000  # cap 2: the 500 smallest get none
    assert plan_points([5, 0, 1, 300], 10) == [3, 0, 1, 3]  # cap max(2, 10 // 3)
    views = [view(c, 8, 8) for c in range(40)]
    for points in (2, 50, 80, 100, 10_000):
        chosen = select(views, points)
        assert len(chosen) <= points
        if points >= 2 * len(views):
            assert {p.cluster for p in chosen} == set(range(40))
    chosen = select([view(0, 2, 3)], 4)  # random members first, in their montage row
    assert [(p.image_id, p.tile) for p in chosen] == [
        ("r0-0", (1, 0)), ("r0-1", (1, 1)), ("r0-2", (1, 2)), ("n0-0", (0, 0))]
    assert select([view(0, 0, 2)], 4)[0].tile == (0, 0)  # no nearest row: random is row 0


def test_map_projection_is_deterministic():
    feats = np.random.default_rng(1).normal(size=(80, 16)).astype(np.float32)
    a, method = project(feats, seed=3)
    b, _ = project(feats, seed=3)
    assert method == "t-SNE" and a.shape == (80, 2) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert a.min() >= 0 and a.max() <= 1
    assert project(feats[:4], seed=3)[1] == "PCA"


def test_map_escapes_hostile_ids_and_labels():
    emap = EmbeddingMap(xy=np.array([[0.1, 0.2], [0.8, 0.9]], np.float32), clusters=[0, 1],
                        ids=HOSTILE, labels=HOSTILE[::-1], tiles=[(0, 0), (0, 1)],
                        method="PCA", embed_s=0.0, project_s=0.0)
    text = map_section(emap, "note <b>", 64, 50)
    assert "<script>alert" not in text and "<img src=x" not in text and "<b>" not in text
    assert text.count("</script>") == 1  # only the JSON block's own end tag
    block = re.search(r"<script type=application/json id=map-data>(.*?)</script>", text, re.S)
    assert block is not None
    data = json.loads(block.group(1))
    assert data["ids"] == HOSTILE and data["labels"] == HOSTILE[::-1]
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text  # the label legend, escaped


def test_map_without_model_is_a_note(tmp_path):
    write_run(tmp_path, k=3)
    for name in ("model.json", "model.safetensors"):
        (tmp_path / "run" / "model" / name).unlink()
    write_report(str(tmp_path / "run"))
    text = (tmp_path / "run" / "report.html").read_text()
    assert "id=map-none" in text and "<svg id=map " not in text


def test_jobs_report_cli_regenerates(tmp_path):
    import subprocess
    import sys

    write_run(tmp_path, k=4)
    result = subprocess.run([sys.executable, str(REPO / "jobs" / "report.py"),
                             str(tmp_path / "run")], capture_output=True, text=True,
                            timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "run" / "report.html").stat().st_size > 1000
