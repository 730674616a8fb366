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

:func:`plan` turns it into runs (pure, tested without MPI); :func:`run_pending` starts each run
that has not finished under ``mpirun`` (a finished run is skipped, an interrupted one resumes,
since the trainer resumes any run folder); :func:`slurm_array` writes a SLURM job array instead;
:func:`collect` reads every finished run's last evaluation and :func:`summarise` gives mean and
spread over seeds per setting, as Markdown and JSON.
"""

from __future__ import annotations

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
from mhd_hpc.report.summary import step_summary, traffic_and_speed
from mhd_hpc.run.metrics_file import MetricsError, read_metrics

__all__ = ["Run", "SweepSpec", "load_sweep", "plan", "is_finished", "run_pending",
           "slurm_array", "collect", "summarise", "markdown_table", "COLUMNS"]

#: Table columns: key -> header (HEAD/beta_sh and HEAD/beta_priv are accepted for any head).
COLUMNS = {"main/beta_priv": "main priv", "main/beta_sh": "main sh",
           "last/beta_priv": "last aux priv", "last/beta_sh": "last aux sh",
           "main_priv_worst": "worst main priv", "main_sh_client_std": "main sh spread over clients",
           "health_failed": "runs failing health", "mb_sent": "MB sent",
           "ms_per_step": "ms/step", "probe_acc": "linear probe"}


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


def load_sweep(path: str | Path) -> SweepSpec:
    """Read a sweep file; errors name the file and the offending key."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError("<sweep file>", f"{path}: {exc}") from None
    known = {"base", "out_dir", "overrides", "settings", "grid", "seeds", "ranks", "description",
             "columns"}
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
                     int(data.get("ranks") or 0), columns)


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
                ranks = spec.ranks or sum(cfg.client_ranks())
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


def train_command(spec: SweepSpec, run: Run, launcher: str = "mpirun") -> list[str]:
    """The command of one run: ``mpirun --oversubscribe -np N`` (a workstation, CI) or
    ``srun --ntasks N --kill-on-bad-exit=1`` (inside a SLURM allocation)."""
    if Path(launcher).name == "srun":  # PMIx unless the site says otherwise (run_with_requeue.sh)
        launch = [launcher, "--ntasks", str(run.ranks), "--kill-on-bad-exit=1",
                  f"--mpi={os.environ.get('MHD_SRUN_MPI', 'pmix')}"]
    else:
        launch = [launcher, "--oversubscribe", "-np", str(run.ranks)]
    return [*launch, sys.executable, "-m", "mhd_hpc.train", str(spec.base), *run.overrides]


def run_pending(spec: SweepSpec, runs: list[Run], launcher: str = "mpirun",
                timeout_s: float | None = None, log=print) -> list[tuple[Run, int]]:
    """Run every unfinished run in order under ``mpirun``; returns the failed ones with their
    exit codes (the sweep goes on past a failure: one bad setting does not cost the others)."""
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
             "# Generated by: python tools/sweep.py " + shlex.quote(sweep_file) + " --slurm",
             "set -euo pipefail",
             f"python tools/sweep.py {shlex.quote(sweep_file)} --only $SLURM_ARRAY_TASK_ID "
             "--launcher srun", ""]
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
        # The run had a client failing the check at some evaluation.
        row["health_failed"] = int(bool(summary["health_failures"]))
        row.update(traffic_and_speed(m))
        if "linear_probe" in summary:
            row["probe_acc"] = summary["linear_probe"]["mean"]
        rows.append(row)
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    """Per setting: mean, standard deviation and worst (min) over seeds of every number."""
    out = []
    for setting in dict.fromkeys(r["setting"] for r in rows):
        mine = [r for r in rows if r["setting"] == setting]
        entry: dict = {"setting": setting, "seeds": [r["seed"] for r in mine],
                       "heads": mine[0]["heads"]}
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
    mean ± std over seeds (worst: the minimum; health: runs; MB: mean)."""
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
                cells.append(f"{v['mean'] * len(entry['seeds']):.0f}")
            elif key == "main_priv_worst":
                cells.append(f"{v['min']:.3f}")
            elif key in ("mb_sent", "ms_per_step"):
                cells.append(f"{v['mean']:.1f}")
            else:
                cells.append(f"{v['mean']:.3f} ± {v['std']:.3f}")
        lines.append(f"| {entry['setting']} | {len(entry['seeds'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(spec: SweepSpec, summary: list[dict], rows: list[dict], table: str) -> Path:
    """``OUT_DIR/results.json`` (per run and per setting) and ``OUT_DIR/results.md``."""
    out = Path(spec.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"sweep": str(spec.path), "runs": rows,
                                                  "settings": summary}, indent=1))
    (out / "results.md").write_text(f"Sweep {spec.path.name}: mean ± std over seeds\n\n{table}\n")
    return out
