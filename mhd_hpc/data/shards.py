"""WebDataset tar shards: writing and reading image/label samples.

A sample is two tar members that share a key: ``{key}.npy`` (a ``uint8`` image array of
shape ``(C, H, W)`` saved with ``numpy.save``) and ``{key}.cls`` (the label as ASCII decimal).
This is the layout that both the ``webdataset`` package and NVIDIA DALI's
``fn.readers.webdataset`` understand, so the same shards serve the fallback and the fast path.

Writes are atomic per shard: each tar is written under a hidden temporary name in the target
folder and renamed into place only once complete, so an interrupted writer never leaves a
truncated shard under a final name (a reader would otherwise see a silently short split).

Nothing here knows about ranks or clients; callers pass explicit paths.
"""

from __future__ import annotations

import io
import os
import tarfile
import tempfile
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import numpy as np

from mhd_hpc.runtime.files import replace_durably

__all__ = ["Samples", "write_shards", "read_shards", "shard_name", "add_member"]


@dataclass
class Samples:
    """An in-memory split: keys, images ``uint8 (N, C, H, W)`` and labels ``int64 (N,)``."""

    keys: list[str]
    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.keys)


def shard_name(prefix: str, index: int) -> str:
    """File name of shard ``index``: ``{prefix}-{index:06d}.tar``."""
    return f"{prefix}-{index:06d}.tar"


def _check_key(key: str) -> None:
    # webdataset (and DALI) split a member name at the first dot of its base name into key and
    # extension, so a dot in the key would silently corrupt the grouping on read.
    if not key or "." in key or "/" in key or any(ch.isspace() for ch in key):
        raise ValueError(
            f"invalid sample key {key!r}: must be non-empty, without '.', '/' or spaces"
        )


