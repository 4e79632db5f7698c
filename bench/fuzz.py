"""Fuzzing, for longer than the tests do: every outcome of hostile inputs, counted.

    python -m bench fuzz            # 2-5 minutes on 2 cores (9,750 cases)
    python -m bench fuzz --quick    # 15-40 s (975 cases)
    python -m bench fuzz --seed 1   # other cases (a seed repeats its cases exactly)

The cases and their runners are the fuzz tests' own (``tests/fuzz/cases.py``, no Ray): the
decoder (real images in every format and odd mode, then damaged or with forged sizes),
ingest sources (zip archives and folders with hostile names, bombs, symlinks), the config
loader (YAML files and ``--set`` strings) and the report (HTML and script in every string).
Per target the JSON holds the cases tried, the inputs they held (a zip or folder holds
several items, each with its own outcome), the outcomes (``decoded``, ``quarantined`` by
reason, ``resolved``, ``config_error``, ``source_error``, ``escaped``), ``tracebacks``
(an exception escaped), ``violations`` (a rule broken without one: a row lost, a file outside
the tree read, a multi-line error, an injected element), the slowest case and the first bad
cases. Headline: tracebacks over all targets, target 0; it meets only with no violations
either.
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections import Counter
from typing import Any

from hypothesis import Phase, given, settings
from hypothesis import seed as hypothesis_seed

from bench.common import write_result
from tests.fuzz.cases import TARGETS, Outcome, Target, fuzz_settings

EXAMPLES = {"decoder": 5000, "sources": 1500, "config": 3000, "report": 250}
QUICK = {"decoder": 500, "sources": 150, "config": 300, "report": 25}


def explore(target: Target, examples: int, seed: int) -> dict[str, Any]:
    """Run ``examples`` cases of ``target`` (generation only: nothing is shrunk) and count
    their outcomes."""
    outcomes: list[Outcome] = []
    bad: list[dict[str, str]] = []
    slowest = [0.0]

    @hypothesis_seed(seed)
    @settings(fuzz_settings(examples, derandomize=False), phases=[Phase.generate])
    @given(target.strategy)
    def run(case: Any) -> None:
        start = time.perf_counter()
        got = target.run(case)
        slowest[0] = max(slowest[0], time.perf_counter() - start)
        outcomes.extend(got)
        bad.extend({"case": repr(case)[:600], "detail": o.detail[-2000:]} for o in got if o.bad)

    start = time.perf_counter()
    run()
    return {"cases": examples, **tally(outcomes), "slowest_case_s": round(slowest[0], 3),
            "seconds": round(time.perf_counter() - start, 1), "bad_cases": bad[:5]}


def tally(outcomes: list[Outcome]) -> dict[str, Any]:
    """``{"inputs": n, kind: n, ..., "quarantined": {reason: n}, "tracebacks": n,
    "violations": n}``."""
    kinds = Counter(o.kind for o in outcomes if not o.bad)
    reasons = Counter(o.detail for o in outcomes if o.kind == "quarantined")
    out: dict[str, Any] = {"inputs": len(outcomes)}
    out.update({kind: n for kind, n in sorted(kinds.items()) if kind != "quarantined"})
    if reasons:
        out["quarantined"] = dict(reasons.most_common())
    out["tracebacks"] = sum(o.kind == "traceback" for o in outcomes)
    out["violations"] = sum(o.kind == "violation" for o in outcomes)
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench fuzz")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    counts = QUICK if args.quick else EXAMPLES
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow's notes on the damage it survives
        results = {name: explore(TARGETS[name], n, args.seed) for name, n in counts.items()}
    tracebacks = sum(r["tracebacks"] for r in results.values())
    violations = sum(r["violations"] for r in results.values())
    write_result("fuzz-quick" if args.quick else "fuzz",
                 {"name": "tracebacks", "value": tracebacks, "target": 0,
                  "meets": tracebacks == 0 and violations == 0},
                 {"seed": args.seed, "violations": violations, "targets": results,
                  "wall_s": round(time.perf_counter() - start, 1)})
    tried = ", ".join(f"{r['cases']:,} {name} cases ({r['inputs']:,} inputs)"
                      for name, r in results.items())
    print(f"fuzz: {tried}: {tracebacks} tracebacks, {violations} violations "
          f"({time.perf_counter() - start:.0f} s)")
    return 0 if tracebacks == 0 and violations == 0 else 1
