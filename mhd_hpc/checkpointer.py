"""Resume and save everything a client needs to continue exactly: model, optimizer, RNG state
and, in pool mode, the checkpoint pool. The file format (atomic HDF5) lives in ``checkpoint``.

Every client's leader writes ``checkpoints/client_NNN/step_*.h5`` (and ``pools/client_NNN/...``);
on resume all ranks agree on the newest step that *every* client has, so the clients restart
from the same step and the run continues as if it had never stopped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from mhd_hpc.checkpoint import ClientCheckpoints, newest_common_step
from mhd_hpc.config import ConfigError
from mhd_hpc.distributed.world import World
from mhd_hpc.pool import pool_files

__all__ = ["Checkpointer"]


class Checkpointer:
    """One client's checkpoints (and pool files) in a run folder."""

    def __init__(self, run_dir: str | Path, world: World, keep: int, fingerprint: str,
                 arch: str, with_pool: bool):
        self.world, self.fingerprint, self.arch = world, fingerprint, arch
        self.ckpts = ClientCheckpoints(run_dir, world.client, keep)
        self.pools = pool_files(run_dir, world.client, keep) if with_pool else None

    def _usable_steps(self) -> set[int]:
        usable = set(self.ckpts.steps())
        if self.pools is not None:  # a pool-mode step needs its pool file as well
            usable &= set(self.pools.steps())
        return usable

    def common_step(self) -> int:
        """Collective: the newest step every client can resume from (0 = start fresh)."""
        mine = sorted(self._usable_steps()) if self.world.is_leader else None
        return newest_common_step([s for s in self.world.allgather(mine) if s is not None])

    def resume(self, model: torch.nn.Module, opt: torch.optim.Optimizer, source) -> int:
        """Collective: load the newest common step into ``model``, ``opt``, the RNG and the
        target ``source``; returns that step (0 when the run starts fresh)."""
        start = self.common_step()
        if not start:
            return 0
        state, meta = self.ckpts.load(start)
        if meta.get("fingerprint") != self.fingerprint or meta.get("arch") != self.arch:
            raise ConfigError("run.out_dir", f"{self.ckpts.path(start)} was written by a "
                              "different job")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        if self.pools is not None:
            source.load_state(self.pools.load(start)[0])
        return start

    def save(self, step: int, model: torch.nn.Module, opt: torch.optim.Optimizer, source,
             before_commit: Callable[[], None] | None = None) -> None:
        """Leader only writes; ``before_commit`` runs between the temp file and the rename."""
        if not self.world.is_leader:
            return
        meta = {"fingerprint": self.fingerprint, "arch": self.arch, "client": self.world.client,
                "step": step}
        if self.pools is not None:
            self.pools.save(step, source.state(), meta)
        self.ckpts.save(step, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                               "torch_rng": torch.get_rng_state(), "step": step}, meta,
                        before_commit=before_commit)

    @property
    def folder(self) -> Path:
        return self.ckpts.folder.parent
