"""Experiments as jobs: a grid of runs from one base job, run resumably, summarised in one table.

A sweep file (YAML; ``jobs/paper/*.yaml``)::

    base: ../digits.yaml            # the job every run starts from (relative to this file)
    out_dir: runs/paper/fig4        # runs go to OUT_DIR/<setting>/seed<N>
    overrides: [run.steps=600]      # applied to every run
    settings:                       # named settings (optional; default: one named "base")
      - {name: mhd}
      - {name: separate, overrides: [method=separate], grid: {}}   # its own grid (here: none)
    grid:                           # crossed with every setting without a grid of its own
      model.aux_heads: [1, 2, 3, 4]
    seeds: [0, 1, 2]
    ranks: 4                        # mpirun -np (optional; default: the job's total ranks)
    columns: [main/beta_priv, last/beta_sh]   # the table's numbers (optional; see COLUMNS)
    launcher: mpirun                # mpirun | srun | custom (optional; see LAUNCHERS)
    launcher_args: [--oversubscribe]          # flags after mpirun or srun (optional)
    launch_command: mpiexec -n {ranks}        # launcher: custom, the whole prefix
    entry: mhd_hpc.train            # the module every rank runs with python -m (optional)

:func:`plan` turns it into runs (pure, tested without MPI); :func:`run_pending` starts each run
that has not finished under ``mpirun`` (a finished run is skipped, an interrupted one resumes,
since the trainer resumes any run folder); :func:`slurm_array` writes a SLURM job array instead;
:func:`collect` reads every finished run's last evaluation and :func:`summarise` gives mean and
spread over seeds per setting, as Markdown and JSON; :func:`plot_sweep` draws the finished runs
over training, one line per setting (the mean over seeds) with a band.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from mhd_hpc.config import ConfigError, format_value
from mhd_hpc.job import load_job
from mhd_hpc.report.summary import HEALTH_STATES, step_summary, traffic_and_speed
from mhd_hpc.run.metrics_file import MetricsError, read_metrics

__all__ = ["Run", "SweepSpec", "load_sweep", "plan", "is_finished", "run_pending",
           "slurm_array", "collect", "summarise", "markdown_table", "plot_sweep", "COLUMNS"]

#: Table columns: key -> header (HEAD/beta_sh and HEAD/beta_priv are accepted for any head).
COLUMNS = {"main/beta_priv": "main priv", "main/beta_sh": "main sh",
           "last/beta_priv": "last aux priv", "last/beta_sh": "last aux sh",
           "main_priv_worst": "worst main priv", "main_sh_client_std": "main sh spread over clients",
           "health_failed": "runs failing health", "mb_sent": "MB sent",
           "ms_per_step": "ms/step", "probe_acc": "linear probe",
           "epsilon": "epsilon (max over clients)"}


@dataclass(frozen=True)
class Run:
    """One training run of a sweep."""

    setting: str  # name of the setting (seed excluded): the rows of the summary
    seed: int
    overrides: tuple[str, ...]  # every override, run.out_dir and run.seed included
    out_dir: str
    ranks: int
    steps: int


@dataclass
class SweepSpec:
    path: Path
    base: Path
    out_dir: str
    overrides: list[str] = field(default_factory=list)
    settings: list[dict] = field(default_factory=lambda: [{"name": "base"}])
    grid: dict[str, list] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=lambda: [0])
    ranks: int = 0
    columns: list[str] | None = None
    description: str = ""
    launcher: str = "mpirun"
    launcher_args: list[str] | None = None  # None: the launcher's defaults (LAUNCHERS)
    launch_command: str = ""
    entry: str = "mhd_hpc.train"


#: How a run is started: the launcher and its default flags. mpirun's --oversubscribe is Open
#: MPI's (a workstation, CI): launcher_args: [] for MPICH or Intel MPI's mpirun/mpiexec. srun's
#: --mpi is PMIx unless MHD_SRUN_MPI says otherwise (run_with_requeue.sh). ``custom``: the
#: sweep's launch_command, {ranks} replaced by the run's rank count.
LAUNCHERS = {"mpirun": ["--oversubscribe"], "srun": ["--kill-on-bad-exit=1"], "custom": []}


def load_sweep(path: str | Path) -> SweepSpec:
    """Read a sweep file; errors name the file and the offending key."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError("<sweep file>", f"{path}: {exc}") from None
    known = {"base", "out_dir", "overrides", "settings", "grid", "seeds", "ranks", "description",
             "columns", "launcher", "launcher_args", "launch_command", "entry"}
    for key in data:
        if key not in known:
            raise ConfigError(f"sweep.{key}", f"unknown key in {path} (valid: "
                              f"{', '.join(sorted(known))})")
    for key in ("base", "out_dir"):
        if key not in data:
            raise ConfigError(f"sweep.{key}", f"{path} must name {key}")
    settings = data.get("settings") or [{"name": "base"}]
    names = [s.get("name") for s in settings]
    if any(not isinstance(n, str) or not n for n in names) or len(set(names)) != len(names):
        raise ConfigError("sweep.settings", f"{path}: every setting needs a unique name, got "
                          f"{names}")
    seeds = data.get("seeds", [0])
    if not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
        raise ConfigError("sweep.seeds", f"{path}: a non-empty list of seeds >= 0, got {seeds}")
    grid = data.get("grid") or {}
    if not all(isinstance(v, list) and v for v in grid.values()):
        raise ConfigError("sweep.grid", f"{path}: every grid key needs a non-empty list of values")
    columns = data.get("columns")
    unknown = [c for c in columns or [] if c not in COLUMNS and not c.startswith(
        ("main/", "last/", "aux"))]
    if unknown:
        raise ConfigError("sweep.columns", f"{path}: unknown columns {unknown} (known: "
                          f"{', '.join(COLUMNS)}, or HEAD/beta_sh, HEAD/beta_priv)")
    return SweepSpec(path, (path.parent / data["base"]).resolve(), str(data["out_dir"]),
                     list(data.get("overrides") or []), settings, grid, seeds,
                     int(data.get("ranks") or 0), columns, str(data.get("description") or ""),
                     *_launch(path, data))


