"""Typed, layered, validated configuration.

Settings are resolved in three layers, as in dinov2's ``utils/config.py``:

1. the dataclass defaults below (every default carries a comment giving its reason),
2. an optional YAML file (``--config FILE.yaml``),
3. command-line overrides: the named flags of the job scripts and ``--set dotted.key=value``.

Everything is validated before any work starts: an unknown key, a wrong type or a value out of
range raises :class:`ConfigError` naming the dotted field and the allowed values. The resolved
config is written next to every run's outputs (``config.yaml``) by :func:`dump_yaml`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import reprlib
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Union

import yaml

from pipeline import methods
from pipeline.errors import ConfigError

__all__ = ["Config", "ConfigError", "IngestConfig", "resolve"]

Backbone = Literal["small_cnn", "resnet18", "resnet50"]
Optimizer = Literal["sgd", "adam", "adamw"]
AssignDecode = Literal["tasks", "actor"]
Schedule = Literal["constant", "cosine", "step"]
FeatureDtype = Literal["float32", "float16"]
ShuffleMode = Literal["auto", "global", "stream"]


# Settings that were removed, and why: still accepted (with a warning) in saved configs.
REMOVED = {"online.passes": "never read by the online method"}


@dataclass
class S3Config:
    """How to reach ``s3://`` URIs. Credentials always come from the standard AWS chain."""

    endpoint_url: str | None = None  # None = AWS; set for MinIO/Ceph/moto (http://127.0.0.1:9000)
    region: str | None = None  # None = the AWS chain's region (AWS_REGION, ~/.aws/config)
    anonymous: bool = False  # public buckets need no credentials
    # "worker": every process resolves the standard AWS chain itself, as clusters with
    # instance profiles (or IRSA, or env keys on every node) need, and no key ever leaves a
    # node. "driver" (opt-in, for workers without a chain of their own): the driver resolves
    # its chain once and ships the keys inside the pickled filesystem, so they sit in clear in
    # Ray's task specs, the object store and its spill files, and temporary keys expire
    # mid-run.
    credentials: Literal["driver", "worker"] = "worker"
    connect_timeout_s: float = 5.0  # an unreachable bucket must fail within seconds
    request_timeout_s: float = 30.0  # generous for large shards, still bounded
    # Attempts per S3 request, exponential backoff from 50 ms (AWS SDK default strategy): 10
    # ride out ~25 s of throttling (503 SlowDown), resets or outage per request (measured);
    # a dead endpoint still fails in under a second, by a 2-attempt probe (pipeline/data/fs.py).
    max_attempts: int = 10


@dataclass
class DataConfig:
    """Input shards, output location and the decode contract (DESIGN §3)."""

    input: str | None = None  # Parquet shards dir or s3:// prefix; None = embedded digits demo
    output: str = "runs/demo"  # run directory or s3:// prefix
    image_size: int = 28  # square side after resize; 28 suits MNIST-like data, 224 ImageNet
    channels: int = 1  # 1 = greyscale, 3 = RGB; other modes are converted on decode
    mean: list[float] = field(default_factory=lambda: [0.5])  # per channel, or one for all
    std: list[float] = field(default_factory=lambda: [0.5])  # per channel, or one for all
    max_pixels: int = 64_000_000  # reject decompression bombs before decoding (W*H)
    decode_batch_size: int = 256  # rows per decode task; bounded so blocks stay small
    cache_decoded: bool = False  # decode once into the object store (small datasets only)
    # Training streams never trust the stored order (inputs are often sorted by class):
    # "global" = a full random permutation of the encoded rows every epoch; "stream" = file
    # and block order re-drawn every epoch plus the local buffer below; "auto" = global up to
    # global_shuffle_max_gb of input, where its measured cost is small (README), else stream.
    shuffle: ShuffleMode = "auto"
    # 8 GiB of encoded images is ~5M CIFAR-size or ~70k ImageNet-size JPEGs: an all-to-all of
    # that per epoch stays cheap next to decode + training; beyond it, write shuffled shards
    # (jobs/ingest.py does by default) and stream.
    global_shuffle_max_gb: float = 8.0  # 0 = always stream
    # Local shuffle buffer per worker, in decoded float32 pixels: 256 MiB is ~21k rows at
    # 32 px RGB, ~440 at 224 px; large against a 256-row decode block either way.
    shuffle_buffer_mb: float = 256.0


@dataclass
class ModelConfig:
    """Backbone and embedding."""

    backbone: Backbone = "small_cnn"  # small_cnn for 28-32 px; resnet18/50 for larger images
    weights: str | None = None  # local path or s3:// URI (safetensors or weights-only state dict)
    # Where in that checkpoint (default: wherever the most of the model fits): its table of
    # tensors ("teacher", nested "model/ema") and the names' prefix ("module.encoder_q.").
    weights_key: str | None = None
    weights_prefix: str | None = None
    # small_cnn channels (width, 2w, 4w); 32 trains ~170 img/s/core at 28 px. online defaults
    # to 16 (its registry line, pipeline/methods/__init__.py).
    width: int = 32
    feature_dim: int = 64  # embedding size the centroids live in
    normalize_features: bool = True  # L2-normalised embeddings make k-means distances bounded


