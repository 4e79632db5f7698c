"""Every figure in the README's results tables is the committed benchmark JSON it names.

The convention (README, "## Results"), which every table in that section must follow:

* a ``source`` column names, per row, the JSON file(s) under ``bench/results/`` in
  backticks and, optionally, the object inside them as a dotted path:
  ```quality-run1.json` `online.drift_off``` (a number indexes a list: ``rows.3``);
* the line above the table is a comment mapping every other column to the keys (relative to
  that object) of the figures in its cells, left to right:
  ``<!-- figures: method=label; NMI=nmi; (c) incl. start-up=pipeline_images_per_s,pipeline_startup_s -->``.
  ``label`` marks a descriptive column (not checked), ``.`` is the object itself, ``2:key``
  reads the row's second file. A key absent from a row's object means its cell must not
  show that figure (an empty ``epochs`` cell for k-means).

A figure matches when it equals the JSON value rounded to the digits shown (``268 s`` for
267.572, ``0.883`` for 0.8835); ``yes``/``no`` match booleans.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache
from typing import Any

import pytest

from tests.conftest import REPO

README = REPO / "README.md"
RESULTS = REPO / "bench" / "results"
SPEC = re.compile(r"^<!--\s*figures:\s*(.*?)\s*-->$")
RULE = re.compile(r"^\|(\s*:?-+:?\s*\|)+$")
NUMBER = re.compile(r"[+\-−]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
MISSING = object()


@dataclass
class Table:
    line: int  # 1-based line of the header in README.md
    spec: str | None
    header: list[str]
    rows: list[list[str]]


def cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def results_tables(text: str) -> list[Table]:
    """Every Markdown table between ``## Results`` and the next ``## `` heading."""
    lines = text.splitlines()
    start = lines.index("## Results")
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")),
               len(lines))
    tables, i = [], start
    while i < end:
        if lines[i].startswith("|") and i + 1 < end and RULE.match(lines[i + 1].strip()):
            match = SPEC.match(lines[i - 1].strip())
            j = i + 2
            rows = []
            while j < end and lines[j].startswith("|"):
                rows.append(cells(lines[j]))
                j += 1
            tables.append(Table(i + 1, match.group(1) if match else None, cells(lines[i]),
                                rows))
            i = j
        else:
            i += 1
    return tables


def parse_spec(spec: str) -> dict[str, list[tuple[int, str]] | None]:
    """``COL=key,key; COL=label`` -> {column: [(file index, key), ...] or None for labels}."""
    out: dict[str, list[tuple[int, str]] | None] = {}
    for entry in filter(None, (e.strip() for e in spec.split(";"))):
        column, _, keys = entry.partition("=")
        if keys.strip() == "label":
            out[column.strip()] = None
            continue
        parsed = []
        for key in keys.split(","):
            index, _, name = key.strip().rpartition(":")
            parsed.append((int(index) - 1 if index else 0, name))
        out[column.strip()] = parsed
    return out


@cache
def load(name: str) -> Any:
    path = RESULTS / name
    assert path.is_file(), f"bench/results/{name} does not exist"
    return json.loads(path.read_text())


def lookup(obj: Any, dotted: str) -> Any:
    if dotted in ("", "."):
        return obj
    for part in dotted.split("."):
        if isinstance(obj, list) and part.isdigit() and int(part) < len(obj):
            obj = obj[int(part)]  # a list element: ``rows.3``
        elif isinstance(obj, dict) and part in obj:
            obj = obj[part]
        else:
            return MISSING
    return obj


def sources(cell: str) -> list[Any]:
    """The JSON objects a row's ``source`` cell names (one per file, at its path)."""
    quoted = re.findall(r"`([^`]+)`", cell)
    files = [q for q in quoted if q.endswith(".json")]
    paths = [q for q in quoted if not q.endswith(".json")]
    assert files, f"source {cell!r} names no JSON file"
    assert len(paths) <= 1, f"source {cell!r}: one object path at most"
    objs = [lookup(load(f), paths[0] if paths else "") for f in files]
    for f, obj in zip(files, objs, strict=True):
        assert obj is not MISSING, f"{f} has no {paths[0]!r}"
    return objs


