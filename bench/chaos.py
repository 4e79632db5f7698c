"""Chaos run: random SIGKILLs of a clustering run's processes, then nothing may be lost.

    python -m bench chaos              # MNIST test split, >= 20 kills (README table)
    python -m bench chaos --quick      # the embedded digits, 6 kills, a few minutes
    python -m bench chaos --kills 30 --seed 1
    python -m bench chaos --kinds centroid_server,driver   # only these kinds

It runs the main job and then the assign job as a user would (``python jobs/...``, each
with a private local cluster), and while they run it kills, with SIGKILL, at seeded random
times, a random process of the run: a Ray Train worker, the centroid server, an assignment
actor, a Ray Data task worker or the driver itself. A killed driver's command is started
again, as a scheduler would. A run's processes are found by its private ``RAY_TMPDIR``;
kinds are picked among those alive at that moment, the least-killed first.

At the end every input id must be in ``assignments/`` exactly once or in ``rejects/`` (for
the main job and for the assign job), ``metrics.json`` must be complete, and NMI within 0.05
of an unkilled run with the same seed, run first in the same script.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from bench.common import REPO, SHARED, need, write_result

WORK = REPO / "work" / "chaos"
KINDS = ("train_worker", "centroid_server", "assign_actor", "data_task", "driver")
MIN_KILLS = 20  # the full run's floor (a job that ends early leaves the rest of the budget)
DRIVER_WEIGHT = 0.5  # a driver kill costs a whole restart; pick it less often
METRIC_KEYS = ("n_images", "k", "method", "wall_s", "images_per_s", "rejects", "cluster_sizes",
               "nmi", "acc", "ari")
# From scratch on 2 cores: MNIST as bench/quality.py runs it, the digits as the demo does,
# but streaming (no data.cache_decoded), so Ray Data tasks decode throughout training.
# train.deterministic makes the unkilled reference reproducible, so the NMI gap measures the
# kills rather than Ray Data's block order (without it: bench/results/
# chaos-nondeterministic.json).
MNIST = ["model.width=16", "scale.threads_per_worker=2", "train.deterministic=true"]
DIGITS = ["data.image_size=16", "model.width=16", "scale.threads_per_worker=2",
          "train.epochs=3", "report.map_points=300"]


def classify(title: str) -> str | None:
    """The kind of a Ray process from its title (``ray::Class.method`` / ``ray::Op->Op``)."""
    if not title.startswith("ray::"):
        return None
    if "RayTrainWorker" in title:
        return "train_worker"
    if "CentroidServer" in title:
        return "centroid_server"
    if "MapWorker" in title:
        return "assign_actor" if "Assign" in title else "data_task"
    if any(op in title for op in ("ReadParquet", "MapBatches", "ReadFiles", "Repartition")):
        return "data_task"
    return None


def processes(tmpdir: str) -> dict[str, list[psutil.Process]]:
    """The live processes of the run whose ``RAY_TMPDIR`` is ``tmpdir``, by kind."""
    found: dict[str, list[psutil.Process]] = {}
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("RAY_TMPDIR") != tmpdir:
                continue
            kind = classify(" ".join(proc.cmdline()))
        except psutil.Error:
            continue
        if kind:
            found.setdefault(kind, []).append(proc)
    return found


@dataclass
class Monkey:
    """Seeded kills: when (uniform in ``interval``), which kind, which process."""

    seed: int
    budget: int
    interval: tuple[float, float]
    kinds: tuple[str, ...] = KINDS
    kills: Counter = field(default_factory=Counter)
    events: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    @property
    def left(self) -> int:
        return self.budget - sum(self.kills.values())

    def wait(self) -> float:
        return self.rng.uniform(*self.interval)

    def pick(self, alive: dict[str, list[psutil.Process]]) -> str | None:
        """A kind among those alive now, the least-killed favoured; the driver only once the
        run is working (one of its workers is alive), so a kill never lands in start-up
        alone."""
        working = [k for k in KINDS if k != "driver" and alive.get(k)]
        kinds = [k for k in working if k in self.kinds]
        kinds += ["driver"] if working and "driver" in self.kinds else []
        if not kinds:
            return None
        weights = [(DRIVER_WEIGHT if k == "driver" else 1.0) / (1 + self.kills[k])
                   for k in kinds]
        return self.rng.choices(kinds, weights)[0]


def run_with_kills(cmd: list[str], monkey: Monkey | None, log: Path,
                   max_attempts: int = 40) -> dict[str, Any]:
    """Run ``cmd`` to success, killing its processes per ``monkey``; re-run after a driver
    kill or a failure. Returns the wall time and the attempts."""
    start, attempts = time.perf_counter(), 0
    while attempts < max_attempts:
        attempts += 1
        tmpdir = tempfile.mkdtemp(prefix="chaos-", dir="/tmp")  # short: socket path limits
        env = {**_clean_env(), "RAY_TMPDIR": tmpdir}
        with open(log, "a") as out:
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=out)
            _haunt(proc, tmpdir, monkey)
        if proc.returncode == 0:
            return {"wall_s": round(time.perf_counter() - start, 1), "attempts": attempts}
        _wait_for_cleanup(tmpdir)
    raise RuntimeError(f"{cmd[1]} did not finish in {max_attempts} attempts; see {log}")


def _haunt(proc: subprocess.Popen, tmpdir: str, monkey: Monkey | None) -> None:
    """Kill processes of ``proc``'s run until it ends or the budget is spent."""
    if monkey is None:
        proc.wait()
        return
    while proc.poll() is None and monkey.left > 0:
        deadline = time.monotonic() + monkey.wait()
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        kind = None
        while proc.poll() is None and kind is None:  # short tasks: look again every 0.2 s
            alive = processes(tmpdir)
            kind = monkey.pick(alive)
            time.sleep(0.2 if kind is None else 0)
        if kind is not None and proc.poll() is None:
            _kill(proc, kind, alive, monkey)
    proc.wait()


