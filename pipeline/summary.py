"""The compact end-of-run summary table."""

from __future__ import annotations

from typing import Any


def summary_rows(metrics: dict[str, Any], output: str) -> list[tuple[str, str]]:
    sizes = metrics["cluster_sizes"]
    rows = [
        ("output", output),
        ("method", metrics["method"]),
        ("images", f"{metrics['n_images']:,}"),
        ("rejects", f"{metrics['rejects']:,}"),
        ("k", str(metrics["k"])),
        ("cluster sizes", f"min {sizes['min']}  median {sizes['median']:g}  max {sizes['max']}"
                          f"  empty {sizes['empty']}"),
        ("inertia", f"{metrics['inertia']:.4g}"),
    ]
    for key in ("nmi", "acc", "ari"):
        if key in metrics:
            rows.append((key.upper(), f"{metrics[key]:.4f}"))
    rows += [("wall time", f"{metrics['wall_s']:.1f} s"),
             ("throughput", f"{metrics['images_per_s']:.1f} images/s end to end, "
                            f"{metrics['assign_images_per_s']:.1f} images/s assignment")]
    return rows


def print_table(rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    print("\n" + "-" * (width + 40))
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    print("-" * (width + 40))


def print_summary(metrics: dict[str, Any], output: str) -> None:
    print_table(summary_rows(metrics, output))


def assign_rows(result: dict[str, Any]) -> list[tuple[str, str]]:
    """Rows of the ``jobs/assign.py`` summary (``AssignResult.as_dict()``)."""
    rows = [("output", result["output"]),
            ("shards", f"{result['shards']:,} assigned now, {result['shards_skipped']:,} "
                       f"already done, {result['shards_total']:,} in total")]
    if result["shards"]:
        rows += [("images", f"{result['rows']:,}"),
                 ("assigned", f"{result['assigned']:,}"),
                 ("outliers", f"{result['outliers']:,}"),
                 ("rejects", f"{result['rejects']:,}"),
                 ("throughput", f"{result['images_per_s']:.1f} images/s "
                                f"({result['seconds']:.1f} s)")]
    return rows
