"""The run folder (``run.out_dir``): which job it belongs to, and what may change on resume.

A run folder holds one job: ``config.yaml`` (the resolved config), ``partition.json``,
``metrics.h5``, ``checkpoints/`` and ``pools/``. Its *identity* is every setting that changes what
is learned; bookkeeping keys (``RESUMABLE_CHANGES``) may differ between the first start and a
resume. Only the root rank touches the folder here; it reports problems as a message instead of
raising, so that every rank can stop together with the same config error.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import yaml

from mhd_hpc.config import ConfigError, JobConfig, config_from_dict

__all__ = ["RESUMABLE_CHANGES", "identity", "fingerprint", "prepare_run_dir"]

#: Config keys that may change when a run is resumed (they do not change what is learned).
RESUMABLE_CHANGES = ("run.steps", "run.eval_every", "run.log_every", "run.checkpoint_every",
                     "run.keep_checkpoints", "run.threads", "exchange.timeout_s", "run.out_dir")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def identity(cfg: JobConfig) -> dict:
    """The settings that define what a run learns; a resumed run must match them."""
    return {k: v for k, v in _flatten(cfg.to_dict()).items() if k not in RESUMABLE_CHANGES}


def fingerprint(cfg: JobConfig) -> str:
    """16 hex digits of sha256 over the run's identity: stored in checkpoints and metrics."""
    return hashlib.sha256(json.dumps(identity(cfg), sort_keys=True).encode()).hexdigest()[:16]


def prepare_run_dir(cfg: JobConfig) -> str | None:
    """Root only: create the run folder, refuse to mix two different jobs in it, save the
    resolved config. Returns an error message instead of raising so all ranks can stop together."""
    run_dir = Path(cfg.run.out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    saved = run_dir / "config.yaml"
    if saved.exists():
        try:
            old = config_from_dict(yaml.safe_load(saved.read_text()) or {})
        except (ConfigError, yaml.YAMLError) as exc:
            return f"{saved} is not a config of this version ({exc}); use another run.out_dir"
        new_id, old_id = identity(cfg), identity(old)
        for key in new_id:
            if new_id[key] != old_id.get(key):
                return (f"{run_dir} holds a run with {key}={old_id.get(key)!r}, this job has "
                        f"{new_id[key]!r}: resume with the same settings or use another "
                        f"run.out_dir")
    tmp = saved.with_suffix(".yaml.tmp")
    tmp.write_text(cfg.to_yaml())
    os.replace(tmp, saved)
    return None
