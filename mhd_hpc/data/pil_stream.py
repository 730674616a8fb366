"""The ``wds`` backend for JPEG shards: PIL decoding in ``torch`` DataLoader worker processes.

Same sample order as every backend (:class:`~mhd_hpc.data.streams.BatchStream`); the transforms
match DALI's up to decoder and resampler rounding (``train``: random-resized crop + flip;
``public``/``eval``: resize the shorter side to S/0.875 and centre crop).
"""

from __future__ import annotations

import io
import math
from typing import Iterator

import numpy as np
import torch

from mhd_hpc.seeds import AUGMENT
from mhd_hpc.data.batches import Batch, normalize_images
from mhd_hpc.data.streams import (BatchStream, ByteReader, SplitTable, _round, centre_offset,
                                  resize_shorter_to, resized_size)

__all__ = ["PilStream", "decode_pil", "random_resized_box"]


def decode_pil(data: bytes, size: int, train: bool, rng: np.random.Generator | None
               ) -> np.ndarray:
    """JPEG bytes -> ``uint8 (3, S, S)`` with the ``train`` or the deterministic transform."""
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
        rng = np.random.default_rng([self.seed, tag, self.part, AUGMENT]) if train else None
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
