"""Run a grid of training runs and print one comparison table (see mhd_hpc/sweep.py).

Usage (from the repository root)::

    python tools/sweep.py jobs/paper/fig4_aux_heads.yaml            # run what is missing, then the table
    python tools/sweep.py jobs/paper/fig4_aux_heads.yaml --dry-run  # list the runs and their state
    python tools/sweep.py jobs/paper/fig4_aux_heads.yaml --table    # only the table of finished runs
    python tools/sweep.py jobs/paper/fig4_aux_heads.yaml --slurm > sweep.sbatch && sbatch sweep.sbatch

Finished runs are skipped and interrupted ones resume, so the command can be repeated until the
sweep is complete. Results: OUT_DIR/results.md and OUT_DIR/results.json (mean and spread over
seeds per setting). Each run's output goes to its run folder's train.log.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

try:
    from mhd_hpc import sweep
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from mhd_hpc import sweep
from mhd_hpc.config import ConfigError


def default_launcher() -> str:
    local = os.path.join(os.path.dirname(sys.executable), "mpirun")
    return local if os.path.exists(local) else (shutil.which("mpirun") or "mpirun")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("sweep_file")
    p.add_argument("--dry-run", action="store_true", help="list the runs, run nothing")
    p.add_argument("--table", action="store_true", help="only summarise the finished runs")
    p.add_argument("--slurm", action="store_true", help="print a SLURM job-array script")
    p.add_argument("--only", type=int, default=None, help="run only run number N (0-based)")
    p.add_argument("--launcher", default=None, help="mpirun (default) or srun")
    p.add_argument("--timeout", type=float, default=None, help="seconds allowed per run")
    args = p.parse_args(argv)
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
        return 0
    failed = []
    if not args.table:
        chosen = runs if args.only is None else [runs[args.only]]
        failed = sweep.run_pending(spec, chosen, args.launcher or default_launcher(),
                                   args.timeout, log=lambda m: print(m, flush=True))
        if args.only is not None:
            return 1 if failed else 0
    rows = sweep.collect(runs)
    summary = sweep.summarise(rows)
    table = sweep.markdown_table(summary, spec.columns)
    out = sweep.write_results(spec, summary, rows, table)
    print(table)
    print(f"\n{len(rows)}/{len(runs)} runs finished; results in {out}/results.md and "
          f"{out}/results.json")
    for run, code in failed:
        print(f"FAILED (exit code {code}): {run.setting} seed {run.seed}: see "
              f"{run.out_dir}/train.log", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
