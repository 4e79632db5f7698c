"""Everything the report shows, gathered from a finished run directory (local or ``s3://``).

Cluster sizes and the confusion matrix use every assignment row (two small columns). The
montage images come from a bounded sample of shards (``report.sample_rows`` images, chosen
at random with the run's seed): per cluster, the sampled members nearest the centroid and
random others. Only the chosen images' bytes are read, so the report costs the same for
10 thousand or 100 million images; for runs smaller than the sample it is exact.
"""

from __future__ import annotations

import json
import logging
import posixpath
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from pipeline.config import Config
from pipeline.data import fs as fsx
from pipeline.data.fs import Location
from pipeline.outputs import DEMO_INPUT, RunPaths
from pipeline.report.embedding import EmbeddingMap, build_map

log = logging.getLogger(__name__)


@dataclass
class ClusterView:
    """One cluster section: its numbers and the encoded bytes of its sample images."""

    cluster: int
    size: int
    mean_distance: float = float("nan")
    threshold: float | None = None
    top_labels: list[tuple[str, int]] = field(default_factory=list)
    nearest: list[bytes] = field(default_factory=list)
    random: list[bytes] = field(default_factory=list)
    nearest_ids: list[str] = field(default_factory=list)  # ids of ``nearest``, same order
    random_ids: list[str] = field(default_factory=list)  # ids of ``random``, same order
    labels_of: dict[str, str] = field(default_factory=dict)  # id -> label of those images
    sampled: bool = False  # False beyond report.max_montages: listed without a montage


@dataclass
class Confusion:
    """Clusters (rows) x labels (columns) counts, both in display order."""

    clusters: list[int]
    labels: list[str]
    counts: np.ndarray  # (len(clusters), len(labels)) int64


@dataclass
class ReportData:
    run_uri: str
    metrics: dict[str, Any]
    config_text: str
    history: list[dict[str, Any]]
    sizes: np.ndarray  # (k,) int64
    clusters: list[ClusterView]  # every cluster, largest first
    confusion: Confusion | None
    sample_note: str
    embedding: EmbeddingMap | None = None  # the map of the montage images (embedding.py)
    map_note: str = ""


def gather(paths: RunPaths, cfg: Config) -> ReportData:
    table = _read_assignments(paths, ["cluster", "distance", "label"])
    clusters = table.column("cluster").to_numpy().astype(np.int64)
    k = cfg.cluster.k
    sizes = np.bincount(clusters, minlength=k)
    labels = _labels(table)
    views = _cluster_views(clusters, table.column("distance").to_numpy(), labels, sizes,
                           _thresholds(paths))
    note = _attach_samples(views[: cfg.report.max_montages], paths, cfg)
    embedding, map_note = build_map(views[: cfg.report.max_montages], paths, cfg)
    return ReportData(
        run_uri=paths.root.uri,
        metrics=_json(paths.metrics, {}),
        config_text=fsx.read_bytes(paths.config).decode() if fsx.exists(paths.config) else "",
        history=_json(paths.history, []),
        sizes=sizes, clusters=views,
        confusion=None if labels is None else confusion(clusters, labels, sizes),
        sample_note=note, embedding=embedding, map_note=map_note,
    )


def _json(loc: Location, default: Any) -> Any:
    return json.loads(fsx.read_bytes(loc)) if fsx.exists(loc) else default


def _read_assignments(paths: RunPaths, columns: list[str]) -> pa.Table:
    files = [f.path for f in fsx.list_files(paths.assignments, (".parquet",))]
    dataset = pads.dataset(files, filesystem=paths.assignments.fs, format="parquet")
    return dataset.to_table(columns=[c for c in columns if c in dataset.schema.names])


def _labels(table: pa.Table) -> np.ndarray | None:
    if "label" not in table.column_names:
        return None
    return np.asarray([None if v is None else str(v) for v in table.column("label").to_pylist()],
                      dtype=object)


def _thresholds(paths: RunPaths) -> list[float] | None:
    found = _json(paths.outliers, None)
    return None if found is None else list(found["thresholds"])


def _cluster_views(clusters: np.ndarray, distance: np.ndarray, labels: np.ndarray | None,
                   sizes: np.ndarray, thresholds: list[float] | None) -> list[ClusterView]:
    sums = np.bincount(clusters, weights=distance, minlength=len(sizes))
    views = []
    for c in np.argsort(-sizes, kind="stable"):
        view = ClusterView(int(c), int(sizes[c]))
        if sizes[c]:
            view.mean_distance = float(sums[c] / sizes[c])
        if thresholds is not None:
            view.threshold = float(thresholds[c])
        views.append(view)
    if labels is not None:
        _top_labels(views, clusters, labels)
    return views


def _top_labels(views: list[ClusterView], clusters: np.ndarray, labels: np.ndarray) -> None:
    valid = np.array([v is not None for v in labels], dtype=bool)
    names, codes = np.unique(labels[valid].astype(str), return_inverse=True)
    counts = np.zeros((len(views), len(names)), np.int64)
    np.add.at(counts, (clusters[valid], codes), 1)
    for view in views:
        row = counts[view.cluster]
        top = np.argsort(-row, kind="stable")[:3]
        view.top_labels = [(str(names[i]), int(row[i])) for i in top if row[i]]


