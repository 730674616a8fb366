"""Build JPEG WebDataset shards (public, per-client private, test) from an ImageFolder tree.

Input: ``train/<class>/*.JPEG`` (ImageNet layout) and a validation set, either a tree
``val/<class>/*`` or a folder of images with a label file (lines ``filename class_name``).
Output, in the layout of :mod:`mhd_hpc.data.manifest` (plus ``dataset``/``classes``/``format``/
``corrupt`` in the manifest)::

    out/manifest.json
    out/public/shard-000000.tar  shard-000000.idx  shard-000000.sums  shard-000000.done
    out/client_000/...   out/test/...

A sample is ``{key}.jpg`` (the original file bytes; re-encoded as RGB JPEG only when it is not a
JPEG or exceeds ``max_side``) + ``{key}.cls`` (ASCII class index). The split is
:func:`make_partition` of the train labels; public and client samples are shuffled at write time
(DALI's reader only shuffles within a buffer), test keeps source order.

Robustness: a shard is written to a fixed temporary name and renamed; then its DALI index
(:mod:`mhd_hpc.data.tarindex`), its member checksums (:mod:`mhd_hpc.data.checksums`, taken
while writing; a rerun adds them to complete shards of older versions) and last a ``.done``
sidecar (sample count, sha256, a hash of the planned contents) are written. A rerun skips
every shard whose sidecar matches the plan, so an interrupted build resumes and a finished one
is a no-op. Unreadable images are listed by path in
the manifest (``corrupt``) and the summary: never a crash, never a silent drop.

Parallelism: shard jobs are spread over ranks (``rank``/``size``, shard i on rank i % size) and
within a rank over a process pool; the caller owns MPI (see ``tools/make_shards.py``).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import sys
import tarfile
import time
import zlib
from dataclasses import asdict, dataclass
from multiprocessing import Pool
from typing import Callable

import numpy as np

from mhd_hpc.data.checksums import sums_path, write_sums
from mhd_hpc.data.manifest import (FORMAT_VERSION, file_sha256, use_whole_pool_as_public,
                                   write_manifest, write_order)
from mhd_hpc.data.build.client_folders import client_folder_partition
from mhd_hpc.data.build.partition import make_partition
from mhd_hpc.data.records import RECORDS_FORMAT, meta_path, write_record_shard
from mhd_hpc.data.shards import add_member, shard_name
from mhd_hpc.data.tarindex import index_path, write_index
from mhd_hpc.runtime.files import atomic_write, temp_path

__all__ = ["ShardSettings", "ShardJob", "list_image_folder", "list_label_file", "plan_jobs",
           "write_shard", "build_imagefolder_shards", "IMAGENET_MEAN",
           "IMAGENET_STD", "FAULT_ENV"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
FAULT_ENV = "MHD_MAKE_SHARDS_FAIL_AFTER"  # test hook: raise after this many shards were written
JPEG_QUALITY = 95  # re-encoding only; close to lossless for training purposes


@dataclass(frozen=True)
class ShardSettings:
    """Everything that determines the built dataset (recorded in the manifest)."""

    train_dir: str
    val_dir: str | None = None
    val_labels: str | None = None
    clients: int = 8
    public_fraction: float = 0.1
    label_assignment: str = "random"
    labels_per_client: int | None = None  # None: a quarter of the classes (paper: 250 of 1000)
    skew: float = 100.0
    seed: int = 0
    image_size: int = 224
    max_side: int | None = None
    samples_per_shard: int = 1000
    public_source: str = "split"  # "all": the public split lists the whole training pool (MHD+)
    decode_public: bool = True  # public and test splits stored decoded (raw uint8, S x S)
    partition: str = "primary"  # primary | dirichlet | a plug-in's package.module:function
    alpha: float = 0.5  # dirichlet's concentration
    min_samples: int = 1  # fewest private samples a client may receive
    client_folders: bool = False  # train_dir holds client_NNN/<class>/* trees (client_folders)

    def record(self) -> dict:
        """The settings as the manifest records them: the ones added with the Dirichlet and
        client-folder partitions only when set, so that rebuilding a dataset of an older
        version writes the same manifest."""
        added = {"partition": "primary", "alpha": 0.5, "min_samples": 1, "client_folders": False}
        record = {k: v for k, v in asdict(self).items() if k not in added or v != added[k]}
        if self.partition != "dirichlet":
            record.pop("alpha", None)
        return record


@dataclass
class ShardJob:
    """One shard to write: ``items`` are ``(key, source path, label)`` in write order."""

    split: str
    relpath: str
    items: list[tuple[str, str, int]]
    max_side: int | None
    decoded_size: int = 0  # > 0: a raw uint8 record shard of centre crops of this side

    def plan_hash(self) -> str:
        plan = [self.relpath, self.max_side, self.items]
        if self.decoded_size:  # (plans of JPEG shards hash as they always did)
            plan.append(self.decoded_size)
        blob = json.dumps(plan, separators=(",", ":"))
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def files(self, out_dir: str) -> list[str]:
        """The files the shard consists of (the record shard's keys and labels sit beside)."""
        final = os.path.join(out_dir, self.relpath)
        return [final, meta_path(final) if self.decoded_size else index_path(final)]


def _key(prefix: str, rel: str, seen: set[str]) -> str:
    # webdataset/DALI cut a member name at its first dot: keys carry no dots, slashes or spaces.
    key = prefix + re.sub(r"[^A-Za-z0-9_-]", "_", os.path.splitext(rel)[0])
    base, n = key, 1
    while key in seen:
        key, n = f"{base}_{n}", n + 1
    seen.add(key)
    return key


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def list_image_folder(root: str, classes: list[str] | None = None
                      ) -> tuple[list[str], list[tuple[str, int]]]:
    """(class names, sorted ``(path, label)``) of ``root/<class>/**``; ``classes`` fixes the map."""
    found = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not found:
        raise ValueError(f"{root}: no class folders (expected {root}/<class>/<image>)")
    classes = classes if classes is not None else found
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(found) - set(index))
    if unknown:
        raise ValueError(f"{root}: class folders not in the train classes: {unknown[:10]}")
    items = []
    for name in found:
        for dirpath, dirnames, files in os.walk(os.path.join(root, name), followlinks=True):
            dirnames.sort()
            items += [(os.path.join(dirpath, f), index[name]) for f in sorted(files)
                      if _is_image(f)]
    return classes, items


