"""Evaluation math (design §4) and the ``metrics.h5`` writer.

Layout of ``RUN_DIR/metrics.h5`` (K clients, H heads, C classes; all growable along axis 0):

    attrs: clients (names), heads (names), label_distribution (K, C), fingerprint,
           hop_distances (K, K): hops for information to flow from client j to client i (-1: never)
    eval/step            (E,)        int64
    eval/per_class_acc   (E, K, H, C) float32   accuracy per test class, in [0, 1]
    eval/beta_sh         (E, K, H)    mean over classes (uniform "shared" task)
    eval/beta_priv       (E, K, H)    sum_c p_i(c) acc(c): the client's own private task
    eval/cross_acc       (E, K, H, K) [.., i, h, j] = sum_c p_j(c) acc_i(c): client i on j's task
    train/step           (T,)        int64
    train/<name>         (T, K)       float64 per client: loss terms, bytes, times (see trainer)

Only the root rank writes. On resume, rows after the resumed step are cut first, so every step
appears exactly once even when a run died between a metrics write and its checkpoint. Reading the
file while the run writes it is safe for both sides (see the writer section).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np


class MetricsError(RuntimeError):
    """metrics.h5 is unreadable or belongs to a different run."""


# ----------------------------------------------------------------------------- math


def per_class_accuracy(predictions: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(C,) accuracy per true class; NaN for a class absent from ``labels``."""
    correct = np.bincount(labels, weights=(predictions == labels), minlength=num_classes)
    total = np.bincount(labels, minlength=num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, correct / np.maximum(total, 1), np.nan)


def beta_shared(acc: np.ndarray) -> np.ndarray:
    """Mean accuracy over classes (last axis): the uniform-distribution accuracy beta_sh."""
    return np.nanmean(acc, axis=-1)


def weighted_accuracy(acc: np.ndarray, distribution: np.ndarray) -> np.ndarray:
    """sum_c p(c) acc(c). ``acc`` (..., C), ``distribution`` (K, C) -> (..., K)."""
    return np.nan_to_num(acc) @ distribution.T


def summarize(acc: np.ndarray, distribution: np.ndarray) -> dict[str, np.ndarray]:
    """From per-class accuracies (K, H, C) and private label distributions (K, C)."""
    k = acc.shape[0]
    cross = weighted_accuracy(acc, distribution)  # (K, H, K)
    return {
        "per_class_acc": acc.astype(np.float32),
        "beta_sh": beta_shared(acc),
        "beta_priv": cross[np.arange(k), :, np.arange(k)],  # diagonal: own distribution
        "cross_acc": cross,
    }


# ----------------------------------------------------------------------------- writer
#
# Readers never disturb the writer, and never see a half-written row:
# * HDF5 file locking is off on both sides (``locking=False``), so a reader holding the file open
#   cannot make the writer's open fail (it did: "unable to lock file", and the job died);
# * every write is bracketed by a sequence number in ``metrics.h5.seq`` (odd while writing, even
#   when done, replaced atomically): a reader reads it before and after reading the file and
#   retries when it changed or was odd, like a seqlock, so what it returns is a consistent
#   snapshot of complete rows;
# * every dataset carries HDF5's fletcher32 checksum, so flipped bytes are an error naming the
#   file and dataset rather than wrong accuracies.

_SEQ_SUFFIX = ".seq"


def _seq_path(path: Path) -> Path:
    return path.with_name(path.name + _SEQ_SUFFIX)


def _read_seq(path: Path) -> int:
    try:
        return int(_seq_path(path).read_text() or 0)
    except (OSError, ValueError):
        return 0  # no sequence file: a finished run of an older version, or none yet


def _write_seq(path: Path, value: int) -> None:
    tmp = _seq_path(path).with_name(_seq_path(path).name + ".tmp")
    tmp.write_text(str(value))
    os.replace(tmp, _seq_path(path))


def _append(f: h5py.File, name: str, row: np.ndarray) -> None:
    row = np.asarray(row)
    if name not in f:
        f.create_dataset(name, shape=(0,) + row.shape, maxshape=(None,) + row.shape,
                         dtype=row.dtype, chunks=(64,) + row.shape, fletcher32=True)
    ds = f[name]
    if ds.shape[1:] != row.shape:
        raise MetricsError(f"{f.filename}: {name} has rows of shape {ds.shape[1:]}, "
                           f"this run writes {row.shape}")
    ds.resize(ds.shape[0] + 1, axis=0)
    ds[-1] = row


def _verify(f: h5py.File) -> None:
    """Read every dataset once: fletcher32 checks each chunk on the way."""
    def visit(name, obj):
        if isinstance(obj, h5py.Dataset):
            try:
                obj[()]
            except OSError as exc:
                raise MetricsError(f"{f.filename}: dataset {name} is corrupt ({exc})") from None
    f.visititems(visit)


