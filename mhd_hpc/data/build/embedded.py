"""The embedded default dataset: scikit-learn's ``load_digits`` written as WebDataset shards.

``load_digits`` (1797 grey 8x8 images, pixel values 0..16, 10 classes) ships with scikit-learn,
so a demo or a test needs no download. A fixed stratified test split (seed 0, independent of the
run seed) is held out so that every run is evaluated on the same samples; the rest, the *pool*,
is split by :func:`mhd_hpc.data.build.partition.make_partition` into the public set and the clients.

Layout of a built dataset (``root/<dataset_dir_name>/``)::

    manifest.json            splits -> shard files, counts, normalisation, the partition
    test/shard-000000.tar
    public/shard-000000.tar
    client_000/shard-000000.tar  ...

The folder name hashes the settings, so different partitions live side by side. The shards are
written by :func:`mhd_hpc.data.build.array_shards.build_array_shards` (resumable shard by shard, the
manifest last, one builder per folder at a time).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import numpy as np

from mhd_hpc.data.build.array_shards import (ArraySplits, PartitionSettings, build_array_shards,
                                             partition_record)
from mhd_hpc.data.manifest import FORMAT_VERSION
from mhd_hpc.run.compat import EMBEDDED_DIGITS_LAYOUT, dataset_settings

__all__ = [
    "DIGITS_TEST_FRACTION", "DIGITS_TEST_SEED", "load_digits_arrays", "digits_test_split",
    "digits_settings", "dataset_dir_name", "build_digits_shards",
]

DIGITS_TEST_FRACTION = 0.2
DIGITS_TEST_SEED = 0  # fixed on purpose: the test set must not move with the run seed
DIGITS_NUM_CLASSES = 10
DIGITS_SCALE = 1.0 / 16.0  # pixel values are 0..16
SAMPLES_PER_SHARD = 1000


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """All of ``load_digits`` as ``uint8 (1797, 1, 8, 8)`` images and ``int64`` labels."""
    from sklearn.datasets import load_digits  # lazy: sklearn is slow to import

    digits = load_digits()
    images = np.rint(digits.images).astype(np.uint8)[:, None, :, :]
    return images, digits.target.astype(np.int64)


def digits_test_split(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(test, pool) sorted source indices: stratified, fixed seed ``DIGITS_TEST_SEED``."""
    from sklearn.model_selection import train_test_split

    pool, test = train_test_split(
        np.arange(labels.size), test_size=DIGITS_TEST_FRACTION, stratify=labels,
        random_state=DIGITS_TEST_SEED,
    )
    return np.sort(test).astype(np.int64), np.sort(pool).astype(np.int64)


def digits_settings(num_clients: int, public_fraction: float, label_assignment: str,
                    labels_per_client: int, skew: float, seed: int,
                    public_source: str = "split", partition: PartitionSettings | None = None,
                    ) -> dict[str, Any]:
    """The settings that determine a built dataset, with normalised types (10 == 10.0).
    ``partition``: its scheme, alpha and min_samples are recorded when not the defaults."""
    scheme = partition_record(partition) if partition is not None else {}
    extra = dataset_settings({"public_source": public_source,  # left out when "split", ...
                              **{k: v for k, v in scheme.items()
                                 if k in ("partition", "alpha", "min_samples",
                                          "partition_sha256")}})
    if label_assignment == "even":  # distinct sets since rule 2 (rule 1 could repeat a set)
        extra["even_rule"] = 2
    return extra | {
        "dataset": "digits",
        "format_version": FORMAT_VERSION,
        "test_fraction": DIGITS_TEST_FRACTION,
        "test_seed": DIGITS_TEST_SEED,
        "num_clients": int(num_clients),
        "public_fraction": float(public_fraction),
        "label_assignment": str(label_assignment),
        "labels_per_client": int(labels_per_client),
        "skew": float(skew),
        "seed": int(seed),
    }


def dataset_dir_name(settings: dict) -> str:
    """``digits-`` + 12 hex chars of sha256 over the canonical JSON of ``settings``."""
    canonical = json.dumps(settings, sort_keys=True, separators=(",", ":"))
    return "digits-" + hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:12]


def build_digits_shards(root: str, *, num_clients: int, public_fraction: float,
                        label_assignment: str, labels_per_client: int, skew: float,
                        seed: int, public_source: str = "split", partition: str = "primary",
                        alpha: float = 0.5, min_samples: int = 1) -> str:
    """Build (or find) the digits dataset for these settings under ``root``; return its folder.
    ``public_source='all'``: the public split lists the whole training pool (MHD+);
    ``partition``, ``alpha``, ``min_samples``: as the data keys of the same names."""
    scheme = PartitionSettings(num_clients, public_fraction, label_assignment,
                               labels_per_client, skew, seed, public_source, partition, alpha,
                               min_samples)
    settings = digits_settings(num_clients, public_fraction, label_assignment,
                               labels_per_client, skew, seed, public_source,
                               scheme)  # recorded as is
    final = os.path.join(root, dataset_dir_name(settings))
    images, labels = load_digits_arrays()
    test, pool = digits_test_split(labels)
    scaled = images[pool].astype(np.float64) * DIGITS_SCALE
    splits = ArraySplits(
        "digits", images[pool], labels[pool], [f"digits-{j:05d}" for j in pool], images[test],
        labels[test], [f"digits-{j:05d}" for j in test], DIGITS_NUM_CLASSES,
        scale=DIGITS_SCALE,  # pixel values are 0..16; one channel: the mean over all pixels
        normalize={"scale": DIGITS_SCALE, "mean": [float(scaled.mean())],
                   "std": [float(scaled.std())]})
    build_array_shards(splits, final, scheme, settings=settings,
                       samples_per_shard=SAMPLES_PER_SHARD, layout=EMBEDDED_DIGITS_LAYOUT)
    return final
