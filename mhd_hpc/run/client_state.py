"""Resume and save everything a client needs to continue exactly: model, optimizer, RNG state
and, in pool mode, the checkpoint pool. The file format (atomic HDF5) lives in ``checkpoint_files``.

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

from mhd_hpc.distributed.world import World
from mhd_hpc.run.checkpoint_files import (CheckpointError, ClientCheckpoints, newest_common_step,
                                          pool_files)

__all__ = ["ClientState"]


class ClientState:
    """Everything one client needs to continue exactly, saved to and resumed from its checkpoint
    (and pool) files in a run folder."""

    def __init__(self, run_dir: str | Path, world: World, *, keep: int,
                 fingerprints: tuple[str, ...], arch: str, with_pool: bool,
                 precision: str = "fp32"):
        """``fingerprints``: the run's fingerprint (written into new files) first, then older
        spellings of the same identity that existing files may carry; ``precision``: the
        resolved number format, recorded so that a change on resume is said."""
        self.world, self.fingerprints, self.arch = world, fingerprints, arch
        self.precision = precision
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
            ok = True
            for files in self._files():
                try:
                    files.load(step)
                except CheckpointError as exc:  # only the file that failed is moved aside
                    ok = False
                    aside = _set_aside(files.path(step), "corrupt")
                    notes.append(f"{exc}; moved aside to {aside.name}")
            if ok:
                intact.append(step)
        return sorted(intact), notes

    def _abandon_after(self, start: int) -> list[str]:
        """Leader: files of steps after the one every client resumes from belong to a timeline
        that is being replaced; moved aside, so that rotation and a later resume never mix them
        with the new one."""
        notes = []
        for files in self._files():
            for step in files.steps():
                if step > start:
                    aside = _set_aside(files.path(step), "abandoned")
                    notes.append(f"{files.path(step)}: newer than the resumed step {start} "
                                 f"(not every client has it intact); moved aside to {aside.name}")
        return notes

    def resume(self, model: torch.nn.Module, opt: torch.optim.Optimizer, source,
               scaler: torch.amp.GradScaler | None = None) -> tuple[int, list[str]]:
        """Collective: load the newest step every client has intact into ``model``, ``opt``, the
        RNG, the fp16 gradient ``scaler`` and the target ``source``. Returns (that step or 0 for
        a fresh start, the notes about corrupt files of all clients, for the root to print)."""
        mine = self._intact_steps() if self.world.is_leader else None
        reports = [r for r in self.world.allgather(mine) if r is not None]
        start = newest_common_step([steps for steps, _ in reports])
        mine = self._abandon_after(start) if self.world.is_leader else None
        notes = [note for _, client_notes in reports for note in client_notes]
        notes += [note for n in self.world.allgather(mine) if n for note in n]
        if not start:
            return 0, notes
        # Errors below reach one client's ranks only: a CheckpointError aborts the whole job
        # (World.guard) where a config error would leave the other clients waiting.
        state, meta = self.ckpts.load(start)
        if meta.get("fingerprint") not in self.fingerprints or meta.get("arch") != self.arch:
            raise CheckpointError(f"{self.ckpts.path(start)} was written by a different job "
                                  f"(fingerprint {meta.get('fingerprint')}, arch "
                                  f"{meta.get('arch')}; this job: {self.fingerprints[0]}, "
                                  f"{self.arch})")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        if scaler is not None:
            if "scaler" not in state:
                raise CheckpointError(f"{self.ckpts.path(start)} has no gradient-scaler state: "
                                      "it was not written by an fp16 run (backend.precision)")
            scaler.load_state_dict(state["scaler"])
        if meta.get("precision", self.precision) != self.precision and self.world.is_root:
            notes.append(f"precision changes on resume: {meta['precision']} before, "
                         f"{self.precision} now (backend.precision resolves per device)")
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
                "client": self.world.client, "step": step, "precision": self.precision}
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


def _set_aside(path: Path, why: str) -> Path:
    """Rename ``path`` to ``path.WHY`` (``.WHY.1``, ... when taken): kept, never deleted."""
    target, n = path.with_name(f"{path.name}.{why}"), 0
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.{why}.{n}")
    path.rename(target)
    return target
