"""Readers for the labelled image datasets researchers keep on disk as arrays, into uint8
``(N, C, H, W)`` images and int64 labels (no download, no I/O beyond the files named):

* ``idx``: the IDX files of MNIST, Fashion-MNIST, KMNIST and EMNIST (gzipped or plain):
  ``[prefix]train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
  ``t10k-labels-idx1-ubyte`` (each optionally ``.gz``). The format: two zero bytes, a type byte
  (0x08 = uint8), the number of dimensions, one big-endian uint32 size per dimension, then the
  data in C order.
* ``cifar``: the python-pickle CIFAR-10 (``data_batch_1..5``, ``test_batch``, ``batches.meta``)
  and CIFAR-100 (``train``, ``test``, ``meta``; fine or coarse labels) distributions.

A missing, truncated or malformed file is a ``DatasetFileError`` naming it.
"""

from __future__ import annotations

import gzip
import os
import pickle
from dataclasses import dataclass

import numpy as np

__all__ = ["ArrayDataset", "DatasetFileError", "read_idx", "load_idx_dataset",
           "load_cifar_dataset", "FASHION_MNIST_CLASSES", "CIFAR_LABELS"]

FASHION_MNIST_CLASSES = ["t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal",
                         "shirt", "sneaker", "bag", "ankle boot"]
CIFAR_LABELS = ("fine", "coarse")
_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class DatasetFileError(ValueError):
    """A dataset file is missing, truncated or not in the expected format (names the file)."""


@dataclass
class ArrayDataset:
    """A labelled dataset in memory: the official train and test splits."""

    name: str
    train_images: np.ndarray  # uint8 (N, C, H, W)
    train_labels: np.ndarray  # int64 (N,)
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: list[str]
    files: list[str]  # what it was read from

    def __post_init__(self) -> None:
        for split, images, labels in (("train", self.train_images, self.train_labels),
                                      ("test", self.test_images, self.test_labels)):
            if images.dtype != np.uint8 or images.ndim != 4 or len(images) != len(labels):
                raise DatasetFileError(f"{self.name} {split}: {images.dtype} images of shape "
                                       f"{images.shape} with {len(labels)} labels "
                                       f"({', '.join(self.files)})")
            if len(labels) and (labels.min() < 0 or labels.max() >= len(self.classes)):
                raise DatasetFileError(f"{self.name} {split}: labels outside [0, "
                                       f"{len(self.classes)}) ({', '.join(self.files)})")


