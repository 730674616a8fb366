"""Where and how a rank computes: its device, its number formats, its memory layout, and
getting batches there.

* ``backend.precision``: ``auto`` is bf16 autocast on CUDA devices that support it and fp32
  elsewhere; ``bf16`` and ``fp16`` autocast the forward pass (fp16 with a gradient scaler);
  losses, softmax targets and the confidence selection always run in fp32.
* ``backend.channels_last``: ``auto`` is on for CUDA (tensor cores want NHWC convolutions).
* Ranks of one client on one GPU cannot use NCCL between them (it refuses duplicate GPUs): the
  pure rule :func:`clients_sharing_a_gpu` finds them, and ``intra`` falls back to gloo.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from mhd_hpc.data.read.batches import normalize_tensor
from mhd_hpc.config.choices import DEVICES, PRECISIONS  # noqa: F401 (re-exported)

if TYPE_CHECKING:
    from mhd_hpc.data.read.batches import Batch

__all__ = ["DEVICES", "PRECISIONS", "Precision", "pick_device", "to_device", "mirror",
           "BatchFeed", "resolve_precision", "resolve_channels_last", "gpu_of",
           "clients_sharing_a_gpu"]

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def gpu_of(node_local_rank: int, device_count: int) -> int:
    """The GPU a rank uses: its rank among the ranks of its node, modulo the node's GPUs."""
    return node_local_rank % device_count


def pick_device(kind: str, node_local_rank: int) -> torch.device:
    """``cuda`` (or ``auto`` with CUDA present): the GPU of the node-local rank, made current;
    else the CPU."""
    if kind == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    device = torch.device("cuda", gpu_of(node_local_rank, torch.cuda.device_count()))
    torch.cuda.set_device(device)
    # Batches have fixed shapes: let cuDNN pick the fastest convolution algorithms once. (A
    # resumed GPU run is then not bit-identical to an uninterrupted one; CPU runs are.)
    torch.backends.cudnn.benchmark = True
    return device


@dataclass(frozen=True)
class Precision:
    """The number format of the forward pass: ``fp32`` (none), ``bf16`` or ``fp16`` autocast."""

    name: str

    @property
    def dtype(self) -> torch.dtype | None:
        return _DTYPES.get(self.name)

    @property
    def scaled(self) -> bool:
        """fp16 needs a gradient scaler (its range is too small for raw gradients)."""
        return self.name == "fp16"

    def autocast(self, device: torch.device):
        """The forward pass's context: autocast to ``dtype``, or nothing for fp32."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.dtype)


def resolve_precision(setting: str, device: torch.device) -> tuple[Precision, str]:
    """``backend.precision`` for this device, and a line for the log saying what and why."""
    if setting not in PRECISIONS:
        raise ValueError(f"unknown precision {setting!r}; expected one of {PRECISIONS}")
    if setting != "auto":
        return Precision(setting), f"backend.precision={setting}"
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return Precision("bf16"), "backend.precision=auto -> bf16 autocast (CUDA with bf16)"
    return Precision("fp32"), f"backend.precision=auto -> fp32 ({device.type})"


def resolve_channels_last(setting: bool | str, device: torch.device) -> bool:
    """``backend.channels_last``: ``auto`` is on for CUDA, off elsewhere."""
    return device.type == "cuda" if setting == "auto" else bool(setting)


def clients_sharing_a_gpu(ranks_of_client: list[list[int]], hosts: list[str],
                          node_local_ranks: list[int], device_count: int) -> list[int]:
    """Clients with two or more ranks on the same GPU of the same node (pure: from the rank
    layout, every rank's host name and node-local rank, and the GPUs per node)."""
    if device_count < 1:
        return []
    out = []
    for client, ranks in enumerate(ranks_of_client):
        gpus = [(hosts[r], gpu_of(node_local_ranks[r], device_count)) for r in ranks]
        if len(set(gpus)) < len(gpus):
            out.append(client)
    return out


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