def list_label_file(image_dir: str, label_file: str, classes: list[str]
                    ) -> list[tuple[str, int]]:
    """``(path, label)`` from lines ``filename class_name`` (ImageNet validation style)."""
    index = {c: i for i, c in enumerate(classes)}
    items = []
    with open(label_file, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            parts = line.split()
            if len(parts) != 2 or parts[1] not in index:
                raise ValueError(f"{label_file}:{line_no}: expected 'filename class_name' with "
                                 f"a train class, got {line.strip()!r}")
            items.append((os.path.join(image_dir, parts[0]), index[parts[1]]))
    return sorted(items)


def _find_val(s: ShardSettings) -> tuple[str, str | None]:
    """(validation image folder, label file or None for a class tree)."""
    val_dir = s.val_dir or (os.path.dirname(s.val_labels) if s.val_labels else None)
    if val_dir is None and s.client_folders:  # ROOT/test beside ROOT/client_000, ...
        val_dir = os.path.join(s.train_dir, "test")
        if not os.path.isdir(val_dir):
            raise ValueError(f"no test set: pass --val DIR (no {val_dir})")
    if val_dir is None:
        sibling = os.path.join(os.path.dirname(os.path.abspath(s.train_dir)), "val")
        if not os.path.isdir(sibling):
            raise ValueError(f"no validation set: pass val_dir/val_labels (no {sibling})")
        val_dir = sibling
    if s.val_labels:
        return val_dir, s.val_labels
    if any(e.is_dir() for e in os.scandir(val_dir)):
        return val_dir, None
    for cand in (os.path.join(val_dir, "val_labels.txt"),
                 os.path.join(os.path.dirname(os.path.abspath(val_dir)), "val_labels.txt")):
        if os.path.isfile(cand):
            return val_dir, cand
    raise ValueError(f"{val_dir}: neither class folders nor a val_labels.txt")


def plan_jobs(s: ShardSettings) -> tuple[list[str], dict, dict[str, list[ShardJob]]]:
    """(classes, partition manifest, split -> shard jobs): a pure function of the file listing."""
    if s.client_folders:  # the split is the folders' (data/build/client_folders.py)
        classes, train, part = client_folder_partition(s.train_dir, s.public_fraction, s.seed,
                                                       s.min_samples, list_image_folder)
        if len(part.clients) != s.clients:
            raise ValueError(f"{s.train_dir} has {len(part.clients)} client folders, but "
                             f"{s.clients} clients were asked for")
    else:
        classes, train = list_image_folder(s.train_dir)
    val_dir, label_file = _find_val(s)
    test = (list_label_file(val_dir, label_file, classes) if label_file
            else list_image_folder(val_dir, classes)[1])
    if not s.client_folders:
        labels = np.array([lab for _, lab in train], dtype=np.int64)
        lpc = (s.labels_per_client if s.labels_per_client is not None
               else max(1, len(classes) // 4))
        part = make_partition(labels, s.clients, s.public_fraction, s.label_assignment, lpc,
                              s.skew, s.seed, num_classes=len(classes), scheme=s.partition,
                              alpha=s.alpha, min_samples=s.min_samples)
    order: dict[str, np.ndarray | None] = {"test": None}
    order.update(write_order(s.seed, part.public, part.clients))
    seen: set[str] = set()
    train_keys = [_key("", os.path.relpath(p, s.train_dir), seen) for p, _ in train]
    test_keys = [_key("val_", os.path.relpath(p, val_dir), seen) for p, _ in test]
    jobs: dict[str, list[ShardJob]] = {}
    for split, idx in order.items():
        if idx is None:
            items = [(k, p, lab) for k, (p, lab) in zip(test_keys, test)]
        else:
            items = [(train_keys[i], train[i][0], train[i][1]) for i in idx]
        n = s.samples_per_shard
        size = s.image_size if split in decoded_splits(s) else 0
        jobs[split] = [ShardJob(split, _shard_relpath(split, j // n, size), items[j:j + n],
                                s.max_side, size) for j in range(0, len(items), n)]
    return classes, part.manifest(), jobs


def decoded_splits(s: ShardSettings) -> tuple[str, ...]:
    """The splits stored decoded at the training resolution: what every client reads with the
    deterministic transform, decoded once here instead of K times per step. The public split
    stays JPEG for MHD+ (its listing then includes the clients' shards)."""
    if not s.decode_public:
        return ()
    return ("test",) if s.public_source == "all" else ("public", "test")


def _shard_relpath(split: str, index: int, decoded_size: int) -> str:
    name = shard_name("shard", index)
    return os.path.join(split, name.removesuffix(".tar") + ".npy" if decoded_size else name)


def prepare_image(path: str, max_side: int | None) -> tuple[bytes, bool]:
    """(bytes to store, re-encoded?). Raises for unreadable images (the caller reports them)."""
    from PIL import Image

    with open(path, "rb") as f:
        raw = f.read()
    with Image.open(io.BytesIO(raw)) as im:
        w, h = im.size
        if im.format == "JPEG" and not (max_side and max(w, h) > max_side):
            # Keep the original bytes, but prove they decode: a DCT-scaled draft still reads
            # every scan (truncation raises) at ~1/8 of the full decode cost.
            im.draft(None, (max(1, w // 8), max(1, h // 8)))
            im.load()
            return raw, False
        # Not a JPEG (ImageNet's train set has a PNG named .JPEG) or too large: store an RGB
        # JPEG. Gray and CMYK JPEGs kept verbatim decode identically in DALI and PIL (tested).
        rgb = im.convert("RGB")
        if max_side and max(w, h) > max_side:
            scale = max_side / max(w, h)
            rgb = rgb.resize((max(1, round(w * scale)), max(1, round(h * scale))),
                             Image.BICUBIC, reducing_gap=3.0)
        buf = io.BytesIO()
        rgb.save(buf, "JPEG", quality=JPEG_QUALITY)
        return buf.getvalue(), True


def _done_path(out_dir: str, relpath: str) -> str:
    return os.path.splitext(os.path.join(out_dir, relpath))[0] + ".done"


def read_done(out_dir: str, job: ShardJob) -> dict | None:
    """The sidecar of a finished shard, or None if the shard must be (re)written."""
    try:
        with open(_done_path(out_dir, job.relpath), encoding="utf-8") as f:
            done = json.load(f)
        first, second = job.files(out_dir)
        ok = (done.get("plan") == job.plan_hash() and os.path.getsize(first) == done["bytes"]
              and os.path.isfile(second))
    except (OSError, ValueError, KeyError):
        return None
    return done if ok else None


def _atomic_json(path: str, obj: dict) -> None:
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=1)


def _write_decoded(job: ShardJob, out_dir: str) -> dict:
    """A record shard of the centre crops (the eval/public transform) of ``job``'s images."""
    from mhd_hpc.data.read.pil_stream import decode_pil

    corrupt: dict[str, str] = {}
    keys, labels, images = [], [], []
    for key, path, label in job.items:
        try:
            data, _ = prepare_image(path, job.max_side)
            images.append(decode_pil(data, job.decoded_size, False, None)[0])
        except Exception as exc:  # any decoder failure: report, keep going
            corrupt[path] = f"{type(exc).__name__}: {exc}"
            continue
        keys.append(key)
        labels.append(label)
    size = job.decoded_size
    array = np.stack(images) if images else np.zeros((0, 3, size, size), np.uint8)
    final, meta = write_record_shard(os.path.join(out_dir, job.relpath), keys, array,
                                     np.asarray(labels, np.int64))
    done = {"plan": job.plan_hash(), "count": len(labels), "bytes": os.path.getsize(final),
            "sha256": file_sha256(final), "meta_sha256": file_sha256(meta), "labels": labels,
            "corrupt": corrupt, "converted": 0}
    _atomic_json(_done_path(out_dir, job.relpath), done)  # last: marks the shard complete
    return done


def write_shard(job: ShardJob, out_dir: str) -> dict:
    """Write one shard + index + sidecar; return the sidecar (counts, bytes, corrupt paths)."""
    if job.decoded_size:
        return _write_decoded(job, out_dir)
    final = os.path.join(out_dir, job.relpath)
    os.makedirs(os.path.dirname(final), exist_ok=True)
    # One fixed temp name per shard: a killed run's leftover is simply overwritten next time.
    tmp = temp_path(final, hidden=True)
    corrupt: dict[str, str] = {}
    labels: list[int] = []
    converted = 0
    crcs: dict[str, int] = {}  # of the bytes as written, for the sums file
    with atomic_write(final, tmp=tmp, chmod=0o644) as f:
        with tarfile.open(fileobj=f, mode="w") as tar:
            for key, path, label in job.items:
                try:
                    data, conv = prepare_image(path, job.max_side)
                except Exception as exc:  # any decoder failure: report, keep going
                    corrupt[path] = f"{type(exc).__name__}: {exc}"
                    continue
                for name, member in ((f"{key}.jpg", data),
                                     (f"{key}.cls", str(label).encode("ascii"))):
                    add_member(tar, name, member)
                    crcs[name] = zlib.crc32(member)
                labels.append(label)
                converted += conv
    write_index(final)
    write_sums(final, crcs)
    done = {"plan": job.plan_hash(), "count": len(labels), "bytes": os.path.getsize(final),
            "sha256": file_sha256(final), "labels": labels, "corrupt": corrupt,
            "converted": converted}
    _atomic_json(_done_path(out_dir, job.relpath), done)  # last: marks the shard complete
    return done


def _write_one(args: tuple[ShardJob, str]) -> dict:
    return write_shard(*args)


class _Progress:
    """One status line: ``\\r``-updated on a terminal, at most every 10 s in a log file."""

    def __init__(self, total: int, prefix: str) -> None:
        self.total, self.prefix, self.t0, self.last = total, prefix, time.monotonic(), 0.0
        self.done = self.samples = self.bytes = 0
        self.tty = sys.stderr.isatty()

    def update(self, info: dict) -> None:
        self.done += 1
        self.samples += info["count"]
        self.bytes += info["bytes"]
        now = time.monotonic()
        if self.tty or now - self.last >= 10 or self.done == self.total:
            self.last = now
            rate = self.samples / max(now - self.t0, 1e-9)
            eta = (self.total - self.done) * (now - self.t0) / self.done
            start = "\r" if self.tty else ""
            end = "" if self.tty and self.done < self.total else "\n"
            sys.stderr.write(f"{start}{self.prefix}{self.done}/{self.total} shards, "
                             f"{self.samples} samples, {self.bytes / 1e6:.1f} MB, "
                             f"{rate:.0f} img/s, ETA {eta:.0f} s{end}")
            sys.stderr.flush()


def build_imagefolder_shards(s: ShardSettings, out_dir: str, workers: int = 1, rank: int = 0,
                             size: int = 1, barrier: Callable[[], None] | None = None,
                             log: Callable[[str], None] = print) -> dict | None:
    """Write this rank's missing shards; rank 0 then writes and returns the manifest."""
    classes, part_manifest, jobs = plan_jobs(s)
    flat = [j for split in jobs.values() for j in split]
    mine = [j for i, j in enumerate(flat) if i % size == rank]
    todo = [j for j in mine if read_done(out_dir, j) is None]
    older = [j for j in mine if j not in todo and not j.decoded_size
             and not os.path.isfile(sums_path(os.path.join(out_dir, j.relpath)))]
    for j in older:  # complete shards of a version without member checksums: add them
        write_sums(os.path.join(out_dir, j.relpath))
    if older:
        log(f"rank {rank}/{size}: member checksums added to {len(older)} complete shards")
    log(f"rank {rank}/{size}: {len(mine)} shards, {len(mine) - len(todo)} already complete, "
        f"{len(todo)} to write with {workers} worker(s)")
    fail_after = int(os.environ.get(FAULT_ENV, "0") or 0)
    progress = _Progress(len(todo), f"[make_shards rank {rank}] ")
    args = [(j, out_dir) for j in todo]
    if workers > 1 and len(todo) > 1:
        with Pool(workers) as pool:  # leaving the block on error terminates the workers
            for n, info in enumerate(pool.imap_unordered(_write_one, args), start=1):
                progress.update(info)
                if fail_after and n >= fail_after:
                    raise RuntimeError(f"{FAULT_ENV}={fail_after}: injected failure")
    else:
        for n, a in enumerate(args, start=1):
            progress.update(_write_one(a))
            if fail_after and n >= fail_after:
                raise RuntimeError(f"{FAULT_ENV}={fail_after}: injected failure")
    if barrier is not None:
        barrier()
    if rank != 0:
        return None
    return _write_manifest(s, out_dir, classes, part_manifest, jobs)


def _write_manifest(s: ShardSettings, out_dir: str, classes: list[str], part_manifest: dict,
                    jobs: dict[str, list[ShardJob]]) -> dict:
    c = len(classes)
    manifest: dict = {
        "dataset": "imagefolder", "format_version": FORMAT_VERSION, "format": "jpg",
        "num_classes": c, "classes": classes, "image_shape": [3, s.image_size, s.image_size],
        "normalize": {"scale": 1.0 / 255.0, "mean": IMAGENET_MEAN, "std": IMAGENET_STD},
        "settings": {**s.record(), "dataset": "imagefolder", "format_version": FORMAT_VERSION},
        "partition": part_manifest, "splits": {}, "counts": {}, "class_counts": {}, "bytes": {},
        "corrupt": [], "corrupt_reasons": {}, "converted": 0, "shard_sha256": {},
        "split_formats": {split: RECORDS_FORMAT for split in decoded_splits(s)},
    }
    missing = []
    for split, split_jobs in jobs.items():
        counts = np.zeros(c, dtype=np.int64)
        manifest["splits"][split] = [j.relpath for j in split_jobs]
        manifest["bytes"][split] = 0
        for j in split_jobs:
            done = read_done(out_dir, j)
            if done is None:
                missing.append(j.relpath)
                continue
            counts += np.bincount(np.asarray(done["labels"], dtype=np.int64), minlength=c)
            manifest["bytes"][split] += done["bytes"]
            manifest["shard_sha256"][j.relpath] = done["sha256"]
            if "meta_sha256" in done:
                manifest["shard_sha256"][os.path.relpath(j.files(out_dir)[1], out_dir)] = \
                    done["meta_sha256"]
            manifest["corrupt"] += list(done["corrupt"])
            manifest["corrupt_reasons"].update(done["corrupt"])
            manifest["converted"] += done["converted"]
        manifest["counts"][split] = int(counts.sum())
        manifest["class_counts"][split] = counts.tolist()
    if missing:
        raise RuntimeError(f"{len(missing)} shards were not written (a rank or worker failed): "
                           f"{missing[:5]}; rerun to complete them")
    if s.public_source == "all":
        use_whole_pool_as_public(manifest)
    write_manifest(out_dir, manifest)
    return manifest