def _launch(path: Path, data: dict) -> tuple[str, list[str] | None, str, str]:
    """The sweep file's launcher, launcher_args, launch_command and entry, checked."""
    launcher = data.get("launcher", "mpirun")
    if launcher not in LAUNCHERS:
        raise ConfigError("sweep.launcher", f"{path}: {launcher!r} is not one of "
                          f"{', '.join(LAUNCHERS)}")
    args = data.get("launcher_args")
    if args is not None and not (isinstance(args, list) and all(isinstance(a, str) for a in args)):
        raise ConfigError("sweep.launcher_args", f"{path}: a list of flags, got {args!r}")
    command = data.get("launch_command", "")
    if not isinstance(command, str):
        raise ConfigError("sweep.launch_command", f"{path}: a string, got {command!r}")
    if (launcher == "custom") != bool(command):
        raise ConfigError("sweep.launch_command", f"{path}: launcher: custom needs a "
                          "launch_command (e.g. 'mpiexec -n {ranks}'), and only it takes one")
    entry = data.get("entry", "mhd_hpc.train")
    if not (isinstance(entry, str) and all(p.isidentifier() for p in entry.split("."))):
        raise ConfigError("sweep.entry", f"{path}: a module to run with python -m (e.g. "
                          f"mypkg.train), got {entry!r}")
    try:
        found = importlib.util.find_spec(entry)
    except ImportError:
        found = None
    if found is None:
        raise ConfigError("sweep.entry", f"{path}: module {entry!r} cannot be imported here "
                          "(installed, or on PYTHONPATH?)")
    return launcher, args, command, entry


def plan(spec: SweepSpec) -> list[Run]:
    """Every run of the sweep, in a stable order (setting, grid point, seed). Each run's config is
    loaded and validated here, so a bad grid stops before anything runs, naming the key."""
    runs = []
    for setting in spec.settings:
        grid = setting.get("grid", spec.grid) or {}
        keys = list(grid)
        for values in itertools.product(*(grid[k] for k in keys)):
            point = [f"{k}={format_value(v)}" for k, v in zip(keys, values)]
            name = setting["name"] + "".join(f" {p}" for p in point)
            folder = os.path.join(spec.out_dir, _slug(name))
            for seed in spec.seeds:
                out = os.path.join(folder, f"seed{seed}")
                overrides = (*spec.overrides, *setting.get("overrides", []), *point,
                             f"run.seed={seed}", f"run.out_dir={out}")
                cfg = load_job(str(spec.base), list(overrides))
                ranks = spec.ranks or cfg.num_ranks()
                runs.append(Run(name, seed, overrides, out, ranks, cfg.run.steps))
    return runs


