"""Getting batches to the device: uint8 images copied as uint8 (a quarter of the bytes of
floats), mirrored and normalised there, and :class:`BatchFeed`, which reads (and on a GPU
copies) the next step's batch on a thread while the current step trains (docs/data.md)."""

from __future__ import annotations

import dataclasses

import torch

from mhd_hpc.data.read.batches import Batch, normalize_tensor

__all__ = ["to_device", "mirror", "BatchFeed"]


def to_device(batch: Batch, device: torch.device,
              memory_format: torch.memory_format = torch.contiguous_format) -> Batch:
    """A new batch on the device, ready for the model (the given one is left as it is): uint8
    images are copied as uint8 (a quarter of the bytes of floats) and normalised and mirrored
    there, in ``memory_format``. Pinned host memory makes the copy asynchronous."""
    images, labels = batch.images, batch.labels
    if device.type != "cpu" and not images.is_cuda and not images.is_pinned():
        images, labels = images.pin_memory(), labels.pin_memory()  # loaders pin: seldom here
    images = images.to(device, non_blocking=True)
    if batch.flip is not None:
        # Mirrored before the normalisation (it acts per channel, so the numbers are the same)
        # on a quarter of the bytes.
        images = mirror(images, batch.flip.to(device, non_blocking=True))
    if batch.normalize is not None:
        images = normalize_tensor(images, batch.normalize)
    return dataclasses.replace(batch, images=images.contiguous(memory_format=memory_format),
                               labels=labels.to(device, non_blocking=True), normalize=None,
                               flip=None)


def mirror(images: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """A copy of ``images`` (B, C, H, W) with sample ``i`` mirrored left-right where ``flip[i]``.

    On a CPU sample by sample through numpy views: ``torch.where`` over a flipped copy of the
    whole batch cost 2.0 ms per 224 px float image there (two full-size temporaries), this 0.05
    ms on uint8. On a GPU ``torch.where``, which needs no host synchronisation."""
    if images.device.type != "cpu" or images.dtype == torch.bfloat16 or images.requires_grad:
        return torch.where(flip[:, None, None, None], images.flip(-1), images)
    out = torch.empty_like(images, memory_format=torch.contiguous_format)
    src, dst = images.numpy(), out.numpy()
    for i, f in enumerate(flip.tolist()):
        dst[i] = src[i, ..., ::-1] if f else src[i]
    return out


class BatchFeed:
    """A stream's batches on the device, one step ahead: while step t trains, a background
    thread reads batch t + 1 (the stream's workers fill it) and, on a GPU, copies it (uint8)
    to the device on a side CUDA stream, with an event the compute stream waits for; the
    normalisation runs on the compute stream when the batch is taken. On a CPU there is no
    device to hand the normalisation to, so the background thread normalises and mirrors too
    (the same ``to_device``, so the same numbers). The training thread only hands over and
    waits for what is ready. Batches stay a pure function of the step:
    the feed prefetches the step after the one asked for, and a jump (a resume) reads directly.
    """

    def __init__(self, stream, device: torch.device,
                 memory_format: torch.memory_format = torch.contiguous_format):
        from concurrent.futures import ThreadPoolExecutor

        self.stream, self.device, self.memory_format = stream, device, memory_format
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batch-feed")
        self._ahead: tuple[int, object] | None = None  # (step, future)
        self._side = torch.cuda.Stream(device) if device.type == "cuda" else None

    def _prepare(self, step: int) -> tuple[Batch, object]:
        """Background: the host batch of ``step`` and, on a GPU, its copy in flight; on a CPU
        the finished batch (normalised, in the memory format)."""
        batch = self.stream.batch(step)
        if self._side is None:
            return to_device(batch, self.device, self.memory_format), None
        with torch.cuda.stream(self._side):
            images = batch.images.to(self.device, non_blocking=True)
            labels = batch.labels.to(self.device, non_blocking=True)
            flip = (batch.flip.to(self.device, non_blocking=True) if batch.flip is not None
                    else None)
            copied = torch.cuda.Event()
            copied.record(self._side)
        return dataclasses.replace(batch, images=images, labels=labels, flip=flip), copied

    def batch(self, step: int) -> Batch:
        """Batch ``step`` on the device (normalised, in the memory format)."""
        if self._ahead is not None and self._ahead[0] == step:
            batch, copied = self._ahead[1].result()
        else:
            batch, copied = self._prepare(step)
        self._ahead = (step + 1, self._pool.submit(self._prepare, step + 1))
        if self._side is None:
            return batch  # a CPU batch is finished in the background
        current = torch.cuda.current_stream(self.device)
        current.wait_event(copied)  # the compute stream waits for the copy, the host does not
        for t in (batch.images, batch.labels, batch.flip):
            if t is not None:
                t.record_stream(current)  # allocated on the side stream, used here
        return to_device(batch, self.device, self.memory_format)

    def close(self) -> None:
        self._ahead = None
        self._pool.shutdown(wait=True)
