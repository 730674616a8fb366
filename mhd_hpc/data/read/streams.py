"""Step-indexed image streams over built datasets: the base class and what backends share.

:class:`BatchStream` owns the sample *order*, :class:`~mhd_hpc.data.read.batches.StepBatches`' order
for ``(seed, step)`` sliced by ``part``/``num_parts``: the private stream resumes exactly at any
step, and the public stream is aligned across clients. Backends only decode: :class:`NpyStream`
(in-memory ``.npy`` datasets, here), ``PilStream`` (:mod:`mhd_hpc.data.read.pil_stream`) and
``DaliStream`` (:mod:`mhd_hpc.data.read.dali_streams`), both reading encoded JPEG bytes through
:class:`SplitTable` at offsets from the DALI index files (which is why the DALI backend feeds
``fn.external_source`` instead of using ``fn.readers.webdataset``, whose shuffle is its own).
:func:`mhd_hpc.data.read.stream_factory.open_stream` picks the backend.

Transforms (``kind``), identical in both backends up to decoder/resampler rounding:

* ``train``: random-resized crop (area 8-100 %, aspect 3/4-4/3) to S x S, random flip;
* ``public`` / ``eval``: resize the shorter side to round(S / 0.875), centre crop S x S;

Batches come out as raw uint8 with the manifest's ``normalize`` (``(x * scale - mean) / std``),
applied where the batch is used (``devices.to_device``). Datasets of raw uint8 samples (the
embedded digits, IDX and CIFAR builds, the pre-resized public and test splits of JPEG builds)
are served without decoding, untransformed.
"""

from __future__ import annotations

import math
import os
import zlib
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from mhd_hpc.data.checksums import DamagedSample, ShardSums, read_sums, sums_path
from mhd_hpc.data.manifest import Manifest
from mhd_hpc.data.read.batches import Batch, PoissonBatches, StepBatches, key_hash
from mhd_hpc.data.shards import Samples
from mhd_hpc.data.tarindex import index_path, index_tar, read_index

__all__ = ["KINDS", "BatchStream", "ByteReader", "NpyStream", "SplitTable", "resize_shorter_to",
           "resized_size", "centre_offset", "resize_uint8", "resize_crops"]

KINDS = ("train", "public", "eval")
EVAL_CROP_RATIO = 0.875  # the usual ImageNet 224/256


def _round(x: float) -> int:
    return int(math.floor(x + 0.5))  # half up, as DALI rounds sizes and crop anchors


def resize_shorter_to(size: int) -> int:
    """Shorter side before the centre crop: round(S / 0.875) (256 for 224)."""
    return _round(size / EVAL_CROP_RATIO)


def resized_size(w: int, h: int, shorter: int) -> tuple[int, int]:
    """(w, h) after resizing the shorter side to ``shorter``, rounded like DALI's resize."""
    if w <= h:
        return shorter, _round(h * shorter / w)
    return _round(w * shorter / h), shorter


def centre_offset(extent: int, crop: int) -> int:
    """Left/top of a centred crop, rounded like DALI's ``crop_pos=0.5``."""
    return _round((extent - crop) * 0.5)


def resize_uint8(hwc: np.ndarray, size: int) -> np.ndarray:
    """``uint8 (H, W, 3)`` -> ``uint8 (3, S, S)`` (a channels-last view): bilinear with
    antialiasing, the filter of PIL's ``BILINEAR`` resize, through torch's uint8 kernel (SIMD,
    on the uint8 pixels, no float copy): 0.85 against PIL's 1.48 ms per 224 px crop of a 500 x
    375 image on one core, the same pixels up to weight rounding (mean absolute difference 0.01
    levels downscaling, 0.07 upscaling)."""
    t = torch.from_numpy(hwc).permute(2, 0, 1).unsqueeze(0)  # channels-last contiguous
    out = torch.nn.functional.interpolate(t, size=(size, size), mode="bilinear",
                                          antialias=True, align_corners=False)
    return out[0].numpy()


def resize_crops(crops: list[np.ndarray], size: int, pool=None) -> torch.Tensor:
    """Crops of any size (``uint8 (H, W, 3)``) -> one ``uint8 (B, 3, S, S)`` batch, resized by
    :func:`resize_uint8`; ``pool`` (a ``concurrent.futures`` executor) spreads them over its
    threads (torch's kernel releases the GIL)."""
    out = torch.empty((len(crops), 3, size, size), dtype=torch.uint8)
    view = out.numpy()

    def one(j: int) -> None:
        view[j] = resize_uint8(crops[j], size)

    if pool is None:
        for j in range(len(crops)):
            one(j)
    else:
        list(pool.map(one, range(len(crops))))  # list(): re-raise a worker's exception
    return out


