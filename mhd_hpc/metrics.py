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
appears exactly once even when a run died between a metrics write and its checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

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


def _append(f: h5py.File, name: str, row: np.ndarray) -> None:
    row = np.asarray(row)
    if name not in f:
        f.create_dataset(name, shape=(0,) + row.shape, maxshape=(None,) + row.shape,
                         dtype=row.dtype, chunks=(64,) + row.shape)
    ds = f[name]
    if ds.shape[1:] != row.shape:
        raise MetricsError(f"{f.filename}: {name} has rows of shape {ds.shape[1:]}, "
                           f"this run writes {row.shape}")
    ds.resize(ds.shape[0] + 1, axis=0)
    ds[-1] = row


class MetricsWriter:
    """Append-only writer owned by the root rank; reopened per write so a crash loses nothing
    that was already written and the file is readable while the job runs."""

    def __init__(self, path: str | Path, clients: list[str], heads: list[str],
                 label_distribution: np.ndarray, fingerprint: str, resume_step: int,
                 hop_distances: np.ndarray | None = None):
        self.path = Path(path)
        meta = {"clients": json.dumps(clients), "heads": json.dumps(heads),
                "fingerprint": fingerprint}
        if self.path.exists():
            try:
                with h5py.File(self.path, "a") as f:
                    if f.attrs.get("fingerprint") != fingerprint:
                        raise MetricsError(
                            f"{self.path} was written by a different job (clients, heads or "
                            f"partition differ); use another run.out_dir or move the file away")
                    self._truncate(f, resume_step)
            except OSError as exc:
                raise MetricsError(f"{self.path}: unreadable metrics file ({exc}); move it away "
                                   "to start the metrics afresh") from exc
        else:
            with h5py.File(self.path, "w") as f:
                f.attrs.update(meta)
                f.attrs["label_distribution"] = label_distribution
                if hop_distances is not None:
                    f.attrs["hop_distances"] = hop_distances

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
        with h5py.File(self.path, "a") as f:
            _append(f, "eval/step", np.int64(step))
            for name, value in summary.items():
                _append(f, f"eval/{name}", value)

    def write_train(self, step: int, values: dict[str, np.ndarray]) -> None:
        with h5py.File(self.path, "a") as f:
            _append(f, "train/step", np.int64(step))
            for name, value in values.items():
                _append(f, f"train/{name}", np.asarray(value, dtype=np.float64))


def read_metrics(path: str | Path) -> dict:
    """Everything in a metrics file as numpy arrays plus names."""
    path = Path(path)
    if not path.exists():
        raise MetricsError(f"{path}: no metrics file (has the run evaluated yet?)")
    try:
        with h5py.File(path, "r") as f:
            out = {"clients": json.loads(f.attrs["clients"]), "heads": json.loads(f.attrs["heads"]),
                   "label_distribution": np.array(f.attrs["label_distribution"]),
                   "hop_distances": (np.array(f.attrs["hop_distances"])
                                     if "hop_distances" in f.attrs else None)}
            for group in ("eval", "train"):
                out[group] = {k: v[()] for k, v in f[group].items()} if group in f else {}
            return out
    except (OSError, KeyError) as exc:
        raise MetricsError(f"{path}: unreadable metrics file ({exc})") from exc
