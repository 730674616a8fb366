"""NVIDIA DALI pipelines for JPEG shards (imported lazily, only when DALI is used).

Two ways to feed the same decode/augment graph:

* :class:`DaliStream` (the training loader): encoded bytes read in StepBatches order by DALI's
  parallel external source (sample mode, :class:`StepSamples` in ``py_num_workers`` worker
  processes: no byte read on the training thread; DALI prepares ``data.prefetch`` batches
  ahead). Order-exact, so public batches align across clients and a resumed run sees the same
  samples. Evaluation passes (partial last batch) use the batch-mode external source.
* :func:`reader_batches`: ``fn.readers.webdataset`` with the index files, the reader DALI users
  expect. Its order is DALI's own (buffer shuffle), so it serves benchmarks, not training.

CPU pipelines (``device_id=None``) when CUDA is absent: uint8 batches, normalised where they
are used. The CPU train graph stops after the ROI decode: its ragged crops are resized by
torch's uint8 kernel (:func:`~mhd_hpc.data.read.streams.resize_crops`, on ``threads`` threads of the
process that takes the batch, ``BatchFeed``'s background thread in training) and its flips are
applied where the batch is used, as the ``wds`` loader's are.

With CUDA, ``mixed`` decoding (nvJPEG; ``fn.decoders.image_random_crop`` decodes only the crop
window, and DALI 2.x decodes through nvImageCodec, using the GPU's hardware JPEG decoder where
there is one), GPU resize/crop/normalisation, and batches come back as CUDA tensors. Tested
with DALI 2.4 (CPU pipelines; no GPU was available to run the mixed path).
"""

from __future__ import annotations

import io
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.tensors import TensorListGPU

from mhd_hpc.data.checksums import DamagedSample
from mhd_hpc.data.read.batches import Batch
from mhd_hpc.data.read.streams import (BatchStream, ByteReader, SplitTable, resize_crops,
                                  resize_shorter_to)
from mhd_hpc.data.tarindex import index_path
from mhd_hpc.runtime.signals import children_shielded

__all__ = ["DaliStream", "build_pipeline", "reader_batches"]

LABEL_BYTES = 12  # .cls members are padded to this many ASCII bytes (a dense batch for DALI)


def _device() -> int | None:
    return torch.cuda.current_device() if torch.cuda.is_available() else None


def _transform(jpegs, train: bool, size: int, normalize: dict, gpu: bool) -> tuple:
    """The decode + augment + normalise graph shared by both feeds: its outputs, a tuple."""
    decode_dev = "mixed" if gpu else "cpu"
    if train:
        # ROI decoding: only the random crop window is decoded (libjpeg-turbo / nvJPEG).
        images = fn.decoders.image_random_crop(
            jpegs, device=decode_dev, output_type=types.RGB, random_area=[0.08, 1.0],
            random_aspect_ratio=[3 / 4, 4 / 3], num_attempts=10)
        mirror = fn.random.coin_flip(probability=0.5)
        if not gpu:
            # CPU: the crops (ragged uint8 HWC) and the flips leave the pipeline; the crops
            # are resized by torch's uint8 kernel (resize_crops) and mirrored where the batch
            # is used. DALI's CPU resize took 1.1 ms per 224 px crop of a 500 x 375 image on
            # one core, more than its ROI decode (0.87 ms); torch's kernel takes 0.33.
            return images, mirror
        images = fn.resize(images, size=[size, size], interp_type=types.INTERP_LINEAR,
                           antialias=True)
    else:
        images = fn.decoders.image(jpegs, device=decode_dev, output_type=types.RGB)
        # Linear + antialias is PIL's BILINEAR resize; subpixel_scale=False maps the whole
        # input onto the rounded output size, as PIL does (else edges shift by up to 0.5 px).
        images = fn.resize(images, resize_shorter=resize_shorter_to(size),
                           interp_type=types.INTERP_LINEAR, antialias=True,
                           subpixel_scale=False)
        mirror = 0
    if not gpu:  # CPU: uint8 out; the normalisation runs where the batch is used
        return (fn.crop_mirror_normalize(images, crop=(size, size), crop_pos_x=0.5,
                                         crop_pos_y=0.5, mirror=mirror, dtype=types.UINT8,
                                         output_layout="CHW"),)
    # GPU: normalised floats in the same kernel, already on the device.
    # (x * scale - mean) / std == (x - mean / scale) / (std / scale) on raw 0..255 values.
    scale = float(normalize.get("scale", 1.0))
    return (fn.crop_mirror_normalize(
        images, crop=(size, size), crop_pos_x=0.5, crop_pos_y=0.5, mirror=mirror,
        mean=[m / scale for m in normalize["mean"]], std=[s / scale for s in normalize["std"]],
        dtype=types.FLOAT, output_layout="CHW"),)


