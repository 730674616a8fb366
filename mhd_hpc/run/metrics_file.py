"""``metrics.h5``: the file a run's evaluations and training rows go to, its writer and its safe
reader. (The accuracy math that fills the eval rows lives in ``evaluation``.)

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
import io
import json
import time
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np

from mhd_hpc.runtime.files import atomic_write_text


class MetricsError(RuntimeError):
    """metrics.h5 is unreadable or belongs to a different run."""


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
    # Atomic, not durable: the number only keeps readers off a file being written (two writes
    # per metrics row); after a crash a missing or stale one is harmless (see _read_seq).
    atomic_write_text(_seq_path(path), str(value), durable=False)


def _missing(dtype: np.dtype):
    """The value of a row a dataset did not get: NaN, or -1 for integers (health, distances)."""
    return np.nan if np.issubdtype(dtype, np.floating) else -1


def _append_row(f: h5py.File, group: str, step: int, row: dict[str, np.ndarray]) -> None:
    """Append one row to every dataset of ``group``, keeping them aligned with ``step``: a
    dataset this row lacks gets a missing value, and one that first appears now is created with
    missing values for the earlier rows (a pool's staleness, FedMD's terms, a diagnostic turned
    on at resume)."""
    n = len(f[group]["step"]) if group in f and "step" in f[group] else 0
    row = {"step": np.int64(step), **{k: np.asarray(v) for k, v in row.items()}}
    for name, value in row.items():
        if name not in f.get(group, {}):
            f.create_dataset(f"{group}/{name}", shape=(n,) + value.shape,
                             maxshape=(None,) + value.shape, dtype=value.dtype,
                             chunks=(64,) + value.shape, fletcher32=True,
                             fillvalue=_missing(value.dtype))
    for name, ds in f[group].items():
        value = row.get(name)
        if value is not None and ds.shape[1:] != value.shape:
            raise MetricsError(f"{f.filename}: {group}/{name} has rows of shape {ds.shape[1:]}, "
                               f"this run writes {value.shape}")
        ds.resize(n + 1, axis=0)
        ds[n] = value if value is not None else np.full(ds.shape[1:], _missing(ds.dtype),
                                                           dtype=ds.dtype)


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

    def __init__(self, path: str | Path, *, clients: list[str], heads: list[str],
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
        self.seq += 2 if self.seq % 2 else 1  # odd, whatever a failed write left behind
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
                ds.resize(min(keep, len(ds)), axis=0)  # never grows a dataset

    def write_eval(self, step: int, summary: dict[str, np.ndarray]) -> None:
        with self._writing() as f:
            _append_row(f, "eval", step, summary)

    def write_train(self, step: int, values: dict[str, np.ndarray]) -> None:
        with self._writing() as f:
            _append_row(f, "train", step, {k: np.asarray(v, dtype=np.float64)
                                           for k, v in values.items()})


def _read_once(path: Path) -> dict:
    # Parse an in-memory copy of the bytes: libhdf5 never sees the file change under it (the
    # sequence number around the copy says whether the copy is of a complete file).
    with h5py.File(io.BytesIO(path.read_bytes()), "r") as f:
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
            except Exception as exc:  # noqa: BLE001 - a torn copy can fail in any way; retried
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
        except Exception as exc:  # noqa: BLE001
            last = exc
    if last is not None:
        raise MetricsError(f"{path}: unreadable metrics file ({last})") from last
    raise MetricsError(f"{path}: the run kept writing it during {attempts} attempts to read it; "
                       "try again")
