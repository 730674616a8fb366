"""The run folder (``run.out_dir``): who owns it, which job it belongs to, what may change on
resume, and the rule that nothing is written into it before every check has passed.

A run folder holds one job: ``config.yaml`` (the resolved config), ``dataset.json`` (which
dataset, by content), ``partition.json``, ``metrics.h5``, ``checkpoints/`` and ``pools/``. Its
*identity* is every setting that changes what is learned, plus the dataset's content digest;
bookkeeping keys (``RESUMABLE_CHANGES``) may differ between the first start and a resume, and the
dataset may move (``data.root`` is a location, not an identity).

Only the root rank touches the folder here. It first takes the folder's lock (``RunLock``: one
job per folder), then checks the saved config, the dataset, every checkpoint's and the metrics
file's fingerprint, and only then writes. Problems come back as a message instead of an
exception, so that every rank can stop together with the same config error.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from mhd_hpc.config import ConfigError, JobConfig, config_from_saved, format_value
from mhd_hpc.run.checkpoint_files import CheckpointError, read_meta
# identity and fingerprints live in their own modules; re-exported here, where callers look
from mhd_hpc.run.compat import fingerprints, legacy_fingerprint  # noqa: F401
from mhd_hpc.run.identity import fingerprint, flatten_keys, identity  # noqa: F401
from mhd_hpc.run.metrics_file import check_metrics_file
from mhd_hpc.runtime.files import atomic_write_text

__all__ = ["identity", "fingerprints", "RunLock", "RunFolder", "claim_run_dir"]

LOCK_NAME = ".lock"
DATASET_RECORD = "dataset.json"


class RunLock:
    """One job per run folder: an exclusive ``flock`` on ``RUN_DIR/.lock``, held by the root
    rank for the job's lifetime. The OS drops the lock when the process ends in any way
    (``kill -9``, a node failure once the file system notices), so a rerun is never blocked by a
    dead job. The file's text names the holder (host, pid, start time) for the refusal message.
    Where the file system offers no ``flock``, the text alone is the lock, and a lock whose
    holder ran on this host and whose pid is gone is recognised as stale and taken over."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK_NAME
        self.fd: int | None = None
        self.text_only = False  # no flock here: the holder's text is the lock
        self._previous = b""  # text-only: what the file held before this job took it

    @staticmethod
    def _holder(text: str) -> str:
        try:
            h = json.loads(text)
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(h["since"]))
            return f"host {h['host']}, pid {h['pid']}, since {since}"
        except (ValueError, KeyError, TypeError):
            return "an unknown holder"

    def acquire(self) -> str | None:
        """Take the lock; None on success, else why not (naming folder and holder)."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 4096, 0).decode(errors="replace")
            os.close(fd)
            return (f"{self.path.parent} is in use by another job ({self._holder(text)}): wait "
                    "for it to end or stop it, or use another run.out_dir")
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                os.close(fd)
                raise
            previous = os.pread(fd, 4096, 0)
            problem = self._stale_check(previous.decode(errors="replace"))
            if problem:
                os.close(fd)
                return problem
            self.text_only, self._previous = True, previous
        self.fd = fd
        if self.text_only:  # the text is the lock: written now (restored if the job is refused)
            self._write_holder()
        return None

    def announce(self) -> None:
        """Write this job's name (host, pid, start time) into the lock file, for the message
        another job gets. Called when the job starts training: a job that is refused, or that
        finds its run complete, leaves the folder as it found it."""
        if self.fd is not None and not self.text_only:
            self._write_holder()

    def _write_holder(self) -> None:
        me = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()})
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, me.encode(), 0)
        os.fsync(self.fd)

    def _stale_check(self, text: str) -> str | None:
        """Without flock: refuse unless the recorded holder is gone (same host, dead pid)."""
        try:
            h = json.loads(text)
        except ValueError:
            return None  # empty or unreadable: nobody holds it
        if h.get("host") == socket.gethostname():
            try:
                os.kill(int(h["pid"]), 0)
            except ProcessLookupError:
                return None  # stale: its holder died
            except PermissionError:
                pass
        return (f"{self.path.parent} is in use by another job ({self._holder(text)}; this file "
                f"system has no flock, so a holder on another host cannot be checked): if that "
                f"job is gone, delete {self.path}")

    def release(self, refused: bool = False) -> None:
        """Give the folder up: close the descriptor, which drops the flock; without flock, also
        clear the holder's text, which is the lock there (or, for a refused job, put back what
        it found)."""
        if self.fd is not None:
            if self.text_only:
                os.ftruncate(self.fd, 0)
                if refused and self._previous:
                    os.pwrite(self.fd, self._previous, 0)
            os.close(self.fd)
            self.fd = None


@dataclass
class RunFolder:
    """The root's result of checking and claiming a run folder."""

    lock: RunLock
    old_config: JobConfig | None = None  # the config the run started with (None: a new run)
    notes: list[str] = field(default_factory=list)  # what the user should read in the log


