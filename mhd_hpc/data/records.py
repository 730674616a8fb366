"""Raw uint8 record shards (manifest format ``u8``): images stored at training resolution, read
at I/O speed with no decode, and randomly addressable without loading a split into memory.

A shard is two files side by side::

    split/shard-000000.npy    uint8 (N, C, H, W), numpy's .npy format (memory-mapped on read)
    split/shard-000000.json   {"keys": [...], "labels": [...]} in the same order

The manifest lists the ``.npy`` files as the split's shards and records a sha256 for both
files. Small datasets (IDX, CIFAR) are stored this way for every split; a batch is a gather of
rows from memory-mapped shards, so every rank of a node shares the page cache of one copy.
"""

from __future__ import annotations

import json
import os

import numpy as np

from mhd_hpc.data.shards import Samples
from mhd_hpc.runtime.files import atomic_write, temp_path

__all__ = ["RECORDS_FORMAT", "meta_path", "write_record_shard", "RecordImages", "read_records"]

RECORDS_FORMAT = "u8"


def meta_path(shard_path: str) -> str:
    """``split/shard-000000.npy`` -> ``split/shard-000000.json`` (keys and labels)."""
    return os.path.splitext(shard_path)[0] + ".json"


def _replace_into(path: str, write) -> None:
    with atomic_write(path, tmp=temp_path(path, hidden=True)) as f:
        write(f)


def write_record_shard(path: str, keys: list[str], images: np.ndarray, labels: np.ndarray
                       ) -> list[str]:
    """Write one record shard (images first, then its keys and labels, each atomically);
    returns both paths."""
    images = np.ascontiguousarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or len(images) != len(keys) \
            or len(labels) != len(keys):
        raise ValueError(f"{path}: need uint8 (N, C, H, W) images with N keys and labels, got "
                         f"{images.dtype} {images.shape}, {len(keys)} keys, {len(labels)} "
                         "labels")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    _replace_into(path, lambda f: np.save(f, images, allow_pickle=False))
    meta = json.dumps({"keys": list(keys), "labels": [int(x) for x in labels]}).encode()
    _replace_into(meta_path(path), lambda f: f.write(meta))
    return [path, meta_path(path)]


class RecordImages:
    """The images of a split's record shards as one indexable array: ``images[idx]`` gathers
    rows from the memory-mapped shards (only those rows are read)."""

    def __init__(self, arrays: list[np.ndarray], shape: tuple[int, ...]):
        self.arrays = arrays
        self.starts = np.cumsum([0] + [len(a) for a in arrays])
        self.shape = (int(self.starts[-1]), *shape)
        self.dtype = np.dtype(np.uint8)
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx) -> np.ndarray:
        idx = np.asarray(idx, dtype=np.int64)
        if idx.ndim == 0:
            return self[idx[None]][0]
        out = np.empty((len(idx), *self.shape[1:]), dtype=np.uint8)
        shard = np.searchsorted(self.starts, idx, side="right") - 1
        for s in np.unique(shard):
            sel = shard == s
            out[sel] = self.arrays[s][idx[sel] - self.starts[s]]
        return out


def read_records(paths: list[str], image_shape: tuple[int, ...]) -> Samples:
    """A split's record shards, images memory-mapped; errors name the file."""
    arrays, keys, labels = [], [], []
    for path in paths:
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
            with open(meta_path(path), encoding="utf-8") as f:
                meta = json.load(f)
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"record shard file missing: {exc.filename}") from None
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path}: corrupt record shard ({exc})") from None
        if array.dtype != np.uint8 or tuple(array.shape[1:]) != tuple(image_shape) \
                or len(meta.get("keys", ())) != len(array) or \
                len(meta.get("labels", ())) != len(array):
            raise ValueError(f"{path}: {array.dtype} {array.shape} with "
                             f"{len(meta.get('keys', ()))} keys, expected uint8 (N, "
                             f"{', '.join(map(str, image_shape))}) with N keys and labels "
                             "(truncated or replaced?)")
        arrays.append(array)
        keys += meta["keys"]
        labels += meta["labels"]
    return Samples(keys, RecordImages(arrays, tuple(image_shape)),
                   np.asarray(labels, dtype=np.int64))
