"""``mhd-make-shards`` (``python tools/make_shards.py``): build a partitioned dataset (public,
per-client private and test shards) from the formats researchers have on disk.

The work is done by :mod:`mhd_hpc.data.build.make_shards` (image trees) and
:mod:`mhd_hpc.data.build.array_shards` (arrays); this module parses the arguments, says what
went wrong in terms of the command's flags, and owns the optional MPI part (shards spread over
the ranks of ``mpirun -np N mhd-make-shards ...``).
"""

from __future__ import annotations

import argparse
import os
import sys

from mhd_hpc.data.build.make_shards import ShardSettings, build_imagefolder_shards
from mhd_hpc.data.build.partition import PartitionError
from mhd_hpc.data.manifest import format_summary
from mhd_hpc.distributed.launched import launched_world
from mhd_hpc.errors import command

__all__ = ["main", "parse_args"]

DESCRIPTION = """\
Build a partitioned dataset for data.dataset=shards: an unlabeled public split, one private
split per client and a test split, with a manifest that records the partition and a sha256 per
shard. Sources:
  imagefolder  SRC is a train/<class>/<image> tree (ImageNet's layout); JPEG shards, decoded
               at training time; the partition is drawn here (--partition).
  clientfolders SRC holds client_000/<class>/<image>, client_001/..., one tree per client, an
               optional public/<class>/<image> tree and a test/<class>/<image> tree (or --val):
               the data is already split by client, and the split is kept.
  idx          SRC holds the four IDX files of MNIST, Fashion-MNIST, KMNIST or EMNIST.
  cifar        SRC holds the python-pickle batches of CIFAR-10 or CIFAR-100.
idx and cifar write raw uint8 record shards at the images' own size (no decoding when
training). Rerunning the same command resumes an interrupted build and does nothing on a
finished one."""

EPILOG = """\
Partitions (--partition): primary is the paper's primary labels per client with skew
(--label-assignment, --labels-per-client, --skew); dirichlet splits every label over the
clients in proportions drawn from Dir(--alpha), the label skew of most federated-learning
papers; package.module:function is your own partition function (docs/plugins.md). A client
with fewer than --min-samples private samples stops the build.

Examples:
  mhd-make-shards imagefolder /data/imagenet/train /scratch/imagenet-mhd \
      --val /data/imagenet/val --clients 8 --labels-per-client 250 --skew 100
  mpirun -np 4 mhd-make-shards imagefolder ...      (the shards spread over 4 ranks)
  mhd-make-shards idx /usr/share/datasets/fashion-mnist /scratch/fmnist-dir \
      --clients 8 --partition dirichlet --alpha 0.5
  mhd-make-shards clientfolders /data/hospitals /scratch/hospitals-mhd
  mhd-make-shards cifar /data/cifar-100-python /scratch/c100 --clients 8 --cifar-labels coarse
Then train with data.dataset=shards data.root=OUT_DIR, and check the shards at any time with
mhd-verify-shards OUT_DIR."""

#: The flag of each config key a partition error may name.
FLAGS = {"data.min_samples": "--min-samples", "data.partition": "--partition",
         "data.alpha": "--alpha", "data.public_fraction": "--public-fraction"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mhd-make-shards", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", choices=("imagefolder", "clientfolders", "idx", "cifar"),
                   help="the layout of SRC (see above)")
    p.add_argument("train_dir", metavar="SRC", help="the folder to read (see above)")
    p.add_argument("out_dir", metavar="OUT_DIR",
                   help="the dataset folder to write (manifest.json and one folder per split)")
    p.add_argument("--val", dest="val_dir", help="imagefolder, clientfolders: the test set, a "
                   "<class>/<image> tree or images with a val_labels.txt (default: the sibling "
                   "folder val of SRC; clientfolders: SRC/test)")
    p.add_argument("--val-labels", help="a label file with lines 'filename class_name'")
    p.add_argument("--clients", type=int, default=None, help="number of clients K (default: "
                   "8; clientfolders: the number of client folders)")
    p.add_argument("--public-fraction", type=float, default=0.1, help="fraction of the "
                   "training pool that becomes the unlabeled public set (clientfolders: of "
                   "every client's samples, unless SRC/public exists)")
    p.add_argument("--partition", default="primary", help="primary, dirichlet or "
                   "package.module:function (see below; default: primary)")
    p.add_argument("--alpha", type=float, default=0.5,
                   help="dirichlet: the concentration alpha (default: 0.5)")
    p.add_argument("--min-samples", type=int, default=1,
                   help="fewest private samples a client may receive (default: 1)")
    p.add_argument("--label-assignment", choices=("random", "even"), default="random",
                   help="primary: random label sets, or every label primary for as many "
                   "clients (default: random)")
    p.add_argument("--labels-per-client", type=int, default=None,
                   help="primary: primary labels per client (default: a quarter of the classes)")
    p.add_argument("--skew", type=float, default=100.0,
                   help="primary: the skew s, 0 for iid, 100 for strongly non-iid (default: 100)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the partition and of the write order (default: 0)")
    p.add_argument("--image-size", type=int, default=224, help="imagefolder, clientfolders: "
                   "the training crop size S (idx and cifar keep their own size)")
    p.add_argument("--cifar-labels", choices=("fine", "coarse"), default="fine",
                   help="cifar: CIFAR-100's 100 fine or 20 coarse classes (default: fine)")
    p.add_argument("--max-side", type=int, default=None, help="re-encode images whose longer "
                   "side exceeds N pixels (default: keep the original bytes)")
    p.add_argument("--samples-per-shard", type=int, default=None,
                   help="samples per shard (default: 1000 for image trees, 5000 for arrays)")
    p.add_argument("--public-source", choices=("split", "all"), default="split",
                   help="all: the public split is the whole training pool (the paper's MHD+); "
                        "recorded in the manifest, and data.public_source must match")
    p.add_argument("--no-decode-public", dest="decode_public", action="store_false",
                   help="image trees: keep the public and test splits as JPEG shards (by "
                        "default they are stored decoded at the training size, raw uint8, so "
                        "that no client decodes them)")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                   help="writer processes per rank (default: one less than the CPUs)")
    return p.parse_args(argv)


