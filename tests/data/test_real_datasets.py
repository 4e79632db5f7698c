"""Ingest and read back the real datasets in ../shared/datasets (skipped when absent)."""

from __future__ import annotations

import io
import zipfile

import numpy as np
from PIL import Image

from pipeline.config import IngestConfig
from pipeline.data.decode import DecodeSpec
from pipeline.data.ingest import ingest
from pipeline.data.reader import read_images
from pipeline.data.sources import read_idx
from tests.conftest import shared_dataset

MNIST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_mnist_idx_test_split(ray_cluster, tmp_path):
    mnist = shared_dataset("mnist")
    out = str(tmp_path / "mnist")
    result = ingest(IngestConfig(source=f"idx:{mnist}", output=out))
    assert result.rows == 10_000 and result.rejects == 0
    assert result.label_counts == {str(d): n for d, n in enumerate(MNIST_COUNTS)}
    rows = read_images(out, DecodeSpec(channels=1, size=28), normalized=False) \
        .filter(lambda r: r["id"].endswith(("/00000", "/09999"))).take_all()
    raw = read_idx(str(mnist / "t10k-images-idx3-ubyte.gz"))
    for row in rows:  # PNG is lossless: exact pixels
        index = int(row["id"].rsplit("/", 1)[1])
        np.testing.assert_array_equal(row["pixels"][0], raw[index])


def cifar_subset(tmp_path, per_class: int = 200):
    """A 2,000-image zip of the first ``per_class`` JPEGs of each CIFAR-10 class."""
    source = shared_dataset("cifar10", "cifar10-train.zip")
    subset = tmp_path / "cifar-subset.zip"
    chosen: dict[str, bytes] = {}
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(subset, "w") as zout:
        names = sorted(n for n in zin.namelist() if n.endswith(".jpg"))
        taken: dict[str, int] = {}
        for name in names:
            label = name.split("/")[-2]
            if taken.get(label, 0) < per_class:
                taken[label] = taken.get(label, 0) + 1
                chosen[name] = zin.read(name)
                zout.writestr(name, chosen[name])
    return subset, chosen


def test_cifar10_subset_labels_and_pixels(ray_cluster, tmp_path):
    subset, chosen = cifar_subset(tmp_path)
    out = str(tmp_path / "cifar")
    result = ingest(IngestConfig(source=str(subset), output=out, labels_from_folders=True))
    assert result.rows == 2000 and result.rejects == 0
    assert set(result.label_counts.values()) == {200} and len(result.label_counts) == 10
    rows = read_images(out, DecodeSpec(channels=3, size=32), normalized=False).take_all()
    assert len(rows) == 2000
    for row in rows:
        assert row["label"] == row["id"].split("/")[-2]
    for row in rows[::97]:
        direct = np.asarray(Image.open(io.BytesIO(chosen[row["id"]])).convert("RGB"))
        diff = np.abs(row["pixels"].transpose(1, 2, 0).astype(int) - direct.astype(int))
        assert diff.max() <= 2, f"{row['id']}: decode differs from Pillow by {diff.max()}"