def _npy_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(image), allow_pickle=False)
    return buf.getvalue()


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    # Fixed metadata (mtime 0, no owner) makes shards byte-identical across rebuilds, which keeps
    # checksums and DALI index files stable.
    info = tarfile.TarInfo(name=name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o444
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


class _ShardWriter:
    """One shard being written under a temporary name; ``commit`` renames it into place."""

    def __init__(self, out_dir: str, final_name: str) -> None:
        self.final_path = os.path.join(out_dir, final_name)
        fd, self.tmp_path = tempfile.mkstemp(dir=out_dir, prefix=f".{final_name}.", suffix=".tmp")
        self._file = os.fdopen(fd, "wb")
        # Default (POSIX) format, as webdataset's own TarWriter uses: DALI reads it.
        self.tar = tarfile.open(fileobj=self._file, mode="w")
        self.count = 0

    def add(self, key: str, image: np.ndarray, label: int) -> None:
        add_member(self.tar, f"{key}.npy", _npy_bytes(image))
        add_member(self.tar, f"{key}.cls", str(int(label)).encode("ascii"))
        self.count += 1

    def commit(self) -> str:
        self.tar.close()
        self._file.close()
        os.chmod(self.tmp_path, 0o644)  # mkstemp creates 0600; shards are meant to be shared
        replace_durably(self.tmp_path, self.final_path)  # fsync, rename, fsync the folder
        return self.final_path

    def abort(self) -> None:
        try:
            self.tar.close()
            self._file.close()
        finally:
            if os.path.exists(self.tmp_path):
                os.unlink(self.tmp_path)


def write_shards(
    out_dir: str,
    keys: Sequence[str],
    images: Iterable[np.ndarray],
    labels: Sequence[int],
    samples_per_shard: int = 1000,
    prefix: str = "shard",
    first_index: int = 0,
) -> list[str]:
    """Write samples to ``out_dir/{prefix}-000000.tar``, ... and return the shard paths in order.

    ``images`` may be an array or any iterable (a generator lets large datasets stream); each
    item must be a ``uint8`` array of shape ``(C, H, W)``, all of the same shape; shards are
    numbered from ``first_index`` (a builder writing shard by shard names each). Zero samples
    write zero shards. If anything fails mid-way the shard in progress is removed; shards already
    completed stay (they are whole), and the exception propagates.
    """
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    if len(keys) != len(labels):
        raise ValueError(f"{len(keys)} keys but {len(labels)} labels")
    if hasattr(images, "__len__") and len(images) != len(keys):  # generators are checked at end
        raise ValueError(f"{len(keys)} keys but {len(images)} images")
    os.makedirs(out_dir, exist_ok=True)

    paths: list[str] = []
    writer: _ShardWriter | None = None
    shape: tuple[int, ...] | None = None
    seen: set[str] = set()
    n = 0
    try:
        for key, image, label in zip(keys, images, labels):
            _check_key(key)
            if key in seen:
                raise ValueError(f"duplicate sample key {key!r}")
            seen.add(key)
            image = np.asarray(image)
            if image.dtype != np.uint8 or image.ndim != 3:
                raise ValueError(
                    f"sample {key!r}: image must be uint8 (C,H,W), got {image.dtype} {image.shape}"
                )
            if shape is None:
                shape = image.shape
            elif image.shape != shape:
                raise ValueError(f"sample {key!r}: image shape {image.shape} differs from {shape}")
            if int(label) < 0:
                raise ValueError(f"sample {key!r}: negative label {label}")
            if writer is None:
                writer = _ShardWriter(out_dir, shard_name(prefix, first_index + len(paths)))
            writer.add(key, image, int(label))
            n += 1
            if writer.count == samples_per_shard:
                paths.append(writer.commit())
                writer = None
        if n != len(keys):
            raise ValueError(f"{len(keys)} keys but only {n} images")
        if writer is not None:
            paths.append(writer.commit())
            writer = None
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    return paths


def _decode_sample(sample: dict, url: str) -> tuple[str, np.ndarray, int]:
    key = sample["__key__"]
    for ext in ("npy", "cls"):
        if ext not in sample:
            raise ValueError(f"{url}: sample {key!r} has no .{ext} member")
    try:
        image = np.load(io.BytesIO(sample["npy"]), allow_pickle=False)
        label = int(sample["cls"].decode("ascii").strip())
    except Exception as exc:  # corrupt member: re-raise with the file and key named
        raise ValueError(f"{url}: sample {key!r} cannot be decoded: {exc}") from exc
    if image.dtype != np.uint8 or image.ndim != 3:
        raise ValueError(
            f"{url}: sample {key!r} image is {image.dtype} {image.shape}, not uint8 (C,H,W)"
        )
    return key, image, label


def _iter_shard(path: str) -> Iterator[dict]:
    """Samples of one shard, grouped by key with webdataset's own tar primitives.

    We open the file ourselves instead of going through ``wds.WebDataset``: webdataset 1.0.2
    leaves its shard streams for the garbage collector (a ResourceWarning per shard), and its
    pipeline consults the global torch rank for node splitting, which this layer must not do.
    Owning the file also lets every error name the exact shard.
    """
    from webdataset.tariterators import group_by_keys, tar_file_expander

    with open(path, "rb") as f:
        try:
            yield from group_by_keys(tar_file_expander([{"url": path, "stream": f}]))
        except (tarfile.TarError, EOFError, ValueError) as exc:
            reason = exc.args[0] if exc.args else exc
            raise ValueError(f"{path}: corrupt or truncated shard: {reason}") from exc


def read_shards(paths: Sequence[str]) -> Samples:
    """Read shards in the given order into memory (webdataset's tar reader and grouping).

    Raises ``FileNotFoundError`` / ``ValueError`` naming the offending file for a missing shard, a
    corrupt tar, a sample without ``.npy`` or ``.cls``, an undecodable member, a shape mismatch or
    a duplicate key. An empty ``paths`` gives empty ``Samples`` (images of shape ``(0,0,0,0)``).
    """
    paths = [os.fspath(p) for p in paths]
    for p in paths:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"shard not found: {p}")
    keys: list[str] = []
    images: list[np.ndarray] = []
    labels: list[int] = []
    first_path: str | None = None
    seen: set[str] = set()
    for path in paths:
        for sample in _iter_shard(path):
            key, image, label = _decode_sample(sample, path)
            if images and image.shape != images[0].shape:
                raise ValueError(
                    f"{path}: sample {key!r} has shape {image.shape}, but {first_path} has "
                    f"{images[0].shape}"
                )
            if key in seen:
                raise ValueError(f"{path}: duplicate sample key {key!r}")
            seen.add(key)
            first_path = first_path or path
            keys.append(key)
            images.append(image)
            labels.append(label)
    stacked = np.stack(images) if images else np.zeros((0, 0, 0, 0), dtype=np.uint8)
    return Samples(keys=keys, images=stacked, labels=np.asarray(labels, dtype=np.int64))
