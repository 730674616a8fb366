"""The ``wds`` loader for JPEG shards: webdataset tar shards decoded by PIL in ``torch``
DataLoader worker processes.

Same sample order as every loader (:class:`~mhd_hpc.data.read.streams.BatchStream`); the transforms
match DALI's up to decoder and resampler rounding (``train``: random-resized crop + flip;
``public``/``eval``: resize the shorter side to S/0.875 and centre crop). Workers hand over
uint8 batches (through a reused shared-memory ring; pinned for a GPU) and the flip of each
sample: the flip and the normalisation happen where the batch is used
(``devices.to_device``), so workers spend no time on floats.
"""

from __future__ import annotations

import copy
import io
import math
from typing import Iterator

import numpy as np
import torch

from mhd_hpc.data.checksums import DamagedSample
from mhd_hpc.data.read.batches import Batch
from mhd_hpc.runtime.seeds import AUGMENT
from mhd_hpc.runtime.signals import children_shielded
from mhd_hpc.data.read.streams import (BatchStream, ByteReader, SplitTable, _round, centre_offset,
                                  resize_shorter_to, resize_uint8, resized_size)

__all__ = ["PilStream", "decode_pil", "random_resized_box", "resize_uint8", "stop_workers"]


def stop_workers(it: Iterator | None) -> None:
    """End a DataLoader iterator's worker processes now and wait for them. Dropping the
    iterator is not enough: a traceback (an error raised through ``next``) keeps it alive, and
    the workers block the stop signals (``children_shielded``), so the SIGTERM that
    multiprocessing sends its children at exit cannot end them and the process would wait for
    them at exit forever. torch's own shutdown first (a stop message on each worker's queue,
    a join with a timeout), then SIGKILL, which no mask blocks, for a worker still there."""
    shutdown = getattr(it, "_shutdown_workers", None)  # only multi-process iterators have it
    if shutdown is None:
        return
    shutdown()
    for worker in getattr(it, "_workers", ()):
        if worker.is_alive():
            worker.kill()
            worker.join()


def decode_pil(data: bytes, size: int, train: bool, rng: np.random.Generator | None
               ) -> tuple[np.ndarray, bool]:
    """JPEG bytes -> (``uint8 (3, S, S)``, mirror it?) with the ``train`` or the deterministic
    transform; the flip is drawn here (same random sequence) but applied by the caller."""
    from PIL import Image

    im = Image.open(io.BytesIO(data))
    w, h = im.size
    if train:
        x, y, cw, ch = random_resized_box(w, h, rng)
        # DCT-scaled decode when the crop is much larger than S: what DALI's ROI decode saves.
        im.draft("RGB", (max(1, math.ceil(w * size / cw)), max(1, math.ceil(h * size / ch))))
        dw, dh = im.size  # after the draft: the crop box scales with it
        x0, y0 = round(x * dw / w), round(y * dh / h)
        x1 = min(dw, max(x0 + 1, round((x + cw) * dw / w)))
        y1 = min(dh, max(y0 + 1, round((y + ch) * dh / h)))
        if im.mode != "RGB":
            im = im.convert("RGB")
        crop = np.array(im.crop((x0, y0, x1, y1)))  # writable HWC uint8
        return resize_uint8(crop, size), bool(rng.random() < 0.5)
    nw, nh = resized_size(w, h, resize_shorter_to(size))
    im = im.convert("RGB").resize((nw, nh), Image.BILINEAR)
    x, y = centre_offset(nw, size), centre_offset(nh, size)
    im = im.crop((x, y, x + size, y + size))
    return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1), False


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
    """DataLoader dataset whose items are whole batches: ``(tag, indices, train, slot)`` ->
    (``slot``, bool flips), the uint8 images decoded into ``ring[slot]``. The normalisation
    and mirror are left to the device."""

    def __init__(self, reader: ByteReader, size: int, seed: int, part: int) -> None:
        self.reader, self.size, self.seed, self.part = reader, size, seed, part
        self.ring: torch.Tensor | None = None  # (slots, rows, 3, S, S) uint8, set per loader

    def __len__(self) -> int:  # items are addressed by the sampler, never enumerated
        return 0

    def __getitem__(self, job: tuple[int, np.ndarray, bool, int]) -> tuple[int, torch.Tensor]:
        tag, idx, train, slot = job
        # Augmentation randomness is a function of (seed, step, part): exact on resume.
        rng = np.random.default_rng([self.seed, tag, self.part, AUGMENT]) if train else None
        flips = torch.zeros(len(idx), dtype=torch.bool)
        view = self.ring[slot, :len(idx)].numpy()
        for j, i in enumerate(idx):
            data = self.reader.read(int(i))  # checked against its CRC32: names the damage
            try:
                view[j], flips[j] = decode_pil(data, self.size, train, rng)
            except Exception as exc:  # PIL's errors name neither the shard nor the sample
                raise DamagedSample(f"{self.reader.table.where(int(i))}: cannot be decoded "
                                    f"({type(exc).__name__}: {exc})") from exc
        return slot, flips


