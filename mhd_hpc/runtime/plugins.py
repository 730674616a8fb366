"""Plug-ins: a researcher's own code named in a job by an import path ``package.module:name``
(``clients.arch`` for a backbone, ``data.partition`` for a partition function).

The module is imported on every rank the way Python imports anything, so it must be importable
there: installed, or on ``PYTHONPATH`` (mpirun passes the environment to its ranks; with
``mpirun -x PYTHONPATH`` on clusters whose launcher does not). What a plug-in must return is
the business of the package that calls it (:mod:`mhd_hpc.models.plugin`,
:mod:`mhd_hpc.data.build.partition`); this module only finds the object and says precisely why
it could not.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import re
from typing import Any, Callable

__all__ = ["PluginError", "is_import_path", "load_callable", "source_digest"]

#: ``package.module:name``: dotted identifiers, one colon, an identifier (attributes allowed).
_IMPORT_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


class PluginError(ValueError):
    """An import path that does not lead to a callable; the message says what was found."""


def is_import_path(text: object) -> bool:
    """Whether ``text`` names a plug-in (has the ``module:name`` form) rather than a built-in
    choice; a malformed path with a colon counts too, so that it fails with a clear reason."""
    return isinstance(text, str) and ":" in text


def load_callable(path: str) -> Callable[..., Any]:
    """The callable that ``path`` (``package.module:name``) names; ``PluginError`` otherwise."""
    if not _IMPORT_PATH.fullmatch(path):
        raise PluginError(f"{path!r} is not an import path of the form package.module:function")
    module_name, attr = path.split(":", 1)
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise PluginError(f"cannot import module {module_name!r} of {path!r} ({exc}); is it "
                          "installed or on PYTHONPATH on every node?") from None
    except Exception as exc:  # the plug-in's own import-time code failed
        raise PluginError(f"importing module {module_name!r} of {path!r} failed: "
                          f"{type(exc).__name__}: {exc}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise PluginError(f"module {module_name!r} has no attribute {attr!r} (from "
                              f"{path!r})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise PluginError(f"{path!r} is a {type(obj).__name__}, not a function")
    return obj


def source_digest(path: str) -> str:
    """sha256 (16 hex digits) of the source file of the module that ``path`` names, so that a
    dataset built by a plug-in is rebuilt when the plug-in's code changes ('' when the module
    has no source file, e.g. a compiled extension)."""
    module = importlib.import_module(path.split(":", 1)[0])
    try:
        source = inspect.getsourcefile(module)
    except TypeError:
        source = None
    if not source:
        return ""
    with open(source, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]