@dataclass
class ClusterConfig:
    """Mini-batch k-means and the centroid server (DESIGN §4)."""

    k: int = 10  # number of clusters
    # Initial centroids: k-means++ over the features of a uniform sample of init_pool images
    # per cluster (at most init_pool_max, decoded on the driver); "random" = k of them as drawn.
    init: Literal["kmeans++", "random"] = "kmeans++"
    init_pool: int = 10  # 10 candidates a cluster: k-means++ then rarely misses a small one
    init_pool_max: int = 20_000  # caps the driver: 20k images at 224 px RGB are ~3 GB uint8
    # A centroid's count is capped at this many points before each mini-batch update, so it
    # is a moving mean over about its last centroid_window members rather than a mean over
    # every feature space the training network has had (0 = unbounded, Sculley's 1/n rate;
    # Spark's StreamingKMeans forgets the same way). README, "The centroid window".
    centroid_window: int = 256
    sync_every: int = 1  # steps between pushes of aggregated statistics to the server
    max_staleness: int = 1  # rounds a worker may run ahead of the applied centroids (0 = sync)
    # Hsu & Lin 2017, measured on a held-out probe (pipeline/kmeans/drift.py). Off by
    # default: on MNIST it lowered the mean NMI over three seeds, before the centroid window
    # and with it (0.802 against 0.831; README, "online with the centroid window").
    drift_compensation: bool = False
    drift_smoothing: float = 1.0  # fraction of the measured drift applied per round
    # The held-out probe the drift is measured on (pipeline/kmeans/drift.py): images per
    # cluster, at most drift_probe_max in all, and images re-embedded per round.
    drift_probe: int = 4
    drift_probe_max: int = 4096
    drift_chunk: int = 64
    reseed_every: int = 20  # rounds between starved-cluster checks
    reseed_ratio: float = 0.05  # starved = recent count below this fraction of the largest
    reservoir_size: int = 4096  # recent features kept for reseeding starved clusters
    assign_batch_size: int = 512  # rows per forward in the assignment pass
    # jobs/assign.py flags an image as an outlier when it is farther from its centroid than
    # this quantile of the training images' distances in the same cluster.
    outlier_quantile: float = 0.99
    outlier_min_members: int = 20  # smaller clusters use the quantile over all images
    persist_every: int = 20  # rounds between the server's restart-file writes


@dataclass
class TrainConfig:
    """Optimisation."""

    # Passes over the data. A method may default to its own (its registry line's defaults,
    # pipeline/methods/__init__.py): imc 15, to fill the 15 minutes on MNIST.
    epochs: int = 10
    batch_size: int = 256  # global batch, split evenly over workers
    optimizer: Optimizer = "adam"  # adam is robust from scratch on small images
    lr: float = 1e-3  # adam default
    momentum: float = 0.9  # sgd only
    weight_decay: float = 1e-5  # mild; the compactness term already regularises
    warmup_epochs: int = 1  # k-means only (frozen CNN) first, so pseudo-labels are sane
    # Learning-rate schedule over epochs: constant; cosine to 0; step = x0.1 at 1/2 and 3/4.
    lr_schedule: Schedule = "constant"
    # Stop after the epoch during which this many seconds of training passed (0 = no limit);
    # for equal-budget comparisons and for jobs that must end by a deadline. Per attempt.
    time_budget_s: float = 0.0
    seed: int = 0  # everything random derives from this
    # Reproducible runs: Ray Data keeps block order (so the seeded shuffles draw the same
    # epoch order) and every online step waits for the centroid server to apply the
    # previous round (cluster.max_staleness 0). With 1 worker two runs then give the same
    # model and NMI; with more, the server still applies the workers' pushes in arrival
    # order. Costs some throughput (README), so off by default.
    deterministic: bool = False
    # Precise BatchNorm after training (methods that use it: online, imc): BatchNorm's running
    # statistics are recomputed as the average batch statistics of this many uniformly
    # drawn images under the final weights, in batches of the training batch per worker,
    # so the eval-mode assignment pass sees features as the training steps did (MNIST,
    # seed 2: 85% of assignments agreed with a training batch's, 99% after; NMI 0.784 ->
    # 0.830, bench/results/quality-seeds.json). 0 = off: the exponential running averages
    # of training stay. imc also checks its head for empty clusters on these images.
    precise_bn_images: int = 4096


@dataclass
class OnlineConfig:
    """Loss of the ``online`` method (Hsu & Lin 2017, DESIGN §5.1)."""

    temperature: float = 0.1  # logits = -||f - c||^2 / temperature
    compactness_weight: float = 0.1  # pulls features towards their assigned centroid
    consistency_weight: float = 1.0  # two augmented views must agree (0 = off)
    entropy_weight: float = 1.0  # log k - H(mean soft assignment): guards against collapse
    balance: bool = True  # weight samples by inverse cluster size (collapse guard)
    augment: bool = True  # a random second view of each image (below); false = no consistency
    # The second view of colour inputs (data.channels 3) is SimCLR's (Chen et al. 2020): a
    # random resized crop of this area fraction, a flip, colour jitter (0.4, 0.4, 0.4, 0.1;
    # p 0.8) and greyscale (p 0.2); greyscale inputs keep the digit-safe affine warp. On a
    # 10,000-image CIFAR-10 subset (10 epochs, width 32) the affine view gave NMI 0.129 and
    # 0.109 on two seeds, this one 0.122, 0.127 and 0.130 on three (raw pixels: 0.081;
    # README, "online on a CIFAR-10 subset").
    colour_crop_scale: list[float] = field(default_factory=lambda: [0.2, 1.0])
    # Independent starts (k-means' n_init, for the joint objective): each start seeds its own
    # model and centroids and trains start_epochs epochs; the start with the lowest mean
    # training loss in its last epoch goes on for the rest of train.epochs (the others are
    # dropped). The low MNIST runs are local optima (two digits split by writing style),
    # and their loss is already clearly higher after 5 epochs. Costs (starts - 1) x
    # start_epochs more epochs. 1 = a single start, as before. README, "online with three
    # starts".
    starts: int = 3
    start_epochs: int = 5


