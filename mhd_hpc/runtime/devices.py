"""Where and how a rank computes: its device, its number formats, its memory layout, and
getting batches there.

* ``backend.precision``: ``auto`` is bf16 autocast on CUDA devices that support it and fp32
  elsewhere; ``bf16`` and ``fp16`` autocast the forward pass (fp16 with a gradient scaler);
  losses, softmax targets and the confidence selection always run in fp32.
* ``backend.channels_last``: ``auto`` is on for CUDA (tensor cores want NHWC convolutions).
* Which GPU a rank uses, and which ranks share one, is decided from the GPUs each rank really
  sees (their UUIDs, gathered over the job: :func:`place`), not from node-local arithmetic:
  whole-node visibility, ``srun --gpus-per-task``, ``--gpu-bind`` and ``CUDA_VISIBLE_DEVICES``
  set per rank by a wrapper all give the right answer. Ranks of one client on one GPU cannot use
  NCCL between them (it refuses duplicate GPUs): :func:`clients_sharing_a_gpu` finds them, and
  ``intra`` falls back to gloo.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from mhd_hpc.data.read.batches import normalize_tensor
from mhd_hpc.config.choices import DEVICES, PRECISIONS  # noqa: F401 (re-exported)

if TYPE_CHECKING:
    from mhd_hpc.data.read.batches import Batch

__all__ = ["DEVICES", "PRECISIONS", "Precision", "Placement", "place", "assign_gpus",
           "visible_gpus", "usable_cpus", "to_device", "mirror", "BatchFeed", "resolve_precision",
           "resolve_channels_last", "clients_sharing_a_gpu"]

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def visible_gpus() -> tuple[str, ...]:
    """Identities of the GPUs this process sees, in torch's order: the UUID (the same string
    whatever ``CUDA_VISIBLE_DEVICES`` calls it), else the PCI bus id, else the index."""
    out = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        ident = getattr(props, "uuid", None) or getattr(props, "pci_bus_id", None)
        out.append(f"GPU-{ident}" if ident is not None and not str(ident).startswith("GPU")
                   else str(ident) if ident is not None else f"cuda:{i}")
    return tuple(out)


def assign_gpus(places: Sequence[tuple[str, Sequence[str]]]) -> list[int]:
    """Per rank, the index into its own visible GPUs of the GPU it uses (pure; ``places``: each
    rank's host and visible GPU identities, in rank order). Ranks of one host that see the same
    GPUs take them in turn: with whole-node visibility that is the node-local rank modulo the
    GPUs; a rank that sees one GPU of its own (``--gpus-per-task=1``, a wrapper's
    ``CUDA_VISIBLE_DEVICES``) takes it."""
    seen: dict[tuple[str, tuple[str, ...]], int] = {}
    out = []
    for host, gpus in places:
        key = (host, tuple(gpus))
        n = seen.get(key, 0)
        seen[key] = n + 1
        out.append(n % len(gpus) if gpus else -1)
    return out


@dataclass(frozen=True)
class Placement:
    """Where every rank computes: this rank's device and, per rank, (host, GPU identity) of the
    GPU it uses (empty when the job runs on CPUs)."""

    device: torch.device
    gpus: list[tuple[str, str]] = field(default_factory=list)
    cpus: list[int] = field(default_factory=list)  # per rank: the CPUs it may run on
    hosts: list[str] = field(default_factory=list)  # per rank

    def cpu_lines(self, threads: int, loader_threads: int) -> list[str]:
        """The CPUs every rank has (its affinity, as the launcher bound it) against the threads
        it runs (torch's, plus the loader's decoding threads or workers): a line for the log,
        and a warning when a rank runs more threads than it has CPUs."""
        if not self.cpus:
            return []
        low, high = min(self.cpus), max(self.cpus)
        have = f"{low}" if low == high else f"{low}-{high}"
        per_host: dict[str, int] = {}
        for host in self.hosts:
            per_host[host] = per_host.get(host, 0) + 1
        where = ", ".join(f"{h} x{n}" for h, n in list(per_host.items())[:8])
        lines = [f"CPUs per rank (affinity): {have}; threads per rank: {threads} torch + "
                 f"{loader_threads} loader" + (f"; ranks per host: {where}" if where else "")]
        short = [r for r, n in enumerate(self.cpus) if threads + loader_threads > n]
        if short:
            lines.append(f"WARNING rank(s) {_ranks(short)} have {min(self.cpus[r] for r in short)}"
                         f" CPU(s) but run {threads} torch thread(s) (run.threads) + "
                         f"{loader_threads} loader thread(s) (data.loader_threads): lower them, or"
                         f" give each task more CPUs (srun/sbatch --cpus-per-task)")
        return lines

    def describe(self, backend: str, limit: int = 16) -> str | None:
        """One line for the log: rank -> host and GPU, and the intra-client backend (None on
        CPUs: nothing to map)."""
        if not self.gpus:
            return None
        shown = ", ".join(f"{r}->{h}:{g[:12]}" for r, (h, g) in enumerate(self.gpus[:limit]))
        more = f", ... ({len(self.gpus)} ranks)" if len(self.gpus) > limit else ""
        return (f"GPU mapping (rank->host:GPU): {shown}{more}; {len(set(self.gpus))} distinct "
                f"GPU(s) for {len(self.gpus)} ranks; {backend}")


def place(kind: str, rank: int, allgather: Callable[[Any], list]) -> Placement:
    """Collective (``allgather``: over every rank of the job, in rank order; ``rank``: this
    rank's position there): this rank's device from ``backend.device`` (``cuda``, or ``auto``
    with CUDA present: a GPU, made current), chosen by :func:`assign_gpus` from what every rank
    sees."""
    use_gpu = kind != "cpu" and torch.cuda.is_available()
    gathered = allgather((socket.gethostname(), visible_gpus() if use_gpu else (), usable_cpus()))
    places, cpus = [(h, g) for h, g, _ in gathered], [n for _, _, n in gathered]
    hosts = [h for h, _ in places]
    if not use_gpu:
        return Placement(torch.device("cpu"), cpus=cpus, hosts=hosts)
    index = assign_gpus(places)
    device = torch.device("cuda", index[rank])
    torch.cuda.set_device(device)
    # Batches have fixed shapes: let cuDNN pick the fastest convolution algorithms once. (A
    # resumed GPU run is then not bit-identical to an uninterrupted one; CPU runs are.)
    torch.backends.cudnn.benchmark = True
    return Placement(device, [(h, tuple(gpus)[i]) for (h, gpus), i in zip(places, index)], cpus,
                     hosts)


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity (what srun --cpus-per-task or mpirun's
    binding gave it), not the node's core count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _ranks(ranks: list[int], limit: int = 8) -> str:
    shown = ", ".join(map(str, ranks[:limit]))
    return shown + (f", ... ({len(ranks)} ranks)" if len(ranks) > limit else "")


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


def clients_sharing_a_gpu(ranks_of_client: list[list[int]],
                          gpus: Sequence[tuple[str, str]]) -> list[int]:
    """Clients with two or more ranks on the same GPU (pure: from the rank layout and, per
    rank, the host and identity of the GPU it uses)."""
    if not gpus:
        return []
    return [client for client, ranks in enumerate(ranks_of_client)
            if len({tuple(gpus[r]) for r in ranks}) < len(ranks)]


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
