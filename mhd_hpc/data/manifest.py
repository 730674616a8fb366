"""The dataset manifest: the one description of a built dataset that everything else reads.

The shard builders (:mod:`mhd_hpc.data.build.array_shards` for arrays such as the embedded
digits, :mod:`mhd_hpc.data.build.make_shards` for ImageFolder trees) write it through
:func:`write_manifest`; the training run reads it once as a typed :class:`Manifest` (:meth:`Manifest.read`) and hands it to the streams;
:func:`load_manifest` gives the JSON object as stored (builders, tools, digests). Layout::

    dataset_dir/manifest.json    format_version, num_classes, image_shape, normalize, settings,
                                 partition (primary labels, per-client per-class counts),
                                 splits (split -> shard files), counts, class_counts, bytes,
                                 shard_sha256 (shard file -> digest)
    dataset_dir/<split>/shard-000000.tar ...

Splits are named ``test``, ``public`` and ``client_000``, ``client_001``, ...
(:func:`client_split`).
The write order of the public and client splits is one rule for both builders
(:func:`write_order`): DALI only shuffles within a buffer, so samples are shuffled when written.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mhd_hpc.runtime.files import atomic_write
from mhd_hpc.runtime.seeds import WRITE_ORDER

__all__ = ["MANIFEST_NAME", "FORMAT_VERSION", "Manifest", "Partition", "client_split",
           "split_format", "load_manifest",
           "write_manifest",
           "write_order", "format_summary", "file_sha256", "content_digest", "verify_shards",
           "use_whole_pool_as_public"]

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
_REQUIRED = ("num_classes", "image_shape", "normalize", "splits", "counts")


def client_split(i: int) -> str:
    """Split name of client ``i`` in a manifest: ``client_000``, ``client_001``, ..."""
    return f"client_{i:03d}"


def split_format(manifest: dict, split: str) -> str:
    """How ``split`` is stored: ``jpg`` (encoded photographs), ``npy`` (tars of raw uint8
    samples) or ``u8`` (raw uint8 record shards). JPEG datasets store their public and test
    splits decoded at training resolution (``split_formats``), so no client decodes them."""
    return manifest.get("split_formats", {}).get(split, manifest.get("format", "npy"))


def load_manifest(dataset_dir: str) -> dict:
    """Read and check ``dataset_dir/manifest.json``; errors name the file."""
    path = os.path.join(dataset_dir, MANIFEST_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"dataset manifest not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError) as exc:
        raise ValueError(f"corrupt dataset manifest {path}: {exc}") from exc
    if not isinstance(manifest, dict):
        raise ValueError(f"corrupt dataset manifest {path}: top level is not an object")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"dataset manifest {path} has format_version {version!r}; this code "
                         f"reads {FORMAT_VERSION} (rebuild the dataset)")
    for key in _REQUIRED:
        if key not in manifest:
            raise ValueError(f"corrupt dataset manifest {path}: missing {key!r}")
    return manifest


@dataclass(frozen=True)
class Partition:
    """How the training pool was split into clients (paper §3.3), fixed when the dataset was
    built."""

    num_clients: int
    counts: list[list[int]]  # (K, C): samples of each class in each client's split
    primary: list[list[int]]  # each client's primary labels
    settings: dict[str, Any]  # the builder's partition settings, for the log and the audit

    def label_distribution(self) -> np.ndarray:
        """(K, C) private label distribution p_i(c) of every client."""
        counts = np.asarray(self.counts, dtype=np.float64)
        return counts / counts.sum(axis=1, keepdims=True)


@dataclass(frozen=True)
class Manifest:
    """A built dataset's description as the training side reads it (typed); ``raw`` is the
    JSON object as stored, for digests, audits and the run folder's copy."""

    num_classes: int
    image_shape: tuple[int, ...]  # (channels, height, width) of a stored sample
    normalize: dict[str, Any]  # scale, mean, std: (x * scale - mean) / std
    splits: dict[str, list[str]]  # split -> shard files, relative to the dataset folder
    counts: dict[str, int]  # split -> samples
    partition: Partition
    dataset: str = "?"  # the source's name, for the log
    format: str = "npy"  # how images are stored: jpg | npy | u8
    split_formats: dict[str, str] = field(default_factory=dict)  # splits stored otherwise
    public_source: str = "split"  # split | all (MHD+)
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dict(cls, raw: dict) -> "Manifest":
        part = raw.get("partition", {})
        return cls(num_classes=int(raw["num_classes"]),
                   image_shape=tuple(int(x) for x in raw["image_shape"]),
                   normalize=raw["normalize"], splits=raw["splits"], counts=raw["counts"],
                   partition=Partition(int(part.get("num_clients", 0)), part.get("counts", []),
                                       part.get("primary", []), part.get("settings", {})),
                   dataset=raw.get("dataset", "?"), format=raw.get("format", "npy"),
                   split_formats=raw.get("split_formats", {}),
                   public_source=raw.get("public_source", "split"), raw=raw)

    @classmethod
    def read(cls, dataset_dir: str) -> "Manifest":
        """Read and check ``dataset_dir/manifest.json``; errors name the file."""
        return cls.from_dict(load_manifest(dataset_dir))

    @classmethod
    def of(cls, manifest: "Manifest | dict") -> "Manifest":
        """A manifest as read, whether typed already or the stored JSON object."""
        return manifest if isinstance(manifest, Manifest) else cls.from_dict(manifest)

    def split_format(self, split: str) -> str:
        """How ``split`` is stored (see :func:`split_format`)."""
        return self.split_formats.get(split, self.format)


