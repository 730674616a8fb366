"""Checkpoint files: atomic, checksummed, resumable per-client HDF5 files, and their folders
(``checkpoints/client_NNN/`` and, in pool mode, ``pools/client_NNN/``).

A checkpoint is any nested structure of dicts, lists, tensors and JSON-able leaves (model and
optimizer state dicts, step, RNG states). Tensors become HDF5 datasets, everything else a JSON
attribute, so the files can be inspected with h5py/h5dump without this package.

Writes go to ``*.tmp`` first, are flushed and fsync'ed, then renamed into place
(``runtime.files.replace_durably``): a kill
during a write never damages the previous checkpoint. Each client keeps the last N checkpoints;
on resume the job restarts from the newest step that *every* client has complete and intact.

Every file carries a sha256 of its content (names, kinds, dtypes, shapes and bytes of every
node, in write order) in the ``sha256`` attribute; ``load`` recomputes it, so flipped bytes
anywhere in the stored state are an error naming the file, never silently trained on.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Callable

import h5py
import numpy as np
import torch

from mhd_hpc.run.compat import checkpoint_checksum_ok
from mhd_hpc.runtime.files import replace_durably, temp_path

FORMAT_VERSION = 1
_STEP_FILE = re.compile(r"^step_(\d{9})\.h5$")


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, corrupt or from an incompatible run."""


# ----------------------------------------------------------------------------- tree codec


def _digest(h, node_name: str, kind: str, detail: str, data: bytes | np.ndarray = b"") -> None:
    """Feed one node into the content hash: where it is, what it is, and its bytes (an array's
    are read in place, not copied)."""
    if isinstance(data, np.ndarray):
        data = memoryview(np.ascontiguousarray(data).reshape(-1)).cast("B")
    h.update(f"{node_name}\0{kind}\0{detail}\0{len(data)}\0".encode())
    h.update(data)


def _write(group: h5py.Group, name: str, obj: Any, h) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu()
        # numpy has no bfloat16: store widened, restore on load
        array = (t.float() if t.dtype == torch.bfloat16 else t).contiguous().numpy()
        ds = group.create_dataset(name, data=array)
        ds.attrs["kind"] = "tensor"
        ds.attrs["dtype"] = str(t.dtype).removeprefix("torch.")
        _digest(h, ds.name, "tensor", f"{ds.attrs['dtype']}{array.shape}", array)
    elif isinstance(obj, np.ndarray):
        ds = group.create_dataset(name, data=obj)
        ds.attrs["kind"] = "ndarray"
        _digest(h, ds.name, "ndarray", f"{obj.dtype}{obj.shape}", obj)
    elif isinstance(obj, dict):
        sub = group.create_group(name)
        sub.attrs["kind"] = "dict"
        # Item names are positional: state-dict keys may be ints or contain '/'.
        sub.attrs["keys"] = json.dumps([[type(k).__name__, k] for k in obj])
        _digest(h, sub.name, "dict", sub.attrs["keys"])
        for n, value in enumerate(obj.values()):
            _write(sub, f"i{n}", value, h)
    elif isinstance(obj, (list, tuple)):
        sub = group.create_group(name)
        sub.attrs["kind"] = "list" if isinstance(obj, list) else "tuple"
        sub.attrs["length"] = len(obj)
        _digest(h, sub.name, sub.attrs["kind"], str(len(obj)))
        for n, value in enumerate(obj):
            _write(sub, f"i{n}", value, h)
    else:
        try:
            text = json.dumps(obj)
        except TypeError:
            raise TypeError(f"cannot store {type(obj).__name__} in a checkpoint ({name})") from None
        ds = group.create_dataset(name, data=np.bytes_(text.encode()))
        ds.attrs["kind"] = "json"
        _digest(h, ds.name, "json", "", text.encode())


def _read(node: h5py.Group | h5py.Dataset, h) -> Any:
    kind = node.attrs["kind"]
    if kind == "tensor":
        array = np.array(node[()])
        dtype = node.attrs["dtype"]
        _digest(h, node.name, "tensor", f"{dtype}{array.shape}", array)
        t = torch.from_numpy(array)
        return t.to(getattr(torch, dtype)) if str(t.dtype).removeprefix("torch.") != dtype else t
    if kind == "ndarray":
        array = np.array(node[()])
        _digest(h, node.name, "ndarray", f"{array.dtype}{array.shape}", array)
        return array
    if kind == "json":
        data = bytes(node[()])
        _digest(h, node.name, "json", "", data)
        return json.loads(data.decode())
    if kind == "dict":
        _digest(h, node.name, "dict", node.attrs["keys"])
        keys = json.loads(node.attrs["keys"])
        return {(int(k) if t == "int" else k): _read(node[f"i{n}"], h)
                for n, (t, k) in enumerate(keys)}
    if kind in ("list", "tuple"):
        length = int(node.attrs["length"])
        _digest(h, node.name, kind, str(length))
        items = [_read(node[f"i{n}"], h) for n in range(length)]
        return items if kind == "list" else tuple(items)
    raise CheckpointError(f"unknown node kind {kind!r} at {node.name}")