@dataclass
class DeepClusterConfig:
    """The ``deepcluster`` method (Caron et al. 2018, DESIGN §5.2)."""

    # PCA-whitening size, capped at model.feature_dim. 16 measures best here: on 3,000 MNIST
    # digits (90-s budgets) NMI 0.28 at 32 -> 0.41 at 16; the paper's ImageNet 256 is in
    # configs/deepcluster-paper.yaml.
    pca_dim: int = 16
    kmeans_iters: int = 20  # Lloyd iterations per epoch (faiss default 20; the paper's 20)
    sobel: bool = False  # fixed greyscale + Sobel input filters (the paper uses them)
    # Random affine + jitter views when training on pseudo-labels (the paper trains on
    # random crops and flips); without them the CNN just memorises the current partition.
    augment: bool = True
    # Passes over the data on each clustering's pseudo-labels before re-clustering. The
    # paper's 1 suits ImageNet (5,000 steps a pass); small sets need several to learn:
    # 3 passes with pca_dim 16 give MNIST NMI 0.64 against 0.53-0.60 for 1 pass at 256.
    passes: int = 3
    # k-means runs with faiss on the driver up to this many images; above it, Lloyd's
    # partial sums are reduced across kmeans_shards Ray actors holding the features.
    local_max_points: int = 2_000_000
    kmeans_shards: int = 4  # feature-holding actors for the sharded k-means
    feature_dtype: FeatureDtype = "float32"  # float16 halves the N x d feature memory
    max_feature_memory_fraction: float = 0.5  # of the driver's available memory, else refuse


@dataclass
class DepictConfig:
    """The ``depict`` method (Dizaji et al. 2017, DESIGN §5.3): a convolutional autoencoder
    with a softmax head, trained on a KL objective under a uniform cluster-frequency prior."""

    # Encoder conv channels: the reference's 50@4x4/2 then 50@5x5/2 for 28-32 px; larger
    # images get more 5x5/2 layers (channels doubling) until the map is at most 8 px.
    channels: list[int] = field(default_factory=lambda: [50, 50])
    embed_dim: int = 0  # 0 = cluster.k, as in the reference code
    noisy: bool = True  # noisy (dropout) + clean pathways; false = a plain autoencoder
    dropout: float = 0.1  # on the input and the first conv layer (the reference's 0.1, 0.1)
    # The noisy pathway also sees a random affine + jitter view of the image (the clean one
    # the image itself): on 10,000 MNIST digits the joint rounds then lift the k-means
    # start's NMI (0.60 -> 0.69 in 3 rounds) where with dropout alone they hold it (0.53).
    augment: bool = True
    hidden_weight: float = 0.1  # layer-wise reconstruction of the hidden layers (input: 1)
    reconstruction_weight: float = 1.0  # against the clustering loss's 1
    # q ~ p / f^(1/2) (the paper's Eq. 7) or p^2 / f (DEC; what the reference code runs):
    # on 10,000 MNIST digits dec sharpens more and ends higher (NMI 0.70 vs 0.66, 8 rounds).
    target: Literal["sqrt", "dec"] = "dec"
    target_every: int = 1  # epochs of joint training per target refresh (a clean pass)
    tol: float = 0.001  # stop when fewer than this fraction of targets change their argmax
    pretrain_epochs: int = 15  # autoencoder pretraining before the k-means initialisation
    # Global batch of every DEPICT train stage (the reference's 100): on 10,000 MNIST digits
    # 64 reaches after 1 epoch the k-means NMI that 256 reaches after 10 (0.53).
    batch_size: int = 64
    # PCA-whiten and L2-normalise the clean embeddings for the initial k-means (as
    # DeepCluster does), the whitening folded into the head: on 3,000 MNIST digits the run
    # ends at NMI 0.76 against 0.70 without (README, ablation).
    whiten: bool = True
    kmeans_iters: int = 50  # Lloyd iterations of the initial k-means on clean embeddings
    kmeans_redo: int = 10  # initial k-means runs (the best kept); the reference runs 40


@dataclass
class ImcConfig:
    """The ``imc`` method (IMC-SwAV, Ntelemis et al. 2021, DESIGN §5.4): a SwAV encoder with
    trainable prototypes and an MLP head trained by mutual information, in one phase.
    Defaults are the authors' CIFAR settings (``foiv0s/imc-swav-pub``) unless noted."""

    # Trainable prototypes k' (SwAV's codes): the reference's 1,000 (for 10 to 100 classes),
    # not scaled with the data: 100 did no better in a spot check on the 1,797 digits
    # (README). The MI head's k is cluster.k.
    prototypes: int = 1000
    project_dim: int = 128  # projection output (on the unit sphere) the prototypes score
    head_hidden: int = 1024  # MI head: feature -> 1024 -> BN-ReLU -> 1024 -> BN-ReLU -> k
    # Multi-crop: 2 global and 4 local views per image. Sizes 0 = scaled with
    # data.image_size from the reference's 28 and 18 px at 32 px (28 px input: 24 and 16).
    global_crops: int = 2
    local_crops: int = 4
    global_size: int = 0
    local_size: int = 0
    # Area fractions [min, max] of each crop. null = by data.channels: colour inputs get the
    # reference's 0.2-1.0 and 0.08-0.4; greyscale ones 0.5-1.0 and 0.2-0.5, since a small
    # box of a digit is a stroke that many digits share (short in-memory runs, README).
    global_scale: list[float] | None = None
    local_scale: list[float] | None = None
    # Horizontal flips: None = for colour inputs only (a mirrored digit is another glyph).
    flip: bool | None = None
    # Rotation of every crop by up to this many degrees: None = 20 for greyscale inputs,
    # 0 for colour ones (the reference's CIFAR views have none). Without it the MNIST test
    # digits' 4s and 9s ended up as two clusters each half 4s, half 9s (README).
    rotate: float | None = None
    # Colour jitter (brightness, contrast, saturation, hue) with probability jitter_p, then
    # greyscale with grey_p; greyscale inputs use brightness and contrast only.
    jitter: list[float] = field(default_factory=lambda: [0.4, 0.4, 0.4, 0.1])
    jitter_p: float = 0.8
    grey_p: float = 0.25
    tau: float = 0.1  # softmax temperature of the swapped prediction and of u in the MI joint
    eps: float = 0.05  # Sinkhorn's entropic regularisation: codes = Sinkhorn(exp(u / eps))
    sinkhorn_iters: int = 3  # SwAV's 3 row/column normalisation rounds
    # lambda in H(Y|U) - lambda * H(Y): the balance of clusters. 2 ended higher than the
    # reference's 4 in a short in-memory run on the MNIST test digits (one run each;
    # bench/imc_sweep.py compares them) and asks less of a dataset whose classes are not
    # equally frequent (README).
    entropy_weight: float = 2.0
    logit_weight: float = 0.01  # logit regulariser: weight * mean(sum relu(|y| - logit_bound))
    logit_bound: float = 5.0
    # Adam over every part (encoder, projection, prototypes, head), as in the reference,
    # but at 4x its lr 5e-4 and imc's own train.batch_size 128 (the reference's 256): on
    # the 2-core CPU a run sees ~1,200 updates, not the reference's ~97,000 (README).
    lr: float = 2e-3
    betas: list[float] = field(default_factory=lambda: [0.8, 0.999])
    weight_decay: float = 1e-5
    # Linear learning-rate warm-up over this many updates, during which the prototypes are
    # also frozen (their gradients dropped) so the codes start from a settled encoder.
    # null = fitted to the run: min(500, 10% of its updates, train.epochs x steps per
    # epoch). Long runs get the reference's 500 (0.5% of its 500 CIFAR-10 epochs at batch
    # 256, 195 steps each); short ones SwAV's largest share (10 warm-up epochs of its
    # 100-epoch schedule), so the warm-up never takes the run (500 updates are 13 epochs of
    # the 10,000 MNIST test digits, 71 of the 1,797 demo digits). An integer is used as is.
    warmup_steps: int | None = None
    # Step decay: lr x decay_gamma at each of these fractions of train.epochs. The
    # reference's [0.3, 0.6, 0.8] x 0.4 (its epochs 150, 300 and 400 of 500) cut the lr of
    # a short run while it is still far from converged; two late steps anneal it (README).
    decay_at: list[float] = field(default_factory=lambda: [0.6, 0.8])
    decay_gamma: float = 0.3


