"""Class-sorted inputs: ingest order, the training stream's order and the initial centroids.

The input is what users have: 10 class folders, ingested with ``--keep-order`` into shards of at
most 300 rows, so the stored order is the class order. Measured honestly: the code before the
shuffle work also passes the entropy test here (0.93), because Ray 2.60 reads shards and row
groups in parallel into large blocks; the test guards the default's mixing, whatever Ray does. Real Parquet, the shared Ray cluster, and the
same Ray Data path as Ray Train's ``get_dataset_shard`` (``streaming_split``).
"""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.config import Config, IngestConfig, resolve
from pipeline.data.ingest import ingest
from pipeline.data.reader import find_shards
from tests.images import encode

CLASSES, PER_CLASS = 10, 300


def class_folders(root, per_class: int = PER_CLASS) -> None:
    """Class c is a distinct colour plus noise, so even a random CNN separates them."""
    palette = np.random.default_rng(99).integers(0, 256, (CLASSES, 3))
    rng = np.random.default_rng(0)
    for c in range(CLASSES):
        (root / f"class{c}").mkdir(parents=True)
        for j in range(per_class):
            noise = rng.normal(0, 20, (12, 12, 3))
            img = np.clip(palette[c] + noise, 0, 255).astype(np.uint8)
            (root / f"class{c}" / f"{j:03d}.png").write_bytes(encode(img, "PNG"))


@pytest.fixture(scope="module")
def sorted_input(ray_cluster, tmp_path_factory):
    """Shards in class order: files of at most 300 rows, in the source's (path) order."""
    root = tmp_path_factory.mktemp("classes")
    class_folders(root / "src")
    out = str(root / "sorted")
    ingest(IngestConfig(source=str(root / "src"), output=out, labels_from_folders=True,
                        keep_order=True, rows_per_file=PER_CLASS, row_group_size=100))
    return out


def run_cfg(uri: str, *settings: str) -> Config:
    return resolve(Config, overrides=["data.image_size=12", "data.channels=3",
                                      "train.batch_size=32", "cluster.k=10", *settings],
                   flags={"data.input": uri, "data.output": "unused"})


def file_rows(uri: str) -> list[list[str]]:
    return [pq.read_table(f, columns=["id"]).column("id").to_pylist()
            for f in find_shards(uri).files]


def first_epochs(cfg: Config, epochs: int = 1) -> list[list[dict]]:
    """Each epoch's batches as a train worker sees them (1 worker)."""
    from pipeline.distributed.job import training_images
    from pipeline.distributed.train import epoch_batches_kwargs

    uri = cfg.data.input
    shard = training_images(cfg, uri, find_shards(uri), ["id", "pixels"]).streaming_split(1)[0]
    return [list(shard.iter_batches(batch_size=32, **epoch_batches_kwargs(cfg, e)))
            for e in range(epochs)]


def entropy(labels) -> float:
    _, counts = np.unique(np.asarray(labels), return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


def test_keep_order_input_is_class_sorted(sorted_input):
    files = file_rows(sorted_input)
    ids = [i for f in files for i in f]
    assert ids == sorted(ids) and len(ids) == CLASSES * PER_CLASS  # the source's (class) order
    assert len(files) >= CLASSES and max(map(len, files)) <= PER_CLASS  # bounded shards


@pytest.mark.parametrize("settings", [
    (),  # the product's default
    ("data.shuffle=global", "data.shuffle_buffer_mb=0.01"),  # the order alone, no buffer
], ids=["default", "global-order-no-buffer"])
def test_training_batches_mix_the_classes(sorted_input, settings):
    """Mean per-batch label entropy over the first epoch >= 90% of the marginal's."""
    cfg = run_cfg(sorted_input, *settings)
    (batches,) = first_epochs(cfg)
    labels = np.concatenate([b["label"] for b in batches])
    assert len(labels) == CLASSES * PER_CLASS // 32 * 32
    ratio = np.mean([entropy(b["label"]) for b in batches]) / entropy(labels)
    assert ratio >= 0.9, f"per-batch label entropy only {ratio:.2f} of the marginal"


@pytest.mark.parametrize("mode", ["global", "stream"])
def test_every_epoch_has_a_new_order(sorted_input, mode):
    cfg = run_cfg(sorted_input, f"data.shuffle={mode}", "data.shuffle_buffer_mb=0.01")
    orders = [[i for b in epoch for i in b["id"]] for epoch in first_epochs(cfg, epochs=2)]
    assert orders[0] != orders[1]
    assert len(set(orders[0])) == len(orders[0])


def test_initial_centroids_cover_the_classes_reproducibly(sorted_input):
    from pipeline.distributed.job import initial_pool, sample_centroids
    from pipeline.kmeans.init import seed_centroids
    from pipeline.methods.arch import initial_model

    cfg = run_cfg(sorted_input)
    shards = find_shards(sorted_input)
    rows, pool = initial_pool(cfg, shards, initial_model(cfg))
    assert len(rows) == 100 and len({r["id"] for r in rows}) == 100  # k x cluster.init_pool
    centroids = seed_centroids(pool, 10, cfg.train.seed)
    chosen = np.argmin(((centroids[:, None] - pool[None]) ** 2).sum(-1), axis=1)
    covered = {str(rows[i]["label"]) for i in chosen}
    assert len(covered) >= 8, f"initial centroids cover only {sorted(covered)}"
    again = sample_centroids(cfg, shards, initial_model(cfg))
    np.testing.assert_array_equal(centroids, again)


def test_ingest_writes_a_seeded_permutation(ray_cluster, tmp_path):
    class_folders(tmp_path / "src", per_class=60)
    outs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        outs[name] = str(tmp_path / name)
        ingest(IngestConfig(source=str(tmp_path / "src"), output=outs[name], seed=seed,
                            labels_from_folders=True, rows_per_file=30, row_group_size=30))
    a, b, c = (file_rows(outs[n]) for n in "abc")
    ids = [i for f in a for i in f]
    assert sorted(ids) == sorted(f"class{c}/{j:03d}.png" for c in range(CLASSES)
                                 for j in range(60))
    assert len(ids) == len(set(ids))  # every id exactly once
    assert a == b  # the same seed: the same shards, row for row
    names = [[f.rsplit("/", 1)[-1] for f in find_shards(o).files] for o in (outs["a"], outs["b"])]
    assert names[0] == names[1] and names[0][0] == "part-00000.parquet"
    assert a != c
    shard_classes = [len({i.split("/")[0] for i in f}) for f in a]
    assert min(shard_classes) >= 5  # no shard is one class any more
