"""Entry point: ``mpirun -np K python -m mhd_hpc.train JOB.yaml [key=value ...]``.

Thin on purpose: parse arguments, start MPI, load and validate the job on every rank, hand over
to the training loop. A config error stops every rank with exit code 2 before any communication;
any other exception on any rank aborts the whole job (``World.guard``) instead of leaving the
other ranks blocked in MPI calls.
"""

from __future__ import annotations

import argparse
import os
import sys

from mhd_hpc.config import ConfigError, check_world_size
from mhd_hpc.config.parse import OVERRIDES_HELP, JobArgumentParser
from mhd_hpc.errors import command
from mhd_hpc.job import check_environment, load_job
from mhd_hpc.runtime.signals import EXIT_CONFIG


DESCRIPTION = """\
Train the clients of a job by multi-headed distillation or one of the baselines, under an MPI
launcher with one rank per client (or the ranks each client asks for). The job is checked on
every rank before any communication; a bad key stops every rank with exit code 2 and a message
naming it. Rerunning the same command on the same run.out_dir resumes the run."""

EPILOG = """\
Examples:
  mpirun -np 4 mhd-train jobs/digits.yaml
  mpirun -np 4 mhd-train jobs/digits.yaml run.steps=60 topology.kind=cycle distill.nu_aux=3
  srun --mpi=pmix mhd-train jobs/imagenet.yaml run.out_dir=/scratch/runs/r1
Every option, its default and its meaning: mhd-config. The resolved job without training:
mhd-job JOB.yaml [key=value ...]."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = JobArgumentParser(prog="mhd-train", description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("job", help="YAML job file")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP)
    parser.add_argument("--dry-run", action="store_true",
                        help="check the job and where every rank runs (host, GPU, CPUs, the "
                             "intra-client backend), log it and exit without training")
    return parser.parse_intermixed_args(argv)


def report_exit(is_root: bool, code: int) -> None:
    """The root writes the job's exit code to ``$MHD_EXIT_FILE`` (jobs/slurm's wrapper): the
    ranks' own exit codes do not always reach the batch script (srun --kill-on-bad-exit kills
    the ranks still finalising when the first one exits with 3, and reports their signal)."""
    path = os.environ.get("MHD_EXIT_FILE")
    if is_root and path:
        with open(path, "w") as f:
            f.write(f"{code}\n")


@command
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Imported here, not at module level: loader worker processes (spawn/forkserver) re-import
    # this module as their __main__, and importing mpi4py there would start MPI in a child of
    # an MPI rank, with the parent's Open MPI environment (seen: segfaults in the sm transport).
    from mhd_hpc.distributed.world import init_world, launcher_tasks

    world = init_world()
    with world.guard():
        try:
            cfg = load_job(args.job, args.overrides)
            launcher, tasks = launcher_tasks()
            check_world_size(cfg, world.size, launcher, tasks)
            # The installation may differ between nodes: every rank checks its own, then all
            # agree, so that a problem on one node stops every rank with the same message.
            try:
                check_environment(cfg)
                problem = None
            except ConfigError as exc:
                problem = (exc.key, f"{exc.message} (on {world.where()})")
            found = [p for p in world.allgather(problem) if p is not None]
            if found:
                raise ConfigError(*found[0])
            from mhd_hpc.trainer import check_placement, run, run_hosted  # fail fast first

            code = (check_placement(cfg, world) if args.dry_run else
                    run_hosted(cfg, world) if cfg.clients.per_rank > 1 else run(cfg, world))
            report_exit(world.is_root, code)
            return code
        except ConfigError as exc:
            # Every rank reached the same verdict from the same inputs; one message is enough.
            if world.is_root:
                print(f"mhd_hpc: {exc}", file=sys.stderr, flush=True)
            return EXIT_CONFIG


if __name__ == "__main__":
    sys.exit(main())
