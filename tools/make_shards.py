"""Build a partitioned dataset (public / per-client / test shards) from the formats researchers
have on disk.

Usage (from the repository root)::

    python tools/make_shards.py imagefolder /data/imagenet/train /scratch/imagenet-wds \
        --val /data/imagenet/val --clients 8 --labels-per-client 250 --skew 100 --workers 16
    mpirun -np 4 python tools/make_shards.py imagefolder ...     # shards spread over ranks
    python tools/make_shards.py idx /usr/share/datasets/fashion-mnist /scratch/fmnist \
        --clients 8 --labels-per-client 3 --skew 100     # MNIST, Fashion-MNIST, KMNIST, EMNIST
    python tools/make_shards.py cifar /data/cifar-100-python /scratch/c100 --cifar-labels coarse

``imagefolder`` writes JPEG WebDataset shards (photographs: decoded at training time);
``idx`` (the gzipped or plain IDX files of the MNIST family) and ``cifar`` (the python-pickle
CIFAR-10 / CIFAR-100 batches, fine or coarse labels) write raw uint8 record shards at the
images' own resolution (no decode when training). Every source gets the same partition,
manifest, checksums and shard-by-shard resumable writing.

The validation set is ``--val DIR`` (a ``<class>/*`` tree, or images plus ``val_labels.txt``
with lines ``filename class_name``), ``--val-labels FILE``, or by default the sibling ``val``
folder of the train folder. Rerunning resumes an interrupted build and is a no-op on a finished
one. The work is done by :mod:`mhd_hpc.data.build.make_shards`; this tool parses arguments and owns
the (optional) MPI part.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

try:
    from mhd_hpc.data.build.make_shards import ShardSettings, build_imagefolder_shards
    from mhd_hpc.data.manifest import format_summary
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from mhd_hpc.data.build.make_shards import ShardSettings, build_imagefolder_shards
    from mhd_hpc.data.manifest import format_summary

_LAUNCHER_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")


def mpi_world() -> tuple[int, int, Callable[[], None] | None]:
    """(rank, size, barrier) under an MPI launcher with > 1 ranks, else (0, 1, None).

    The only mpi4py use of the tool. Without launcher variables mpi4py is not even imported,
    so a plain run never initialises MPI (slow, and noisy on some clusters).
    """
    if not any(v in os.environ for v in _LAUNCHER_VARS):
        return 0, 1, None
    try:
        from mpi4py import MPI
    except ImportError:
        return 0, 1, None
    comm = MPI.COMM_WORLD
    if comm.Get_size() < 2:
        return 0, 1, None
    return comm.Get_rank(), comm.Get_size(), comm.Barrier


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("source", choices=("imagefolder", "idx", "cifar"), help="input layout")
    p.add_argument("train_dir", help="imagefolder: the train/<class>/<image> tree; idx: the "
                   "folder of the four IDX files; cifar: the folder of the python batches")
    p.add_argument("out_dir", help="output dataset folder (manifest.json + shard folders)")
    p.add_argument("--val", dest="val_dir", help="validation folder (default: sibling 'val')")
    p.add_argument("--val-labels", help="label file with lines 'filename class_name'")
    p.add_argument("--clients", type=int, default=8, help="number of clients K")
    p.add_argument("--public-fraction", type=float, default=0.1,
                   help="fraction of the train set that becomes the unlabeled public set")
    p.add_argument("--label-assignment", choices=("random", "even"), default="random")
    p.add_argument("--labels-per-client", type=int, default=None,
                   help="primary labels per client (default: a quarter of the classes)")
    p.add_argument("--skew", type=float, default=100.0, help="s: 0 = iid, 100 = strongly non-iid")
    p.add_argument("--seed", type=int, default=0, help="partition and write-order seed")
    p.add_argument("--image-size", type=int, default=224,
                   help="imagefolder: training crop size S (idx, cifar: their own size)")
    p.add_argument("--cifar-labels", choices=("fine", "coarse"), default="fine",
                   help="cifar: CIFAR-100's 100 fine or 20 coarse classes")
    p.add_argument("--max-side", type=int, default=None,
                   help="re-encode images whose longer side exceeds N pixels (default: keep bytes)")
    p.add_argument("--samples-per-shard", type=int, default=None,
                   help="default: 1000 (imagefolder), 5000 (idx, cifar)")
    p.add_argument("--public-source", choices=("split", "all"), default="split",
                   help="all: the public split is the whole training pool (the paper's MHD+); "
                        "recorded in the manifest (data.public_source must match)")
    p.add_argument("--no-decode-public", dest="decode_public", action="store_false",
                   help="imagefolder: keep the public and test splits as JPEG shards (by "
                        "default they are stored decoded at the training size, raw uint8, so "
                        "that no client decodes them; what datasets built before did)")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                   help="writer processes per rank")
    return p.parse_args(argv)


def build_arrays(args: argparse.Namespace) -> dict:
    """The ``idx`` and ``cifar`` sources: one process (the data is in memory), resumable."""
    from mhd_hpc.data.build.array_shards import PartitionSettings, build_array_shards, settings_record
    from mhd_hpc.data.build.builtin import array_splits
    from mhd_hpc.data.manifest import file_sha256
    from mhd_hpc.data.build.sources import load_cifar_dataset, load_idx_dataset

    data = (load_idx_dataset(args.train_dir) if args.source == "idx"
            else load_cifar_dataset(args.train_dir, args.cifar_labels))
    lpc = args.labels_per_client
    if lpc is None:
        lpc = max(1, len(data.classes) // 4)
    partition = PartitionSettings(args.clients, args.public_fraction, args.label_assignment,
                                  lpc, args.skew, args.seed, args.public_source)
    settings = settings_record(f"{args.source}:{data.name}", partition, source_sha256={
        os.path.basename(p): file_sha256(p) for p in data.files})
    splits = array_splits(data.name, data.train_images, data.train_labels, data.test_images,
                          data.test_labels, data.classes)
    return build_array_shards(splits, args.out_dir, partition, settings=settings,
                              samples_per_shard=args.samples_per_shard or 5000,
                              log=lambda m: print(m, file=sys.stderr, flush=True))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.source in ("idx", "cifar"):
        try:
            manifest = build_arrays(args)
        except ValueError as exc:  # a missing or truncated file, named
            print(f"make_shards: {exc}", file=sys.stderr)
            return 1
        print(format_summary(manifest))
        print(os.path.abspath(args.out_dir))
        return 0
    settings = ShardSettings(
        train_dir=os.path.abspath(args.train_dir),
        val_dir=os.path.abspath(args.val_dir) if args.val_dir else None,
        val_labels=os.path.abspath(args.val_labels) if args.val_labels else None,
        clients=args.clients, public_fraction=args.public_fraction,
        label_assignment=args.label_assignment, labels_per_client=args.labels_per_client,
        skew=args.skew, seed=args.seed, image_size=args.image_size, max_side=args.max_side,
        samples_per_shard=args.samples_per_shard or 1000, public_source=args.public_source,
        decode_public=args.decode_public)
    rank, size, barrier = mpi_world()
    os.makedirs(args.out_dir, exist_ok=True)
    manifest = build_imagefolder_shards(settings, args.out_dir, workers=args.workers, rank=rank,
                                        size=size, barrier=barrier,
                                        log=lambda m: print(m, file=sys.stderr, flush=True))
    if manifest is not None:
        print(format_summary(manifest))
        print(os.path.abspath(args.out_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
