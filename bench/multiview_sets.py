"""``multiview.weighting`` across view sets: is a default's win one set's accident?

    python -m bench multiview_sets        # after python -m bench multiview (its saved runs)
    python -m bench multiview_sets --view-budget 240   # after a call with that budget
    python -m bench multiview_sets --alone   # each view alone through the fusion network

On the view passes that ``python -m bench multiview`` saved (MNIST and the CIFAR-10
subset, no image is read), the fusion is replayed in this process for every view set, the
whole set and each set with one view left out, with each weighting of :data:`WEIGHTINGS`
and each ``train.seed`` of :data:`SEEDS`, everything else at the run's config. Per set:
the best single view's NMI (k-means on its whitened features, as in the run) and each
weighting's NMI per seed; per weighting: its mean gain over the best single view, and
over how many (set, seed) pairs it beat the other.

Headline: the default weighting's mean CIFAR-10 gain over the best single view across the
sets and seeds.

With ``--alone`` (``multiview-alone.json``), the sets are the whole set and each view alone,
with the default weighting only (one view has weight 1 under any weighting): the fusion
network on one view is a deep clusterer of that view (its branch, DEC), so this separates
what the views' fusion adds from what the network adds over k-means on a view. Headline:
the whole set's CIFAR-10 seed mean minus the best view-alone seed mean (> 0: the fusion
beats the network on any one view).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from bench.common import write_result
from bench.multiview import VIEW_BUDGET_S, WORK, replay_fusion, run_config, run_tag

WEIGHTINGS = ("gated", "gap")
SEEDS = (0, 1, 2)
DATASETS = ("mnist", "cifar10")
IMAGES = 10_000


def view_sets(views: list[str], alone: bool = False) -> list[tuple[str, list[str]]]:
    """(label, entries): the whole set, then each set with one view left out (``alone``:
    each view by itself)."""
    from pipeline.methods import multiview as mv

    names = mv.view_names([mv.parse_view(v) for v in views])
    if alone:
        return [("all", views)] + [(f"only {names[i]}", [views[i]]) for i in range(len(views))]
    return [("all", views)] + [(f"without {names[i]}", views[:i] + views[i + 1:])
                               for i in range(len(views))]


def set_rows(dataset: str, budget: float, alone: bool, weightings: tuple[str, ...]
             ) -> list[dict[str, Any]] | dict[str, str]:
    """A row per view set (:func:`view_sets`) of ``dataset``'s saved run (views of
    ``budget`` seconds): per weighting its NMI per seed and their mean."""
    run = WORK / "runs" / run_tag(dataset, IMAGES, budget)
    if not (run / "config.yaml").exists():
        return {"skipped": f"{run} is absent: run python -m bench multiview "
                           f"--view-budget {budget:g} first"}
    views = list(run_config(run).multiview.views)
    rows = []
    for label, entries in view_sets(views, alone):
        row: dict[str, Any] = {"set": label, "views": len(entries)}
        for weighting in weightings:
            nmis = []
            for seed in SEEDS:
                cfg = run_config(run, [f"multiview.views={entries}",
                                       f"multiview.weighting={weighting}",
                                       f"train.seed={seed}"])
                table = replay_fusion(cfg, run)
                row["best_single"] = max(r["nmi"] for r in table if r.get("entry"))
                nmis.append(table[-1]["nmi"])
            row[f"{weighting}_mean"] = round(sum(nmis) / len(nmis), 4)
            row[weighting] = nmis
            print(f"  {dataset} {label}: {weighting} {nmis} (best view "
                  f"{row['best_single']:.3f})", flush=True)
        rows.append(row)
    return rows


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per weighting: the mean gain over the best single view and its wins over the other."""
    out: dict[str, Any] = {}
    for w in WEIGHTINGS:
        gains = [n - r["best_single"] for r in rows for n in r[w]]
        other = next(o for o in WEIGHTINGS if o != w)
        wins = sum(a > b for r in rows for a, b in zip(r[w], r[other], strict=True))
        out[w] = {"mean_gain": round(sum(gains) / len(gains), 4),
                  "min_gain": round(min(gains), 4), "wins": wins, "pairs": len(gains)}
    return out


def alone_summary(rows: list[dict[str, Any]], weighting: str) -> dict[str, Any]:
    """The whole set's seed mean against the best view-alone seed mean."""
    key = f"{weighting}_mean"
    whole = next(r for r in rows if r["set"] == "all")
    best = max((r for r in rows if r is not whole), key=lambda r: r[key])
    return {"all_mean": whole[key], "best_alone": best["set"], "best_alone_mean": best[key],
            "all_minus_best_alone": round(whole[key] - best[key], 4),
            "best_single_kmeans": whole["best_single"]}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench multiview_sets")
    p.add_argument("--view-budget", type=float, default=VIEW_BUDGET_S,
                   help="the view budget of the bench multiview call whose runs to replay")
    p.add_argument("--alone", action="store_true",
                   help="each view alone through the fusion network (multiview-alone.json)")
    args = p.parse_args(argv)
    from pipeline.config import MultiviewConfig

    default = MultiviewConfig().weighting
    weightings = (default,) if args.alone else WEIGHTINGS
    results: dict[str, Any] = {}
    for dataset in DATASETS:
        started = time.monotonic()
        rows = set_rows(dataset, args.view_budget, args.alone, weightings)
        results[f"{dataset}-{IMAGES}"] = (
            {"sets": rows,
             "summary": alone_summary(rows, default) if args.alone else summary(rows),
             "wall_s": round(time.monotonic() - started, 1)}
            if isinstance(rows, list) else rows)
    got = results[f"cifar10-{IMAGES}"].get("summary", {})
    if args.alone:
        name, value = "multiview-alone", got.get("all_minus_best_alone")
        head = {"name": "cifar10_multiview_minus_best_view_alone_through_the_network",
                "value": value, "target": 0.0, "meets": value is not None and value > 0}
    else:
        name, value = "multiview-sets", got.get(default, {}).get("mean_gain")
        head = {"name": "cifar10_multiview_mean_gain_over_best_view_across_view_sets",
                "value": value, "target": 0.05, "floor": 0.02,
                "meets": value is not None and value >= 0.02}
    head["weighting"] = default
    path = write_result(name, head, {"datasets": results, "seeds": list(SEEDS),
                                     "view_budget_s": args.view_budget})
    print(f"multiview_sets: {head} -> {path}")
    return 0
