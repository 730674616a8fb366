"""DALI webdataset index files (``.idx``): write them without DALI, read them for random access.

The format is the one DALI's ``wds2idx`` writes (``IndexCreator``, version ``v1.2``)::

    v1.2 <number of samples>
    <ext> <data offset> <size> <member name> [<ext> <offset> <size> <name> ...]

One line per sample. Offsets point at the member *data* (after its 512-byte header); members
are grouped into samples by the key (the member name up to the first dot of its base name),
consecutive members only; non-regular members (PAX headers, folders) are skipped.
``index_tar`` reproduces that with the standard ``tarfile`` module, so shard writers need
neither DALI nor GNU tar, and the same index gives the Python readers O(1) access to any sample
(StepBatches order needs random access).
"""

from __future__ import annotations

import os
import tarfile
from dataclasses import dataclass

from mhd_hpc.runtime.files import atomic_write

__all__ = ["INDEX_VERSION", "IndexEntry", "index_path", "index_tar", "scan_tar", "write_index",
           "read_index", "split_name"]

INDEX_VERSION = "v1.2"


@dataclass(frozen=True)
class IndexEntry:
    """One sample of a shard: its key and ``ext -> (data offset, size)`` of its members."""

    key: str
    members: dict[str, tuple[int, int]]


def index_path(shard_path: str) -> str:
    """``dir/shard-000000.tar`` -> ``dir/shard-000000.idx`` (``wds2idx``'s default name)."""
    base = os.path.basename(shard_path)
    stem = base[: base.find(".", 1)] if base.find(".", 1) > 0 else base
    return os.path.join(os.path.dirname(shard_path), stem + ".idx")


def _split_name(name: str) -> tuple[str, str]:
    dot = name.find(".", name.rfind("/") + 1)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1:])


def _raw_index(shard_path: str) -> list[list[tuple[str, int, int, str]]]:
    samples: list[list[tuple[str, int, int, str]]] = []
    last = None
    with tarfile.open(shard_path, mode="r:") as tar:
        for member in tar:
            if not member.isreg():
                continue
            key, ext = _split_name(member.name)
            if not key or key.endswith("/"):  # hidden files, as wds2idx skips them
                continue
            if key != last:
                samples.append([])
                last = key
            samples[-1].append((ext, member.offset_data, member.size, member.name))
    return samples


def scan_tar(shard_path: str) -> list[list[tuple[str, int, int, str]]]:
    """Per sample, its members as ``(ext, data offset, size, member name)``, in tar order."""
    return _raw_index(shard_path)


def split_name(name: str) -> tuple[str, str]:
    """A member name -> (sample key, extension), cut at the first dot of the base name."""
    return _split_name(name)


def index_tar(shard_path: str) -> list[IndexEntry]:
    """Scan a tar's headers (data is seeked over, not read) into per-sample index entries."""
    return [IndexEntry(key=_split_name(comps[0][3])[0],
                       members={ext: (off, size) for ext, off, size, _ in comps})
            for comps in _raw_index(shard_path)]


def write_index(shard_path: str, idx_path: str | None = None) -> str:
    """Write the ``wds2idx``-format index of ``shard_path`` atomically; return its path.

    An empty tar gets a ``v1.2 0`` header (``wds2idx`` refuses empty tars; DALI then reads
    nothing from that shard, which is what an empty shard means).
    """
    idx_path = idx_path or index_path(shard_path)
    samples = _raw_index(shard_path)
    lines = [f"{INDEX_VERSION} {len(samples)}\n"]
    for comps in samples:
        lines.append(" ".join(f"{ext} {off} {size} {name}" for ext, off, size, name in comps)
                     + "\n")
    with atomic_write(idx_path, "w") as f:
        f.writelines(lines)
    return idx_path


def read_index(idx_path: str) -> list[IndexEntry]:
    """Parse an index file; ``ValueError`` naming the file if it is not ``v1.2`` or malformed."""
    with open(idx_path, encoding="utf-8") as f:
        header = f.readline().split()
        if len(header) != 2 or header[0] != INDEX_VERSION:
            raise ValueError(f"{idx_path}: not a {INDEX_VERSION} webdataset index: {header}")
        entries = []
        for line_no, line in enumerate(f, start=2):
            parts = line.split()
            if not parts or len(parts) % 4:
                raise ValueError(f"{idx_path}:{line_no}: malformed index line")
            members = {parts[i]: (int(parts[i + 1]), int(parts[i + 2]))
                       for i in range(0, len(parts), 4)}
            entries.append(IndexEntry(key=_split_name(parts[3])[0], members=members))
    if len(entries) != int(header[1]):
        raise ValueError(f"{idx_path}: header says {header[1]} samples, found {len(entries)}")
    return entries
