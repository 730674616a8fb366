"""The embedded default dataset: scikit-learn's ``load_digits`` written as WebDataset shards.

``load_digits`` (1797 grey 8x8 images, pixel values 0..16, 10 classes) ships with scikit-learn,
so a demo or a test needs no download. A fixed stratified test split (seed 0, independent of the
run seed) is held out so that every run is evaluated on the same samples; the rest, the *pool*,
is split by :func:`mhd_hpc.data.partition.make_partition` into the public set and the clients.

Layout of a built dataset (``root/<dataset_dir_name>/``)::

    manifest.json            splits -> shard files, counts, normalisation, the partition
    test/shard-000000.tar
    public/shard-000000.tar
    client_000/shard-000000.tar  ...

The folder name hashes the settings, so different partitions live side by side, and the build
is atomic (temporary sibling folder, renamed at the end): a crash never leaves a half-built
dataset under the final name, and concurrent builders of the same settings all end up with one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from typing import Any

import numpy as np

from mhd_hpc.data.manifest import (FORMAT_VERSION, MANIFEST_NAME, file_sha256, load_manifest,
                                   use_whole_pool_as_public, write_manifest, write_order)
from mhd_hpc.data.partition import make_partition
from mhd_hpc.data.shards import write_shards

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
                    public_source: str = "split") -> dict[str, Any]:
    """The settings that determine a built dataset, with normalised types (10 == 10.0)."""
    extra = {} if public_source == "split" else {"public_source": public_source}
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


def _is_complete(dataset_dir: str, settings: dict) -> bool:
    """True if ``dataset_dir`` holds a readable manifest for ``settings`` and all its shards."""
    manifest = load_manifest(dataset_dir)
    if manifest.get("settings") != settings:
        raise ValueError(
            f"{os.path.join(dataset_dir, MANIFEST_NAME)} was built with other settings "
            f"({manifest.get('settings')}) than requested ({settings})"
        )
    files = [f for shards in manifest["splits"].values() for f in shards]
    return all(os.path.isfile(os.path.join(dataset_dir, f)) for f in files)


def build_digits_shards(root: str, *, num_clients: int, public_fraction: float,
                        label_assignment: str, labels_per_client: int, skew: float,
                        seed: int, public_source: str = "split") -> str:
    """Build (or find) the digits dataset for these settings under ``root``; return its folder.
    ``public_source='all'``: the public split lists the whole training pool (MHD+)."""
    settings = digits_settings(num_clients, public_fraction, label_assignment,
                               labels_per_client, skew, seed, public_source)  # recorded as is
    final = os.path.join(root, dataset_dir_name(settings))
    if os.path.exists(final):
        if _is_complete(final, settings):
            return final
        raise ValueError(f"{final} exists but lacks shards listed in its manifest; delete it")

    images, labels = load_digits_arrays()
    test, pool = digits_test_split(labels)
    part = make_partition(labels[pool], num_clients, public_fraction, label_assignment,
                          labels_per_client, skew, seed, num_classes=DIGITS_NUM_CLASSES)

    # Partition indices point into the pool; map them back to load_digits indices. Public and
    # client splits are written in the manifest's write order; the test split in source order.
    splits: dict[str, np.ndarray] = {"test": test}
    splits.update(write_order(seed, pool[part.public], [pool[idx] for idx in part.clients]))

    scaled = images[pool].astype(np.float64) * DIGITS_SCALE
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=root, prefix=f".{os.path.basename(final)}.tmp-")
    try:
        manifest: dict[str, Any] = {
            "dataset": "digits",
            "format_version": FORMAT_VERSION,
            "num_classes": DIGITS_NUM_CLASSES,
            "image_shape": [1, 8, 8],
            "normalize": {"scale": DIGITS_SCALE, "mean": [float(scaled.mean())],
                          "std": [float(scaled.std())]},
            "settings": settings,
            "partition": part.manifest(),
            "splits": {},
            "counts": {},
            "class_counts": {},
            "bytes": {},
            "shard_sha256": {},
        }
        for name, idx in splits.items():
            paths = write_shards(os.path.join(tmp, name), [f"digits-{j:05d}" for j in idx],
                                 images[idx], labels[idx], samples_per_shard=SAMPLES_PER_SHARD)
            manifest["splits"][name] = [os.path.relpath(p, tmp) for p in paths]
            manifest["bytes"][name] = sum(os.path.getsize(p) for p in paths)
            manifest["shard_sha256"].update({os.path.relpath(p, tmp): file_sha256(p)
                                             for p in paths})
            manifest["counts"][name] = int(idx.size)
            manifest["class_counts"][name] = np.bincount(
                labels[idx], minlength=DIGITS_NUM_CLASSES).tolist()
        if public_source == "all":
            use_whole_pool_as_public(manifest)
        write_manifest(tmp, manifest)
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700; the dataset is meant to be shared
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process finished the same build first; its result is equivalent.
            if not (os.path.isdir(final) and _is_complete(final, settings)):
                raise
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return final