def write_manifest(dataset_dir: str, manifest: dict) -> str:
    """Write ``manifest.json`` atomically (temp file, fsync, rename); returns its path."""
    path = os.path.join(dataset_dir, MANIFEST_NAME)
    with atomic_write(path, "w") as f:
        json.dump(manifest, f, indent=1)
    return path


def write_order(seed: int, public: np.ndarray, clients: list[np.ndarray]) -> dict[str, np.ndarray]:
    """The order in which the public and client splits are written: a seeded permutation of
    each, drawn public first, then client 0, 1, ... from one generator."""
    rng = np.random.default_rng([int(seed), WRITE_ORDER])
    order = {"public": rng.permutation(public)}
    for i, idx in enumerate(clients):
        order[client_split(i)] = rng.permutation(idx)
    return order


def use_whole_pool_as_public(manifest: dict) -> None:
    """MHD+ (``public_source: all``): the public split becomes the whole training pool, i.e. the
    held-out public shards plus every client's shards, listed again (nothing is copied)."""
    pool = ["public"] + sorted(s for s in manifest["splits"] if s.startswith("client_"))
    manifest["splits"]["public"] = [f for s in pool for f in manifest["splits"][s]]
    manifest["counts"]["public"] = sum(manifest["counts"][s] for s in pool)
    if "class_counts" in manifest:
        manifest["class_counts"]["public"] = np.sum(
            [manifest["class_counts"][s] for s in pool], axis=0).astype(int).tolist()
    if "bytes" in manifest:
        manifest["bytes"]["public"] = sum(manifest["bytes"][s] for s in pool)
    manifest["public_source"] = "all"


def file_sha256(path: str) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            sha.update(chunk)
    return sha.hexdigest()


def content_digest(manifest: dict) -> str:
    """What identifies a dataset whatever folder it sits in: a digest of the manifest's content
    (classes, normalisation, partition, split files and per-class counts), not its path. Shard
    digests and byte counts are left out: older builds of the same samples lack them, and the
    shards themselves are checked against them by :func:`verify_shards`."""
    keep = {k: manifest.get(k) for k in ("num_classes", "image_shape", "normalize", "partition",
                                         "splits", "counts", "class_counts")}
    if manifest.get("public_source", "split") != "split":
        keep["public_source"] = manifest["public_source"]
    canonical = json.dumps(keep, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def format_summary(manifest: dict, dataset_dir: str | None = None,
                   max_class_columns: int = 16) -> str:
    """Samples, shards, bytes and per-class counts per split, the primary labels, and the
    corrupt input files (ImageFolder builds) of a manifest, as a table."""
    c = int(manifest["num_classes"])
    wide = c <= max_class_columns
    head = f"{'split':<12}{'samples':>9}{'shards':>8}{'MB':>10}{'classes':>9}  "
    head += "".join(f"{i:>5}" for i in range(c)) if wide else "min/max per class"
    lines = ([f"dataset {dataset_dir}"] if dataset_dir else []) + [head, "-" * len(head)]
    sizes: dict[str, Any] = manifest.get("bytes", {})
    for split, count in manifest["counts"].items():
        cc = manifest.get("class_counts", {}).get(split, [0] * c)
        mb = f"{sizes[split] / 1e6:>10.1f}" if split in sizes else f"{'?':>10}"
        line = (f"{split:<12}{count:>9}{len(manifest['splits'][split]):>8}{mb}"
                f"{sum(x > 0 for x in cc):>9}  ")
        lines.append(line + ("".join(f"{x:>5}" for x in cc) if wide
                             else f"{min(cc)}/{max(cc)}"))
    total = sum(sizes.values()) if sizes else 0
    lines.append(f"total {sum(manifest['counts'].values())} samples, {total / 1e6:.1f} MB, "
                 f"{manifest.get('converted', 0)} re-encoded, "
                 f"{len(manifest.get('corrupt', []))} corrupt")
    primary = manifest.get("partition", {}).get("primary")
    if primary is not None and len(primary) <= 64:
        lines.append("primary labels: " + "; ".join(
            f"{client_split(i)}={','.join(map(str, p)) if len(p) <= 16 else f'{len(p)} labels'}"
            if p else f"{client_split(i)}=-" for i, p in enumerate(primary)))
    lines += [f"corrupt: {p}: {manifest.get('corrupt_reasons', {}).get(p, '')}"
              for p in manifest.get("corrupt", [])]
    return "\n".join(lines)


def verify_shards(dataset_dir: str, manifest: dict, part: int = 0, num_parts: int = 1,
                  ) -> tuple[int, list[str]]:
    """Hash this part's share of the shards (shard n when n % num_parts == part) and compare
    with the manifest's ``shard_sha256``. Returns (shards checked, problems naming each file);
    a manifest without digests (built before they were recorded) is one problem."""
    digests = manifest.get("shard_sha256")
    if not digests:
        return 0, [f"{os.path.join(dataset_dir, MANIFEST_NAME)} records no shard digests "
                   "(built by an older version): rebuild the dataset to verify it"]
    problems, checked = [], 0
    for n, (rel, want) in enumerate(sorted(digests.items())):
        if n % num_parts != part:
            continue
        path = os.path.join(dataset_dir, rel)
        checked += 1
        try:
            got = file_sha256(path)
        except OSError as exc:
            problems.append(f"{path}: unreadable ({exc.strerror or exc})")
            continue
        if got != want:
            problems.append(f"{path}: sha256 {got[:12]}... does not match the manifest's "
                            f"{want[:12]}... (corrupt or replaced)")
    return checked, problems
