"""``python -m mhd_hpc.report RUN_DIR [RUN_DIR ...] [--json] [--step N] [--plot [OUT_DIR]]``:
what a run learned, or several runs side by side.

One run: the table shows, per client and head, beta_priv (accuracy on the client's own private
label distribution) and beta_sh (mean per-class accuracy, i.e. on a uniform label distribution),
at the last evaluated step unless ``--step`` picks another; then the linear probe (when
recorded), accuracy by graph distance, step time and traffic, and any health warning. ``--json``
prints the same numbers as

    {"step": N, "clients": {NAME: {"heads": {HEAD: {"beta_priv": x, "beta_sh": y}}}},
     "mean": {HEAD: {"beta_priv": x, "beta_sh": y}}, "health_failures": {NAME: [steps]},
     "health": "failed" | "passed" | "not judged",
     "linear_probe": {"clients": {NAME: x}, "mean": x},           (only with a probe)
     "epsilon": {"clients": {NAME: eps}, "max": eps}}              (only with privacy.enabled)

with accuracies as fractions in [0, 1]. ``--plot`` writes the figures (see report.plots) into
OUT_DIR (default RUN_DIR/plots), as ``--format`` png (default), pdf or svg.

Several runs: one row per run with the settings that differ between them, beta_priv and beta_sh
per head (means over clients), MB sent and ms per step (``--json``: see compare.comparison);
``--plot`` draws them in OUT_DIR/compare.FMT (default ./compare-plots): runs that differ only
in run.seed form one setting, drawn as the mean over seeds with a band (``--band``). A run
still training shows its latest complete evaluation.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


from mhd_hpc.errors import command
from mhd_hpc.report.summary import accuracy_by_distance, step_summary, traffic_and_speed
from mhd_hpc.run.metrics_file import MetricsError, read_metrics


def format_table(summary: dict, metrics: dict) -> str:
    heads = list(summary["mean"])
    width = max(8, max(len(c) for c in summary["clients"]))
    lines = [f"step {summary['step']}: accuracy per client and head "
             "(beta_priv = own label distribution, beta_sh = uniform over classes)", ""]
    header = f"{'client':<{width}} " + " ".join(f"{h + ' priv':>10} {h + ' sh':>8}" for h in heads)
    lines += [header, "-" * len(header)]
    rows = list(summary["clients"].items()) + [("mean", {"heads": summary["mean"]})]
    for name, entry in rows:
        if name == "mean":
            lines.append("-" * len(header))
        lines.append(f"{name:<{width}} " + " ".join(
            f"{entry['heads'][h]['beta_priv']:>10.3f} {entry['heads'][h]['beta_sh']:>8.3f}"
            for h in heads))
    if "linear_probe" in summary:
        lp = summary["linear_probe"]
        lines += ["", "linear probe on the frozen embedding (test accuracy, mean over classes; "
                  "fitted on the labelled public set): " + "  ".join(
                      f"{c} {v:.3f}" for c, v in lp["clients"].items())
                  + f"  mean {lp['mean']:.3f}"]
    if "epsilon" in summary:
        eps = summary["epsilon"]
        lines += ["", "privacy spent (epsilon at the job's privacy.delta, per client; "
                  "docs/privacy.md): " + "  ".join(f"{c} {v:.2f}"
                                                   for c, v in eps["clients"].items())
                  + f"  max {eps['max']:.2f}"]
    lines += cross_client_lines(summary, metrics)
    failures = summary.get("health_failures") or {}
    if failures:
        lines += ["", "HEALTH WARNING: " + "; ".join(
            f"{name} failed the health check at steps {', '.join(map(str, steps))}"
            for name, steps in failures.items())
            + ". Its main head did not learn its private task: this run is not a result "
            "(see the log for the likely causes)."]
    elif summary.get("health") == "not judged":
        lines += ["", "HEALTH NOT JUDGED: the health check judged no evaluation up to this step "
                  "(the run ended before its first judged step, or the check was off): this is "
                  "not a pass; a short run's numbers are of a model still warming up."]
    if metrics["train"] and len(metrics["train"].get("step", [])):
        t = traffic_and_speed(metrics)
        lines += ["", f"mean step time {t['ms_per_step']:.1f} ms, of which exchange wait "
                      f"{t['ms_exchange_wait']:.1f} ms; {t['mb_sent']:.2f} MB sent in total by "
                      "all clients"]
    return "\n".join(lines)


def cross_client_lines(summary: dict, metrics: dict) -> list[str]:
    """Accuracy of client i's heads on client j's task, averaged by graph distance j -> i: how
    far knowledge travels along the topology (transitive distillation, paper §4.4)."""
    by_distance = accuracy_by_distance(metrics, list(metrics["eval"]["step"])
                                       .index(summary["step"]))
    if not by_distance:
        return []
    lines = ["", "accuracy on other clients' tasks by distance from them (cross_acc):",
             f"{'distance':<12} " + " ".join(f"{h:>8}" for h in metrics["heads"])]
    for label, means in by_distance:
        lines.append(f"{label:<12} " + " ".join(f"{m:>8.3f}" for m in means))
    return lines


EXAMPLES = """\
Examples:
  mhd-report runs/digits                      the table of the last evaluation
  mhd-report runs/digits --plot --format pdf  the figures, in runs/digits/plots
  mhd-report runs/digits runs/ring --json     two runs side by side, as JSON"""


@command
def main(argv: list[str] | None = None) -> int:
    # The module's docstring is the help, its reStructuredText backticks dropped.
    parser = argparse.ArgumentParser(prog="mhd-report", description=__doc__.replace("``", ""),
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=EXAMPLES)
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="run folder(s) (run.out_dir of the job); several: side by side")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--step", type=int, default=None, help="evaluated step (default: last)")
    parser.add_argument("--plot", nargs="?", const="", default=None, metavar="OUT_DIR",
                        help="write figures (needs matplotlib: pip install -e '.[plot]')")
    parser.add_argument("--format", choices=("png", "pdf", "svg"), default="png",
                        help="figure format for --plot: pdf and svg are vector (default: png)")
    parser.add_argument("--band", choices=("minmax", "std"), default="minmax",
                        help="several runs with --plot: the band around a setting's mean over "
                             "seeds (min-max or ±1 std; default: minmax)")
    args = parser.parse_args(argv)
    try:
        if len(args.run_dirs) > 1:
            return _several(args)
        metrics = read_metrics(Path(args.run_dirs[0]) / "metrics.h5")
        summary = step_summary(metrics, args.step)
        if args.plot is not None:
            from mhd_hpc.report.plots import plot_run, run_title

            out = args.plot or str(Path(args.run_dirs[0]) / "plots")
            made = plot_run(metrics, run_title(args.run_dirs[0]), out, summary["step"],
                            args.format)
            print(f"wrote {len(made)} figures: " + ", ".join(str(p) for p in made),
                  file=sys.stderr)
    except (MetricsError, ImportError) as exc:
        print(f"mhd_hpc.report: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=1) if args.json else format_table(summary, metrics))
    return 0


def _several(args: argparse.Namespace) -> int:
    from mhd_hpc.report.compare import comparison, format_comparison, load_runs

    runs = load_runs(args.run_dirs)
    comp = comparison(runs)
    if args.plot is not None:
        from mhd_hpc.report.plots import plot_comparison

        path = plot_comparison(runs, args.plot or "compare-plots", args.format, args.band)
        print(f"wrote {path}", file=sys.stderr)
    print(json.dumps(comp, indent=1) if args.json else format_comparison(comp))
    return 0

