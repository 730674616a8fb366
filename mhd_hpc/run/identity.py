"""A run's identity (the settings that define what it learns) and its fingerprint (a hash of
the identity and the dataset's content digest, stored in checkpoints and metrics and compared on
resume). The older spellings of fingerprints that existing files may carry are in
:mod:`mhd_hpc.run.compat`."""

from __future__ import annotations

import hashlib
import json

from mhd_hpc.config import JobConfig
from mhd_hpc.config.keys import ADDED_KEYS, LOCATION_KEYS, METHOD_KEYS, RESUMABLE_CHANGES

__all__ = ["flatten_keys", "identity", "fingerprint"]


def flatten_keys(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}: the dotted keys of a config."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten_keys(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def identity(cfg: JobConfig, keep: tuple[str, ...] = ()) -> dict:
    """The settings that define what a run learns; a resumed run must match them (``keep``:
    resumable keys to count as identity anyway, as older fingerprints did)."""
    skip = set(RESUMABLE_CHANGES + LOCATION_KEYS) - set(keep)
    skip |= {k for k, method in METHOD_KEYS.items() if method != cfg.method}
    return {k: v for k, v in flatten_keys(cfg.to_dict()).items() if k not in skip}


def fingerprint(cfg: JobConfig, dataset_digest: str = "", keep: tuple[str, ...] = ()) -> str:
    """16 hex digits of sha256 over the run's identity and its dataset's content digest: stored
    in checkpoints and metrics, compared on resume. Keys added to the config after a run folder
    was written leave the hash alone while they hold the value that reproduces the old
    behaviour (``ADDED_KEYS``): adding a key never makes existing run folders unresumable."""
    stable = {k: v for k, v in identity(cfg, keep).items()
              if not (k in ADDED_KEYS and v == ADDED_KEYS[k])}
    blob = json.dumps({"identity": stable, "dataset": dataset_digest}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
