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
import os
import socket
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from mhd_hpc.config.choices import DEVICES, PRECISIONS  # noqa: F401 (re-exported)

__all__ = ["DEVICES", "PRECISIONS", "Precision", "Placement", "place", "assign_gpus",
           "visible_gpus", "usable_cpus", "resolve_precision",
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