def _check_config(run_dir: Path, cfg: JobConfig) -> tuple[JobConfig | None, str | None]:
    saved = run_dir / "config.yaml"
    if not saved.exists():
        return None, None
    try:
        old = config_from_saved(yaml.safe_load(saved.read_text()) or {})
    except (ConfigError, yaml.YAMLError) as exc:
        return None, f"{saved} is not a config of this version ({exc}); use another run.out_dir"
    new_id, old_id = identity(cfg), identity(old)
    differing = [k for k in new_id if new_id[k] != old_id.get(k)]
    if differing:  # all of them at once, with the overrides that resume it
        k = differing[0]
        fix = " ".join(f"{key}={format_value(old_id.get(key))}" for key in differing)
        return None, (f"{run_dir} holds a run with {k}={old_id.get(k)!r}, this job has "
                      f"{new_id[k]!r}" + (f" (and {len(differing) - 1} more: "
                                          f"{', '.join(differing[1:])})" if len(differing) > 1
                                          else "")
                      + f": resume it with {fix}, or use another run.out_dir")
    return old, None


def _check_dataset(run_dir: Path, cfg: JobConfig, digest: str) -> tuple[list[str], str | None]:
    record = run_dir / DATASET_RECORD
    if not record.exists():
        return [], None
    try:
        old = json.loads(record.read_text())
    except ValueError as exc:
        return [], f"{record} is unreadable ({exc}); move it away to resume"
    if old.get("digest") != digest:
        return [], (f"data.root={cfg.data.root} holds a different dataset (content digest "
                    f"{digest}) than the one this run started with ({old.get('root')}, digest "
                    f"{old.get('digest')}): point data.root at that dataset or use another "
                    "run.out_dir")
    if old.get("root") != cfg.data.root:
        return [f"dataset moved from {old.get('root')} to {cfg.data.root} (same content, digest "
                f"{digest}): continuing"], None
    return [], None


def _check_files(run_dir: Path, accepted: tuple[str, ...]) -> str | None:
    """Every checkpoint and pool file (their meta only) and the metrics file belong to this
    job. Unreadable checkpoints are left to the resume, which names and skips them."""
    for kind in ("checkpoints", "pools"):
        for path in sorted((run_dir / kind).glob("client_*/step_*.h5")):
            try:
                found = read_meta(path).get("fingerprint")
            except CheckpointError:
                continue
            if found not in accepted:
                return (f"{path} was written by a different job (fingerprint {found}, this job "
                        f"{accepted[0]}): resume with the same settings and dataset or use "
                        "another run.out_dir")
    return check_metrics_file(run_dir / "metrics.h5", accepted)


def claim_run_dir(cfg: JobConfig, dataset_digest: str, partition: dict,
                  ) -> tuple[RunFolder | None, str | None]:
    """Root only: lock the run folder, check everything in it against this job, and only then
    write the config, the dataset record and the partition. Returns (folder, None) or
    (None, message)."""
    run_dir = Path(cfg.run.out_dir)
    lock = RunLock(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        problem = lock.acquire()
    except OSError as exc:  # a file, read-only storage, no permission, no space: one line
        return None, _unusable(run_dir, exc)
    if problem:
        return None, problem
    accepted = fingerprints(cfg, dataset_digest)
    old, problem = _check_config(run_dir, cfg)
    notes: list[str] = []
    if not problem:
        notes, problem = _check_dataset(run_dir, cfg, dataset_digest)
    if not problem:
        problem = _check_files(run_dir, accepted)
    if problem:
        lock.release(refused=True)
        return None, problem
    try:
        _write_atomic(run_dir / "config.yaml", cfg.to_yaml())
        _write_atomic(run_dir / DATASET_RECORD, json.dumps(
            {"digest": dataset_digest, "root": cfg.data.root}, indent=1))
        _write_atomic(run_dir / "partition.json", json.dumps(partition, indent=1))
    except OSError as exc:
        lock.release(refused=True)
        return None, _unusable(run_dir, exc)
    return RunFolder(lock, old, notes), None


def _unusable(run_dir: Path, exc: OSError) -> str:
    """Why ``run_dir`` cannot hold the run, in one line (the OS's reason and the path)."""
    where = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(run_dir) else ""
    if isinstance(exc, (FileExistsError, NotADirectoryError)):
        reason = "it, or a folder above it, is a file, not a folder"
    else:
        reason = exc.strerror or str(exc)
    return f"cannot use {run_dir} as the run folder: {reason}{where}"


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically, and not at all when it already holds it (a rerun
    of a finished job reads its folder and writes nothing)."""
    try:
        if path.read_text() == text:
            return
    except OSError:
        pass
    atomic_write_text(path, text)
