"""MPI for tools that also run alone (``mhd-make-shards``): a world of ranks when an MPI launcher
started several, and no MPI at all otherwise.

Without launcher variables mpi4py is not even imported, so a plain run never initialises MPI
(slow, and noisy on some clusters); training uses :mod:`mhd_hpc.distributed.world` instead.
"""

from __future__ import annotations

import os
from typing import Callable

__all__ = ["LAUNCHER_VARS", "launched_world"]

#: Environment variables that Open MPI, MPICH/PMI, PMIx (srun) and Intel MPI set in their ranks.
LAUNCHER_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")


def launched_world() -> tuple[int, int, Callable[[], None] | None]:
    """(rank, size, barrier) under an MPI launcher with more than one rank, else (0, 1, None)."""
    if not any(v in os.environ for v in LAUNCHER_VARS):
        return 0, 1, None
    try:
        from mpi4py import MPI
    except ImportError:
        return 0, 1, None
    comm = MPI.COMM_WORLD
    if comm.Get_size() < 2:
        return 0, 1, None
    return comm.Get_rank(), comm.Get_size(), comm.Barrier