def _slug(name: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-_.=" else "_" for c in name.replace(" ", "__"))
    return keep.strip("_") or "base"


def is_finished(run: Run) -> bool:
    """The run evaluated its last step (so rerunning it would change nothing)."""
    try:
        steps = read_metrics(Path(run.out_dir) / "metrics.h5", attempts=3)["eval"].get("step", [])
    except MetricsError:
        return False
    return len(steps) > 0 and int(steps[-1]) >= run.steps


def train_command(spec: SweepSpec, run: Run, launcher: str | None = None) -> list[str]:
    """The command of one run: the launcher (``launcher``, a path to mpirun or srun, wins over
    the sweep file's), its flags (the sweep's ``launcher_args``, else :data:`LAUNCHERS`'), and
    ``python -m ENTRY BASE overrides...``. ``custom``: the sweep's ``launch_command``."""
    kind = launcher or spec.launcher
    entry = [sys.executable, "-m", spec.entry, str(spec.base), *run.overrides]
    if kind == "custom":
        return [w.replace("{ranks}", str(run.ranks)) for w in shlex.split(spec.launch_command)] \
            + entry
    if Path(kind).name == "srun":
        flags = spec.launcher_args if spec.launcher_args is not None else [
            *LAUNCHERS["srun"], f"--mpi={os.environ.get('MHD_SRUN_MPI', 'pmix')}"]
        return [kind, "--ntasks", str(run.ranks), *flags, *entry]
    flags = spec.launcher_args if spec.launcher_args is not None else LAUNCHERS["mpirun"]
    return [kind, *flags, "-np", str(run.ranks), *entry]


def run_pending(spec: SweepSpec, runs: list[Run], launcher: str | None = None,
                timeout_s: float | None = None, log=print) -> list[tuple[Run, int]]:
    """Run every unfinished run in order (:func:`train_command`); returns the failed ones with
    their exit codes (the sweep goes on past a failure: one bad setting does not cost the others)."""
    failed = []
    for n, run in enumerate(runs, start=1):
        if is_finished(run):
            log(f"[{n}/{len(runs)}] {run.setting} seed {run.seed}: finished, skipped")
            continue
        log(f"[{n}/{len(runs)}] {run.setting} seed {run.seed}: running ({run.out_dir})")
        Path(run.out_dir).mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        with open(Path(run.out_dir) / "train.log", "a") as out:
            try:
                code = subprocess.run(train_command(spec, run, launcher), stdout=out,
                                      stderr=subprocess.STDOUT, timeout=timeout_s).returncode
            except subprocess.TimeoutExpired:
                code = -1
        log(f"    exit code {code} after {time.time() - t0:.0f} s")
        if code != 0:
            failed.append((run, code))
    return failed


def slurm_array(spec: SweepSpec, runs: list[Run], sweep_file: str,
                sbatch_args: tuple[str, ...] = ()) -> str:
    """A SLURM batch script running the sweep as a job array: task i runs run i (skipped when
    finished, resumed when interrupted), with ``srun`` as the launcher."""
    lines = ["#!/bin/bash", f"#SBATCH --job-name=mhd-sweep-{_slug(spec.path.stem)}",
             f"#SBATCH --array=0-{len(runs) - 1}", f"#SBATCH --ntasks={max(r.ranks for r in runs)}",
             "#SBATCH --output=%x-%A_%a.out", *[f"#SBATCH {a}" for a in sbatch_args], "",
             "# Generated by: mhd-sweep " + shlex.quote(sweep_file) + " --slurm",
             "set -euo pipefail",
             f"python -m mhd_hpc.sweep {shlex.quote(sweep_file)} --only $SLURM_ARRAY_TASK_ID"
             + ("" if spec.launcher == "custom" else " --launcher srun"), ""]
    return "\n".join(lines)


def collect(runs: list[Run]) -> list[dict]:
    """The last evaluation of every finished run: per head, beta_sh and beta_priv (means over
    clients), the worst client's main beta_priv, health failures, bytes and step time."""
    rows = []
    for run in runs:
        try:
            m = read_metrics(Path(run.out_dir) / "metrics.h5", attempts=3)
        except MetricsError:
            continue
        ev = m["eval"]
        if not len(ev.get("step", [])) or int(ev["step"][-1]) < run.steps:
            continue
        summary, heads = step_summary(m), m["heads"]
        row = {"setting": run.setting, "seed": run.seed, "step": summary["step"],
               "heads": heads, "main_priv_worst": float(ev["beta_priv"][-1][:, 0].min())}
        for h in heads:
            row[f"{h}/beta_sh"] = summary["mean"][h]["beta_sh"]
            row[f"{h}/beta_priv"] = summary["mean"][h]["beta_priv"]
        row["last/beta_sh"] = row[f"{heads[-1]}/beta_sh"]
        row["last/beta_priv"] = row[f"{heads[-1]}/beta_priv"]
        row["main_sh_client_std"] = float(ev["beta_sh"][-1][:, 0].std())
        # The run had a client failing the check at some evaluation ("failed"), passed every
        # judged one, or was never judged (a short run): the last is no pass.
        row["health"] = summary["health"]
        row["health_failed"] = int(summary["health"] == "failed")
        row.update(traffic_and_speed(m))
        if "linear_probe" in summary:
            row["probe_acc"] = summary["linear_probe"]["mean"]
        if "epsilon" in summary:  # privacy.enabled: the largest budget any client spent
            row["epsilon"] = summary["epsilon"]["max"]
        rows.append(row)
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    """Per setting: mean, standard deviation and worst (min) over seeds of every number."""
    out = []
    for setting in dict.fromkeys(r["setting"] for r in rows):
        mine = [r for r in rows if r["setting"] == setting]
        entry: dict = {"setting": setting, "seeds": [r["seed"] for r in mine],
                       "heads": mine[0]["heads"],
                       "health_runs": {state: sum(r.get("health") == state for r in mine)
                                       for state in HEALTH_STATES}}
        numbers = [k for k, v in mine[0].items()
                   if isinstance(v, (int, float)) and k not in ("seed", "step")]
        for key in numbers:
            values = np.array([r.get(key, np.nan) for r in mine], dtype=float)
            entry[key] = {"mean": float(np.nanmean(values)), "std": float(np.nanstd(values)),
                          "min": float(np.nanmin(values)), "max": float(np.nanmax(values))}
        out.append(entry)
    return out


def markdown_table(summary: list[dict], columns: list[str] | None = None) -> str:
    """``columns``: keys of :data:`COLUMNS` (or HEAD/beta_sh); default: main/last head
    beta_priv and beta_sh, the worst main beta_priv, health failures and MB sent. Numbers are
    mean ± std over seeds (worst: the minimum; health: runs failing, see :func:`health_cell`;
    MB: mean)."""
    keys = columns or ["main/beta_priv", "main/beta_sh", "last/beta_sh", "main_priv_worst",
                       "health_failed", "mb_sent"]
    columns = [(COLUMNS.get(k, k.replace("/", " ")), k) for k in keys]
    head = "| setting | seeds | " + " | ".join(h for h, _ in columns) + " |"
    lines = [head, "|" + "---|" * (len(columns) + 2)]
    for entry in summary:
        cells = []
        for _, key in columns:
            v = entry.get(key)
            if v is None:
                cells.append("-")
            elif key == "health_failed":
                cells.append(health_cell(entry))
            elif key == "main_priv_worst":
                cells.append(f"{v['min']:.3f}")
            elif key in ("mb_sent", "ms_per_step"):
                cells.append(f"{v['mean']:.1f}")
            elif key == "epsilon":
                cells.append(f"{v['max']:.2f}")
            else:
                cells.append(f"{v['mean']:.3f} ± {v['std']:.3f}")
        lines.append(f"| {entry['setting']} | {len(entry['seeds'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def health_cell(entry: dict) -> str:
    """Runs failing the health check among those it judged: "0", "1 (2 not judged)", or "not
    judged" when it judged none (a run never judged is not counted as passing)."""
    runs = entry.get("health_runs")
    if runs is None:  # a summary from before "not judged" was a state
        return f"{entry['health_failed']['mean'] * len(entry['seeds']):.0f}"
    if runs["not judged"] == len(entry["seeds"]):
        return "not judged"
    unjudged = f" ({runs['not judged']} not judged)" if runs["not judged"] else ""
    return f"{runs['failed']}{unjudged}"


def write_results(spec: SweepSpec, summary: list[dict], rows: list[dict], table: str) -> Path:
    """``OUT_DIR/results.json`` (per run and per setting) and ``OUT_DIR/results.md``."""
    out = Path(spec.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"sweep": str(spec.path), "runs": rows,
                                                  "settings": summary}, indent=1))
    (out / "results.md").write_text(f"Sweep {spec.path.name}: mean ± std over seeds\n\n{table}\n")
    return out


def plot_sweep(spec: SweepSpec, runs: list[Run], fmt: str = "png", band: str = "minmax"
               ) -> Path | None:
    """``OUT_DIR/results.FMT``: the finished runs grouped by setting, per setting the mean over
    its seeds with a band (report.plots.plot_groups); None when no run has finished."""
    from mhd_hpc.report.plots import plot_groups

    groups: dict[str, list[dict]] = {}
    for run in runs:
        try:
            m = read_metrics(Path(run.out_dir) / "metrics.h5", attempts=3)
        except MetricsError:
            continue
        steps = m["eval"].get("step", [])
        if len(steps) and int(steps[-1]) >= run.steps:  # finished runs only, as in the table
            groups.setdefault(run.setting, []).append(m)
    if not groups:
        return None
    title = spec.path.stem + (f": {spec.description}" if spec.description else "")
    return plot_groups(list(groups.items()), Path(spec.out_dir) / "results", title=title,
                       fmt=fmt, band=band)


if __name__ == "__main__":  # python -m mhd_hpc.sweep: the same command as mhd-sweep, whose
    import runpy  # command line lives in mhd_hpc.cli.sweep (the library never imports it)

    runpy.run_module("mhd_hpc.cli.sweep", run_name="__main__")
