"""Member checksums of JPEG tar shards: each member's size and CRC32, beside the DALI index,
checked as the member is read; and the cheap whole-shard check made before a run starts.

``tools/make_shards.py`` writes, for ``split/shard-000000.tar``, ``split/shard-000000.sums``::

    mhd-sums v1 <tar size in bytes> <samples>
    <key> <ext>:<size>:<crc32, 8 hex digits> [<ext>:<size>:<crc32> ...]

one line per sample, in the order of the index (``.idx``, whose format DALI reads and which
therefore cannot carry more fields). The checksums are of the bytes the builder wrote, taken
while writing. A reader checks a sample's bytes against them when it reads them
(:class:`~mhd_hpc.data.read.streams.ByteReader`, in the PIL workers and for DALI's external
source alike): CRC32 costs about 30 us per 110 kB JPEG, against milliseconds to decode it.
Before training, the root compares each shard's size with the size recorded here (or, for
shards built before checksums existed, with the end of the last member in the index): a
truncated copy is named before anything is written. ``data.verify_shards`` (sha256 of every
byte against the manifest) remains the full check.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass

from mhd_hpc.data.manifest import Manifest
from mhd_hpc.data.tarindex import index_path, scan_tar, split_name
from mhd_hpc.runtime.files import atomic_write

__all__ = ["SUMS_VERSION", "DamagedSample", "ShardSums", "sums_path", "write_sums", "read_sums",
           "check_shard_sizes"]

SUMS_VERSION = "mhd-sums v1"


class DamagedSample(ValueError):
    """A sample's bytes differ from what was written when the shard was built (or cannot be
    decoded): the message names the shard file and the sample key."""


@dataclass(frozen=True)
class ShardSums:
    """A shard's recorded size and, per sample key, ``ext -> (size, crc32)`` of its members."""

    tar_bytes: int
    members: dict[str, dict[str, tuple[int, int]]]


def sums_path(shard_path: str) -> str:
    """``dir/shard-000000.tar`` -> ``dir/shard-000000.sums`` (beside the ``.idx``)."""
    return index_path(shard_path).removesuffix(".idx") + ".sums"


def write_sums(shard_path: str, crcs: dict[str, int] | None = None) -> str:
    """Write ``shard_path``'s sums file atomically; return its path. ``crcs``: member name ->
    CRC32 of the bytes the builder wrote; members missing there are read back from the tar
    (shards built before checksums existed get theirs this way)."""
    crcs = crcs or {}
    samples = scan_tar(shard_path)
    lines = [f"{SUMS_VERSION} {os.path.getsize(shard_path)} {len(samples)}\n"]
    with open(shard_path, "rb") as f:
        for members in samples:
            parts = [split_name(members[0][3])[0]]
            for ext, off, size, name in members:
                crc = crcs.get(name)
                if crc is None:
                    crc = zlib.crc32(os.pread(f.fileno(), size, off))
                parts.append(f"{ext}:{size}:{crc:08x}")
            lines.append(" ".join(parts) + "\n")
    path = sums_path(shard_path)
    with atomic_write(path, "w") as out:
        out.writelines(lines)
    return path


def read_sums(path: str) -> ShardSums:
    """Parse a sums file; ``ValueError`` naming the file (and line) if it is malformed."""
    with open(path, encoding="utf-8") as f:
        header = f.readline().split()
        if len(header) != 4 or " ".join(header[:2]) != SUMS_VERSION:
            raise ValueError(f"{path}: not a {SUMS_VERSION} file: {header}")
        members: dict[str, dict[str, tuple[int, int]]] = {}
        for line_no, line in enumerate(f, start=2):
            key, *fields = line.split()
            try:
                members[key] = {ext: (int(size), int(crc, 16)) for ext, size, crc in
                                (field.split(":") for field in fields)}
            except ValueError:
                raise ValueError(f"{path}:{line_no}: malformed line") from None
    if len(members) != int(header[3]):
        raise ValueError(f"{path}: header says {header[3]} samples, found {len(members)}")
    return ShardSums(int(header[2]), members)


def _last_member_end(idx_path: str) -> int:
    """The end of the last member in a DALI index (its lines are in tar order): the least size
    of a whole shard, read from the index's tail only."""
    with open(idx_path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 65536))
        lines = [ln for ln in f.read().decode("utf-8", "replace").splitlines() if ln.strip()]
    parts = lines[-1].split() if len(lines) > 1 else []
    return max((int(parts[i + 1]) + int(parts[i + 2]) for i in range(0, len(parts) - 3, 4)),
               default=0)


def check_shard_sizes(dataset_dir: str, manifest: Manifest) -> tuple[list[str], int]:
    """(problems, shards without checksums) of the JPEG tar shards of every split: a shard
    whose size differs from its sums file's, or (older shards) ends before its index's last
    member, is named. Reads only the sums files' first lines and the indexes' tails."""
    problems, unchecked = [], 0
    for split, files in manifest.splits.items():
        if manifest.split_format(split) != "jpg":
            continue
        for rel in files:
            path = os.path.join(dataset_dir, rel)
            try:
                size = os.path.getsize(path)
                sums = sums_path(path)
                if os.path.isfile(sums):
                    with open(sums, encoding="utf-8") as f:
                        header = f.readline().split()
                    expected, exact = int(header[2]), True
                else:
                    unchecked += 1
                    idx = index_path(path)
                    if not os.path.isfile(idx):
                        continue
                    expected, exact = _last_member_end(idx), False
            except (OSError, ValueError, IndexError) as exc:
                problems.append(f"{path}: {exc}")
                continue
            if size < expected or (exact and size != expected):
                built = "was built with" if exact else "its index needs at least"
                problems.append(f"{path} has {size} bytes, {built} {expected}: truncated or "
                                f"replaced (copy it again, or rebuild with tools/make_shards.py)")
    return problems, unchecked
