"""``mhd-verify-shards`` (``python tools/verify_shards.py``): check every shard of a built
dataset against the sha256 digests in its manifest, with the hashing spread over processes."""

from __future__ import annotations

import argparse
import os
import sys
from multiprocessing import Pool

from mhd_hpc.data.manifest import load_manifest, verify_shards
from mhd_hpc.errors import command

__all__ = ["main"]

DESCRIPTION = """\
Check every shard of a dataset built by mhd-make-shards (or a built-in dataset's folder) against
the sha256 digest its manifest records, and name every shard that is corrupt, missing or
unreadable. A training job does the same check at start with data.verify_shards=true."""

EPILOG = """\
Exit codes: 0 when every shard matches, 1 when any does not (each one named), 2 when the folder
is not a dataset.

Examples:
  mhd-verify-shards /scratch/imagenet-mhd --workers 8
  mhd-verify-shards data/digits-0123456789ab"""


def _one(args: tuple[str, dict, int, int]) -> tuple[int, list[str]]:
    return verify_shards(*args)


@command
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mhd-verify-shards", description=DESCRIPTION,
                                epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset_dir", metavar="DATASET_DIR",
                   help="the dataset folder (the one with manifest.json)")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                   help="hashing processes (default: one less than the CPUs)")
    args = p.parse_args(argv)
    try:
        manifest = load_manifest(args.dataset_dir)
    except (OSError, ValueError) as exc:
        print(f"mhd-verify-shards: {exc}", file=sys.stderr)
        return 2
    workers = max(1, min(args.workers, len(manifest.get("shard_sha256") or {0: 0})))
    jobs = [(args.dataset_dir, manifest, n, workers) for n in range(workers)]
    if workers == 1:
        results = [_one(jobs[0])]
    else:
        with Pool(workers) as pool:
            results = pool.map(_one, jobs)
    checked = sum(n for n, _ in results)
    problems = [p for _, found in results for p in found]
    for problem in problems:
        print(f"CORRUPT {problem}")
    print(f"{checked} shards checked, {len(problems)} problem(s) in {args.dataset_dir}")
    return 1 if problems else 0
