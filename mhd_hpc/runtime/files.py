"""Atomic file writes: a file is either absent, its old content, or its complete new content.

Every writer of the package goes through here. The new content goes to a temporary file in the
same folder (by default ``PATH.tmp``: checkpoint folders clear stale ``*.tmp`` files left by a
killed writer, and readers ignore them), which is flushed and fsync'ed, then ``os.replace``d
over ``PATH``, and the folder is fsync'ed so that the rename itself survives a crash. An
exception while writing removes the temporary file and leaves ``PATH`` as it was.

* :func:`atomic_write`: a context manager yielding the open temporary file;
* :func:`atomic_write_bytes`, :func:`atomic_write_text`: the same for content in hand;
* :func:`replace_durably`: for writers that produce the temporary file themselves (h5py,
  ``tempfile.mkstemp``): fsync it, rename it into place, fsync the folder.

``durable=False`` skips the fsyncs (the rename stays atomic): for files whose loss in a crash
costs nothing, written often (the metrics file's sequence number).
"""

from __future__ import annotations

import contextlib
import errno
import os
from typing import IO, Iterator

__all__ = ["temp_path", "atomic_write", "atomic_write_bytes", "atomic_write_text",
           "replace_durably", "fsync_dir", "storage_full"]

TMP_SUFFIX = ".tmp"


def temp_path(path: str | os.PathLike, hidden: bool = False) -> str:
    """The temporary name :func:`atomic_write` uses for ``path``: ``PATH.tmp``, or with
    ``hidden`` ``DIR/.NAME.tmp`` (out of sight of globs such as ``*.tar``)."""
    path = os.fspath(path)
    if not hidden:
        return path + TMP_SUFFIX
    head, name = os.path.split(path)
    return os.path.join(head, "." + name + TMP_SUFFIX)


def fsync_dir(folder: str | os.PathLike) -> None:
    """fsync a folder: a rename or a new entry in it reaches the disk."""
    fd = os.open(os.fspath(folder) or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def replace_durably(tmp: str | os.PathLike, final: str | os.PathLike, *,
                    durable: bool = True) -> None:
    """Move the finished temporary file ``tmp`` over ``final`` atomically: fsync its content,
    ``os.replace`` it, fsync the folder (without ``durable``: the rename only)."""
    tmp, final = os.fspath(tmp), os.fspath(final)
    if durable:
        _fsync_file(tmp)
    os.replace(tmp, final)
    if durable:
        fsync_dir(os.path.dirname(os.path.abspath(final)))


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", *, encoding: str | None = None,
                 tmp: str | os.PathLike | None = None, chmod: int | None = None,
                 durable: bool = True) -> Iterator[IO]:
    """``with atomic_write(path) as f: f.write(...)``: ``f`` is the open temporary file (``tmp``,
    default ``PATH.tmp``); on leaving the block it is flushed, fsync'ed, given the permission
    bits ``chmod`` if set, and renamed over ``path``, and the folder is fsync'ed. On an
    exception the temporary file is removed and ``path`` is untouched."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write writes a whole file: mode 'w' or 'wb', not {mode!r}")
    if "b" not in mode and encoding is None:
        encoding = "utf-8"
    tmp = os.fspath(tmp) if tmp is not None else temp_path(path)
    try:
        with open(tmp, mode, encoding=encoding) as f:
            yield f
            f.flush()
            if durable:
                os.fsync(f.fileno())
        if chmod is not None:
            os.chmod(tmp, chmod)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    if durable:
        fsync_dir(os.path.dirname(os.path.abspath(path)))


def atomic_write_bytes(path: str | os.PathLike, data: bytes, **kwargs) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write` for ``kwargs``)."""
    with atomic_write(path, "wb", **kwargs) as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8",
                      **kwargs) -> None:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write` for ``kwargs``)."""
    with atomic_write(path, "w", encoding=encoding, **kwargs) as f:
        f.write(text)


_FULL = (errno.ENOSPC, errno.EDQUOT)
_FULL_TEXT = ("No space left on device", "Disk quota exceeded")


def storage_full(exc: BaseException) -> BaseException | None:
    """The error in ``exc``'s chain that says the disk (or the user's quota) is full, if any:
    an ``OSError`` with ENOSPC or EDQUOT, or an error that only says so in words (h5py's)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _FULL:
            return exc
        if any(text in str(exc) for text in _FULL_TEXT):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None