class StepSamples:
    """The bytes of sample ``i`` of the batch of step ``start + iteration``: a stateless,
    picklable source for DALI's parallel external source (sample mode), which calls it in
    ``py_num_workers`` worker processes, so that no byte read runs on the training thread."""

    def __init__(self, reader: ByteReader, order, start: int) -> None:
        self.reader, self.order, self.start = reader, order, start

    def __call__(self, info) -> np.ndarray:
        i = self.order.indices(self.start + info.iteration)[info.idx_in_batch]
        return np.frombuffer(self.reader.read(int(i)), np.uint8)


def build_pipeline(source: Callable | None, train: bool, size: int, normalize: dict,
                   max_batch: int, threads: int, seed: int, reader: dict | None = None,
                   prefetch: int = 2, parallel: bool = False):
    """A built pipeline fed by ``source`` (a batch_info callback, or with ``parallel`` a
    :class:`StepSamples` run in worker processes) or by a webdataset ``reader``;
    ``prefetch``: batches DALI prepares ahead (``prefetch_queue_depth``)."""
    dev = _device()
    workers = {"py_num_workers": max(1, threads // 2), "py_start_method": "spawn"} \
        if parallel else {}

    @pipeline_def(batch_size=max_batch, num_threads=max(1, threads), device_id=dev,
                  seed=seed % (2 ** 31), prefetch_queue_depth=max(1, prefetch), **workers)
    def pipe():
        if reader is None:
            if parallel:
                jpegs = fn.external_source(source=source, parallel=True, batch=False,
                                           dtype=types.UINT8, ndim=1)
            else:
                jpegs = fn.external_source(source=source, batch=True, batch_info=True,
                                           dtype=types.UINT8, ndim=1)
            return _transform(jpegs, train, size, normalize, dev is not None)
        jpegs, cls = fn.readers.webdataset(
            **reader, ext=["jpg", "cls"], missing_component_behavior="error",
            dtypes=[types.UINT8, types.UINT8], name="Reader")
        # Variable-length ASCII labels would make a ragged batch: pad to a fixed width.
        labels = fn.pad(cls, axes=(0,), shape=(LABEL_BYTES,), fill_value=0)
        return (*_transform(jpegs, train, size, normalize, dev is not None), labels)

    p = pipe()
    with children_shielded():  # its worker processes leave a Ctrl-C or scancel to the rank
        p.build()
    return p


def _to_torch(tl) -> torch.Tensor:
    """DALI TensorList -> torch tensor, copied (DALI recycles its output buffers)."""
    if isinstance(tl, TensorListGPU):
        from nvidia.dali.plugin.pytorch import feed_ndarray

        t = tl.as_tensor()
        out = torch.empty(t.shape(), dtype=torch.float32, device=torch.device("cuda", _device()))
        feed_ndarray(t, out, cuda_stream=torch.cuda.current_stream())
        return out
    return torch.from_numpy(np.array(tl.as_tensor()))


def _images(outs: tuple, size: int, pool=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A pipeline's image outputs -> (images, flips to apply where they are used, or None)."""
    if len(outs) == 1:  # S x S already (GPU, or the deterministic transform)
        return _to_torch(outs[0]), None
    crops, mirror = outs  # the CPU train transform: ragged crops, resized here
    # Views of DALI's buffers, consumed before the next run() recycles them.
    images = resize_crops([np.asarray(crops[i]) for i in range(len(crops))], size, pool)
    flips = torch.from_numpy(np.array(mirror.as_tensor()).reshape(-1) != 0)
    return images, flips if bool(flips.any()) else None


class DaliStream(BatchStream):
    """Order-exact DALI stream: StepBatches order in, DALI decode/augment out."""

    def __init__(self, table: SplitTable, normalize: dict, image_size: int, threads: int,
                 prefetch: int = 2, **kw) -> None:
        super().__init__(table.keys, table.labels, normalize, **kw)
        self.table, self.image_size, self.threads = table, image_size, threads
        self.prefetch = prefetch
        self._reader = ByteReader(table)
        self._pipe = None
        self._next = -1
        # CPU train crops are resized by torch on this many threads (DALI decodes on as many).
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="dali-resize") \
            if threads > 1 else None

    def _read(self, idx: np.ndarray) -> list[np.ndarray]:
        return [np.frombuffer(self._reader.read(int(i)), np.uint8) for i in idx]

    def _pipeline(self, source: Callable, train: bool, max_batch: int, seed: int,
                  parallel: bool = False):
        return build_pipeline(source, train, self.image_size, self.normalize, max_batch,
                              self.threads, seed, prefetch=self.prefetch, parallel=parallel)

    def batch(self, step: int) -> Batch:
        idx = self.indices(step)
        if self._pipe is None or step != self._next:
            start = step
            self._pipe = None  # free the old pipeline's threads and buffers first
            # DALI's augmentation RNG is per pipeline: seeded by (seed, part, start step), so a
            # run restarted at a step repeats that restart (but not the unbroken run's draws).
            seed = int(np.random.default_rng([self.seed, self.part, start]).integers(2 ** 31))
            self._pipe = self._pipeline(StepSamples(self._reader, self.order, start),
                                        self.kind == "train", len(idx), seed, parallel=True)
        outs = self._run(self._pipe, idx)
        self._next = step + 1
        images, flips = _images(outs, self.image_size, self._pool)
        return self._batch(idx, images, flips, normalized=images.is_cuda)

    def eval_batches(self) -> Iterator[Batch]:
        ranges = self.eval_ranges()
        if not ranges:
            return

        def source(info) -> list[np.ndarray]:
            if info.iteration >= len(ranges):
                raise StopIteration  # prefetching ran past the end
            lo, hi = ranges[info.iteration]
            return self._read(np.arange(lo, hi))

        pipe = self._pipeline(source, False, self.batch_size, self.seed)
        for lo, hi in ranges:
            images, _ = _images(self._run(pipe, np.arange(lo, hi)), self.image_size)
            yield self._batch(np.arange(lo, hi), images, normalized=images.is_cuda)
        del pipe

    def _run(self, pipe, idx: np.ndarray) -> tuple:
        """``pipe.run()``, its failures named by shard and sample: a damaged sample found by
        the byte reader (in DALI's worker processes, whose errors come back wrapped), or one
        DALI cannot decode (its error names neither: the batch's samples are tried in PIL)."""
        try:
            return pipe.run()
        except Exception as exc:
            # DALI re-raises a worker's error as a plain Exception carrying its traceback.
            found = [ln.split("DamagedSample: ", 1)[1] for ln in str(exc).splitlines()
                     if "DamagedSample: " in ln]
            if found:
                raise DamagedSample(found[-1]) from None
            bad = [self.table.where(i) for i in sorted(set(idx.tolist()))
                   if not _decodes(self._reader, i)]
            first = " ".join(str(exc).split())[:200] or type(exc).__name__
            if bad:
                raise DamagedSample(f"{bad[0]}: DALI cannot decode it ({first})"
                                    + (f"; also {'; '.join(bad[1:4])}" if len(bad) > 1 else "")
                                    ) from exc
            shards = sorted({self.table.paths[int(self.table.shard[i])] for i in idx})
            raise RuntimeError(f"DALI failed on a batch of {len(idx)} samples from "
                               f"{', '.join(shards[:3])} (each decodes in PIL): {first}") from exc

    def close(self) -> None:
        self._pipe = None
        if self._pool is not None:
            self._pool.shutdown()
        self._reader.close()


def _decodes(reader: ByteReader, i: int) -> bool:
    """Whether sample ``i``'s bytes are whole and decode in PIL (after DALI failed a batch)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(reader.read(i))) as im:
            im.load()
    except Exception:  # noqa: BLE001 - any failure marks the sample
        return False
    return True


def reader_batches(shard_paths: list[str], batch_size: int, image_size: int, normalize: dict,
                   train: bool = True, threads: int = 2, seed: int = 0, part: int = 0,
                   num_parts: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless ``(images, labels)`` from ``fn.readers.webdataset`` (DALI's order, not ours)."""
    reader = dict(paths=list(shard_paths), index_paths=[index_path(p) for p in shard_paths],
                  shard_id=part, num_shards=num_parts, random_shuffle=train,
                  initial_fill=min(1024, 4 * batch_size), seed=seed)
    missing = [p for p in reader["index_paths"] if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"DALI index files missing (tools/make_shards.py writes them): "
                                f"{missing[:3]}")
    pipe = build_pipeline(None, train, image_size, normalize, batch_size, threads, seed, reader)
    while True:
        *outs, cls = pipe.run()
        raw = np.array(cls.as_tensor())  # ASCII digits, then zero padding
        labels = torch.tensor([int(bytes(row[row > 0])) for row in raw], dtype=torch.int64)
        images, flips = _images(tuple(outs), image_size)
        if flips is not None:  # CPU train crops: mirrored here, as this reader is used alone
            images[flips] = images[flips].flip(-1)
        yield images, labels
