"""Step-indexed image streams over built datasets, with a DALI and a webdataset/PIL backend.

``open_stream`` is the training loop's entry point. Whatever the backend, the sample *order* is
:class:`~mhd_hpc.data.loader.StepBatches`' order for ``(seed, step)`` (sliced by
``part``/``num_parts``): the private stream resumes exactly at any step, and the public stream
is aligned across clients. This is why the DALI backend feeds encoded bytes through
``fn.external_source`` (read here, at offsets from the DALI index files) instead of using
``fn.readers.webdataset``, whose shuffle is its own and buffer-local.

Transforms (``kind``), identical in both backends up to decoder/resampler rounding:

* ``train``: random-resized crop (area 8-100 %, aspect 3/4-4/3) to S x S, random flip;
* ``public`` / ``eval``: resize the shorter side to round(S / 0.875), centre crop S x S;

then ``(x * scale - mean) / std`` with the manifest's ``normalize``. Datasets of ``.npy``
samples (the embedded digits) are served in memory by the ``wds`` backend, untransformed.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from mhd_hpc.data.loader import Batch, StepBatches, key_hash, load_split, normalize_images
from mhd_hpc.data.shards import Samples
from mhd_hpc.data.tarindex import index_path, index_tar, read_index

__all__ = ["KINDS", "STREAM_BACKENDS", "BatchStream", "SplitTable", "open_stream",
           "dali_available", "resize_shorter_to", "resized_size", "centre_offset"]

KINDS = ("train", "public", "eval")
STREAM_BACKENDS = ("auto", "dali", "wds")
EVAL_CROP_RATIO = 0.875  # the usual ImageNet 224/256
_log = logging.getLogger(__name__)


def dali_available() -> bool:
    """True if ``nvidia.dali`` imports (checked without importing the rest of this package)."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


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


@dataclass
class SplitTable:
    """Random-access view of a JPEG split: per sample its shard, byte range, key and label."""

    paths: list[str]
    shard: np.ndarray
    offset: np.ndarray
    size: np.ndarray
    keys: list[str]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.keys)

    @classmethod
    def load(cls, dataset_dir: str, split: str, manifest: dict) -> "SplitTable":
        paths = [os.path.join(dataset_dir, f) for f in manifest["splits"][split]]
        shard, offset, size, keys, labels = [], [], [], [], []
        for s, path in enumerate(paths):
            idx = index_path(path)
            # No index (a foreign dataset): scan the tar headers, as DALI would at start-up.
            entries = read_index(idx) if os.path.isfile(idx) else index_tar(path)
            with open(path, "rb") as f:
                for e in entries:
                    if "jpg" not in e.members or "cls" not in e.members:
                        raise ValueError(f"{path}: sample {e.key!r} lacks .jpg or .cls")
                    off, n = e.members["cls"]
                    labels.append(int(os.pread(f.fileno(), n, off).decode("ascii")))
                    shard.append(s)
                    offset.append(e.members["jpg"][0])
                    size.append(e.members["jpg"][1])
                    keys.append(e.key)
        expected = manifest["counts"].get(split)
        if expected is not None and expected != len(keys):
            raise ValueError(f"{dataset_dir}: split {split!r} has {len(keys)} indexed samples, "
                             f"manifest says {expected}")
        return cls(paths, np.asarray(shard, np.int32), np.asarray(offset, np.int64),
                   np.asarray(size, np.int64), keys, np.asarray(labels, np.int64))


class ByteReader:
    """``pread`` of encoded samples; file descriptors opened lazily per process (picklable)."""

    def __init__(self, table: SplitTable) -> None:
        self.table = table
        self._fds: dict[int, int] = {}

    def __getstate__(self) -> dict:
        return {"table": self.table, "_fds": {}}  # descriptors do not cross a fork/pickle

    def read(self, i: int) -> bytes:
        s = int(self.table.shard[i])
        fd = self._fds.get(s)
        if fd is None:
            fd = self._fds[s] = os.open(self.table.paths[s], os.O_RDONLY)
        return os.pread(fd, int(self.table.size[i]), int(self.table.offset[i]))

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
                 seed: int, kind: str, part: int, num_parts: int) -> None:
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

    def _batch(self, idx: np.ndarray, images: torch.Tensor) -> Batch:
        return Batch(keys=[self.keys[i] for i in idx], images=images,
                     labels=torch.from_numpy(self.labels[idx]))

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
    """In-memory ``.npy`` datasets (digits): untransformed, exactly the existing loader's output."""

    def __init__(self, samples: Samples, normalize: dict, **kw) -> None:
        super().__init__(samples.keys, samples.labels, normalize, **kw)
        self.samples = samples

    def batch(self, step: int) -> Batch:
        idx = self.indices(step)
        return self._batch(idx, normalize_images(self.samples.images[idx], self.normalize))

    def eval_batches(self) -> Iterator[Batch]:
        for lo, hi in self.eval_ranges():
            idx = np.arange(lo, hi)
            yield self._batch(idx, normalize_images(self.samples.images[idx], self.normalize))


