"""A run's dataset, the one door between training and data: :func:`find_dataset` gives the
folder of a built dataset (asking the builder once for the built-in ones), and
:func:`open_data` opens one rank's streams on it. Nothing here writes into a built dataset.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from mhd_hpc.config.tree import DataConfig
from mhd_hpc.data.build.array_shards import NotWritableError, PartitionSettings
from mhd_hpc.data.build.builtin import BUILTIN_CLASSES, build_builtin
from mhd_hpc.data.build.partition import PartitionError
from mhd_hpc.data.build.sources import DatasetFileError
from mhd_hpc.data.checksums import check_shard_sizes
from mhd_hpc.data.manifest import Manifest, client_split
from mhd_hpc.data.read.stream_factory import open_stream
from mhd_hpc.data.read.streams import BatchStream
from mhd_hpc.runtime.seeds import PRIVATE_ORDER, PUBLIC_ORDER, seed_of

__all__ = ["Data", "find_dataset", "open_data"]


@dataclass
class Data:
    """The dataset of this run, read once: folder, manifest and this rank's streams."""

    folder: str
    manifest: Manifest
    private: BatchStream
    public: BatchStream
    test: BatchStream | None  # leaders only evaluate
    loader: str  # the loader actually used (data.loader resolved)
    probe: BatchStream | None = None  # leaders, eval.probe: the labelled public set, whole

    @property
    def num_classes(self) -> int:
        return self.manifest.num_classes

    def label_distribution(self) -> np.ndarray:
        """(K, C) private label distribution p_i(c) of every client."""
        return self.manifest.partition.label_distribution()

    def close(self) -> None:
        for stream in (self.private, self.public, self.test, self.probe):
            if stream is not None:
                stream.close()


def find_dataset(d: DataConfig, num_clients: int, seed: int, log: Callable[[str], None],
                 ) -> tuple[str, Manifest | None, tuple[str, str] | None]:
    """(dataset folder, its manifest, None), or (path, None, (key, message)) when the dataset
    does not fit the job, so that every rank can stop with the same config error. A built-in
    dataset is built here when missing (once; later runs reuse it)."""
    k = num_clients
    if d.dataset in BUILTIN_CLASSES:
        log(f"dataset {d.dataset}: preparing shards under {d.root} (built once, then reused)")
        if d.partition != "primary":  # said once, not silently ignored
            log(f"data.partition={d.partition}: data.label_assignment, data.labels_per_client "
                "and data.skew (the primary-label partition's keys) are not used")
        partition = PartitionSettings(k, d.public_fraction, d.label_assignment,
                                      d.labels_per_client, d.skew, seed, d.public_source,
                                      d.partition, d.alpha, d.min_samples)
        try:
            folder = build_builtin(d.dataset, d.root, d.source, partition)
        except DatasetFileError as exc:
            return d.root, None, ("data.source", str(exc))
        except PartitionError as exc:  # nothing was written: the partition comes first
            return d.root, None, (exc.key, f"{d.dataset}: {exc}")
        except NotWritableError as exc:
            return d.root, None, ("data.root", f"{d.root}: {exc.strerror}")
        return folder, Manifest.read(folder), None
    try:
        manifest = Manifest.read(d.root)
    except (OSError, ValueError) as exc:
        return d.root, None, ("data.root", f"not a dataset folder from tools/make_shards.py: "
                              f"{exc}")
    n = manifest.partition.num_clients
    if n != k:
        return d.root, None, ("clients.count", f"{d.root} was partitioned for {n} clients, "
                              f"the job has {k}: rebuild the shards with --clients {k} or set "
                              f"clients.count={n}")
    ignored = ignored_partition_keys(d, manifest.partition.settings)
    if ignored:
        key = ignored[0].split("=")[0]
        return d.root, None, (key, f"{', '.join(ignored)}: a shards dataset's partition "
                              f"was fixed when {d.root} was built "
                              f"({manifest.partition.settings}), so these keys would be "
                              "ignored: remove them from the job (or rebuild the shards with "
                              "mhd-make-shards and the partition you want)")
    built = manifest.public_source
    if built != d.public_source:
        return d.root, None, ("data.public_source", f"{d.root} was built with public source "
                              f"{built!r}, the job asks for {d.public_source!r}: rebuild with "
                              f"tools/make_shards.py --public-source {d.public_source} or set "
                              f"data.public_source={built}")
    # Cheap (sizes against the sums files and indexes, no data read): a truncated copy is
    # named here, before the run folder is claimed, not by a rank once its streams open.
    problems, unchecked = check_shard_sizes(d.root, manifest)
    if problems:
        more = f" (and {len(problems) - 1} more shards)" if len(problems) > 1 else ""
        return d.root, None, ("data.root", problems[0] + more)
    if unchecked:
        log(f"dataset {d.root}: {unchecked} JPEG shards have no member checksums (built by an "
            f"older tools/make_shards.py): their samples are not checked as they are read; "
            f"rerun the tools/make_shards.py command that built it to add them, or set "
            f"data.verify_shards=true")
    log(f"dataset {d.root}: {manifest.dataset} shards, {manifest.num_classes} classes, "
        f"partition fixed at build time ({manifest.partition.settings})")
    return d.root, manifest, None


#: The keys of the partition that a shards dataset fixed at build time (the built-in datasets
#: build their partition from them at start).
PARTITION_KEYS = ("public_fraction", "label_assignment", "labels_per_client", "skew",
                  "partition", "alpha", "min_samples")


def ignored_partition_keys(d: DataConfig, built: dict) -> list[str]:
    """The partition keys (``data.KEY=value``) a job sets for a shards dataset that are neither
    their defaults nor what the dataset was built with (its manifest's partition settings)."""
    defaults, out = DataConfig(), []
    for key in PARTITION_KEYS:
        value = getattr(d, key)
        if value != getattr(defaults, key) and value != built.get(key, getattr(defaults, key)):
            out.append(f"data.{key}={value}")
    return out


def open_data(folder: str, manifest: Manifest, d: DataConfig, *, client: int, part: int,
              num_parts: int, seed: int, leader: bool, probe: bool,
              device: torch.device, poisson: tuple[float, int] | None = None) -> Data:
    """This rank's slice (``part`` of its client's ``num_parts`` ranks) of client ``client``'s
    private stream and of the public stream; on the client's leader the test stream (and with
    ``probe`` the whole public split) for evaluation. ``poisson``: (rate, seed) of the private
    stream's Poisson sampling (``privacy.enabled``; the seed is the client's key's)."""
    opts = {"loader": d.loader, "threads": d.loader_threads, "manifest": manifest,
            "pin": device.type == "cuda", "prefetch": d.prefetch}
    mine = {"part": part, "num_parts": num_parts, **opts}
    rate, order_seed = poisson or (0.0, seed_of(seed, PRIVATE_ORDER, client))
    private, loader = open_stream(folder, client_split(client), d.batch_size, order_seed,
                                  "train", poisson_rate=rate, **mine)
    public, _ = open_stream(folder, "public", d.public_batch_size,  # one seed: aligned
                            seed_of(seed, PUBLIC_ORDER), "public", **mine)

    def whole(split: str) -> BatchStream:  # leaders evaluate on whole splits, in order
        return open_stream(folder, split, 256, 0, "eval", **opts)[0]
    test = whole("test") if leader else None
    probe_stream = whole("public") if leader and probe else None
    return Data(folder, manifest, private, public, test, loader, probe_stream)
