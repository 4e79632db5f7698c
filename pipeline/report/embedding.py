"""The report's embedding map: the montage images, embedded by the run's model, in 2-D.

Points are the images the report already fetched for the montages (per cluster the
``report.nearest`` nearest and ``report.random`` random members), stratified per cluster and
capped at ``report.map_points`` in all, so the map costs the same for 10 thousand or 1 billion
images. They are embedded with the run's finished model exactly as the assign engine does
(:func:`pipeline.data.decode.decode_batch`, :func:`pipeline.data.decode.normalize`,
:func:`pipeline.methods.arch.load_model`; CPU, eval mode, no grad), then projected to 2-D.

Projection: PCA to 50 dimensions, then scikit-learn's Barnes-Hut t-SNE (van der Maaten &
Hinton, JMLR 2008), seeded with ``train.seed``. Measured on the 2-core development machine
(64-d L2-normalised features in 30 clusters, sklearn 1.9.1): PCA to 2-D takes 0.02 s (first call) for
1,000 points and 0.004 s for 3,000; PCA-50 + t-SNE 4.3 s and 13.9 s (t-SNE straight on the
64-d features: 4.1 s and 13.4 s). t-SNE separates clusters that PCA's two directions of
largest variance overlap, and at the default ``map_points=3000`` it stays under 15 s, so it
is the layout; PCA first bounds t-SNE's input for wide (512-d, 2048-d) features. At k =
1,000 (3,000 points, small_cnn at 28 px) the whole map costs ~21 s (embedding 5.3 s, t-SNE
15.9 s) and adds ~360 KB to the page; a ResNet at 224 px embeds far slower on CPU, so lower
``report.map_points`` there.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from pipeline.config import Config
from pipeline.data import fs as fsx

if TYPE_CHECKING:
    from pipeline.outputs import RunPaths
    from pipeline.report.data import ClusterView

log = logging.getLogger(__name__)

PCA_DIMS = 50  # t-SNE input size: bounds its cost for wide features (common practice)
MIN_TSNE_POINTS = 10  # fewer points: PCA alone (t-SNE needs perplexity < n)


@dataclass
class EmbeddingMap:
    """The points of the map, all lists of length n (one entry per plotted image)."""

    xy: np.ndarray  # (n, 2) float32, each axis scaled to [0, 1]
    clusters: list[int]  # cluster of each point
    ids: list[str]  # image id of each point
    labels: list[str | None] | None  # ground-truth label of each point; None without labels
    tiles: list[tuple[int, int]]  # (row, col) of the point's tile in its cluster's montage
    method: str  # "t-SNE" or "PCA"
    embed_s: float  # decode + model forward
    project_s: float  # PCA / t-SNE


@dataclass(frozen=True)
class Candidate:
    """One montage image that may become a point."""

    cluster: int
    image_id: str
    data: bytes
    tile: tuple[int, int]  # (row, col) in the cluster's montage sprite


def plan_points(available: Sequence[int], map_points: int) -> list[int]:
    """How many points each cluster gets (clusters in display order, largest first).

    ``available``: (m,) images per cluster. Per-cluster cap = max(2, map_points // m'), m'
    the clusters with any image; the total never exceeds ``map_points``, so when 2 m' >
    map_points the smallest clusters get none. Returns (m,) counts.
    """
    shown = sum(1 for a in available if a > 0)
    cap = max(2, map_points // max(1, shown))
    budget, out = map_points, []
    for a in available:
        take = min(a, cap, budget)
        out.append(take)
        budget -= take
    return out


def candidates(view: ClusterView) -> list[Candidate]:
    """The montage images of one cluster, random members first (they spread over the
    cluster), then the nearest. Tiles follow :func:`pipeline.report.montage.montage`:
    row 0 holds ``nearest`` (when any), the next row ``random``."""
    rand_row = 1 if view.nearest else 0
    rand = [Candidate(view.cluster, i, d, (rand_row, j))
            for j, (i, d) in enumerate(zip(view.random_ids, view.random, strict=True))]
    near = [Candidate(view.cluster, i, d, (0, j))
            for j, (i, d) in enumerate(zip(view.nearest_ids, view.nearest, strict=True))]
    return rand + near


def select(views: Sequence[ClusterView], map_points: int) -> list[Candidate]:
    """Stratified sample of the montage images: at most ``map_points`` (plan_points)."""
    pools = [candidates(v) for v in views]
    counts = plan_points([len(p) for p in pools], map_points)
    return [c for pool, n in zip(pools, counts, strict=True) for c in pool[:n]]


def embed(images: Sequence[bytes], model_bytes: bytes, arch: dict[str, object],
          max_pixels: int, batch_size: int) -> tuple[list[int], np.ndarray]:
    """Features of ``images`` as the assign engine computes them, on CPU, in eval mode.

    Returns (indices of the decoded images, features (n_ok, d) float32); undecodable images
    are skipped.
    """
    import torch

    from pipeline.data.decode import decode_batch, normalize
    from pipeline.distributed.assign import decode_spec_of
    from pipeline.methods.arch import load_model

    spec = decode_spec_of(arch, max_pixels)
    model = load_model(model_bytes, arch, torch.device("cpu"))
    ok: list[int] = []
    parts = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            decoded = decode_batch(images[start:start + batch_size], spec)
            if decoded.ok:
                parts.append(model(normalize(decoded.pixels, spec)).float().numpy())
                ok += [start + i for i in decoded.ok]
    dim = int(parts[0].shape[1]) if parts else 0
    return ok, np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)


def project(features: np.ndarray, seed: int) -> tuple[np.ndarray, str]:
    """(n, d) features -> ((n, 2) float32 scaled to [0, 1] per axis, method name).

    PCA to :data:`PCA_DIMS`, then t-SNE (perplexity 30, or (n - 1) / 3 when smaller, PCA
    initialisation); PCA to 2-D for fewer than :data:`MIN_TSNE_POINTS` points. Deterministic
    for a given seed.
    """
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    x = np.asarray(features, np.float64)
    n = len(x)
    if n < 3:
        return np.full((n, 2), 0.5, np.float32), "PCA"
    reduced = PCA(min(PCA_DIMS, n, x.shape[1]), random_state=seed).fit_transform(x)
    if n < MIN_TSNE_POINTS:
        xy, method = reduced[:, :2], "PCA"
    else:
        tsne = TSNE(2, perplexity=min(30.0, (n - 1) / 3), init="pca", random_state=seed)
        xy, method = tsne.fit_transform(reduced), "t-SNE"
    if xy.shape[1] < 2:
        xy = np.pad(xy, ((0, 0), (0, 2 - xy.shape[1])))
    span = np.ptp(xy, axis=0)
    xy = (xy - xy.min(axis=0)) / np.where(span > 0, span, 1.0)
    return xy.astype(np.float32), method


def build_map(views: Sequence[ClusterView], paths: RunPaths,
              cfg: Config) -> tuple[EmbeddingMap | None, str]:
    """The map of ``views`` (those with montages) and a note; (None, why) without a model."""
    if not fsx.exists(paths.model.join("model.json")):
        return None, "No embedding map: the run has no model/ (model.json)."
    from pipeline.outputs import load_trained

    chosen = select([v for v in views if v.sampled], cfg.report.map_points)
    t0 = time.perf_counter()
    try:
        trained = load_trained(paths)
        ok, features = embed([c.data for c in chosen], trained.model_bytes, trained.arch,
                             cfg.data.max_pixels, cfg.cluster.assign_batch_size)
    except Exception as exc:  # noqa: BLE001 - a broken model must not cost the whole report
        log.warning("report: no embedding map, cannot use the run's model (%s)", exc)
        return None, f"No embedding map: cannot use the run's model ({exc})."
    t1 = time.perf_counter()
    xy, method = project(features, cfg.train.seed)
    t2 = time.perf_counter()
    points = [chosen[i] for i in ok]
    labels_of = {i: lab for v in views for i, lab in v.labels_of.items()}
    emap = EmbeddingMap(
        xy=xy, clusters=[p.cluster for p in points], ids=[p.image_id for p in points],
        labels=[labels_of.get(p.image_id) for p in points] if labels_of else None,
        tiles=[p.tile for p in points], method=method, embed_s=t1 - t0, project_s=t2 - t1)
    log.info("report map: %d points (%d skipped), embed %.1f s, %s %.1f s", len(points),
             len(chosen) - len(points), t1 - t0, method, t2 - t1)
    return emap, _note(emap, len(chosen) - len(points), cfg)


def _note(emap: EmbeddingMap, skipped: int, cfg: Config) -> str:
    bad = f", {skipped} undecodable skipped" if skipped else ""
    return (f"{len(emap.ids):,} montage images{bad} (at most report.map_points="
            f"{cfg.report.map_points:,}, stratified per cluster), embedded by the run's model "
            f"and laid out by {emap.method} (seed {cfg.train.seed}); embedding "
            f"{emap.embed_s:.1f} s, layout {emap.project_s:.1f} s.")