@dataclass
class SplitTable:
    """Random-access view of a JPEG split: per sample its shard, byte range, key, label and
    the CRC32 of its JPEG bytes (-1: a shard built before checksums, not checked)."""

    paths: list[str]
    shard: np.ndarray
    offset: np.ndarray
    size: np.ndarray
    keys: list[str]
    labels: np.ndarray
    crc: np.ndarray | None = None  # int64; None: no shard of the split has checksums
    unchecked: int = 0  # shards without checksums

    def __len__(self) -> int:
        return len(self.keys)

    def where(self, i: int) -> str:
        """'SHARD: sample KEY' for messages about sample ``i``."""
        return f"{self.paths[int(self.shard[i])]}: sample {self.keys[i]!r}"

    @classmethod
    def load(cls, dataset_dir: str, split: str, manifest: Manifest | dict) -> "SplitTable":
        manifest = Manifest.of(manifest)
        paths = [os.path.join(dataset_dir, f) for f in manifest.splits[split]]
        shard, offset, size, keys, labels, crc = [], [], [], [], [], []
        unchecked = 0
        for s, path in enumerate(paths):
            idx = index_path(path)
            # No index (a foreign dataset): scan the tar headers, as DALI would at start-up.
            entries = read_index(idx) if os.path.isfile(idx) else index_tar(path)
            sums = read_sums(sums_path(path)) if os.path.isfile(sums_path(path)) else None
            unchecked += sums is None
            with open(path, "rb") as f:
                for e in entries:
                    if "jpg" not in e.members or "cls" not in e.members:
                        raise ValueError(f"{path}: sample {e.key!r} lacks .jpg or .cls")
                    recorded = _recorded(sums, e, path)
                    off, n = e.members["cls"]
                    raw = os.pread(f.fileno(), n, off)
                    if len(raw) != n or (recorded and zlib.crc32(raw) != recorded["cls"][1]):
                        raise DamagedSample(f"{path}: sample {e.key!r}: its label (.cls) is not "
                                            f"what was written (truncated or damaged shard)")
                    labels.append(int(raw.decode("ascii")))
                    shard.append(s)
                    offset.append(e.members["jpg"][0])
                    size.append(e.members["jpg"][1])
                    keys.append(e.key)
                    crc.append(recorded["jpg"][1] if recorded else -1)
        expected = manifest.counts.get(split)
        if expected is not None and expected != len(keys):
            raise ValueError(f"{dataset_dir}: split {split!r} has {len(keys)} indexed samples, "
                             f"manifest says {expected}")
        return cls(paths, np.asarray(shard, np.int32), np.asarray(offset, np.int64),
                   np.asarray(size, np.int64), keys, np.asarray(labels, np.int64),
                   np.asarray(crc, np.int64) if unchecked < len(paths) else None, unchecked)


def _recorded(sums: ShardSums | None, entry, path: str) -> dict | None:
    """The sums of ``entry``'s members, checked against the index (same members and sizes)."""
    if sums is None:
        return None
    recorded = sums.members.get(entry.key)
    if recorded is None or any(recorded.get(ext, (-1,))[0] != size
                               for ext, (_, size) in entry.members.items()):
        raise ValueError(f"{sums_path(path)}: sample {entry.key!r} does not match the index "
                         f"{index_path(path)} (stale files: rebuild with tools/make_shards.py)")
    return recorded


class ByteReader:
    """``pread`` of encoded samples; file descriptors opened lazily per process (picklable)."""

    def __init__(self, table: SplitTable) -> None:
        self.table = table
        self._fds: dict[int, int] = {}

    def __getstate__(self) -> dict:
        return {"table": self.table, "_fds": {}}  # descriptors do not cross a fork/pickle

    def read(self, i: int) -> bytes:
        """Sample ``i``'s JPEG bytes, checked against their size and CRC32 (when the shard has
        checksums): damage raises :class:`DamagedSample` naming the shard and the key."""
        table = self.table
        s = int(table.shard[i])
        fd = self._fds.get(s)
        if fd is None:
            fd = self._fds[s] = os.open(table.paths[s], os.O_RDONLY)
        size = int(table.size[i])
        data = os.pread(fd, size, int(table.offset[i]))
        if len(data) != size:
            raise DamagedSample(f"{table.where(i)}: {len(data)} of its {size} bytes left: the "
                                f"shard was truncated")
        if table.crc is None or table.crc[i] < 0:  # an older shard: at least a JPEG's start
            if data[:2] != b"\xff\xd8":  # (DALI's CPU decoder crashed on zeroed bytes)
                raise DamagedSample(f"{table.where(i)}: not a JPEG (no start-of-image marker): "
                                    "the shard is damaged")
        elif zlib.crc32(data) != table.crc[i]:
            raise DamagedSample(f"{table.where(i)}: its bytes differ from those written when "
                                f"the shard was built (CRC32 mismatch): the shard is damaged; "
                                f"copy it again or rebuild it with tools/make_shards.py")
        return data

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


