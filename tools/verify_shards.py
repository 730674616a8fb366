"""Check every shard of a built dataset against the sha256 digests in its manifest.

Usage (from the repository root)::

    python tools/verify_shards.py /scratch/imagenet-mhd [--workers 8]
    python tools/verify_shards.py data/digits-0123456789ab

Exit code 0 when every shard matches, 1 when any is corrupt, missing or unreadable (each one
named), 2 when the folder is not a dataset. The training job does the same check at start with
``data.verify_shards=true``.
"""

from __future__ import annotations

import argparse
import os
import sys
from multiprocessing import Pool

try:
    from mhd_hpc.data.manifest import load_manifest, verify_shards
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from mhd_hpc.data.manifest import load_manifest, verify_shards


def _one(args: tuple[str, dict, int, int]) -> tuple[int, list[str]]:
    return verify_shards(*args)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dataset_dir", help="dataset folder (with manifest.json)")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                   help="hashing processes")
    args = p.parse_args(argv)
    try:
        manifest = load_manifest(args.dataset_dir)
    except (OSError, ValueError) as exc:
        print(f"verify_shards: {exc}", file=sys.stderr)
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


if __name__ == "__main__":
    sys.exit(main())
