"""Resume and save everything a client needs to continue exactly: model, optimizer, RNG state
and, in pool mode, the checkpoint pool. The file format (atomic HDF5) lives in ``checkpoint``.

Every client's leader writes ``checkpoints/client_NNN/step_*.h5`` (and ``pools/client_NNN/...``);
on resume every leader verifies its kept files (content checksums), and all ranks agree on the
newest step that *every* client has intact, so the clients restart from the same step and the
run continues as if it had never stopped. A corrupt file is named, moved aside to
``*.h5.corrupt`` (kept for inspection, never deleted) and the previous intact step is used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from mhd_hpc.checkpoint import CheckpointError, ClientCheckpoints, newest_common_step
from mhd_hpc.config import ConfigError
from mhd_hpc.distributed.world import World
from mhd_hpc.pool import pool_files

__all__ = ["Checkpointer"]


class Checkpointer:
    """One client's checkpoints (and pool files) in a run folder."""

    def __init__(self, run_dir: str | Path, world: World, keep: int,
                 fingerprints: tuple[str, ...], arch: str, with_pool: bool):
        """``fingerprints``: the run's fingerprint (written into new files) first, then older
        spellings of the same identity that existing files may carry."""
        self.world, self.fingerprints, self.arch = world, fingerprints, arch
        self.ckpts = ClientCheckpoints(run_dir, world.client, keep)
        self.pools = pool_files(run_dir, world.client, keep) if with_pool else None

    def _files(self) -> list[ClientCheckpoints]:
        return [self.ckpts] + ([self.pools] if self.pools is not None else [])

    def _intact_steps(self) -> tuple[list[int], list[str]]:
        """Leader: the steps whose checkpoint (and pool file) load and match their checksums,
        and a note per corrupt file, which is moved aside so that it is never used again."""
        steps = set(self.ckpts.steps())
        if self.pools is not None:  # a pool-mode step needs its pool file as well
            steps &= set(self.pools.steps())
        intact, notes = [], []
        for step in sorted(steps, reverse=True):
            try:
                for files in self._files():
                    files.load(step)
            except CheckpointError as exc:
                for files in self._files():
                    path = files.path(step)
                    if path.exists():
                        path.rename(path.with_name(path.name + ".corrupt"))
                notes.append(f"{exc}; moved aside to {path.name}.corrupt")
                continue
            intact.append(step)
        return sorted(intact), notes

    def resume(self, model: torch.nn.Module, opt: torch.optim.Optimizer, source,
               scaler: torch.amp.GradScaler | None = None) -> tuple[int, list[str]]:
        """Collective: load the newest step every client has intact into ``model``, ``opt``, the
        RNG, the fp16 gradient ``scaler`` and the target ``source``. Returns (that step or 0 for
        a fresh start, the notes about corrupt files of all clients, for the root to print)."""
        mine = self._intact_steps() if self.world.is_leader else None
        reports = [r for r in self.world.allgather(mine) if r is not None]
        start = newest_common_step([steps for steps, _ in reports])
        notes = [note for _, client_notes in reports for note in client_notes]
        if not start:
            return 0, notes
        state, meta = self.ckpts.load(start)
        if meta.get("fingerprint") not in self.fingerprints or meta.get("arch") != self.arch:
            raise ConfigError("run.out_dir", f"{self.ckpts.path(start)} was written by a "
                              "different job")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        if scaler is not None:
            if "scaler" not in state:
                raise ConfigError("backend.precision", f"{self.ckpts.path(start)} has no "
                                  "gradient-scaler state: it was not written by an fp16 run")
            scaler.load_state_dict(state["scaler"])
        if self.pools is not None:
            source.load_state(self.pools.load(start)[0])
        return start, notes

    def save(self, step: int, model: torch.nn.Module, opt: torch.optim.Optimizer, source,
             scaler: torch.amp.GradScaler | None = None,
             before_commit: Callable[[], None] | None = None) -> None:
        """Leader only writes; ``before_commit`` runs between the temp file and the rename."""
        if not self.world.is_leader:
            return
        meta = {"fingerprint": self.fingerprints[0], "arch": self.arch,
                "client": self.world.client, "step": step}
        if self.pools is not None:
            self.pools.save(step, source.state(), meta)
        state = {"model": model.state_dict(), "optimizer": opt.state_dict(),
                 "torch_rng": torch.get_rng_state(), "step": step}
        if scaler is not None:
            state["scaler"] = scaler.state_dict()
        self.ckpts.save(step, state, meta, before_commit=before_commit)

    @property
    def folder(self) -> Path:
        return self.ckpts.folder.parent
