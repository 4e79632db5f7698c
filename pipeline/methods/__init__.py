"""The methods' registry (DESIGN §5): one entry per clustering method, loaded lazily.

``run()``, the command line and config validation all go through :func:`get`, so an unknown
or not-yet-implemented method is refused everywhere with the list of those available. This
module is a leaf (no torch, no config import), so the config can validate against it.

A method is one module in this package (its algorithm, no Ray), a config section, and one
:class:`MethodInfo` line in :data:`REGISTRY`. Each entry names:

* ``module``: the algorithm, plain PyTorch/numpy;
* ``stages``: ``module:function`` ``(cfg) -> generator of stages`` (:mod:`pipeline.methods.base`),
  which the shared runners execute: :func:`pipeline.distributed.runner.train_stages` on Ray,
  :func:`pipeline.methods.reference.run_reference` in one process. :func:`staged` writes
  such a line; every method is written so;
* ``trainer``: ``module:function`` with signature ``(cfg, input_uri, paths) -> TrainedModel``
  that trains it on Ray (:mod:`pipeline.distributed`); the export is a model and centroids
  such that nearest-centroid assignment is the method's own cluster rule, so the assign job,
  outliers, metrics and the report need nothing per method;
* ``arch``: optional ``module:function`` ``(cfg, arch) -> arch`` that adapts the backbone's
  architecture record (:func:`pipeline.models.arch.backbone_arch`) to the method
  (:mod:`pipeline.methods.arch`);
* ``reads``: the method-specific settings it uses (:data:`METHOD_SETTINGS`), so a changed
  setting that the chosen method ignores is named in a warning (:func:`ignored_settings`);
* ``kinds``: model kinds of its own (``model.json``'s ``kind``) that ``module:build_model``
  ``(arch) -> nn.Module`` builds, so ``model/`` of a finished run loads anywhere
  (:func:`pipeline.methods.arch.load_model`) without a line outside the method;
* ``defaults``: its own defaults of shared settings, as (dotted key, value) pairs: a layer
  between the dataclass defaults and everything given (a job's base, a YAML file, flags,
  ``--set``), so ``--epochs`` still wins (:func:`pipeline.config.resolve`);
* ``check``: optional ``module:function`` ``(cfg) -> None``, a preflight that ``run()`` calls
  before any work (multiview reads its views: a missing run or misfit weights stop here).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline.dotted import flat, matches
from pipeline.errors import ConfigError

if TYPE_CHECKING:
    from pipeline.config import Config


STAGE_RUNNER = "pipeline.distributed.runner:train_stages"


@dataclass(frozen=True)
class MethodInfo:
    name: str
    paper: str
    module: str
    trainer: str
    reads: tuple[str, ...]
    arch: str | None = None
    stages: str | None = None  # "module:function" (cfg) -> stage generator (methods.base)
    kinds: tuple[str, ...] = ()  # model kinds that module:build_model builds
    defaults: tuple[tuple[str, Any], ...] = ()  # (dotted key, value) of shared settings
    check: str | None = None  # "module:function" (cfg) -> None, before any work

    def check_fn(self) -> Callable[..., Any] | None:
        return load(self.check) if self.check else None

    def train_fn(self) -> Callable[..., Any]:
        return load(self.trainer)

    def stages_fn(self) -> Callable[..., Any]:
        if self.stages is None:
            raise NotImplementedError(f"method {self.name} is not on the stage runner yet")
        return load(self.stages)


def staged(name: str, paper: str, module: str, reads: tuple[str, ...] = (),
           arch: str | None = None, kinds: tuple[str, ...] = (),
           defaults: tuple[tuple[str, Any], ...] = (), check: bool = False) -> MethodInfo:
    """The registry line of a method written as stages (:mod:`pipeline.methods.base`):
    ``module`` defines ``stages(cfg)`` (and, with ``check``, ``check(cfg)``); the shared
    stage runner trains it on Ray."""
    return MethodInfo(name, paper, module, STAGE_RUNNER, reads, arch, f"{module}:stages",
                      kinds, defaults, f"{module}:check" if check else None)


# Settings that only some methods use: whole sections (a trailing dot) or single keys.
_CENTROID_SERVER = ("cluster.centroid_window", "cluster.sync_every", "cluster.max_staleness",
                    "cluster.drift_compensation",
                    "cluster.drift_probe", "cluster.drift_probe_max", "cluster.drift_chunk",
                    "cluster.drift_smoothing", "cluster.reseed_every", "cluster.reseed_ratio",
                    "cluster.reservoir_size", "cluster.persist_every", "scale.centroid_shards",
                    "debug.kill_server_at_round")

# Full feature passes and k-means over them (DeepCluster's section holds them).
_FEATURE_PASSES = ("deepcluster.local_max_points", "deepcluster.kmeans_shards",
                   "deepcluster.feature_dtype", "deepcluster.max_feature_memory_fraction")

REGISTRY: dict[str, MethodInfo] = {
    "online": staged(
        "online", "Hsu & Lin 2017", "pipeline.methods.online",
        reads=("online.", "train.warmup_epochs", "train.precise_bn_images",
               *_CENTROID_SERVER),
        # A narrow small_cnn (16-32-64 channels): on a 10,000-image CIFAR-10 subset (10
        # epochs, 3 seeds) NMI 0.136 on average against 0.126 at the shared 32, in half the
        # time; on MNIST one seed did better at 32 (0.695 against 0.558). README, "online on
        # a CIFAR-10 subset". 20 epochs: with cluster.centroid_window the runs still gain
        # after the 10th (README, "online with the centroid window").
        defaults=(("model.width", 16), ("train.epochs", 20))),
    "deepcluster": staged(
        "deepcluster", "Caron et al. 2018", "pipeline.methods.deepcluster",
        reads=("deepcluster.", "train.lr_schedule"),
        arch="pipeline.methods.deepcluster:adapt_arch"),
    "depict": staged(
        "depict", "Dizaji et al. 2017", "pipeline.methods.depict",
        reads=("depict.", *_FEATURE_PASSES),
        arch="pipeline.methods.depict:adapt_arch", kinds=("depict",),
        # 25 joint epochs (rounds): on the 10,000 MNIST test digits NMI reaches its plateau
        # (~0.86) by round 7 and holds it; 15 pretraining epochs plus 25 rounds took 8 of
        # issue 14's 15 minutes on the 2-core CPU (bench/depict.py, README).
        defaults=(("train.epochs", 25),)),
    "imc": staged(
        "imc", "Ntelemis et al. 2021", "pipeline.methods.imc",
        reads=("imc.", "train.precise_bn_images"),
        arch="pipeline.methods.imc:adapt_arch", kinds=("imc",),
        # 18 epochs of the 10,000 MNIST test digits: ~13 min of training at the measured
        # ~240 images/s on the 2-core CPU, inside issue 15's 15 minutes for the whole run
        # (bench/imc.py; 20 took 877 s); the shared 10 would leave 6 of them unused.
        defaults=(("train.epochs", 18), ("train.batch_size", 128))),
    "multiview": staged(
        "multiview", "Guérin et al. 2021", "pipeline.methods.multiview",
        reads=("multiview.", *_FEATURE_PASSES), kinds=("multiview", "multiview_view"),
        # train.epochs counts DEC epochs over the feature arrays (cheap: an MLP on n x 64 v
        # floats), not image epochs; DEC/IDEC train ~200 epochs of MNIST, tol usually stops
        # earlier.
        defaults=(("train.epochs", 100),), check=True),
}
PLANNED: tuple[str, ...] = ()  # methods named in the design, not built yet
METHOD_SETTINGS = tuple(dict.fromkeys(key for m in REGISTRY.values() for key in m.reads))


def available() -> list[str]:
    return list(REGISTRY)


def get(name: str) -> MethodInfo:
    """The registered method ``name``; any other name is a ConfigError listing the choices."""
    if name not in REGISTRY:
        what = "is not implemented yet" if name in PLANNED else "is not a method"
        raise ConfigError(f"method: {name!r} {what}; available: {', '.join(available())}")
    return REGISTRY[name]


def model_builder(kind: str) -> Callable[..., Any] | None:
    """``build_model`` of the method whose model kind ``kind`` is, or None. Only registered
    modules are imported: a ``model.json`` cannot name code to run."""
    for info in REGISTRY.values():
        if kind in info.kinds:
            return load(f"{info.module}:build_model")
    return None


def load(dotted: str) -> Callable[..., Any]:
    module, _, attr = dotted.partition(":")
    fn: Callable[..., Any] = getattr(importlib.import_module(module), attr)
    return fn


def ignored_settings(cfg: Config) -> list[str]:
    """Dotted keys set away from their defaults that ``cfg.method`` does not read."""
    reads = get(cfg.method).reads
    default, actual = flat(type(cfg)()), flat(cfg)
    return [key for key, value in actual.items()
            if value != default[key] and matches(key, METHOD_SETTINGS)
            and not matches(key, reads)]
