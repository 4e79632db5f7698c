"""Pure k-means math (no Ray): batch statistics, mini-batch updates, the reference store."""

from pipeline.kmeans.minibatch import (
    Reservoir,
    apply_drift,
    minibatch_update,
    reseed_starved,
    split_empty,
)
from pipeline.kmeans.stats import assign, drift_stats, partial_stats
from pipeline.kmeans.store import CentroidStore

__all__ = ["CentroidStore", "Reservoir", "apply_drift", "assign", "drift_stats",
           "minibatch_update", "partial_stats", "reseed_starved", "split_empty"]
