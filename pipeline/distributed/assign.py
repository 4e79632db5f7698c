"""Assignment pass: Ray Data ``map_batches`` with an actor pool holding model and centroids.

Each actor loads the model once (GPU when the run has one), embeds decoded images and assigns
them to the nearest centroid. Output rows: ``id``, ``cluster`` (int32), ``distance`` (euclidean
to the assigned centroid), ``margin`` (second-best minus best distance) and ``label`` when the
input has one (DESIGN §3).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pipeline.config import Config
from pipeline.data.fs import Location
from pipeline.data.reader import decode_spec, read_images
from pipeline.distributed.runtime import pin_threads
from pipeline.kmeans.stats import assign
from pipeline.models.arch import load_model, model_arch


class AssignActor:
    """Stateful Ray Data UDF: decoded rows -> assignment rows."""

    def __init__(self, model_bytes: bytes, arch: dict[str, Any], centroids: np.ndarray,
                 threads: float = 1.0):
        pin_threads(threads)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_model(model_bytes, arch, self.device)
        if self.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.centroids = torch.from_numpy(np.array(centroids, np.float32)).to(self.device)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        x = torch.from_numpy(np.ascontiguousarray(batch["pixels"])).to(self.device)
        with torch.inference_mode():
            labels, sqdist, second = assign(self.model(x).float(), self.centroids)
        best, runner_up = sqdist.sqrt(), second.sqrt()
        out = {"id": batch["id"], "cluster": labels.to(torch.int32).cpu().numpy(),
               "distance": best.cpu().numpy().astype(np.float32),
               "margin": (runner_up - best).cpu().numpy().astype(np.float32)}
        if "label" in batch:
            out["label"] = batch["label"]
        return out


def assignment_dataset(cfg: Config, input_uri: str, model_bytes: bytes, centroids: np.ndarray,
                       rejects: Location | None) -> Any:
    """Lazy dataset of assignment rows for every decodable image under ``input_uri``."""
    import ray.data

    images = read_images(input_uri, decode_spec(cfg), s3=cfg.s3, rejects=rejects,
                         batch_size=cfg.data.decode_batch_size)
    cpus = 0.5 if cfg.scale.gpu else 1.0
    return images.map_batches(
        AssignActor,
        fn_constructor_kwargs={"model_bytes": model_bytes, "arch": model_arch(cfg),
                               "centroids": centroids.astype(np.float32), "threads": cpus},
        batch_size=cfg.cluster.assign_batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=cfg.scale.assign_actors),
        num_cpus=cpus, num_gpus=1 if cfg.scale.gpu else 0,
    )