def _kill(proc: subprocess.Popen, kind: str, alive: dict[str, list[psutil.Process]],
          monkey: Monkey) -> None:
    victim = psutil.Process(proc.pid) if kind == "driver" else monkey.rng.choice(alive[kind])
    try:
        victim.kill()
    except psutil.Error:
        return
    monkey.kills[kind] += 1
    monkey.events.append({"t": round(time.time(), 1), "kind": kind, "pid": victim.pid})
    if kind == "driver":
        proc.wait()


def _wait_for_cleanup(tmpdir: str, timeout_s: float = 60) -> None:
    """The dead driver's reaper kills its cluster; wait for that before the re-run."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not any(_env_of(p).get("RAY_TMPDIR") == tmpdir for p in psutil.process_iter()):
            return
        time.sleep(0.5)


def _env_of(proc: psutil.Process) -> dict[str, str]:
    try:
        return proc.environ()
    except psutil.Error:
        return {}


def _clean_env() -> dict[str, str]:
    """A user's environment: no cluster address (each job starts its own)."""
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


def input_ids(shards: str) -> list[str]:
    import pyarrow.dataset as pads

    return pads.dataset(shards, format="parquet").to_table(columns=["id"])["id"].to_pylist()


def accounting(ids: list[str], out: Path) -> dict[str, int]:
    """Rows lost (in no output) and duplicated (assigned more than once, or both assigned
    and rejected) under ``out``'s ``assignments/`` and ``rejects/``."""
    import pyarrow.dataset as pads

    def read(sub: str) -> list[str]:
        if not (out / sub).exists():
            return []
        return pads.dataset(str(out / sub), format="parquet").to_table(
            columns=["id"])["id"].to_pylist()

    assigned, rejected = read("assignments"), read("rejects")
    seen = Counter(assigned) + Counter(rejected)
    return {"rows_in": len(ids), "assigned": len(assigned), "rejected": len(rejected),
            "lost": sum(1 for i in set(ids) if i not in seen),
            "duplicated": sum(n - 1 for n in seen.values() if n > 1)}


def main_cmd(shards: str, out: Path, seed: int, settings: list[str], kills: int) -> list[str]:
    sets = [a for s in settings + [f"train.seed={seed}", f"scale.max_failures={kills + 3}"]
            for a in ("--set", s)]
    return [sys.executable, "jobs/cluster_imagenet.py", "--input", shards, "--output",
            str(out), "--k", "10", *sets]


