"""Print the Markdown table of every benchmark's latest headline (bench/README.md).

    python -m bench table

Reads ``bench/results/<name>.json`` (skipping ``-quick`` and ``-runN`` copies).
"""

from __future__ import annotations

import json
import time

from bench.common import RESULTS


def rows() -> list[str]:
    out = ["| benchmark | headline | value | target | meets | machine | date |",
           "|---|---|---|---|---|---|---|"]
    for path in sorted(RESULTS.glob("*.json")):
        if path.stem.endswith("-quick") or "-run" in path.stem:
            continue
        data = json.loads(path.read_text())
        h, m = data["headline"], data["machine"]
        where = f"{m['cpus']} CPUs" + (f", {m['gpu']}" if m.get("gpu") else "")
        when = time.strftime("%Y-%m-%d", time.gmtime(data.get("created_unix", 0)))
        bars = [str(h["target"])] if h.get("target") is not None else []
        if h.get("floor") is not None:  # a lower bar some issues set beside the target
            bars.append(f"(floor {h['floor']})")
        target = " ".join(bars)
        # No target or floor, no verdict (older GPU JSONs stored meets: true without one).
        verdict = "—" if not bars or h.get("meets") is None else (
            "yes" if h["meets"] else "no")
        out.append(f"| `{path.stem}` | {h['name']} | {h['value']} | {target} | "
                   f"{verdict} | {where} | {when} |")
    return out


def main(argv: list[str]) -> int:
    print("\n".join(rows()))
    return 0