def _open(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def read_idx(path: str) -> np.ndarray:
    """One IDX file (plain or ``.gz``) as a numpy array of its stored shape."""
    try:
        with _open(path) as f:
            data = f.read()
    except FileNotFoundError:
        raise DatasetFileError(f"{path}: no such file") from None
    except (OSError, EOFError) as exc:  # a truncated gzip stream raises EOFError
        raise DatasetFileError(f"{path}: unreadable or truncated ({exc})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_TYPES:
        raise DatasetFileError(f"{path}: not an IDX file (bad magic {data[:4].hex()})")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetFileError(f"{path}: truncated IDX header")
    shape = tuple(int.from_bytes(data[4 + 4 * d:8 + 4 * d], "big") for d in range(ndim))
    dtype = np.dtype(_IDX_TYPES[data[2]])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise DatasetFileError(f"{path}: holds {len(data) - header} data bytes, its header "
                               f"{shape} needs {expected} (truncated or corrupt)")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


def _find(folder: str, stem: str) -> str:
    """``folder/[prefix-]stem`` or ``...stem.gz`` (EMNIST names its files with a prefix)."""
    if not os.path.isdir(folder):
        raise DatasetFileError(f"{folder}: no such folder")
    found = sorted(n for n in os.listdir(folder)
                   if n.endswith((stem, stem + ".gz")) and not n.startswith("."))
    if not found:
        raise DatasetFileError(f"{os.path.join(folder, stem)}[.gz]: missing")
    if len(found) > 1:
        raise DatasetFileError(f"{folder}: several files end in {stem}: {found}; pass a folder "
                               "holding one dataset")
    return os.path.join(folder, found[0])


def load_idx_dataset(folder: str, name: str | None = None,
                     classes: list[str] | None = None) -> ArrayDataset:
    """The four IDX files of an MNIST-family dataset in ``folder``."""
    paths = {part: _find(folder, f"{part}-ubyte") for part in
             ("train-images-idx3", "train-labels-idx1", "t10k-images-idx3", "t10k-labels-idx1")}
    arrays = {part: read_idx(path) for part, path in paths.items()}
    for part in ("train", "t10k"):
        images, labels = arrays[f"{part}-images-idx3"], arrays[f"{part}-labels-idx1"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DatasetFileError(f"{paths[f'{part}-images-idx3']} ({images.shape}) and "
                                   f"{paths[f'{part}-labels-idx1']} ({labels.shape}) do not "
                                   "pair up as images (N, H, W) and labels (N,)")
    train_labels = arrays["train-labels-idx1"].astype(np.int64)
    test_labels = arrays["t10k-labels-idx1"].astype(np.int64)
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    return ArrayDataset(name or os.path.basename(os.path.normpath(folder)),
                        np.ascontiguousarray(arrays["train-images-idx3"][:, None]), train_labels,
                        np.ascontiguousarray(arrays["t10k-images-idx3"][:, None]), test_labels,
                        classes or [str(c) for c in range(num_classes)], list(paths.values()))


def _unpickle(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="bytes")
    except FileNotFoundError:
        raise DatasetFileError(f"{path}: missing") from None
    except (pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise DatasetFileError(f"{path}: not a CIFAR python batch ({exc})") from None


def _cifar_batch(path: str, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    batch = _unpickle(path)
    if b"data" not in batch or label_key not in batch:
        raise DatasetFileError(f"{path}: lacks {label_key.decode()!r} or 'data'")
    data = np.asarray(batch[b"data"], dtype=np.uint8)
    labels = np.asarray(batch[label_key], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise DatasetFileError(f"{path}: data of shape {data.shape} with {len(labels)} labels "
                               "(expected (N, 3072) uint8 rows; truncated?)")
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar_dataset(folder: str, labels: str = "fine") -> ArrayDataset:
    """CIFAR-10 (``data_batch_*``) or CIFAR-100 (``train``/``test``) python batches in
    ``folder``; ``labels``: CIFAR-100's ``fine`` (100) or ``coarse`` (20) classes."""
    if labels not in CIFAR_LABELS:
        raise ValueError(f"labels must be one of {CIFAR_LABELS}, got {labels!r}")
    if os.path.exists(os.path.join(folder, "train")):  # CIFAR-100
        key = b"fine_labels" if labels == "fine" else b"coarse_labels"
        meta = _unpickle(os.path.join(folder, "meta"))
        names = meta.get(b"fine_label_names" if labels == "fine" else b"coarse_label_names")
        train_files = [os.path.join(folder, "train")]
        name = "cifar100" + ("" if labels == "fine" else "-coarse")
    else:  # CIFAR-10
        key = b"labels"
        meta = _unpickle(os.path.join(folder, "batches.meta"))
        names = meta.get(b"label_names")
        train_files = [os.path.join(folder, f"data_batch_{i}") for i in range(1, 6)]
        name = "cifar10"
    test_file = os.path.join(folder, "test_batch" if key == b"labels" else "test")
    parts = [_cifar_batch(p, key) for p in train_files]
    test_images, test_labels = _cifar_batch(test_file, key)
    if not names:
        raise DatasetFileError(f"{folder}: the meta file lacks the label names")
    return ArrayDataset(name, np.concatenate([p[0] for p in parts]),
                        np.concatenate([p[1] for p in parts]), test_images, test_labels,
                        [n.decode() if isinstance(n, bytes) else str(n) for n in names],
                        train_files + [test_file])