def decode_pil(data: bytes, size: int, train: bool, rng: np.random.Generator | None
               ) -> np.ndarray:
    """JPEG bytes -> ``uint8 (3, S, S)`` with the ``train`` or the deterministic transform."""
    import io

    from PIL import Image

    im = Image.open(io.BytesIO(data))
    w, h = im.size
    if train:
        x, y, cw, ch = random_resized_box(w, h, rng)
        # DCT-scaled decode when the crop is much larger than S: what DALI's ROI decode saves.
        im.draft("RGB", (max(1, math.ceil(w * size / cw)), max(1, math.ceil(h * size / ch))))
        sx, sy = im.size[0] / w, im.size[1] / h
        im = im.convert("RGB").resize((size, size), Image.BILINEAR,
                                      box=(x * sx, y * sy, (x + cw) * sx, (y + ch) * sy))
        if rng.random() < 0.5:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
    else:
        nw, nh = resized_size(w, h, resize_shorter_to(size))
        im = im.convert("RGB").resize((nw, nh), Image.BILINEAR)
        x, y = centre_offset(nw, size), centre_offset(nh, size)
        im = im.crop((x, y, x + size, y + size))
    return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)


def random_resized_box(w: int, h: int, rng: np.random.Generator,
                       scale: tuple[float, float] = (0.08, 1.0),
                       ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(x, y, w, h) of an Inception-style random crop (torchvision's RandomResizedCrop rule)."""
    for _ in range(10):
        area = w * h * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = _round(math.sqrt(area * aspect)), _round(math.sqrt(area / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1)), cw, ch
    cw, ch = w, h  # fall back to the whole image, clamped to the aspect range
    if w / h < ratio[0]:
        ch = _round(w / ratio[0])
    elif w / h > ratio[1]:
        cw = _round(h * ratio[1])
    return (w - cw) // 2, (h - ch) // 2, cw, ch


class _DecodeJobs(torch.utils.data.Dataset):
    """DataLoader dataset whose items are whole batches: ``(tag, indices, train)`` -> float32.

    Normalising here, in the workers, keeps the main process free for training: it costs ~0.7 ms
    per 224 px image, as much as a third of the decode.
    """

    def __init__(self, reader: ByteReader, size: int, seed: int, part: int,
                 normalize: dict) -> None:
        self.reader, self.size, self.seed, self.part = reader, size, seed, part
        self.normalize = normalize

    def __len__(self) -> int:  # items are addressed by the sampler, never enumerated
        return 0

    def __getitem__(self, job: tuple[int, np.ndarray, bool]) -> torch.Tensor:
        tag, idx, train = job
        # Augmentation randomness is a function of (seed, step, part): exact on resume.
        rng = np.random.default_rng([self.seed, tag, self.part, 0xA06]) if train else None
        out = np.empty((len(idx), 3, self.size, self.size), np.uint8)
        for j, i in enumerate(idx):
            out[j] = decode_pil(self.reader.read(int(i)), self.size, train, rng)
        return normalize_images(out, self.normalize)


class PilStream(BatchStream):
    """webdataset shards + PIL decode in ``torch`` DataLoader workers (``threads`` processes)."""

    def __init__(self, table: SplitTable, normalize: dict, image_size: int, threads: int,
                 **kw) -> None:
        super().__init__(table.keys, table.labels, normalize, **kw)
        self.table, self.image_size, self.threads = table, image_size, max(0, int(threads))
        self._jobs = _DecodeJobs(ByteReader(table), image_size, self.seed, self.part, normalize)
        self._it: Iterator[torch.Tensor] | None = None
        self._next = -1

    def _loader(self, jobs: Iterator) -> Iterator[torch.Tensor]:
        kw: dict = {}
        if self.threads:
            kw = {"num_workers": self.threads, "prefetch_factor": 2}
            if _mpi_initialised():  # fork under an initialised MPI is unsafe on some fabrics
                kw["multiprocessing_context"] = "forkserver"
        return iter(torch.utils.data.DataLoader(self._jobs, batch_size=None, sampler=jobs, **kw))

    def _step_jobs(self, start: int) -> Iterator:
        step = start
        while True:
            yield step, self.indices(step), self.kind == "train"
            step += 1

    def batch(self, step: int) -> Batch:
        idx = self.indices(step)  # validates before any worker starts
        if self._it is None or step != self._next:
            self._it = self._loader(self._step_jobs(step))
        images = next(self._it)
        self._next = step + 1
        return self._batch(idx, images)

    def eval_batches(self) -> Iterator[Batch]:
        ranges = self.eval_ranges()
        jobs = ((b, np.arange(lo, hi), False) for b, (lo, hi) in enumerate(ranges))
        for (lo, hi), images in zip(ranges, self._loader(jobs)):
            yield self._batch(np.arange(lo, hi), images)

    def close(self) -> None:
        self._it = None  # DataLoader workers exit when their iterator is collected
        self._jobs.reader.close()


def _mpi_initialised() -> bool:
    import sys

    mpi = sys.modules.get("mpi4py.MPI")
    return bool(mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized())


def open_stream(dataset_dir: str, split: str, batch_size: int, seed: int, kind: str,
                backend: str = "auto", part: int = 0, num_parts: int = 1,
                threads: int = 2) -> tuple[BatchStream, str]:
    """Open ``split`` of a built dataset as a :class:`BatchStream`; returns (stream, backend).

    ``backend``: ``dali`` (JPEG datasets; ``mixed`` GPU decoding when CUDA is available),
    ``wds`` (PIL in ``threads`` DataLoader workers; also serves ``.npy`` datasets), or ``auto``
    (``dali`` when importable and the dataset is JPEG, else ``wds``). The second return value
    names the backend actually used, for the caller's log.
    """
    from mhd_hpc.data.embedded import load_manifest

    if backend not in STREAM_BACKENDS:
        raise ValueError(f"unknown loader backend {backend!r}; expected one of {STREAM_BACKENDS}")
    if kind not in KINDS:
        raise ValueError(f"unknown stream kind {kind!r}; expected one of {KINDS}")
    manifest = load_manifest(dataset_dir)
    if split not in manifest["splits"]:
        raise ValueError(f"split {split!r} not in {dataset_dir}; splits: "
                         f"{', '.join(manifest['splits'])}")
    fmt = manifest.get("format", "npy")
    common = dict(batch_size=batch_size, seed=seed, kind=kind, part=part, num_parts=num_parts)
    if backend == "auto":
        backend = "dali" if fmt == "jpg" and dali_available() else "wds"
        _log.info("loader backend auto -> %s (%s samples, DALI %s)", backend, fmt,
                  "importable" if dali_available() else "not importable")
    if fmt == "npy":
        if backend == "dali":
            raise ValueError(f"{dataset_dir} holds .npy samples; the DALI backend reads JPEG "
                             f"shards only: use backend='wds' (or 'auto')")
        return NpyStream(load_split(dataset_dir, split), manifest["normalize"], **common), "wds"
    if fmt != "jpg":
        raise ValueError(f"{dataset_dir}: unknown sample format {fmt!r}")
    table = SplitTable.load(dataset_dir, split, manifest)
    size = int(manifest["image_shape"][-1])
    if backend == "dali":
        if not dali_available():
            raise ValueError("loader backend 'dali' requested but nvidia.dali is not importable "
                             "(pip install nvidia-dali-cuda120); use 'wds' or 'auto'")
        from mhd_hpc.data.dali_streams import DaliStream  # lazy: DALI is optional

        return DaliStream(table, manifest["normalize"], size, threads, **common), "dali"
    return PilStream(table, manifest["normalize"], size, threads, **common), "wds"
