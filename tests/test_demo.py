"""The zero-setup demo as a user runs it: ``python jobs/cluster_imagenet.py``, defaults.

* Its console output, as ``ray job logs``, cron mail or CI see it (not a terminal): every
  line must be one of our own formats, or a line we chose to keep and documented in the
  README ("Progress, logs and errors"). Anything else -- Ray Train's per-report lines, core
  worker errors, "Progress bars disabled", torch warnings -- fails the test with the line.
* Its report in headless Chromium: the embedding map of the demo's clusters renders (its
  montage digits, 16 a cluster) and a hover shows a digit; the map's screenshot (``artifacts/demo-report-map.png``) is the one
  the README shows as ``docs/report-map.png``.

The demo runs once, in a subprocess that starts its own local Ray cluster beside the suite's
shared one: two Ray instances on one machine, which must not disturb each other's output.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO

OURS = [
    r"\d\d:\d\d:\d\d (INFO|WARNING) .+",  # pipeline's console log format
    r"epoch \d+/\d+  .+",  # rank 0's per-epoch and in-epoch progress lines
    r"start \d+/\d+ epoch \d+/\d+  .+",  # the same for online's starts
    r"-{20,}",  # the summary table's rules
    r"(output|method|images|rejects|k|cluster sizes|inertia|NMI|ACC|ARI|wall time|"
    r"throughput) {2,}.+",  # the summary table's rows
]
# Kept and documented: Ray Data's progress block in non-interactive logs (at a dataset's
# start, then every 60 s) and its one line per finished dataset.
# And Ray Core's line that Ray Data's actor pools (MapWorker) take their transformer and
# context by object-store reference with max_restarts > 0: Ray Data passes every pool actor
# those refs, and the driver holds them for the dataset's lifetime.
PID = r"(\(\w+ pid=\d+\) )?"
KEPT = [PID + r"\d{4}-\d\d-\d\d [\d:,]+\tINFO logging_progress\.py:\d+ --( .*)?",
        PID + r".*(Running Dataset:|execution finished in) .*",
        # the same block as an actor (Ray Train's split coordinator) logs it
        PID + r"(=+|Total Progress: .*|Active & requested resources: .*|"
              r"(- )?[\w(). >,=-]+: \d+/(\d+|\?)|Tasks: \d+;.*)",
        PID + r"\[[\d :,-]+ E \d+ \d+\] core_worker\.cc:\d+: Actor with class name: "
              r"'MapWorker\(.*has constructor arguments in the object store.*"]
ALLOWED = re.compile("|".join(f"(?:{p})" for p in OURS + KEPT))


SUITE_RAY_ENV = {"RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE",
                 "RAY_USAGE_STATS_ENABLED", "RAY_DATA_DISABLE_PROGRESS_BARS",
                 "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "RAY_TMPDIR"}


def other_ray_instances() -> set[str]:
    from ray._private.services import find_gcs_addresses

    return set(find_gcs_addresses())


@pytest.fixture(scope="module")
def demo(ray_cluster, tmp_path_factory):
    """The demo with its defaults (12 epochs on scikit-learn's digits): (output dir, lines)."""
    out = tmp_path_factory.mktemp("demo") / "run"
    # A user's environment: none of the Ray variables that tests/conftest.py sets.
    env = {k: v for k, v in os.environ.items() if k not in SUITE_RAY_ENV}
    assert other_ray_instances()  # the suite's cluster: the demo's is the second instance
    proc = subprocess.run([sys.executable, "jobs/cluster_imagenet.py", "--output", str(out)],
                          cwd=REPO, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]


def test_demo_output_is_only_our_lines(demo):
    _, lines = demo
    foreign = [ln for ln in lines if not ALLOWED.fullmatch(ln.strip())]
    assert not foreign, "lines that are not ours:\n" + "\n".join(dict.fromkeys(foreign))
    assert any(ln.startswith("epoch 12/12") for ln in lines)
    assert any(ln.startswith("NMI") for ln in lines)


def test_demo_report_map_in_chromium(demo):
    """The demo's map: each montage digit a point (report.nearest + report.random = 16 per
    cluster, 10 clusters), coloured by cluster; hovering shows the digit."""
    from playwright.sync_api import sync_playwright

    from tests.report.test_report import POINT_ON_TOP, chromium

    out, _ = demo
    shot = REPO / "artifacts" / "demo-report-map.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto((out / "report.html").as_uri())
        page.locator("#embedding").scroll_into_view_if_needed()
        assert page.locator("#map circle.pt").count() == 10 * 16
        fills = set(page.eval_on_selector_all("#map circle.pt",
                                              "ps => ps.map(p => p.getAttribute('fill'))"))
        assert len(fills) == 10  # one colour per cluster
        _, x, y = page.evaluate(POINT_ON_TOP)
        page.mouse.move(x, y)
        assert page.locator("#map-thumb").is_visible()
        shot.parent.mkdir(exist_ok=True)
        page.locator("#embedding").screenshot(path=str(shot))
        browser.close()
