"""``mhd-sweep`` (``python -m mhd_hpc.sweep``, ``python tools/sweep.py``): run a grid of training
runs from a sweep file and print one comparison table. The sweep itself (the file's keys,
planning, launching, collecting) is :mod:`mhd_hpc.sweep`; this module is its command line."""

from __future__ import annotations

import argparse
import os
import shutil
import sys

from mhd_hpc import sweep
from mhd_hpc.config import ConfigError
from mhd_hpc.errors import command

__all__ = ["main", "default_launcher"]

DESCRIPTION = """\
Run a grid of training runs described by a sweep file (a base job, overrides, named settings,
a grid and seeds; see jobs/paper/*.yaml), then print one table of the finished runs: mean and
spread over seeds per setting. Finished runs are skipped and interrupted ones resume, so the
command can be repeated until the sweep is complete. Results go to OUT_DIR/results.md and
OUT_DIR/results.json; each run's output goes to its run folder's train.log."""

EPILOG = """\
How runs are launched (keys of the sweep file): launcher is mpirun (the default, from this
Python's environment when it has one), srun or custom; launcher_args replaces the launcher's
default flags (mpirun: --oversubscribe, which is Open MPI's: use [] for MPICH); launch_command
is the whole prefix for launcher: custom, with {ranks} replaced by the run's rank count (for
example 'mpiexec -n {ranks}'); entry is the module each rank runs with python -m (default
mhd_hpc.train; a wrapper of your own, e.g. mypkg.train, can be swept the same way). The
--launcher flag overrides the file's launcher with a path to mpirun or srun.

Examples:
  mhd-sweep jobs/paper/fig4_aux_heads.yaml              run what is missing, then the table
  mhd-sweep jobs/paper/fig4_aux_heads.yaml --dry-run    list the runs and their state
  mhd-sweep jobs/paper/fig4_aux_heads.yaml --table      only the table of finished runs
  mhd-sweep jobs/paper/fig4_aux_heads.yaml --table --plot --format pdf
  mhd-sweep jobs/paper/fig4_aux_heads.yaml --slurm > sweep.sbatch && sbatch sweep.sbatch"""


def default_launcher() -> str:
    """mpirun of this Python's environment (the mpi extra's Open MPI), else the one on PATH."""
    local = os.path.join(os.path.dirname(sys.executable), "mpirun")
    return local if os.path.exists(local) else (shutil.which("mpirun") or "mpirun")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mhd-sweep", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep_file", metavar="SWEEP.yaml", help="the sweep file")
    p.add_argument("--dry-run", action="store_true", help="list the runs and run nothing")
    p.add_argument("--table", action="store_true", help="only summarise the finished runs")
    p.add_argument("--slurm", action="store_true", help="print a SLURM job-array script")
    p.add_argument("--only", type=int, default=None, help="run only run number N (0-based)")
    p.add_argument("--launcher", default=None, help="a path to mpirun or srun, instead of the "
                   "sweep file's launcher")
    p.add_argument("--timeout", type=float, default=None, help="seconds allowed per run")
    p.add_argument("--plot", action="store_true",
                   help="also draw OUT_DIR/results.FMT (needs matplotlib: the 'plot' extra)")
    p.add_argument("--format", choices=("png", "pdf", "svg"), default="png",
                   help="the figure's format for --plot: pdf and svg are vector (default: png)")
    p.add_argument("--band", choices=("minmax", "std"), default="minmax",
                   help="the band around each setting's mean over seeds (default: minmax)")
    return p.parse_args(argv)


@command
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        spec = sweep.load_sweep(args.sweep_file)
        runs = sweep.plan(spec)
    except ConfigError as exc:
        print(f"sweep: {exc}", file=sys.stderr)
        return 2
    if args.slurm:
        print(sweep.slurm_array(spec, runs, args.sweep_file))
        return 0
    if args.dry_run:
        for n, run in enumerate(runs):
            state = "finished" if sweep.is_finished(run) else "to run"
            print(f"{n:4d} {state:9s} {run.setting} seed {run.seed} -> {run.out_dir}")
        if runs:
            print("first command: " + " ".join(sweep.train_command(spec, runs[0], _launcher(
                args, spec))))
        return 0
    failed = []
    if not args.table:
        chosen = runs if args.only is None else [runs[args.only]]
        failed = sweep.run_pending(spec, chosen, _launcher(args, spec), args.timeout,
                                   log=lambda m: print(m, flush=True))
        if args.only is not None:
            return 1 if failed else 0
    rows = sweep.collect(runs)
    summary = sweep.summarise(rows)
    table = sweep.markdown_table(summary, spec.columns)
    out = sweep.write_results(spec, summary, rows, table)
    print(table)
    print(f"\n{len(rows)}/{len(runs)} runs finished; results in {out}/results.md and "
          f"{out}/results.json")
    if args.plot:
        try:
            figure = sweep.plot_sweep(spec, runs, args.format, args.band)
        except ImportError as exc:
            print(f"sweep: no figure ({exc}): pip install -e '.[plot]'", file=sys.stderr)
            return 1
        print(f"figure: {figure}" if figure else "no figure: no run has finished")
    for run, code in failed:
        print(f"FAILED (exit code {code}): {run.setting} seed {run.seed}: see "
              f"{run.out_dir}/train.log", file=sys.stderr)
    return 1 if failed else 0


def _launcher(args: argparse.Namespace, spec: sweep.SweepSpec) -> str | None:
    """--launcher, else this environment's mpirun when the file asks for mpirun."""
    if args.launcher:
        return args.launcher
    return default_launcher() if spec.launcher == "mpirun" else None


if __name__ == "__main__":
    sys.exit(main())
