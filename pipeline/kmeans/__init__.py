"""Pure k-means math (no Ray): batch statistics, mini-batch updates, the reference store.

* :mod:`.stats` (torch, CPU/GPU): ``assign``, ``partial_stats``, ``drift_stats``: the
  summable per-batch statistics (faiss ``contrib/clustering.py`` pattern).
* :mod:`.minibatch` (numpy): ``minibatch_update`` (Sculley 2010), ``apply_drift``
  (Hsu & Lin 2017), ``Reservoir``, ``reseed_starved``, ``split_empty`` (faiss, DeepCluster).
* :mod:`.drift`: ``DriftProbe``, the held-out per-cluster sample drift is measured on.
* :mod:`.store`: ``CentroidStore``, the in-process centroid-server protocol (v2).
* :mod:`.reference`: ``faiss_kmeans``, ``inertia``, ``minibatch_kmeans`` for parity checks.
"""

from pipeline.kmeans.minibatch import (
    Reservoir,
    apply_drift,
    minibatch_update,
    reseed_starved,
    split_empty,
    starved_clusters,
)
from pipeline.kmeans.reference import faiss_kmeans, inertia, minibatch_kmeans
from pipeline.kmeans.stats import assign, drift_stats, partial_stats, sq_distances
from pipeline.kmeans.store import CentroidStore

__all__ = [
    "CentroidStore",
    "Reservoir",
    "apply_drift",
    "assign",
    "drift_stats",
    "faiss_kmeans",
    "inertia",
    "minibatch_kmeans",
    "minibatch_update",
    "partial_stats",
    "reseed_starved",
    "split_empty",
    "sq_distances",
    "starved_clusters",
]