def build_arrays(args: argparse.Namespace) -> dict:
    """The ``idx`` and ``cifar`` sources: one process (the data is in memory), resumable."""
    from mhd_hpc.data.build.array_shards import (PartitionSettings, build_array_shards,
                                                 settings_record)
    from mhd_hpc.data.build.builtin import array_splits
    from mhd_hpc.data.build.sources import load_cifar_dataset, load_idx_dataset
    from mhd_hpc.data.manifest import file_sha256

    data = (load_idx_dataset(args.train_dir) if args.source == "idx"
            else load_cifar_dataset(args.train_dir, args.cifar_labels))
    lpc = args.labels_per_client
    if lpc is None:
        lpc = max(1, len(data.classes) // 4)
    partition = PartitionSettings(args.clients or 8, args.public_fraction,
                                  args.label_assignment, lpc, args.skew, args.seed,
                                  args.public_source, args.partition, args.alpha,
                                  args.min_samples)
    settings = settings_record(f"{args.source}:{data.name}", partition, source_sha256={
        os.path.basename(p): file_sha256(p) for p in data.files})
    splits = array_splits(data.name, data.train_images, data.train_labels, data.test_images,
                          data.test_labels, data.classes)
    return build_array_shards(splits, args.out_dir, partition, settings=settings,
                              samples_per_shard=args.samples_per_shard or 5000,
                              log=lambda m: print(m, file=sys.stderr, flush=True))


def build_trees(args: argparse.Namespace) -> dict | None:
    """The ``imagefolder`` and ``clientfolders`` sources: over processes and MPI ranks; the
    manifest (on rank 0) or None."""
    folders = args.source == "clientfolders"
    clients = args.clients
    if folders and clients is None:
        from mhd_hpc.data.build.client_folders import client_dirs

        clients = len(client_dirs(args.train_dir))
    settings = ShardSettings(
        train_dir=os.path.abspath(args.train_dir),
        val_dir=os.path.abspath(args.val_dir) if args.val_dir else None,
        val_labels=os.path.abspath(args.val_labels) if args.val_labels else None,
        clients=clients or 8, public_fraction=args.public_fraction,
        label_assignment=args.label_assignment, labels_per_client=args.labels_per_client,
        skew=args.skew, seed=args.seed, image_size=args.image_size, max_side=args.max_side,
        samples_per_shard=args.samples_per_shard or 1000, public_source=args.public_source,
        decode_public=args.decode_public, partition=args.partition, alpha=args.alpha,
        min_samples=args.min_samples, client_folders=folders)
    rank, size, barrier = launched_world()
    os.makedirs(args.out_dir, exist_ok=True)
    return build_imagefolder_shards(settings, args.out_dir, workers=args.workers, rank=rank,
                                    size=size, barrier=barrier,
                                    log=lambda m: print(m, file=sys.stderr, flush=True))


@command
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.source == "clientfolders" and args.partition != "primary":
        print("mhd-make-shards: clientfolders keeps the split of the client folders; "
              f"--partition {args.partition} does not apply", file=sys.stderr)
        return 2
    try:
        manifest = build_arrays(args) if args.source in ("idx", "cifar") else build_trees(args)
    except PartitionError as exc:
        flag = FLAGS.get(exc.key, exc.key)
        print(f"mhd-make-shards: {flag}: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # a missing or truncated file, a bad tree: named
        print(f"mhd-make-shards: {exc}", file=sys.stderr)
        return 1
    if manifest is not None:
        print(format_summary(manifest))
        print(os.path.abspath(args.out_dir))
    return 0