def confusion(clusters: np.ndarray, labels: np.ndarray, sizes: np.ndarray,
              max_rows: int = 60, max_cols: int = 40) -> Confusion:
    """Counts of (cluster, label): the largest clusters and most frequent labels first."""
    valid = np.array([v is not None for v in labels], dtype=bool)
    names, codes, freq = np.unique(labels[valid].astype(str), return_inverse=True,
                                   return_counts=True)
    full = np.zeros((len(sizes), len(names)), np.int64)
    np.add.at(full, (clusters[valid], codes), 1)
    rows = [int(c) for c in np.argsort(-sizes, kind="stable")[:max_rows]]
    cols = [int(i) for i in np.argsort(-freq, kind="stable")[:max_cols]]
    cols.sort(key=lambda i: _label_key(str(names[i])))
    return Confusion(rows, [str(names[i]) for i in cols], full[np.ix_(rows, cols)])


def _label_key(name: str) -> tuple[int, float, str]:
    try:
        return 0, float(name), name
    except ValueError:
        return 1, 0.0, name


# --------------------------------------------------------------------------------------------
# Montage samples.


def _attach_samples(views: list[ClusterView], paths: RunPaths, cfg: Config) -> str:
    """Fill ``nearest``/``random`` image bytes from a sample of shards; returns a note."""
    files = fsx.list_files(paths.assignments, (".parquet",))
    rng = np.random.default_rng(cfg.train.seed)
    order = rng.permutation(len(files))
    picked, rows = [], 0
    for i in order:
        if rows >= cfg.report.sample_rows:
            break
        picked.append(files[i].path)
        rows += pq.read_metadata(files[i].path, filesystem=paths.assignments.fs).num_rows
    wanted = _choose(views, paths, picked, cfg, rng)
    images = _fetch_images(paths, cfg, wanted)
    for view in views:
        view.sampled = True
        near, rand = wanted["by_cluster"].get(view.cluster, ([], []))
        view.nearest_ids = [i for i in near if i in images]
        view.random_ids = [i for i in rand if i in images]
        view.nearest = [images[i] for i in view.nearest_ids]
        view.random = [images[i] for i in view.random_ids]
        view.labels_of = {i: wanted["label_of"][i] for i in near + rand
                          if wanted["label_of"].get(i) is not None}
    return (f"Montages sample {rows:,} images from {len(picked)} of {len(files)} shards "
            f"(report.sample_rows={cfg.report.sample_rows:,}).")


def _choose(views: list[ClusterView], paths: RunPaths, picked: list[str], cfg: Config,
            rng: np.random.Generator) -> dict[str, Any]:
    """Ids to show per cluster, and which shard (relative path) holds each id."""
    root = paths.assignments.path.rstrip("/")
    tables = []
    for path in picked:
        names = pq.read_schema(path, filesystem=paths.assignments.fs).names
        t = pq.read_table(path, filesystem=paths.assignments.fs,
                          columns=[c for c in ("id", "cluster", "distance", "label")
                                   if c in names])
        tables.append(t.append_column("rel", pa.array([posixpath.relpath(path, root)]
                                                      * t.num_rows, pa.string())))
    if not tables:
        return {"by_cluster": {}, "shard_of": {}, "label_of": {}}
    sample = pa.concat_tables(tables)
    ids = np.asarray(sample.column("id").to_pylist(), dtype=object)
    cl = sample.column("cluster").to_numpy()
    dist = sample.column("distance").to_numpy()
    shown = {v.cluster for v in views}
    by_cluster: dict[int, tuple[list[str], list[str]]] = {}
    for c in np.unique(cl):
        if int(c) not in shown:
            continue
        members = np.flatnonzero(cl == c)
        members = members[np.argsort(dist[members], kind="stable")]
        near, rest = members[: cfg.report.nearest], members[cfg.report.nearest:]
        rand = rng.choice(rest, size=min(cfg.report.random, len(rest)), replace=False)
        by_cluster[int(c)] = (list(ids[near]), list(ids[np.sort(rand)]))
    rel = np.asarray(sample.column("rel").to_pylist(), dtype=object)
    chosen = {i for near, rand in by_cluster.values() for i in near + rand}
    shard_of = {ids[j]: rel[j] for j in range(len(ids)) if ids[j] in chosen}
    return {"by_cluster": by_cluster, "shard_of": shard_of,
            "label_of": _labels_of(sample, ids, chosen)}


def _labels_of(sample: pa.Table, ids: np.ndarray, chosen: set[str]) -> dict[str, str | None]:
    """Label of each chosen id (for the map's colour-by-label); empty without labels."""
    if "label" not in sample.column_names:
        return {}
    labels = sample.column("label").to_pylist()
    return {ids[j]: None if labels[j] is None else str(labels[j])
            for j in range(len(ids)) if ids[j] in chosen}


def _fetch_images(paths: RunPaths, cfg: Config, wanted: dict[str, Any]) -> dict[str, bytes]:
    """Encoded bytes of the chosen ids, read from the run's input shards."""
    source = fsx.locate(cfg.data.input or DEMO_INPUT, cfg.s3)
    by_shard: dict[str, list[str]] = {}
    for image_id, rel in wanted["shard_of"].items():
        by_shard.setdefault(rel, []).append(image_id)
    single_file = fsx.info(source).type.name == "File"
    out: dict[str, bytes] = {}
    for rel, ids in by_shard.items():
        loc = source if single_file else source.join(rel)
        try:
            table = pq.read_table(loc.path, filesystem=loc.fs, columns=["id", "image"],
                                  filters=pc.field("id").isin(ids))
        except (OSError, pa.ArrowInvalid) as exc:
            log.warning("report: cannot read %s for montages (%s)", loc.uri, exc)
            continue
        out.update(zip(table.column("id").to_pylist(), table.column("image").to_pylist(),
                       strict=True))
    return out
