"""Per-client folders: data that is already split by client, one ImageFolder tree per client
(``mhd-make-shards clientfolders ROOT OUT``)::

    ROOT/client_000/<class>/*.jpg      client 0's private samples
    ROOT/client_001/<class>/*.jpg      ...
    ROOT/public/<class>/*.jpg          optional: the public set (labels kept for the probe)
    ROOT/test/<class>/*.jpg            the test set (or --val DIR)

The clients are the ``client_NNN`` folders in order; the classes are the union of every tree's
class folders, sorted by name, so one class map serves every split. Without a ``public`` folder,
``public_fraction`` of every client's samples is drawn (seeded by the partition seed and
:data:`~mhd_hpc.runtime.seeds.PARTITION`) and becomes the public set, as the other partitions
draw theirs. The result is a :class:`~mhd_hpc.data.build.partition.Partition` like any other,
so the manifest records per-client counts and the training job reads it like any dataset.
"""

from __future__ import annotations

import os
import re

import numpy as np

from mhd_hpc.data.build.partition import Partition, PartitionError, check_min_samples
from mhd_hpc.runtime.seeds import PARTITION

__all__ = ["CLIENT_FOLDER", "client_dirs", "client_folder_partition"]

#: A client's folder: client_ and its index (client_000, client_1, ...).
CLIENT_FOLDER = re.compile(r"client_(\d+)")


def client_dirs(root: str) -> list[str]:
    """The ``client_NNN`` folders of ``root`` by index; indices must run 0..K-1."""
    found = {int(m.group(1)): e.path for e in os.scandir(root)
             if e.is_dir() and (m := CLIENT_FOLDER.fullmatch(e.name))}
    if not found:
        raise ValueError(f"{root}: no client folders (expected {root}/client_000/<class>/"
                         "<image>, client_001, ...)")
    if sorted(found) != list(range(len(found))):
        raise ValueError(f"{root}: client folders must be numbered 0..{len(found) - 1}, found "
                         f"indices {sorted(found)}")
    return [found[i] for i in range(len(found))]


def _classes(trees: list[str]) -> list[str]:
    names = {e.name for tree in trees for e in os.scandir(tree)
             if e.is_dir() and not e.name.startswith(".")}
    if not names:
        raise ValueError(f"no class folders under {trees[0]} (expected <class>/<image>)")
    return sorted(names)


def client_folder_partition(root: str, public_fraction: float, seed: int, min_samples: int,
                            list_tree) -> tuple[list[str], list[tuple[str, int]], Partition]:
    """(classes, every training sample ``(path, label)``, the partition into it).
    ``list_tree(tree, classes)`` lists one ImageFolder tree with a fixed class map
    (``make_shards.list_image_folder``)."""
    clients = client_dirs(root)
    public_dir = os.path.join(root, "public")
    has_public = os.path.isdir(public_dir)
    classes = _classes(clients + ([public_dir] if has_public else []))
    items: list[tuple[str, int]] = []
    owner: list[int] = []
    for i, tree in enumerate(clients):
        found = list_tree(tree, classes)[1]
        items += found
        owner += [i] * len(found)
    if has_public:
        found = list_tree(public_dir, classes)[1]
        items += found
        owner += [-1] * len(found)
    owners = np.asarray(owner, dtype=np.int64)
    labels = np.asarray([lab for _, lab in items], dtype=np.int64)
    if has_public:
        public = np.flatnonzero(owners == -1)
    else:
        if not 0.0 <= public_fraction < 1.0:
            raise PartitionError("data.public_fraction", f"must be in [0, 1), got "
                                 f"{public_fraction}")
        rng = np.random.default_rng([seed, PARTITION])
        public = np.sort(rng.choice(len(items), size=int(round(public_fraction * len(items))),
                                    replace=False)).astype(np.int64)
        owners[public] = -1
    private = [np.flatnonzero(owners == i) for i in range(len(clients))]
    check_min_samples(private, min_samples, "client folders")
    counts = np.stack([np.bincount(labels[p], minlength=len(classes)) for p in private])
    settings = {"partition": "client_folders", "seed": int(seed), "min_samples": int(min_samples),
                "public_fraction": 0.0 if has_public else float(public_fraction),
                "public_folder": has_public}
    return classes, items, Partition(num_classes=len(classes), public=public, clients=private,
                                     primary=[np.zeros(0, np.int64) for _ in private],
                                     counts=counts.astype(np.int64), settings=settings)