# ----------------------------------------------------------------------------- files


def save_atomic(path: str | Path, state: dict, meta: dict,
                before_commit: Callable[[], None] | None = None) -> None:
    """Write ``state`` to ``path`` so that the file is either absent, old, or complete.
    ``before_commit`` runs between writing the temp file and renaming it (fault injection)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)  # ``*.tmp``: ignored by steps(), cleared by save()
    h = hashlib.sha256()
    with h5py.File(tmp, "w") as f:
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["meta"] = json.dumps(meta)
        _write(f, "state", state, h)
        f.attrs["sha256"] = h.hexdigest()
        f.attrs["complete"] = True  # last: a file without it was cut short
        f.flush()
        os.fsync(f.id.get_vfd_handle())
    if before_commit is not None:
        before_commit()
    replace_durably(tmp, path)  # the rename reaches the disk too (the folder is fsync'ed)


def read_meta(path: str | Path) -> dict:
    """The ``meta`` attribute of a checkpoint without reading its state (cheap)."""
    try:
        with h5py.File(path, "r", locking=False) as f:
            return json.loads(f.attrs["meta"])
    except (OSError, KeyError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable checkpoint ({exc})") from exc


def load(path: str | Path) -> tuple[dict, dict]:
    """(state, meta) of a checkpoint; CheckpointError naming the file when it is unusable,
    including when its content does not match the stored sha256 (files written before checksums
    were introduced have none and load unchecked)."""
    try:
        with h5py.File(path, "r", locking=False) as f:
            if f.attrs.get("format_version") != FORMAT_VERSION or not f.attrs.get("complete"):
                raise CheckpointError(f"{path}: incomplete or unknown checkpoint format")
            h = hashlib.sha256()
            state, meta = _read(f["state"], h), json.loads(f.attrs["meta"])
            stored = f.attrs.get("sha256")
    except CheckpointError:
        raise
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: unreadable checkpoint ({exc})") from exc
    if not checkpoint_checksum_ok(stored, h.hexdigest()):
        raise CheckpointError(f"{path}: corrupt checkpoint (content sha256 {h.hexdigest()[:12]}... "
                              f"does not match the stored {str(stored)[:12]}...)")
    return state, meta


class ClientCheckpoints:
    """The checkpoint folder of one client: ``checkpoints/client_007/step_000001200.h5``
    (``kind`` names the top folder: the checkpoint pools use ``pools``)."""

    def __init__(self, run_dir: str | Path, client: int, keep: int, kind: str = "checkpoints"):
        self.folder = Path(run_dir) / kind / f"client_{client:03d}"
        self.keep = keep

    def path(self, step: int) -> Path:
        return self.folder / f"step_{step:09d}.h5"

    def steps(self) -> list[int]:
        """Steps with a complete checkpoint file (partial ``.tmp`` files are ignored)."""
        if not self.folder.is_dir():
            return []
        found = []
        for entry in self.folder.iterdir():
            match = _STEP_FILE.match(entry.name)
            if match:
                found.append(int(match.group(1)))
        return sorted(found)

    def save(self, step: int, state: dict, meta: dict,
             before_commit: Callable[[], None] | None = None) -> None:
        save_atomic(self.path(step), state, meta, before_commit)
        for old in self.steps()[:-self.keep]:
            self.path(old).unlink(missing_ok=True)
        for stale in self.folder.glob("*.tmp"):  # left by a killed writer
            stale.unlink(missing_ok=True)

    def load(self, step: int) -> tuple[dict, dict]:
        return load(self.path(step))


def newest_common_step(steps_per_client: list[list[int]]) -> int:
    """The newest step every client can resume from (0 = start fresh)."""
    common = set(steps_per_client[0]) if steps_per_client else set()
    for steps in steps_per_client[1:]:
        common &= set(steps)
    return max(common, default=0)


def pool_files(run_dir: str | Path, client: int, keep: int) -> ClientCheckpoints:
    """``RUN_DIR/pools/client_NNN/step_*.h5``: a client's checkpoint pool (pool mode), saved
    with every checkpoint and rotated like them."""
    return ClientCheckpoints(run_dir, client, keep, kind="pools")
