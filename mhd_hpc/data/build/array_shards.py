"""Build a partitioned shard dataset from images held as arrays (the embedded digits, IDX and
CIFAR files), in the layout of :mod:`mhd_hpc.data.manifest`: raw uint8 record shards
(``u8``, :mod:`mhd_hpc.data.records`: read at I/O speed, no decode, memory-mapped), or, for the
embedded digits (kept as their run folders know them), WebDataset tars of ``.npy`` samples.

The partition is :func:`~mhd_hpc.data.build.partition.make_partition` of the training labels; the
public and client splits are written in :func:`~mhd_hpc.data.manifest.write_order`, the test
split in source order. Writing is resumable shard by shard, as for ImageFolder trees: a shard is
written to a temporary name and renamed, then a ``.done`` sidecar records its plan (keys,
labels, a digest of its pixels), sample count, size and sha256; a rerun skips every shard whose
sidecar matches its plan, and the manifest is written last, so a folder with a manifest is
complete. A ``flock`` on ``.build.lock`` keeps two builders of one folder apart; a complete
folder is used without it (nothing is created there, so shared data may be read-only).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Callable, Iterator

import numpy as np

from mhd_hpc.data.manifest import (FORMAT_VERSION, MANIFEST_NAME, file_sha256, load_manifest,
                                   use_whole_pool_as_public, write_manifest, write_order)
from mhd_hpc.data.build.partition import make_partition
from mhd_hpc.data.records import RECORDS_FORMAT, write_record_shard
from mhd_hpc.data.shards import shard_name, write_shards
from mhd_hpc.run.compat import dataset_settings
from mhd_hpc.runtime.files import atomic_write
from mhd_hpc.runtime.plugins import is_import_path, source_digest

__all__ = ["PartitionSettings", "ArraySplits", "build_array_shards", "FAULT_ENV",
           "NotWritableError"]

FAULT_ENV = "MHD_MAKE_SHARDS_FAIL_AFTER"  # test hook: raise after this many shards were written


@dataclass(frozen=True)
class PartitionSettings:
    """How the training pool is split (paper §3.3), recorded in the manifest."""

    clients: int
    public_fraction: float = 0.1
    label_assignment: str = "random"
    labels_per_client: int = 3
    skew: float = 100.0
    seed: int = 0
    public_source: str = "split"
    partition: str = "primary"  # primary | dirichlet | a plug-in's package.module:function
    alpha: float = 0.5  # dirichlet's concentration
    min_samples: int = 1  # fewest private samples a client may receive


@dataclass
class ArraySplits:
    """What a builder hands over: the training pool and the test split, with sample keys."""

    name: str
    train_images: np.ndarray  # uint8 (N, C, H, W)
    train_labels: np.ndarray
    train_keys: list[str]
    test_images: np.ndarray
    test_labels: np.ndarray
    test_keys: list[str]
    num_classes: int
    classes: list[str] | None = None
    scale: float = 1.0 / 255.0  # pixel value -> [0, 1]
    normalize: dict | None = None  # default: per-channel mean and std of the training pool


def _normalize(images: np.ndarray, scale: float) -> dict:
    """Per-channel mean and std of the training pool after ``scale``."""
    scaled = images.astype(np.float64) * scale
    axes = (0, 2, 3)
    return {"scale": scale, "mean": [float(m) for m in scaled.mean(axis=axes)],
            "std": [float(s) for s in scaled.std(axis=axes)]}


def _plan_hash(relpath: str, keys: list[str], labels: np.ndarray, images: np.ndarray) -> str:
    h = hashlib.sha256(json.dumps([relpath, keys, labels.tolist()]).encode())
    h.update(np.ascontiguousarray(images).tobytes())
    return h.hexdigest()


def _done_path(out_dir: str, relpath: str) -> str:
    return os.path.join(out_dir, os.path.splitext(relpath)[0] + ".done")


def _read_done(out_dir: str, relpath: str, plan: str) -> dict | None:
    try:
        with open(_done_path(out_dir, relpath), encoding="utf-8") as f:
            done = json.load(f)
        ok = done.get("plan") == plan and done["bytes"] == sum(
            os.path.getsize(os.path.join(out_dir, f)) for f in done["sha256"])
    except (OSError, ValueError, KeyError):
        return None
    return done if ok else None


def _complete_manifest(out_dir: str, settings: dict) -> dict | None:
    """The manifest of the complete dataset in ``out_dir`` built with ``settings``; None when
    there is none yet (a folder with a manifest is complete: the manifest is written last)."""
    if not os.path.isfile(os.path.join(out_dir, MANIFEST_NAME)):
        return None
    manifest = load_manifest(out_dir)
    if manifest.get("settings") != settings:
        raise ValueError(f"{os.path.join(out_dir, MANIFEST_NAME)} was built with other "
                         f"settings ({manifest.get('settings')}) than requested ({settings})")
    return manifest


class NotWritableError(OSError):
    """A dataset must be built where nothing may be written (a read-only ``data.root``)."""


@contextmanager
def _build_lock(out_dir: str) -> Iterator[None]:
    try:
        os.makedirs(out_dir, exist_ok=True)
        fd = os.open(os.path.join(out_dir, ".build.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:  # read-only storage, no permission: only a build needs to write
        raise NotWritableError(exc.errno, f"the dataset is not built there yet and building it "
                               f"needs write access: {exc.strerror} ({exc.filename})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # waits for another builder of the same folder
        yield
    finally:
        os.close(fd)


def _split_order(data: ArraySplits, s: PartitionSettings) -> tuple[dict, dict]:
    part = make_partition(data.train_labels, s.clients, s.public_fraction, s.label_assignment,
                          s.labels_per_client, s.skew, s.seed, num_classes=data.num_classes,
                          scheme=s.partition, alpha=s.alpha, min_samples=s.min_samples)
    order = {"test": None}
    order.update(write_order(s.seed, part.public, part.clients))
    return part.manifest(), order


def build_array_shards(data: ArraySplits, out_dir: str, s: PartitionSettings, *,
                       settings: dict, samples_per_shard: int = 5000,
                       layout: str = RECORDS_FORMAT,
                       log: Callable[[str], None] = lambda m: None) -> dict:
    """Write (or complete) the dataset in ``out_dir``; returns its manifest. ``settings``: what
    the manifest records as the dataset's settings (a built dataset is found again by them);
    ``layout``: ``u8`` record shards or ``npy`` sample tars."""
    if layout not in (RECORDS_FORMAT, "npy"):
        raise ValueError(f"unknown layout {layout!r}")
    # A complete dataset is used as it is, without the lock: shared data is often read-only.
    complete = _complete_manifest(out_dir, settings)
    if complete is not None:
        log(f"{data.name}: complete already, nothing written ({out_dir})")
        return complete
    with _build_lock(out_dir):
        complete = _complete_manifest(out_dir, settings)  # another builder may have finished
        if complete is not None:
            log(f"{data.name}: complete already, nothing written ({out_dir})")
            return complete
        part_manifest, order = _split_order(data, s)
        manifest: dict = {
            "dataset": data.name, "format_version": FORMAT_VERSION, "format": layout,
            "num_classes": data.num_classes, "image_shape": list(data.train_images.shape[1:]),
            "normalize": data.normalize or _normalize(data.train_images, data.scale),
            "settings": settings,
            "partition": part_manifest, "splits": {}, "counts": {}, "class_counts": {},
            "bytes": {}, "shard_sha256": {},
        }
        if data.classes is not None:
            manifest["classes"] = list(data.classes)
        written, skipped = _write_splits(data, order, out_dir, samples_per_shard, manifest,
                                         layout)
        if s.public_source == "all":
            use_whole_pool_as_public(manifest)
        write_manifest(out_dir, manifest)
        log(f"{data.name}: {written} shards written, {skipped} already complete, in {out_dir}")
        return manifest


def _write_splits(data: ArraySplits, order: dict, out_dir: str, samples_per_shard: int,
                  manifest: dict, layout: str) -> tuple[int, int]:
    fail_after = int(os.environ.get(FAULT_ENV, "0") or 0)
    written = skipped = 0
    for split, idx in order.items():
        if idx is None:
            images, labels, keys = data.test_images, data.test_labels, data.test_keys
        else:
            images, labels = data.train_images[idx], data.train_labels[idx]
            keys = [data.train_keys[i] for i in idx]
        manifest["splits"][split], manifest["bytes"][split] = [], 0
        for j, lo in enumerate(range(0, len(keys), samples_per_shard)):
            hi = lo + samples_per_shard
            relpath = os.path.join(split, shard_name("shard", j))
            if layout == RECORDS_FORMAT:
                relpath = relpath.removesuffix(".tar") + ".npy"
            plan = _plan_hash(relpath, keys[lo:hi], labels[lo:hi], images[lo:hi])
            done = _read_done(out_dir, relpath, plan)
            if done is None:
                path = os.path.join(out_dir, relpath)
                if layout == RECORDS_FORMAT:
                    files = write_record_shard(path, keys[lo:hi], images[lo:hi], labels[lo:hi])
                else:
                    files = write_shards(os.path.join(out_dir, split), keys[lo:hi],
                                         images[lo:hi], labels[lo:hi],
                                         samples_per_shard=samples_per_shard, first_index=j)
                done = {"plan": plan, "count": len(keys[lo:hi]),
                        "bytes": sum(os.path.getsize(f) for f in files),
                        "sha256": {os.path.relpath(f, out_dir): file_sha256(f) for f in files}}
                with atomic_write(_done_path(out_dir, relpath), "w") as f:
                    json.dump(done, f)
                written += 1
                if fail_after and written >= fail_after:
                    raise RuntimeError(f"{FAULT_ENV}={fail_after}: injected failure")
            else:
                skipped += 1
            manifest["splits"][split].append(relpath)
            manifest["bytes"][split] += done["bytes"]
            manifest["shard_sha256"].update(done["sha256"])
        manifest["counts"][split] = len(keys)
        manifest["class_counts"][split] = np.bincount(
            labels, minlength=data.num_classes).astype(int).tolist()
    return written, skipped


def settings_record(dataset: str, s: PartitionSettings, **extra) -> dict:
    """The manifest's ``settings`` of a built-in dataset: what it is and how it was split."""
    # settings added since the first builds are left out at their old value (run.compat)
    return dataset_settings({"dataset": dataset, "format_version": FORMAT_VERSION,
                             **partition_record(s), **extra})


def partition_record(s: PartitionSettings) -> dict:
    """``s`` as recorded: alpha only for dirichlet, and for a plug-in the digest of its source
    (a changed plug-in builds a new dataset instead of finding the old one)."""
    record = asdict(s)
    if s.partition != "dirichlet":
        record.pop("alpha")
    if is_import_path(s.partition):
        record["partition_sha256"] = source_digest(s.partition)
    return record