class PilStream(BatchStream):
    """webdataset shards + PIL decode in ``torch`` DataLoader worker processes (``threads``).

    Workers decode into a ring of batch slots in shared memory, allocated once per loader and
    reused, and hand over only the slot number: a fresh shared-memory tensor per batch cost
    the page faults of 4.8 MB on both sides of every 32 x 224 px batch (0.2 ms per image in
    the worker and 0.15 in the rank, of 2.2). The taker copies a slot out (into pinned memory
    for a GPU) before it asks for the next batch, and the DataLoader dispatches job n + P*W
    (P = prefetch, W = workers) only when batch n is taken, so P*W + 2 slots are never
    overwritten while they are read.
    """

    def __init__(self, table: SplitTable, normalize: dict, image_size: int, threads: int,
                 pin: bool = False, prefetch: int = 2, **kw) -> None:
        """``pin``: batches in page-locked memory (for asynchronous copies to a GPU; copied
        there by the thread taking the batch, never the training thread); ``prefetch``:
        batches each worker prepares ahead."""
        super().__init__(table.keys, table.labels, normalize, **kw)
        self.table, self.image_size, self.threads = table, image_size, max(0, int(threads))
        self.pin, self.prefetch = pin, max(1, int(prefetch))
        self._jobs = _DecodeJobs(ByteReader(table), image_size, self.seed, self.part)
        self._it: Iterator | None = None
        self._ring: torch.Tensor | None = None
        self._next = -1

    def _loader(self, jobs: Iterator, rows: int) -> tuple[Iterator, torch.Tensor]:
        """(iterator of (slot, flips), its ring): a new ring per loader, since the workers of
        a dropped loader may still be writing into the old one."""
        slots = self.prefetch * self.threads + 2
        ring = torch.empty((slots, rows, 3, self.image_size, self.image_size), dtype=torch.uint8)
        kw: dict = {}
        if self.threads:
            ring.share_memory_()
            # Never fork: the process has threads (BatchFeed's, DataLoader's, MPI's) and a
            # forked worker inherits their locks; with fork, 3 of 6 benchmark processes lost a
            # worker to "terminate called without an active exception" at shutdown (0 of 6
            # with forkserver), and fork under an initialised MPI is unsafe on some fabrics.
            kw.update(num_workers=self.threads, prefetch_factor=self.prefetch,
                      multiprocessing_context="forkserver")
        # A dataset per loader: with threads == 0 an eval pass must not redirect the train
        # loader's writes. Pickled to the workers (the ring as a shared handle) at their start.
        dataset = copy.copy(self._jobs)
        dataset.ring = ring
        slotted = ((*job, n % slots) for n, job in enumerate(jobs))
        loader = torch.utils.data.DataLoader(dataset, batch_size=None, sampler=slotted, **kw)
        with children_shielded():  # a Ctrl-C or scancel stops the rank, not its workers
            return iter(loader), ring

    def _take(self, ring: torch.Tensor, slot: int, rows: int) -> torch.Tensor:
        """A copy of ``ring[slot]``'s first ``rows`` images, before the slot is reused."""
        out = torch.empty((rows, 3, self.image_size, self.image_size), dtype=torch.uint8,
                          pin_memory=self.pin)
        return out.copy_(ring[slot, :rows])

    def _step_jobs(self, start: int) -> Iterator:
        step = start
        while True:
            yield step, self.indices(step), self.kind == "train"
            step += 1

    def batch(self, step: int) -> Batch:
        idx = self.indices(step)  # validates before any worker starts
        if len(idx) > self.order.max_rows:
            raise RuntimeError(f"step {step}: a batch of {len(idx)} samples, more than the "
                               f"{self.order.max_rows} the loader holds")
        if self._it is None or step != self._next:
            stop_workers(self._it)
            self._it, self._ring = self._loader(self._step_jobs(step), self.order.max_rows)
        slot, flips = next(self._it)
        self._next = step + 1
        images = self._take(self._ring, slot, len(idx))
        return self._batch(idx, images, flips if bool(flips.any()) else None)

    def eval_batches(self) -> Iterator[Batch]:
        ranges = self.eval_ranges()
        if not ranges:
            return
        jobs = ((b, np.arange(lo, hi), False) for b, (lo, hi) in enumerate(ranges))
        it, ring = self._loader(jobs, max(hi - lo for lo, hi in ranges))
        try:
            for (lo, hi), (slot, _) in zip(ranges, it):
                yield self._batch(np.arange(lo, hi), self._take(ring, slot, hi - lo))
        finally:  # a pass ended, abandoned (the generator closed) or failed
            stop_workers(it)

    def close(self) -> None:
        stop_workers(self._it)
        self._it = self._ring = None
        self._jobs.reader.close()