@dataclass
class MultiviewConfig:
    """The ``multiview`` method (Guérin et al. 2021, DESIGN §5.5): several extractors' features
    as views, fused by a multi-input network with a DEC clustering layer."""

    # Each: a finished run (local or s3://), ARCH[:WEIGHTS_URI] (pipeline/models/zoo.py), or
    # noise[:DIM]; "#size=S,mean=a/b/c,std=a/b/c" overrides the view's input. Required.
    views: list[str] = field(default_factory=list)
    # Weights that fill less than this share of an architecture's tensors are refused
    # (another architecture's, or a truncated file); torchvision checkpoints fill 100%.
    min_coverage: float = 0.9
    # Each view is PCA-whitened to at most this many dimensions (DeepCluster's 256 is for
    # one view; with several, 64 each keeps the fused input small and the k-means fast).
    pca_dim: int = 64
    hidden: int = 256  # each branch and decoder: p_v -> hidden -> embed_dim (and back)
    embed_dim: int = 32  # the fused embedding z
    # View weights from each view's cluster structure (the gap statistic, README): "gated" =
    # equal over the views whose gap >= min_gap, 0 for the others (a pure-noise view's gap
    # is ~0: |gap| < 0.01 measured); "gap" = in proportion to the gap over those views;
    # "uniform" = equal over all. gap lost to gated on CIFAR-10 on 2026-12-02 (the best view
    # had the lowest gap of the trained ones: the gap measures clusterability, not meaning)
    # and tied with it (within the seeds' spread) over six view sets and three seeds on
    # 2026-12-07 with 420 s views
    # (python -m bench multiview_sets; README, Results).
    weighting: str = "gated"
    min_gap: float = 0.02
    batch_size: int = 256  # fusion steps (DEC's 256)
    lr: float = 1e-3  # Adam, for the fusion network
    pretrain_epochs: int = 50  # reconstruction alone, before k-means initialises the centroids
    # Independent pretraining starts (k-means' n_init, as online.starts): each seeds its own
    # branches; the lowest reconstruction in the last pretraining epoch is kept. Costs
    # (starts - 1) x pretrain_epochs epochs. README, multiview, "Training".
    starts: int = 3
    # DEC's start: "embedding" = k-means on the pretrained fused embedding z (DEC's own; it
    # needs the pretraining: shorten pretrain_epochs only with concat); "concat" = k-means
    # on the views' weighted concatenation. python -m bench multiview: embedding beat concat
    # on CIFAR-10 and tied on MNIST with 420 s views, beat it on both with 240 s views;
    # concat won with the weaker view runs of 2026-12-02 (README, Results).
    init: str = "embedding"
    target_every: int = 2  # epochs between DEC target refreshes over every image
    tol: float = 0.001  # stop when fewer clusters than this change in a round (DEC's 0.1%)
    cluster_weight: float = 0.1  # IDEC's gamma: reconstruction + gamma * KL(P || Q)
    alpha: float = 1.0  # the Student-t's degrees of freedom (DEC's 1)
    kmeans_iters: int = 30
    kmeans_redo: int = 3  # k-means restarts (lowest inertia kept), for baselines and the start


@dataclass
class ScaleConfig:
    """Ray resources and fault tolerance."""

    workers: int = 1  # Ray Train workers
    gpu: bool = False  # one GPU per worker and GPU assignment actors
    cpus_per_worker: float = 1.0  # lower (0.5) on 2-core machines to leave CPU for Ray Data
    threads_per_worker: int = 0  # torch threads per train worker; 0 = cpus_per_worker
    assign_actors: int = 1  # model+centroids actors in the assignment pass
    assign_cpus_per_actor: float = 1.0  # CPUs (and torch threads) per assignment actor
    # "tasks": decode in Ray Data tasks (can use CPU-only nodes next to GPU actors);
    # "actor": decode inside the assignment actor (no pixel arrays through the object store).
    assign_decode: AssignDecode = "tasks"
    read_cpus: float = 1.0  # CPUs per Parquet read task; lower it when actors fill the node
    # Centroid-server actors, each owning a range of cluster ids: raise it when one server
    # saturates (large k·d, many workers; bench/README.md). 1 = a single server.
    centroid_shards: int = 1
    max_failures: int = 2  # worker-group restarts from the last checkpoint
    checkpoint_every_steps: int = 200  # also at every epoch end
    collective_timeout_s: int = 600  # gloo/nccl timeout; the 1800 s default hides hangs
    # One writer per output on S3 (pipeline/lock.py): a lease renewed every ttl/4. 60 s rides
    # out a slow store; a re-run after a killed run waits at most this long for its lease.
    lease_ttl_s: float = 60.0