def chaos(shards: str, settings: list[str], kills: int, seed: int, work: Path,
          reference: bool = True, kinds: tuple[str, ...] = KINDS) -> dict[str, Any]:
    """The unkilled reference run (optional), the killed main job, the killed assign job."""
    import json
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    log, ids = work / "jobs.log", input_ids(shards)
    result: dict[str, Any] = {"input": shards, "seed": seed, "settings": settings}
    if reference:
        result["reference"] = run_with_kills(
            main_cmd(shards, work / "clean", seed, settings, kills), None, log)
        result["reference"]["nmi"] = json.loads((work / "clean" / "metrics.json").read_text())["nmi"]
    main_kills = max(1, kills - max(1, kills // 5))
    monkey = Monkey(seed, main_kills, _interval(len(ids)), kinds=kinds)
    result["main"] = run_with_kills(main_cmd(shards, work / "run", seed, settings, kills),
                                    monkey, log)
    metrics = json.loads((work / "run" / "metrics.json").read_text())
    result["main"].update(kills=dict(monkey.kills), events=monkey.events,
                          missing_metrics=[k for k in METRIC_KEYS if k not in metrics],
                          nmi=metrics.get("nmi"), **accounting(ids, work / "run"))
    assign = Monkey(seed + 1, kills - main_kills, (2.0, 6.0),
                    kinds=tuple(k for k in ("assign_actor", "data_task", "driver")
                                if k in kinds) or ("driver",))
    cmd = [sys.executable, "jobs/assign.py", "--run", str(work / "run"), "--input", shards,
           "--output", str(work / "assigned")]
    result["assign"] = run_with_kills(cmd, assign, log)
    result["assign"].update(kills=dict(assign.kills), events=assign.events,
                            **accounting(ids, work / "assigned"))
    return result


def _interval(n: int) -> tuple[float, float]:
    """Seconds between kills: long enough for a restarted worker group to make progress."""
    return (8.0, 16.0) if n < 5000 else (8.0, 20.0)


def summarise(result: dict[str, Any]) -> dict[str, Any]:
    main, assign = result["main"], result["assign"]
    kills = Counter(main["kills"]) + Counter(assign["kills"])
    lost = main["lost"] + assign["lost"]
    dup = main["duplicated"] + assign["duplicated"]
    ref = result.get("reference")
    summary = {"kills": sum(kills.values()), "kills_by_kind": dict(kills), "rows_lost": lost,
               "duplicates": dup, "metrics_complete": not main["missing_metrics"],
               "nmi": main["nmi"], "nmi_unkilled": ref["nmi"] if ref else None,
               "extra_wall_s": round(main["wall_s"] - ref["wall_s"], 1) if ref else None,
               "driver_restarts": main["attempts"] - 1 + assign["attempts"] - 1}
    summary["nmi_gap"] = (round(abs(main["nmi"] - ref["nmi"]), 4) if ref else None)
    return summary


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench chaos", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the digits, 6 kills")
    p.add_argument("--kills", type=int, help="kills in all (default 24; --quick 6)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kinds", default=",".join(KINDS),
                   help=f"what to kill, comma-separated (default: all of {','.join(KINDS)})")
    args = p.parse_args(argv)
    kinds = tuple(k for k in args.kinds.split(",") if k)
    if not kinds or set(kinds) - set(KINDS):
        p.error(f"--kinds: choose among {','.join(KINDS)}; got {args.kinds}")
    kills = args.kills or (6 if args.quick else 24)
    shards, settings = _data(args.quick)
    result = chaos(shards, settings, kills, args.seed, WORK / ("quick" if args.quick else "full"),
                   kinds=kinds)
    s = summarise(result)
    floor = kills if args.quick else min(kills, MIN_KILLS)
    meets = (s["rows_lost"] == 0 and s["duplicates"] == 0 and s["metrics_complete"]
             and s["kills"] >= floor and (s["nmi_gap"] is None or s["nmi_gap"] <= 0.05))
    headline = {"name": "rows lost + duplicated after kills", "value": s["rows_lost"] +
                s["duplicates"], "target": 0, "meets": meets}
    path = write_result("chaos-quick" if args.quick else "chaos", headline,
                        {"summary": s, **result})
    print(f"chaos: {s['kills']} kills {s['kills_by_kind']}, lost {s['rows_lost']}, "
          f"duplicated {s['duplicates']}, NMI {s['nmi']} (unkilled {s['nmi_unkilled']}), "
          f"extra {s['extra_wall_s']} s -> {path}")
    return 0 if meets else 1


def _data(quick: bool) -> tuple[str, list[str]]:
    """Shards of the digits or of MNIST, ingested once by the ingest job."""
    source = "sklearn-digits" if quick else f"idx:{need(SHARED / 'mnist')}"
    out = str(WORK / ("digits" if quick else "mnist"))
    ingest_job(source, out)
    return out, DIGITS if quick else MNIST


def ingest_job(source: str, out: str) -> None:
    subprocess.run([sys.executable, "jobs/ingest.py", "--source", source, "--output", out],
                   cwd=REPO, check=True, env=_clean_env(), capture_output=True)
