"""What the config tree's keys declare about themselves, as the lists the rest of the code uses.

Every list here is derived from the ``doc(...)`` facts of :mod:`mhd_hpc.config.tree`, so a key's
documentation, default, resume rule and history are stated once, next to each other:

* :data:`RESUMABLE_CHANGES`: keys that may differ when a run is resumed (not part of its
  identity); :data:`BOOKKEEPING_KEYS`: those never worth a column when runs are compared
  (with the location keys); :data:`LOCATION_KEYS`: where things are, not what they are;
* :data:`ADDED_KEYS`: keys added after run folders were first written, with the value that
  reproduces what a run from before them did (a saved config that lacks one gets that value);
* :data:`METHOD_KEYS`: keys that belong to one ``method`` (in its runs' identity only);
* :data:`V1_RESUMABLE` and :data:`LATER_RESUMABLE`: what older run folders' fingerprints left out
  and kept in (so that they keep resuming);
* :func:`reference` and :func:`markdown_table`: the option reference (``python -m
  mhd_hpc.config``) and docs/options.md's option table, generated from the same documentation.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import yaml

from mhd_hpc.config.tree import BOOKKEEPING, FIXED, NOT_ADDED, JobConfig

__all__ = ["KeyFacts", "key_facts", "RESUMABLE_CHANGES", "LOCATION_KEYS", "BOOKKEEPING_KEYS",
           "ADDED_KEYS", "METHOD_KEYS", "V1_RESUMABLE", "LATER_RESUMABLE", "format_value", "reference",
           "markdown_table"]


@dataclass(frozen=True)
class KeyFacts:
    """One leaf key of the tree: its dotted name, default, documentation and facts."""

    key: str
    default: Any
    doc: str
    on_resume: str
    location: bool
    added: Any
    became_resumable: bool
    method: str | None = None


def _leaves(obj: Any, prefix: str = "") -> list[KeyFacts]:
    out = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = prefix + f.name
        if dataclasses.is_dataclass(value):
            out.extend(_leaves(value, key + "."))
        else:
            m = f.metadata
            out.append(KeyFacts(key, value, m.get("doc", ""), m.get("on_resume", FIXED),
                                m.get("location", False), m.get("added", NOT_ADDED),
                                m.get("became_resumable", False), m.get("method")))
    return out


def key_facts() -> list[KeyFacts]:
    """Every leaf key of the default tree, in declaration order."""
    return _leaves(JobConfig())


_FACTS = key_facts()
RESUMABLE_CHANGES: tuple[str, ...] = tuple(f.key for f in _FACTS if f.on_resume != FIXED)
LOCATION_KEYS: tuple[str, ...] = tuple(f.key for f in _FACTS if f.location)
BOOKKEEPING_KEYS: tuple[str, ...] = tuple(f.key for f in _FACTS
                                          if f.on_resume == BOOKKEEPING or f.location)
ADDED_KEYS: dict[str, Any] = {f.key: f.added for f in _FACTS if f.added is not NOT_ADDED}
#: Keys that mean something for one method only: part of that method's run identities only.
METHOD_KEYS: dict[str, str] = {f.key: f.method for f in _FACTS if f.method}
#: Made resumable after run folders with them in their identity were written.
LATER_RESUMABLE: tuple[str, ...] = tuple(f.key for f in _FACTS if f.became_resumable)
#: Resumable in the first run-folder version (resumable keys that existed then and were resumable
#: from the start).
V1_RESUMABLE: tuple[str, ...] = tuple(k for k in RESUMABLE_CHANGES
                                      if k not in ADDED_KEYS and k not in LATER_RESUMABLE)


def format_value(value) -> str:
    """A value as one writes it after ``key=`` on the command line (YAML flow style)."""
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...") \
        .removesuffix(" ...")


def reference() -> list[tuple[str, str, str]]:
    """(key, default, doc) for every leaf option, in declaration order."""
    return [(f.key, format_value(f.default), f.doc) for f in _FACTS]


def markdown_table() -> str:
    """docs/options.md's option table (``python -m mhd_hpc.config --markdown``)."""
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for key, default, text in reference():
        lines.append(f"| `{key}` | `{default}` | {text.replace('|', chr(92) + '|')} |")
    return "\n".join(lines)
