"""The datasets a job names instead of a folder (``data.dataset``), built into partitioned shards
under ``data.root`` on first use and found again by their settings afterwards:

* ``digits``: scikit-learn's 8x8 digits, embedded in scikit-learn
  (:mod:`mhd_hpc.data.build.embedded`);
* ``fashion_mnist``: Fashion-MNIST (Xiao et al. 2017; 60000 + 10000 28x28 grayscale images, 10
  classes) from its four official IDX files, by default where Debian's
  ``dataset-fashion-mnist`` package puts them (``data.source`` to read them from elsewhere).

A built-in dataset's folder name hashes its settings (and, for file-backed ones, the files'
sha256), so different partitions and different copies of the files live side by side.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from mhd_hpc.config.choices import BUILTIN_DATASETS
from mhd_hpc.data.build.array_shards import (ArraySplits, PartitionSettings, build_array_shards,
                                       settings_record)
from mhd_hpc.data.build.embedded import build_digits_shards
from mhd_hpc.data.manifest import file_sha256
from mhd_hpc.data.build.sources import FASHION_MNIST_CLASSES, DatasetFileError, load_idx_dataset

__all__ = ["BUILTIN_CLASSES", "BUILTIN_SHAPES", "FASHION_MNIST_DIR", "FASHION_MNIST_HELP", "build_builtin",
           "array_splits"]

#: Classes of every built-in dataset (known before start, so the config can check label counts).
BUILTIN_CLASSES = BUILTIN_DATASETS  # name -> number of classes
#: Image shape (channels, height, width) of every built-in dataset, known before start, so that
#: a plug-in backbone can be checked on every rank before anything is built or sent.
BUILTIN_SHAPES = {"digits": (1, 8, 8), "fashion_mnist": (1, 28, 28)}
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_HELP = (
    "install Debian's package (apt-get install dataset-fashion-mnist, which puts the files in "
    f"{FASHION_MNIST_DIR}), or put the four official files train-images-idx3-ubyte.gz, "
    "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz "
    "(github.com/zalandoresearch/fashion-mnist) in a folder and set data.source=FOLDER")
SAMPLES_PER_SHARD = 5000


def array_splits(name: str, train_images: np.ndarray, train_labels: np.ndarray,
                 test_images: np.ndarray, test_labels: np.ndarray,
                 classes: list[str] | None) -> ArraySplits:
    """An array dataset with its sample keys: ``train-NNNNNN`` and ``test-NNNNNN`` by index."""
    return ArraySplits(name, train_images, train_labels,
                       [f"train-{i:06d}" for i in range(len(train_labels))], test_images,
                       test_labels, [f"test-{i:06d}" for i in range(len(test_labels))],
                       len(classes) if classes else int(train_labels.max()) + 1, classes)


def _dir_name(dataset: str, settings: dict) -> str:
    canonical = json.dumps(settings, sort_keys=True, separators=(",", ":"))
    return f"{dataset}-" + hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:12]


def build_fashion_mnist(root: str, source: str, partition: PartitionSettings) -> str:
    """Build (or find) Fashion-MNIST under ``root`` from the IDX files in ``source``."""
    folder = source or FASHION_MNIST_DIR
    data = load_idx_dataset(folder, "fashion_mnist", FASHION_MNIST_CLASSES)
    digests = {os.path.basename(p): file_sha256(p) for p in data.files}
    settings = settings_record("fashion_mnist", partition, source_sha256=digests)
    final = os.path.join(root, _dir_name("fashion_mnist", settings))
    splits = array_splits("fashion_mnist", data.train_images, data.train_labels,
                          data.test_images, data.test_labels, data.classes)
    build_array_shards(splits, final, partition, settings=settings,
                       samples_per_shard=SAMPLES_PER_SHARD)
    return final


def build_builtin(dataset: str, root: str, source: str, partition: PartitionSettings) -> str:
    """The folder of built-in ``dataset`` for these settings (built when missing). A missing
    or unreadable source file raises ``DatasetFileError`` saying how to get it."""
    if dataset == "digits":
        return build_digits_shards(
            root, num_clients=partition.clients, public_fraction=partition.public_fraction,
            label_assignment=partition.label_assignment,
            labels_per_client=partition.labels_per_client, skew=partition.skew,
            seed=partition.seed, public_source=partition.public_source,
            partition=partition.partition, alpha=partition.alpha,
            min_samples=partition.min_samples)
    if dataset == "fashion_mnist":
        try:
            return build_fashion_mnist(root, source, partition)
        except DatasetFileError as exc:
            raise DatasetFileError(f"Fashion-MNIST: {exc}; to get the files, "
                                   f"{FASHION_MNIST_HELP}") from None
    raise ValueError(f"unknown built-in dataset {dataset!r}; expected one of "
                     f"{', '.join(BUILTIN_CLASSES)}")
