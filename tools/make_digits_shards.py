"""Build the embedded digits dataset as WebDataset shards and print a summary.

Usage (from the repository root)::

    python tools/make_digits_shards.py --root data --clients 4 --public-fraction 0.1 \
        --label-assignment random --labels-per-client 3 --skew 100 --seed 0

The work is done by :func:`mhd_hpc.data.build.embedded.build_digits_shards` (which the training entry
calls too); this tool only parses arguments and prints. Rebuilding with the same settings is a
no-op that prints the existing dataset.
"""

from __future__ import annotations

import argparse
import os
import sys

try:
    from mhd_hpc.data.build.embedded import build_digits_shards
    from mhd_hpc.data.manifest import format_summary, load_manifest
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from mhd_hpc.data.build.embedded import build_digits_shards
    from mhd_hpc.data.manifest import format_summary, load_manifest


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default="data", help="folder that holds built datasets")
    p.add_argument("--clients", type=int, default=4, help="number of clients K")
    p.add_argument("--public-fraction", type=float, default=0.1,
                   help="fraction of the pool that becomes the unlabeled public set")
    p.add_argument("--label-assignment", choices=("random", "even"), default="random",
                   help="how primary labels are chosen per client")
    p.add_argument("--labels-per-client", type=int, default=3, help="primary labels per client")
    p.add_argument("--skew", type=float, default=100.0, help="s: 0 = iid, 100 = strongly non-iid")
    p.add_argument("--seed", type=int, default=0, help="partition seed")
    p.add_argument("--public-source", choices=("split", "all"), default="split",
                   help="all: the public split is the whole training pool (MHD+)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dataset_dir = build_digits_shards(
        root=args.root, num_clients=args.clients, public_fraction=args.public_fraction,
        label_assignment=args.label_assignment, labels_per_client=args.labels_per_client,
        skew=args.skew, seed=args.seed, public_source=args.public_source,
    )
    print(format_summary(load_manifest(dataset_dir), dataset_dir))
    print(dataset_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