class BatchStream:
    """Batches of one split: ``batch(step)`` in StepBatches order, ``eval_batches()`` in order.

    Subclasses decode; this base owns the order. ``batch`` is fastest for consecutive steps
    (backends prefetch ahead) and correct for any step (a jump restarts the prefetcher).
    ``eval_batches`` always uses the deterministic transform and covers this part's contiguous
    slice of the split (everything when ``num_parts == 1``), the last batch partial.
    """

    def __init__(self, keys: list[str], labels: np.ndarray, normalize: dict, batch_size: int,
                 seed: int, kind: str, part: int, num_parts: int,
                 poisson_rate: float = 0.0) -> None:
        """``poisson_rate`` > 0 (a ``train`` stream of one part): each sample joins a step's
        batch with this probability (:class:`PoissonBatches`) instead of the shuffled order."""
        if kind not in KINDS:
            raise ValueError(f"unknown stream kind {kind!r}; expected one of {KINDS}")
        self.keys, self.labels, self.normalize = keys, labels, normalize
        self.batch_size, self.seed, self.kind = int(batch_size), int(seed), kind
        self.part, self.num_parts = part, num_parts
        if num_parts < 1 or not 0 <= part < num_parts:
            raise ValueError(f"need 0 <= part < num_parts, got part={part}, num_parts={num_parts}")
        # StepBatches is the single definition of the order; images are not needed for that.
        stub = Samples(keys, np.zeros((len(keys), 0, 0, 0), np.uint8), labels)
        self.order = (StepBatches(stub, batch_size, {}, seed, True, part, num_parts)
                      if len(keys) and kind != "eval" else None)
        if poisson_rate:
            if kind != "train" or num_parts != 1:
                raise ValueError(f"Poisson sampling is for the private (train) stream of a "
                                 f"one-rank client, not kind={kind!r} in {num_parts} parts")
            self.order = PoissonBatches(len(keys), poisson_rate, seed)

    @property
    def num_samples(self) -> int:
        return len(self.keys)

    def indices(self, step: int) -> np.ndarray:
        """Sample indices of this part's batch at ``step``."""
        if self.order is None:
            raise ValueError(f"batch(step) needs kind 'train' or 'public' and a non-empty split "
                             f"(kind={self.kind!r}, {self.num_samples} samples)")
        return self.order.indices(step)

    def global_key_hash(self, step: int) -> int:
        """:func:`key_hash` of the whole (all parts) batch at ``step``, for alignment checks."""
        if self.order is None:
            self.indices(step)  # raises the explanatory error
        return key_hash([self.keys[i] for i in self.order.global_indices(step)])

    def epoch_of(self, step: int) -> float:
        return step * self.batch_size / max(1, self.num_samples)

    def eval_ranges(self) -> list[tuple[int, int]]:
        n = self.num_samples
        lo, hi = self.part * n // self.num_parts, (self.part + 1) * n // self.num_parts
        return [(a, min(a + self.batch_size, hi)) for a in range(lo, hi, self.batch_size)]

    def _batch(self, idx: np.ndarray, images: torch.Tensor, flip: torch.Tensor | None = None,
               normalized: bool = False) -> Batch:
        """Raw uint8 ``images`` (to be normalised where they are used), or already
        normalised ones (``normalized``: DALI's GPU pipeline)."""
        return Batch(keys=[self.keys[i] for i in idx], images=images,
                     labels=torch.from_numpy(self.labels[idx]),
                     normalize=None if normalized else self.normalize, flip=flip)

    def batch(self, step: int) -> Batch:
        raise NotImplementedError

    def eval_batches(self) -> Iterator[Batch]:
        raise NotImplementedError

    def close(self) -> None:
        """Release workers, pipelines and files (also done on garbage collection)."""

    def __enter__(self) -> "BatchStream":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class NpyStream(BatchStream):
    """Datasets of raw uint8 samples at training resolution (``.npy`` tars read into memory,
    record shards memory-mapped): rows gathered, no decode, no transform."""

    def __init__(self, samples: Samples, normalize: dict, **kw) -> None:
        super().__init__(samples.keys, samples.labels, normalize, **kw)
        self.samples = samples

    def _rows(self, idx: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.samples.images[idx]))

    def batch(self, step: int) -> Batch:
        idx = self.indices(step)
        return self._batch(idx, self._rows(idx))

    def eval_batches(self) -> Iterator[Batch]:
        for lo, hi in self.eval_ranges():
            idx = np.arange(lo, hi)
            yield self._batch(idx, self._rows(idx))