@dataclass
class ReportConfig:
    """The HTML report (``report.html``)."""

    sample_rows: int = 50_000  # montages draw from shards holding about this many images
    nearest: int = 8  # images nearest the centroid per cluster (top montage row)
    random: int = 8  # random members per cluster (bottom montage row)
    page_size: int = 50  # cluster sections per page; the rest are a click or a search away
    max_montages: int = 2000  # clusters beyond the largest N are listed without montages
    thumb_px: int = 64  # thumbnail edge in the montages
    map_points: int = 3000  # embedding-map points in all; t-SNE of 3000 takes ~14 s on 2 cores
    map_legend: int = 50  # legend entries (largest clusters); the rest are summed as others


@dataclass
class DebugConfig:
    """Fault injection for the fault-tolerance tests: real process deaths, once per run."""

    kill_worker_at_step: int = -1  # rank 0 exits (os._exit) at this global step, once
    kill_server_at_round: int = -1  # the centroid server exits at this version, once
    kill_assign_after_shards: int = -1  # the assign driver SIGKILLs itself after N shards


@dataclass
class Config:
    """Everything a clustering run needs. Saved as ``config.yaml`` with each run."""

    method: str = "online"  # a name in pipeline/methods/__init__.py (DESIGN §5)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    online: OnlineConfig = field(default_factory=OnlineConfig)
    deepcluster: DeepClusterConfig = field(default_factory=DeepClusterConfig)
    depict: DepictConfig = field(default_factory=DepictConfig)
    imc: ImcConfig = field(default_factory=ImcConfig)
    multiview: MultiviewConfig = field(default_factory=MultiviewConfig)
    scale: ScaleConfig = field(default_factory=ScaleConfig)
    s3: S3Config = field(default_factory=S3Config)
    report: ReportConfig = field(default_factory=ReportConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    version: str = ""  # package version, filled in when the run is resolved


@dataclass
class IngestConfig:
    """Settings of ``jobs/ingest.py``."""

    source: str = "sklearn-digits"  # dir | .zip | s3://prefix | idx:DIR | sklearn-digits
    output: str = "data/digits"  # Parquet shards dir or s3:// prefix
    labels_from_folders: bool = False  # label = name of the image's parent folder
    overwrite: bool = False  # replace a complete output
    rows_per_file: int = 10_000  # shard size: 30 MB of CIFAR, ~1 GB of ImageNet JPEGs
    # Rows go out in a seeded random order across shards (folder and zip sources list in path
    # order, i.e. sorted by class); the same seed gives the same shards. keep_order = source order.
    keep_order: bool = False
    seed: int = 0  # any fixed value: re-ingesting gives the same shards
    row_group_size: int = 1_000  # bounded row groups so readers stream
    max_pixels: int = 64_000_000  # larger images are rejected as absurd
    s3: S3Config = field(default_factory=S3Config)


# --------------------------------------------------------------------------------------------
# Building dataclasses from plain dicts, with type checks that name the field.


def _show(value: Any) -> str:
    """A bounded one-line ``repr`` for error messages: a YAML alias bomb (a few hundred
    bytes naming 10^9 values) must not take minutes and gigabytes to describe."""
    short = reprlib.Repr()  # keyword arguments only from Python 3.12
    short.maxlevel, short.maxstring, short.maxother = 2, 60, 60
    short.maxlist = short.maxtuple = short.maxdict = short.maxset = 6
    return short.repr(value)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, where)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where}: must be {_type_name(tp)}; got {_show(value)}")
        return value
    if origin is list:
        (inner,) = typing.get_args(tp)
        items = value if isinstance(value, (list, tuple)) else [value]
        return [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(items)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and _EXPONENT.fullmatch(value.strip()):
        return float(value)  # YAML 1.1 reads 1e-6 (no dot) as a string
    if tp is float and isinstance(value, float) and math.isnan(value):
        raise ConfigError(f"{where}: must be a number; got nan")
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{where}: must be true or false; got {_show(value)}")
    if tp is int and isinstance(value, bool):
        raise ConfigError(f"{where}: must be an integer; got {value!r}")
    if not isinstance(value, tp):
        raise ConfigError(f"{where}: must be {_type_name(tp)}; got {_show(value)}")
    return value


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise ConfigError."""
    if not isinstance(data, dict):
        where = prefix.rstrip(".") or "config"
        raise ConfigError(f"{where}: must be a mapping; got {_show(data)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for gone in [key for key in data if f"{prefix}{key}" in REMOVED]:
        logging.getLogger(__name__).warning("%s%s is no longer a setting (%s); ignored",
                                            prefix, gone, REMOVED[f"{prefix}{gone}"])
        data = {k: v for k, v in data.items() if k != gone}
    unknown = sorted(set(data) - set(names), key=str)  # YAML keys may be ints, None, ...
    if unknown:
        raise ConfigError(
            f"{prefix}{_key(unknown[0])}: unknown key; allowed keys here: {', '.join(names)}"
        )
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            kwargs[name] = from_dict(tp, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, tp, f"{prefix}{name}")
    return cls(**kwargs)


def _key(key: Any) -> str:
    """A key as written when it is a short printable string, else its bounded repr."""
    if isinstance(key, str) and key.isprintable() and 0 < len(key) <= 60:
        return key
    return _show(key)


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


# What yaml.safe_load raises on bad input: its own errors, ValueError from a constructor
# (an impossible date such as 2021-02-30), RecursionError for nesting thousands deep.
_YAML_ERRORS = (yaml.YAMLError, ValueError, RecursionError)


def _yaml_problem(exc: BaseException) -> str:
    """One line: what is wrong and where (PyYAML's own message spans several lines)."""
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    text = str(exc)
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem:
        mark = exc.problem_mark
        text = exc.problem + (f" at line {mark.line + 1}, column {mark.column + 1}" if mark else "")
    return " ".join(text.split())[:200]


def parse_override(text: str) -> dict[str, Any]:
    """``"train.lr=0.01"`` -> ``{"train": {"lr": 0.01}}`` (the value is parsed as YAML)."""
    key, sep, raw = text.partition("=")
    if not sep or not all(part.strip() for part in key.split(".")):
        raise ConfigError(f"--set {_show(text)}: expected dotted.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except _YAML_ERRORS as exc:
        raise ConfigError(f"--set {_show(text)}: value is not valid YAML ({_yaml_problem(exc)})"
                          ) from exc
    _refuse_cycles(value, key.strip())
    return _nested(key, value)


def _refuse_cycles(value: Any, where: str) -> None:
    """Refuse a YAML alias inside its own anchor (``a: &x {b: *x}``): no setting is infinite,
    and merging two of them would recurse forever. A depth-first walk that visits each
    shared node once, so an alias bomb costs its size, not its expansion."""
    done: set[int] = set()
    path: set[int] = set()  # the nodes being walked: the current node's ancestors
    stack: list[tuple[Any, str, bool]] = [(value, where, False)]
    while stack:
        node, at, leaving = stack.pop()
        if leaving:
            path.discard(id(node))
            done.add(id(node))
        elif isinstance(node, (dict, list)) and id(node) not in done:
            if id(node) in path:
                raise ConfigError(f"{at}: refers to itself (a YAML alias inside its own anchor)")
            path.add(id(node))
            stack.append((node, at, True))
            stack += _children(node, at)


def _children(node: dict[Any, Any] | list[Any], at: str) -> list[tuple[Any, str, bool]]:
    """The items of a mapping or list with their dotted names, for :func:`_refuse_cycles`."""
    if isinstance(node, list):
        return [(child, f"{at}[{i}]", False) for i, child in enumerate(node)]
    return [(child, f"{at}.{_key(key)}" if at else _key(key), False)
            for key, child in node.items()]


def _load_yaml_file(path: str) -> dict[str, Any]:
    """The settings in a ``--config`` file: a mapping (an empty file is no settings)."""
    try:
        with open(path, "rb") as fh:
            loaded = yaml.safe_load(fh.read())
    except OSError as exc:
        raise ConfigError(f"--config {path}: cannot read ({exc.strerror})") from exc
    except _YAML_ERRORS as exc:
        raise ConfigError(f"--config {path}: not valid YAML ({_yaml_problem(exc)})") from exc
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"--config {path}: must be a mapping of settings; got "
                          f"{type(loaded).__name__} {_show(loaded)}")
    _refuse_cycles(loaded, "")
    return loaded


def resolve(
    cls: type,
    yaml_path: str | None = None,
    overrides: list[str] | None = None,
    flags: dict[str, Any] | None = None,
    base: dict[str, Any] | None = None,
    loaded: dict[str, Any] | None = None,
) -> Any:
    """Defaults (the dataclasses', then the chosen method's own:
    :func:`method_defaults`), ``base`` (dotted keys), ``yaml_path``, ``loaded`` (a nested
    dict, e.g. a saved run's config), ``flags`` (dotted), then ``--set`` overrides;
    validated."""
    layers = [_nested(key, value) for key, value in (base or {}).items()]
    if yaml_path:
        layers.append(_load_yaml_file(yaml_path))
    if loaded:
        layers.append(loaded)
    layers += [_nested(key, value) for key, value in (flags or {}).items() if value is not None]
    layers += [parse_override(text) for text in overrides or []]
    merged = _merge_all(dataclasses.asdict(cls()), layers)
    own = method_defaults(cls, merged.get("method"))
    if own:  # under every given layer: a setting given anywhere wins
        merged = _merge_all(_deep_merge(dataclasses.asdict(cls()), own), layers)
    cfg = from_dict(cls, merged)
    validate(cfg)
    return cfg


def _merge_all(merged: dict[str, Any], layers: list[dict[str, Any]]) -> dict[str, Any]:
    for layer in layers:
        merged = _deep_merge(merged, layer)
    return merged


def method_defaults(cls: type, method: Any) -> dict[str, Any]:
    """The defaults that ``method`` sets for shared settings (its registry line's
    ``defaults``, e.g. ``imc``'s ``train.epochs``), nested; {} for another config class or
    a method that is not registered (validation refuses that one)."""
    info = methods.REGISTRY.get(method) if cls is Config and isinstance(method, str) else None
    merged: dict[str, Any] = {}
    for key, value in info.defaults if info is not None else ():
        merged = _deep_merge(merged, _nested(key, value))
    return merged


def _nested(dotted: str, value: Any) -> dict[str, Any]:
    """``("train.lr", 0.1)`` -> ``{"train": {"lr": 0.1}}``."""
    node: dict[str, Any] = {}
    cursor = node
    *parents, leaf = dotted.strip().split(".")
    for part in parents:
        cursor = cursor.setdefault(part, {})
    cursor[leaf] = value
    return node


# --------------------------------------------------------------------------------------------
# Value checks beyond types.

_POSITIVE_INT = [
    "data.image_size", "data.max_pixels", "data.decode_batch_size", "model.feature_dim", "model.width",
    "cluster.k", "cluster.init_pool", "cluster.init_pool_max", "cluster.sync_every", "cluster.reseed_every", "cluster.reservoir_size",
    "cluster.drift_probe", "cluster.drift_probe_max", "cluster.drift_chunk",
    "cluster.assign_batch_size", "cluster.persist_every", "cluster.outlier_min_members",
    "report.sample_rows", "report.page_size", "report.max_montages", "report.thumb_px", "report.map_points", "report.map_legend",
    "train.epochs", "train.batch_size", "scale.workers", "online.starts", "online.start_epochs",
    "scale.assign_actors", "scale.checkpoint_every_steps", "scale.centroid_shards", "scale.collective_timeout_s",
    "s3.max_attempts",
    "rows_per_file", "row_group_size", "max_pixels", "deepcluster.pca_dim",
    "deepcluster.kmeans_iters", "deepcluster.local_max_points", "deepcluster.kmeans_shards",
    "deepcluster.passes", "depict.target_every", "depict.kmeans_iters", "depict.kmeans_redo",
    "depict.batch_size", "imc.prototypes", "imc.project_dim", "imc.head_hidden",
    "imc.global_crops", "imc.sinkhorn_iters", "multiview.pca_dim", "multiview.hidden",
    "multiview.embed_dim", "multiview.batch_size", "multiview.target_every",
    "multiview.kmeans_iters", "multiview.kmeans_redo", "multiview.starts",
]  # fmt: skip
_NON_NEGATIVE = [
    "data.global_shuffle_max_gb", "cluster.max_staleness", "cluster.centroid_window", "train.weight_decay", "train.warmup_epochs", "train.time_budget_s", "train.precise_bn_images", "scale.max_failures",
    "report.nearest", "report.random", "online.compactness_weight", "online.consistency_weight", "online.entropy_weight", "train.momentum",
    "depict.embed_dim", "depict.hidden_weight", "depict.reconstruction_weight", "depict.tol", "depict.pretrain_epochs",
    "imc.local_crops", "imc.global_size", "imc.local_size", "imc.entropy_weight", "imc.logit_weight",
    "imc.logit_bound", "imc.weight_decay", "imc.warmup_steps", "multiview.pretrain_epochs",
    "multiview.tol", "multiview.cluster_weight", "multiview.min_gap",
]  # fmt: skip
_POSITIVE = ["train.lr", "online.temperature", "scale.cpus_per_worker",
             "imc.tau", "imc.eps", "imc.lr", "multiview.lr", "multiview.alpha",
             "data.shuffle_buffer_mb",
             "scale.assign_cpus_per_actor", "scale.read_cpus", "scale.lease_ttl_s",
             "s3.connect_timeout_s", "s3.request_timeout_s"]  # fmt: skip


# numpy's generators need a seed >= 0; 2**32 leaves room for the per-epoch offsets added to it.
_SEEDS = ["train.seed", "seed"]


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not hasattr(cfg, part):
            return None
        cfg = getattr(cfg, part)
    return cfg


def validate(cfg: Any) -> None:
    """Range checks; each error names the field and what is allowed."""
    for name in _POSITIVE_INT + _POSITIVE:
        value = _get(cfg, name)
        if value is not None and value <= 0:
            raise ConfigError(f"{name}: must be > 0; got {value!r}")
    for name in _NON_NEGATIVE:
        value = _get(cfg, name)
        if value is not None and value < 0:
            raise ConfigError(f"{name}: must be >= 0; got {value!r}")
    for name in _SEEDS:
        value = _get(cfg, name)
        if value is not None and not 0 <= value < 2**32:
            raise ConfigError(f"{name}: must be in [0, 2**32); got {value!r}")
    if isinstance(cfg, Config):
        _validate_run(cfg)


def _validate_run(cfg: Config) -> None:
    methods.get(cfg.method)  # an unknown or unbuilt method is refused with the choices
    if cfg.data.channels not in (1, 3):
        raise ConfigError(f"data.channels: must be 1 or 3; got {cfg.data.channels}")
    for name in ("mean", "std"):
        values = getattr(cfg.data, name)
        if len(values) not in (1, cfg.data.channels):
            raise ConfigError(
                f"data.{name}: needs 1 or data.channels={cfg.data.channels} values; got "
                f"{_show(values)}"
            )
    if any(s <= 0 for s in cfg.data.std):
        raise ConfigError(f"data.std: every value must be > 0; got {_show(cfg.data.std)}")
    if cfg.cluster.k < 2:
        raise ConfigError(f"cluster.k: must be >= 2; got {cfg.cluster.k}")
    for name in ("weights_key", "weights_prefix"):
        if getattr(cfg.model, name) is not None and not cfg.model.weights:
            raise ConfigError(f"model.{name}: says where model.weights keeps the weights; "
                              "set model.weights too")
    if not 0.0 <= cfg.cluster.drift_smoothing <= 1.0:
        raise ConfigError(f"cluster.drift_smoothing: must be in [0, 1]; got {cfg.cluster.drift_smoothing}")
    if not 0.0 < cfg.cluster.outlier_quantile <= 1.0:
        raise ConfigError(f"cluster.outlier_quantile: must be in (0, 1]; got {cfg.cluster.outlier_quantile}")
    if not 0.0 <= cfg.cluster.reseed_ratio < 1.0:
        raise ConfigError(f"cluster.reseed_ratio: must be in [0, 1); got {cfg.cluster.reseed_ratio}")
    if cfg.method == "depict" and cfg.depict.batch_size % cfg.scale.workers:
        raise ConfigError(f"depict.batch_size: must be divisible by scale.workers="
                          f"{cfg.scale.workers}; got {cfg.depict.batch_size}")
    if cfg.train.batch_size % cfg.scale.workers:
        raise ConfigError(
            f"train.batch_size: must be divisible by scale.workers={cfg.scale.workers}; "
            f"got {cfg.train.batch_size}"
        )
    if cfg.scale.centroid_shards > cfg.cluster.k:
        raise ConfigError(f"scale.centroid_shards: must be <= cluster.k={cfg.cluster.k}; got "
                          f"{cfg.scale.centroid_shards}")
    if not 0.0 < cfg.deepcluster.max_feature_memory_fraction <= 1.0:
        raise ConfigError("deepcluster.max_feature_memory_fraction: must be in (0, 1]; got "
                          f"{cfg.deepcluster.max_feature_memory_fraction}")
    if not 0.0 <= cfg.depict.dropout < 1.0:
        raise ConfigError(f"depict.dropout: must be in [0, 1); got {cfg.depict.dropout}")
    if not cfg.depict.channels or min(cfg.depict.channels) < 1:
        raise ConfigError(f"depict.channels: needs at least one value, each >= 1; got "
                          f"{_show(cfg.depict.channels)}")
    _validate_imc(cfg.imc, cfg.data.image_size)
    _scale_range("online.colour_crop_scale", cfg.online.colour_crop_scale)
    _validate_multiview(cfg)
    if cfg.train.warmup_epochs > cfg.train.epochs:
        raise ConfigError(
            f"train.warmup_epochs: must be <= train.epochs={cfg.train.epochs}; "
            f"got {cfg.train.warmup_epochs}"
        )
    o = cfg.online
    if (cfg.method == "online" and o.starts > 1 and o.start_epochs < cfg.train.epochs
            and o.start_epochs <= cfg.train.warmup_epochs):
        raise ConfigError(
            f"online.start_epochs: with online.starts={o.starts} each start must train the CNN "
            f"before the starts are compared, so it must be > train.warmup_epochs="
            f"{cfg.train.warmup_epochs}; got {o.start_epochs}"
        )


def _span(low_open: bool, high_open: bool) -> str:
    return ("(" if low_open else "[") + "0, 1" + (")" if high_open else "]")


def _in_unit(value: float, low_open: bool = False, high_open: bool = False) -> bool:
    return (value > 0 if low_open else value >= 0) and (value < 1 if high_open else value <= 1)


def _unit(name: str, value: float, low_open: bool = False, high_open: bool = False) -> None:
    """``value`` in [0, 1] (or open at either end), else a ConfigError naming ``name``."""
    if not _in_unit(value, low_open, high_open):
        raise ConfigError(f"{name}: must be in {_span(low_open, high_open)}; got {value!r}")


def _units(name: str, values: list[float], count: int | None, low_open: bool = False,
           high_open: bool = False) -> None:
    """``count`` values (any number if None), each as :func:`_unit` wants."""
    if (count is not None and len(values) != count) or not all(
            _in_unit(v, low_open, high_open) for v in values):
        many = f"{count} values, each" if count is not None else "values"
        raise ConfigError(f"{name}: needs {many} in {_span(low_open, high_open)}; got "
                          f"{_show(values)}")


def _scale_range(name: str, values: list[float]) -> None:
    """[min, max] area fractions of a random resized crop, 0 < min <= max <= 1."""
    _units(name, values, 2, low_open=True)
    if values[0] > values[1]:
        raise ConfigError(f"{name}: needs [min, max] with min <= max; got {values}")


def _validate_imc(imc: ImcConfig, image_size: int) -> None:
    """Ranges of the ``imc`` section that a sign check cannot express."""
    for name in ("global_size", "local_size"):
        if getattr(imc, name) > image_size:
            raise ConfigError(f"imc.{name}: must be <= data.image_size={image_size} (0 = "
                              f"scaled with it); got {getattr(imc, name)}")
    if imc.global_crops + imc.local_crops < 2:
        raise ConfigError(f"imc.local_crops: the swapped prediction needs at least 2 views; "
                          f"got imc.global_crops={imc.global_crops} + {imc.local_crops}")
    if imc.rotate is not None and not 0 <= imc.rotate <= 180:
        raise ConfigError(f"imc.rotate: degrees in [0, 180] (null = by data.channels); "
                          f"got {imc.rotate}")
    for name in ("global_scale", "local_scale"):
        values = getattr(imc, name)
        if values is not None:
            _scale_range(f"imc.{name}", values)
    if len(imc.jitter) != 4 or min(imc.jitter) < 0 or not math.isfinite(sum(imc.jitter)) \
            or imc.jitter[3] > 0.5:
        raise ConfigError("imc.jitter: needs 4 values (brightness, contrast, saturation >= 0, "
                          f"hue in [0, 0.5]); got {_show(imc.jitter)}")
    _unit("imc.jitter_p", imc.jitter_p)
    _unit("imc.grey_p", imc.grey_p)
    _units("imc.betas", imc.betas, 2, high_open=True)
    _units("imc.decay_at", imc.decay_at, None)
    _unit("imc.decay_gamma", imc.decay_gamma, low_open=True)


def _validate_multiview(cfg: Config) -> None:
    """The ``multiview`` section's ranges; the views themselves are read by the method's
    preflight (``pipeline.methods.multiview.check``), before any work."""
    mv = cfg.multiview
    if mv.weighting not in ("gated", "gap", "uniform"):
        raise ConfigError(f"multiview.weighting: must be gated, gap or uniform; got "
                          f"{mv.weighting!r}")
    _unit("multiview.min_coverage", mv.min_coverage)
    if mv.init not in ("concat", "embedding"):
        raise ConfigError(f"multiview.init: must be concat or embedding; got {mv.init!r}")
    if cfg.method == "multiview" and not mv.views:
        raise ConfigError("multiview.views: --method multiview needs at least one view, e.g. "
                          "--set multiview.views='[runs/online, resnet18]'")
    if mv.starts > 1 and not mv.pretrain_epochs:
        raise ConfigError(f"multiview.starts: the starts are compared by their pretraining "
                          f"reconstruction, so starts={mv.starts} needs "
                          f"multiview.pretrain_epochs > 0")
    if cfg.method == "multiview" and mv.batch_size % cfg.scale.workers:
        raise ConfigError(f"multiview.batch_size: must be divisible by scale.workers="
                          f"{cfg.scale.workers}; got {mv.batch_size}")


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Any) -> str:
    """The resolved config as YAML; ``resolve(type(cfg), that_file)`` gives ``cfg`` back."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
