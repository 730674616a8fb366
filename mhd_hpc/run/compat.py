"""Run folders and datasets written by older versions: every rule that recognises or
reproduces an older spelling, in one place, so that the rest of the code speaks only the
current one.

* fingerprints: the spellings a run's checkpoints and metrics may carry (:func:`fingerprints`,
  :func:`legacy_fingerprint`);
* checkpoints written before content checksums (:func:`checkpoint_checksum_ok`);
* metrics files written before per-step graphs (:func:`hop_distances_at`);
* dataset settings recorded before a setting existed (:func:`dataset_settings`) and the layout
  the embedded digits keep (:data:`EMBEDDED_DIGITS_LAYOUT`).

Not here, on purpose: the per-key facts of the config (``added=``, ``became_resumable`` in
``config/tree.py``, listed by ``config/keys.py``) and the filling-in of keys a saved config lacks
(``config.config_from_saved``): the config declares them and imports nothing outside
``config/``. This module reads those declarations.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

from mhd_hpc.config import JobConfig
from mhd_hpc.config.keys import (ADDED_KEYS, LATER_RESUMABLE, METHOD_KEYS, RESUMABLE_CHANGES,
                                 V1_RESUMABLE)
from mhd_hpc.run.identity import fingerprint, flatten_keys

__all__ = ["fingerprints", "legacy_fingerprint", "checkpoint_checksum_ok", "hop_distances_at",
           "DATASET_SETTINGS_ADDED", "dataset_settings", "EMBEDDED_DIGITS_LAYOUT"]


# ----------------------------------------------------------------------------- fingerprints

def fingerprints(cfg: JobConfig, dataset_digest: str) -> tuple[str, ...]:
    """The run's fingerprint (written into new files) first, then the older spellings of the
    same identity that existing files may carry: before keys became resumable
    (``LATER_RESUMABLE``), and before the dataset was identified by content."""
    found = [fingerprint(cfg, dataset_digest), fingerprint(cfg, dataset_digest, LATER_RESUMABLE),
             legacy_fingerprint(cfg)]
    return tuple(dict.fromkeys(found))


def legacy_fingerprint(cfg: JobConfig) -> str:
    """The fingerprint that run folders written before the dataset was identified by content
    carry (identity over that version's keys, ``data.root`` included): accepted on resume, never
    written. A job that sets a later-added key to anything but its old behaviour cannot be such
    a run, and gets a fingerprint no file carries."""
    flat = flatten_keys(cfg.to_dict())
    other_methods = {k for k, method in METHOD_KEYS.items() if method != cfg.method}
    if any(flat[k] != v for k, v in ADDED_KEYS.items()
           if k not in RESUMABLE_CHANGES and k not in other_methods):
        return "-"
    ident = {k: v for k, v in flat.items() if k not in V1_RESUMABLE and k not in ADDED_KEYS}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- checkpoints

def checkpoint_checksum_ok(stored: str | None, computed: str) -> bool:
    """Whether a checkpoint's content matches its stored sha256; files written before checksums
    were introduced have none (``stored`` None) and load unchecked."""
    return stored is None or stored == computed


# ----------------------------------------------------------------------------- metrics

def hop_distances_at(metrics: dict, row: int) -> np.ndarray | None:
    """Hop distances (K, K) of the graph of evaluation ``row`` (``eval/hop_distances``); files
    from before per-step graphs have the run's one graph as a file attribute instead."""
    ev = metrics["eval"]
    return ev["hop_distances"][row] if "hop_distances" in ev else metrics.get("hop_distances")


# ----------------------------------------------------------------------------- datasets

#: Dataset settings added after datasets were first built, with the value that builds what
#: datasets from before them hold. A setting at that value is left out of the recorded settings,
#: so the folder name (a hash of them) and the "complete already" check find the older builds.
DATASET_SETTINGS_ADDED: dict[str, object] = {"public_source": "split", "partition": "primary",
                                             "alpha": 0.5, "min_samples": 1}

#: The embedded digits stay WebDataset tars of ``.npy`` samples (not ``u8`` record shards): the
#: dataset digest, which run folders record, covers the split file names.
EMBEDDED_DIGITS_LAYOUT = "npy"


def dataset_settings(record: dict) -> dict:
    """``record`` without the added settings that hold their old-build value
    (:data:`DATASET_SETTINGS_ADDED`)."""
    return {k: v for k, v in record.items()
            if not (k in DATASET_SETTINGS_ADDED and v == DATASET_SETTINGS_ADDED[k])}
