"""Fuzzed report strings: ids, labels, metrics, config text and the run's path holding HTML
and script must reach ``report.html`` escaped. Each page is parsed and compared with the same
report made from harmless strings: same elements and attributes, no event handler or
external reference, untouched scripts, and a JSON block that still holds the ids (cases:
tests/fuzz/cases.py)."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given

from tests.fuzz.cases import (
    ReportCase,
    fuzz_settings,
    page_problems,
    parse,
    render_page,
    report_cases,
    report_outcomes,
    twin,
)

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # PCA of 2 points


@fuzz_settings(max_examples=60)
@given(case=report_cases(full=False))
def test_fuzzed_strings_are_escaped_by_render(case):
    (outcome,) = report_outcomes(case)
    assert not outcome.bad, outcome.detail


@fuzz_settings(max_examples=4)
@given(case=report_cases(full=True))
def test_fuzzed_strings_are_escaped_by_write_report(case):
    (outcome,) = report_outcomes(case)
    assert not outcome.bad, outcome.detail


SCRIPTED = ReportCase(
    ids=("</script><script>alert(1)</script>", "\"><img src=x onerror=alert(1)>"),
    labels=("</textarea><b>x</b>", "'><svg onload=alert(1)>") * 4,
    metrics=(("<script>k</script>", "<i>v</i>"),), text="</pre><script>alert(2)</script>",
    folder="<img src=x onerror=alert(3)>")


def test_script_end_tags_cannot_leave_the_json_block():
    page = render_page(SCRIPTED)
    block = re.search(r"<script type=application/json id=map-data>(.*?)</script>", page, re.S)
    assert block and "<" not in block.group(1) and "\\u003c/script" in block.group(1)
    assert json.loads(block.group(1))["ids"] == list(SCRIPTED.ids)
    assert page_problems(page, SCRIPTED.ids, render_page(twin(SCRIPTED))) == []


def test_the_check_catches_an_unescaped_page(monkeypatch):
    """The checker itself: with escaping switched off, the injections are found."""
    import pipeline.report.html as html_module
    import pipeline.report.map_view as map_module

    clean = render_page(twin(SCRIPTED))
    monkeypatch.setattr(html_module, "E", lambda text, quote=True: text)
    monkeypatch.setattr(map_module, "E", lambda text, quote=True: text)
    problems = page_problems(render_page(SCRIPTED), SCRIPTED.ids, clean)
    assert any("elements differ" in p for p in problems)
    assert any("onerror" in p or "onload" in p for p in problems)
    assert parse(clean).handlers == []