def check_metrics_file(path: Path, fingerprints: tuple[str, ...]) -> str | None:
    """Why ``path`` cannot be continued by a job with these fingerprints (None: it can, or it
    does not exist): another job's file, unreadable, or failing its checksums."""
    if not path.exists():
        return None
    try:
        with h5py.File(path, "r", locking=False) as f:
            if f.attrs.get("fingerprint") not in fingerprints:
                return (f"{path} was written by a different job (clients, heads, partition or "
                        "dataset differ); use another run.out_dir or move the file away")
            _verify(f)
    except MetricsError as exc:
        return f"{exc}: move it away (or restore a copy) to resume"
    except OSError as exc:
        return f"{path}: unreadable metrics file ({exc}); move it away to start the metrics afresh"
    return None


class MetricsWriter:
    """Append-only writer owned by the root rank; reopened per write so a crash loses nothing
    that was already written, and readable at any time (see above)."""

    def __init__(self, path: str | Path, clients: list[str], heads: list[str],
                 label_distribution: np.ndarray, fingerprint: str, resume_step: int,
                 hop_distances: np.ndarray | None = None, accept: tuple[str, ...] = ()):
        """``accept``: older fingerprints of the same job that an existing file may carry."""
        self.path = Path(path)
        self.seq = _read_seq(self.path) + (_read_seq(self.path) % 2)  # a killed write: even again
        meta = {"clients": json.dumps(clients), "heads": json.dumps(heads),
                "fingerprint": fingerprint}
        if self.path.exists():
            problem = check_metrics_file(self.path, (fingerprint, *accept))
            if problem:
                raise MetricsError(problem)
            with self._writing() as f:
                f.attrs["fingerprint"] = fingerprint
                self._truncate(f, resume_step)
        else:
            with self._writing() as f:
                f.attrs.update(meta)
                f.attrs["label_distribution"] = label_distribution
                if hop_distances is not None:
                    f.attrs["hop_distances"] = hop_distances

    @contextlib.contextmanager
    def _writing(self) -> Iterator[h5py.File]:
        self.seq += 1
        _write_seq(self.path, self.seq)  # odd: a write is under way
        with h5py.File(self.path, "a", locking=False) as f:
            yield f
        self.seq += 1
        _write_seq(self.path, self.seq)  # even: the file is complete again

    @staticmethod
    def _truncate(f: h5py.File, resume_step: int) -> None:
        for group in ("eval", "train"):
            if group not in f:
                continue
            steps = f[group]["step"][()]
            keep = int(np.searchsorted(steps, resume_step, side="right"))
            for ds in f[group].values():
                ds.resize(keep, axis=0)

    def write_eval(self, step: int, summary: dict[str, np.ndarray]) -> None:
        with self._writing() as f:
            _append(f, "eval/step", np.int64(step))
            for name, value in summary.items():
                _append(f, f"eval/{name}", value)

    def write_train(self, step: int, values: dict[str, np.ndarray]) -> None:
        with self._writing() as f:
            _append(f, "train/step", np.int64(step))
            for name, value in values.items():
                _append(f, f"train/{name}", np.asarray(value, dtype=np.float64))


def _read_once(path: Path) -> dict:
    with h5py.File(path, "r", locking=False) as f:
        out = {"clients": json.loads(f.attrs["clients"]), "heads": json.loads(f.attrs["heads"]),
               "label_distribution": np.array(f.attrs["label_distribution"]),
               "hop_distances": (np.array(f.attrs["hop_distances"])
                                 if "hop_distances" in f.attrs else None)}
        for group in ("eval", "train"):
            out[group] = {k: v[()] for k, v in f[group].items()} if group in f else {}
    for group in ("eval", "train"):  # complete rows only (a row is complete when all are there)
        rows = min((len(v) for v in out[group].values()), default=0)
        out[group] = {k: v[:rows] for k, v in out[group].items()}
    return out


def read_metrics(path: str | Path, attempts: int = 50, pause_s: float = 0.1) -> dict:
    """Everything in a metrics file as numpy arrays plus names: a consistent snapshot, also
    while the run is writing it (retried until no write overlapped the read)."""
    path = Path(path)
    if not path.exists():
        raise MetricsError(f"{path}: no metrics file (has the run evaluated yet?)")
    last: Exception | None = None
    first = _read_seq(path)
    for _ in range(attempts):
        before = _read_seq(path)
        if before % 2 == 0:
            try:
                out = _read_once(path)
            except (OSError, KeyError, ValueError) as exc:
                last = exc
            else:
                if _read_seq(path) == before:
                    return out
        time.sleep(pause_s)
    if _read_seq(path) == first and first % 2:
        # The same write "under way" for the whole wait: its writer died mid-write. What it
        # left is read as is; only complete rows are returned.
        try:
            return _read_once(path)
        except (OSError, KeyError, ValueError) as exc:
            last = exc
    if last is not None:
        raise MetricsError(f"{path}: unreadable metrics file ({last})") from last
    raise MetricsError(f"{path}: the run kept writing it during {attempts} attempts to read it; "
                       "try again")