def figures(cell: str) -> list[Any]:
    text = cell.replace("**", "").strip()
    if text.lower() in ("yes", "no"):
        return [text.lower() == "yes"]
    return NUMBER.findall(text)


def matches(shown: Any, value: Any) -> bool:
    if isinstance(shown, bool) or isinstance(value, bool):
        return shown is value
    if not isinstance(value, (int, float)):
        return False
    text = shown.replace("−", "-").replace(",", "")
    decimals = len(text.split(".")[1]) if "." in text else 0
    return abs(float(text) - value) <= 0.5 * 10.0**-decimals + 1e-9 * max(1.0, abs(value))


def check(table: Table) -> list[str]:
    """Every mismatch of ``table`` as a readable line; [] when it is all sourced."""
    where = f"README.md:{table.line}"
    if table.spec is None:
        return [f"{where}: no '<!-- figures: ... -->' comment above the table"]
    if "source" not in table.header:
        return [f"{where}: no 'source' column"]
    spec = parse_spec(table.spec)
    columns = [h for h in table.header if h != "source"]
    errors = [f"{where}: column {h!r} is not in the figures comment"
              for h in columns if h not in spec]
    errors += [f"{where}: the figures comment names {h!r}, which is not a column"
               for h in spec if h not in columns]
    if errors:
        return errors
    used: set[tuple[str, int, str]] = set()
    for row in table.rows:
        cell = dict(zip(table.header, row, strict=True))
        objs = sources(cell["source"])
        for column in columns:
            keys = spec[column]
            if keys is None:
                continue
            expected = [(key, lookup(objs[i], key)) for i, key in keys]
            present = [(key, v) for key, v in expected if v is not MISSING]
            used.update((column, i, key) for (i, key), (_, v) in zip(keys, expected,
                                                                     strict=True)
                        if v is not MISSING)
            shown = figures(cell[column])
            label = f"{where}: row {row[0]!r}, {column!r}"
            if len(shown) != len(present):
                errors.append(f"{label}: shows {shown} but the JSON has "
                              f"{[k for k, _ in present]} = {[v for _, v in present]}")
                continue
            errors += [f"{label}: {s} is not {key} = {v!r}"
                       for s, (key, v) in zip(shown, present, strict=True) if not matches(s, v)]
    errors += [f"{where}: {column!r} key {key!r} is in no row's JSON"
               for column, keys in spec.items() for i, key in keys or []
               if (column, i, key) not in used]
    return errors


TABLES = results_tables(README.read_text())


def test_the_results_section_has_its_tables():
    # quality (before, and over three seeds), report bounds, training order, deepcluster
    # before/after (the shuffle fix, the stage runner), deepcluster's per-epoch overhead,
    # deepcluster vs online, GPU, assignment throughput, ingest, chaos, S3 faults, fuzzing,
    # imc (MNIST and CIFAR-10: the runs, the curves), multiview (views, gains over the best
    # view, view sets, each view alone, noise and cost, feature passes on each dataset, where the passes run)
    assert len(TABLES) == 41, [t.line for t in TABLES]
    assert all(t.rows for t in TABLES)


@pytest.mark.parametrize("table", TABLES, ids=[f"line{t.line}" for t in TABLES])
def test_every_figure_is_the_committed_json_it_names(table):
    errors = check(table)
    assert not errors, "\n".join(errors)


def test_the_check_catches_a_changed_figure():
    """A figure off by one shown digit fails; the same figure as shown passes."""
    table = next(t for t in TABLES if "gpu_smoke.json" in t.rows[0][-1])
    assert check(table) == []
    row = list(table.rows[0])
    col = table.header.index("images/s")
    shown = figures(row[col])[0]
    row[col] = str(int(shown.replace(",", "")) + 1)
    errors = check(Table(table.line, table.spec, table.header, [row]))
    assert len(errors) == 1 and "is not" in errors[0]
    assert not matches("2,668", 2669.0) and matches("2,668", 2668.1)
    assert matches("−0.16", -0.1615) and not matches("+0.63", 0.6249)
    assert matches(True, True) and not matches(False, True)
