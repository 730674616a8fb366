"""The report's pictures (``python -m mhd_hpc.report RUN_DIR --plot [OUT_DIR] [--format
pdf|svg|png]``), matplotlib with the headless Agg backend (the ``plot`` extra). PDF and SVG are
vector (for a paper); PNG is rendered at 200 dpi.

One run (titles name the run's settings, from its config.yaml):

* ``accuracy``     beta_sh and beta_priv per head over steps: the mean over clients, each client
                   faint behind it (and the linear probe when it was recorded);
* ``cross_client`` per head, client i's accuracy on client j's label distribution at the chosen
                   step, with the graph's edges j -> i outlined (none on a complete graph);
* ``by_distance``  accuracy on other clients' tasks by graph distance, per head;
* ``losses``       the loss terms over steps;
* ``timing``       step time and the part spent waiting for peers;
* ``staleness``    pool mode only: the age of the targets' checkpoints.

Several runs (``compare``) and a sweep (``tools/sweep.py --plot``): :func:`plot_groups`, the
runs grouped by setting (runs differing only in ``run.seed`` form one group), per panel one line
per setting, the mean over its seeds, with a band (min-max or ±1 std over seeds, as the figure
says); labels are the settings that differ.

Short runs: few evaluations get ticks at the evaluated steps; a single one a marker labelled
with its value. A head has one colour in every figure (``HEAD_COLOURS``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mhd_hpc.report.summary import accuracy_by_distance, hops_at

__all__ = ["HEAD_COLOURS", "FORMATS", "BANDS", "plot_run", "plot_comparison", "plot_groups",
           "group_by_setting", "run_label", "run_title"]

FORMATS = ("png", "pdf", "svg")
BANDS = {"minmax": "band: min-max over seeds", "std": "band: ±1 std over seeds"}

HEAD_COLOURS = ["#222222", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]
RUN_COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
               "#17becf"]
RUN_LINESTYLES = ["-", "--", ":", "-."]


def run_style(g: int) -> tuple[str, str]:
    """(colour, line style) of the ``g``-th run or setting: the colours first, then the same
    colours dashed, dotted...: a sweep of 11 settings must not draw two of them alike."""
    turn, colour = divmod(g, len(RUN_COLOURS))
    return RUN_COLOURS[colour], RUN_LINESTYLES[turn % len(RUN_LINESTYLES)]


def _client_mean(values: np.ndarray, axis: int = 1) -> np.ndarray:
    """Mean over clients that ignores NaN (a client that did not report that row); a row no
    client reported stays NaN, which matplotlib draws as a gap, without numpy's warning."""
    values = np.asarray(values, dtype=float)
    counts = np.sum(~np.isnan(values), axis=axis)
    sums = np.nansum(values, axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def run_label(run_dir: str | Path) -> str:
    """A short name for a run folder in titles: its name, with its parent's when the name alone
    says little (the sweep runner's ``.../SETTING/seed0``)."""
    path = Path(run_dir).resolve()
    return f"{path.parent.name}/{path.name}" if path.name.startswith("seed") else path.name


def run_title(run_dir: str | Path) -> str:
    """A run's settings for a title ("mhd, 4 clients, complete graph, 2 aux heads, digits, 600
    steps, seed 0") from its config.yaml; the folder's name when that is unreadable."""
    import yaml

    try:
        cfg = yaml.safe_load((Path(run_dir) / "config.yaml").read_text()) or {}
        sec = {k: v for k, v in cfg.items() if isinstance(v, dict)}
        run, model = sec.get("run", {}), sec.get("model", {})
        parts = [str(cfg["method"]), f"{sec['clients']['count']} clients",
                 f"{sec['topology']['kind']} graph", f"{model.get('aux_heads', 0)} aux heads",
                 str(sec.get("data", {}).get("dataset", "")), f"{run['steps']} steps",
                 f"seed {run.get('seed', 0)}"]
    except (OSError, KeyError, TypeError, AttributeError, yaml.YAMLError):
        return run_label(run_dir)
    return ", ".join(p for p in parts if p)


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on cluster nodes or in CI
    import matplotlib.pyplot as plt

    return plt


def head_colour(h: int) -> str:
    return HEAD_COLOURS[h % len(HEAD_COLOURS)]


def _save(fig, path: Path, fmt: str = "png", tight: bool = True) -> Path:
    """``path`` with the format's suffix; vector for pdf/svg, 200 dpi for png."""
    if fmt not in FORMATS:
        raise ValueError(f"figure format {fmt!r}: use one of {', '.join(FORMATS)}")
    path = path.with_suffix(f".{fmt}")
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=200, bbox_inches="tight")
    _plt().close(fig)
    return path


def _step_axis(ax, steps) -> None:
    """Few evaluated steps: a tick at each (a 60-step run shows 50 and 60, not 0..60 by 10);
    one step: the axis around it, not an empty range."""
    steps = sorted({int(s) for s in steps})
    if 0 < len(steps) <= 8:
        ax.set_xticks(steps)
    if len(steps) == 1:
        ax.set_xlim(steps[0] * 0.5, steps[0] * 1.5 + 1)


def _curve(ax, steps, values, *, colour: str, label: str | None = None, lw: float = 2.0,
           alpha: float = 1.0, ls: str = "-", annotate: bool = False) -> None:
    """A line over steps; with few points, markers on them, and a lone point (a one-evaluation
    run) labelled with its value, so it reads as a number rather than a stray dot."""
    steps, values = np.asarray(steps), np.asarray(values, dtype=float)
    few = len(steps) <= 12
    ax.plot(steps, values, color=colour, lw=lw, alpha=alpha, ls=ls, label=label,
            marker="o" if few else None, ms=(7 if len(steps) == 1 else 4) if few else 0)
    if annotate and len(steps) == 1 and np.isfinite(values[0]):
        ax.annotate(f"{values[0]:.3f}", (steps[0], values[0]), textcoords="offset points",
                    xytext=(8, 0), va="center", fontsize=8, color=colour)


def _row(metrics: dict, step: int | None) -> int:
    steps = list(metrics["eval"]["step"])
    return len(steps) - 1 if step is None else steps.index(step)


def accuracy_figure(metrics: dict, name: str, out: Path, fmt: str = "png") -> Path:
    plt = _plt()
    ev, heads = metrics["eval"], metrics["heads"]
    steps, k = ev["step"], len(metrics["clients"])
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), sharey=True)
    low = min(np.nanmin(ev["beta_sh"]), np.nanmin(ev["beta_priv"]))
    bottom = max(0.0, np.floor((low - 0.02) * 10) / 10)  # zoom in, but start at a round tenth
    for ax, key, title in ((axes[0], "beta_sh", "shared accuracy β_sh (all classes equally)"),
                           (axes[1], "beta_priv", "private accuracy β_priv (the client's own "
                                                  "label distribution)")):
        for h, head in enumerate(heads):
            values = ev[key][:, :, h]  # (E, K)
            if len(steps) > 1:  # one point per client on a single step is clutter
                for i in range(k):
                    ax.plot(steps, values[:, i], color=head_colour(h), alpha=0.22, lw=0.8)
            _curve(ax, steps, _client_mean(values), colour=head_colour(h), lw=2.2, label=head,
                   annotate=True)
        if key == "beta_sh" and "probe_acc" in ev:
            _curve(ax, steps, _client_mean(ev["probe_acc"], axis=1), colour="#777777", ls="--",
                   lw=1.5, label="linear probe", annotate=True)
        ax.set(title=title, xlabel="training step", ylim=(bottom, 1.01))
        _step_axis(ax, steps)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy")
    axes[0].legend(title="head (bold: mean over clients)", loc="best", fontsize=8)
    faint = ", each faint" if len(steps) > 1 else ""
    fig.suptitle(f"{name}\naccuracy per head over training ({k} clients{faint})", fontsize=10)
    return _save(fig, out / "accuracy", fmt)


def cross_client_figure(metrics: dict, name: str, out: Path, step: int | None,
                        fmt: str = "png") -> Path:
    plt = _plt()
    ev, heads, clients = metrics["eval"], metrics["heads"], metrics["clients"]
    row = _row(metrics, step)
    cross, hops = ev["cross_acc"][row], hops_at(metrics, row)  # (K, H, K)
    k, n = len(clients), len(heads)
    off = ~np.eye(k, dtype=bool)
    # On a complete graph every j -> i is an edge: a box on every cell would hide the numbers.
    complete = hops is not None and bool((hops[off] == 1).all())
    edges = hops is not None and not complete
    fig, axes = plt.subplots(1, n, figsize=(3.3 * n + 1.2, 3.6), squeeze=False)
    image = None
    for h, ax in enumerate(axes[0]):
        image = ax.imshow(cross[:, h, :], vmin=0, vmax=1, cmap="viridis")
        for i in range(k):
            for j in range(k):
                if k <= 10:  # beyond that the numbers no longer fit their cells
                    ax.text(j, i, f"{cross[i, h, j]:.2f}", ha="center", va="center",
                            fontsize=7, color="white" if cross[i, h, j] < 0.6 else "black")
                if edges and hops[i, j] == 1:  # j -> i: i distills from j
                    ax.add_patch(plt.Rectangle((j - 0.45, i - 0.45), 0.9, 0.9, fill=False,
                                               edgecolor="#ff3030", lw=1.4))
        ax.set_title(f"head {heads[h]}", color=head_colour(h))
        ax.set_xticks(range(k), [str(j) for j in range(k)])
        ax.set_yticks(range(k), [str(i) for i in range(k)])
        ax.set_xlabel("task of client j")
    axes[0][0].set_ylabel("model of client i")
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.85, label="accuracy on j's labels")
    graph = (" (red box: graph edge j → i)" if edges else
             " (complete graph: every client learns from every other)" if complete else "")
    fig.suptitle(f"{name}\nstep {int(ev['step'][row])}: client i's heads on client j's task"
                 f"{graph}", fontsize=10)
    return _save(fig, out / "cross_client", fmt, tight=False)


def distance_figure(metrics: dict, name: str, out: Path, step: int | None,
                    fmt: str = "png") -> Path | None:
    plt = _plt()
    ev, heads = metrics["eval"], metrics["heads"]
    row = _row(metrics, step)
    by_distance = accuracy_by_distance(metrics, row)
    if not by_distance:
        return None
    labels = [label for label, _ in by_distance]
    width = 0.8 / len(heads)
    fig, ax = plt.subplots(figsize=(max(6.5, 1.6 + 0.7 * len(labels) * len(heads)), 4))
    for h, head in enumerate(heads):
        values = [means[h] for _, means in by_distance]
        ax.bar(np.arange(len(labels)) + (h - (len(heads) - 1) / 2) * width, values, width,
               color=head_colour(h), label=head)
    ax.set_xticks(range(len(labels)), labels)
    ax.set(xlabel="graph distance from client j to client i", ylim=(0, 1.02),
           ylabel="accuracy of i's head on j's task",
           title=f"{name}\nstep {int(ev['step'][row])}: knowledge by graph distance")
    ax.title.set_fontsize(10)
    ax.legend(title="head", fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, out / "by_distance", fmt)


def losses_figure(metrics: dict, name: str, out: Path, fmt: str = "png") -> Path | None:
    plt = _plt()
    train, heads = metrics["train"], metrics["heads"]
    names = sorted(n for n in train if n.startswith("loss_") and n != "loss_total")
    if not names:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.3))
    for n in names:
        term = n.removeprefix("loss_")
        colour = (head_colour(heads.index(term)) if term in heads
                  else {"ce": HEAD_COLOURS[0], "emb": "#888888"}.get(term, "#bcbd22"))
        style = "--" if term == "emb" else "-"
        _curve(ax, train["step"], _client_mean(train[n], axis=1), colour=colour, ls=style,
               lw=1.5, label=f"{term}" + (" (main head, private labels)" if term == "ce" else ""),
               annotate=True)
    ax.set(xlabel="training step", ylabel="loss (mean over clients and the log interval)",
           title=f"{name}\nloss terms (unweighted)", yscale="log")
    ax.title.set_fontsize(10)
    _step_axis(ax, train["step"])
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    return _save(fig, out / "losses", fmt)


def timing_figure(metrics: dict, name: str, out: Path, fmt: str = "png") -> Path | None:
    plt = _plt()
    train = metrics["train"]
    if "step_time_s" not in train:
        return None
    steps = train["step"]
    total = 1000 * _client_mean(train["step_time_s"], axis=1)
    wait = 1000 * _client_mean(train.get("exchange_wait_s", np.zeros_like(train["step_time_s"])),
                             axis=1)
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.fill_between(steps, 0, wait, color="#d62728", alpha=0.6, label="waiting for peers")
    ax.fill_between(steps, wait, total, color="#1f77b4", alpha=0.5, label="everything else")
    _curve(ax, steps, total, colour="#1f77b4", lw=1.5, annotate=True)
    ax.set(xlabel="training step", ylabel="ms per step (mean over clients)", ylim=(0, None),
           title=f"{name}\nstep time and time spent waiting for peers' messages")
    ax.title.set_fontsize(10)
    _step_axis(ax, steps)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, out / "timing", fmt)


def staleness_figure(metrics: dict, name: str, out: Path, fmt: str = "png") -> Path | None:
    plt = _plt()
    train = metrics["train"]
    if "staleness" not in train:
        return None
    fig, ax = plt.subplots(figsize=(8, 4))
    for i, client in enumerate(metrics["clients"]):
        ax.plot(train["step"], train["staleness"][:, i], alpha=0.35, lw=0.8, color="#555555")
    ax.plot(train["step"], _client_mean(train["staleness"], axis=1), color="#9467bd", lw=2,
            label="mean over clients")
    ax.set(xlabel="training step", ylabel="steps since the target's checkpoint was taken",
           title=f"{name}\nstaleness of the pool's targets (pool mode)", ylim=(0, None))
    ax.title.set_fontsize(10)
    _step_axis(ax, train["step"])
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, out / "staleness", fmt)


def plot_run(metrics: dict, name: str, out_dir: str | Path, step: int | None = None,
             fmt: str = "png") -> list[Path]:
    """Every figure of one run into ``out_dir`` in format ``fmt``; returns the files written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    made = [accuracy_figure(metrics, name, out, fmt),
            cross_client_figure(metrics, name, out, step, fmt),
            distance_figure(metrics, name, out, step, fmt), losses_figure(metrics, name, out, fmt),
            timing_figure(metrics, name, out, fmt), staleness_figure(metrics, name, out, fmt)]
    return [p for p in made if p is not None]


def group_by_setting(runs: list[tuple[str, dict, dict]]) -> list[tuple[str, list[dict]]]:
    """(name, metrics, flattened config) per run -> (label, metrics of its seeds) per setting:
    runs whose configs differ only in ``run.seed`` (and bookkeeping keys such as the folder)
    form one group, labelled with the settings that differ between groups."""
    from mhd_hpc.config import BOOKKEEPING_KEYS

    keys = sorted(set().union(*(c.keys() for _, _, c in runs)))
    differing = [k for k in keys if k not in BOOKKEEPING_KEYS and k != "run.seed"
                 and len({repr(c.get(k)) for _, _, c in runs}) > 1]
    groups: dict[str, list[dict]] = {}
    for name, metrics, config in runs:
        label = ", ".join(f"{k}={config.get(k)}" for k in differing) or "all runs"
        groups.setdefault(label, []).append(metrics)
    return list(groups.items())


def _seed_curves(seeds: list[dict], key: str, head: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, (seeds, steps) client means of ``key`` for ``head``) on the evaluated steps all
    seeds share (a seed still training has fewer)."""
    usable = [m for m in seeds if head in m["heads"] and len(m["eval"].get("step", []))]
    if not usable:
        return np.array([]), np.empty((0, 0))
    common = sorted(set.intersection(*({int(s) for s in m["eval"]["step"]} for m in usable)))
    rows = []
    for m in usable:
        where = [list(map(int, m["eval"]["step"])).index(s) for s in common]
        rows.append(_client_mean(m["eval"][key][where][:, :, m["heads"].index(head)]))
    return np.array(common), np.array(rows)


def plot_groups(groups: list[tuple[str, list[dict]]], out_path: str | Path, *, title: str,
                fmt: str = "png", band: str = "minmax") -> Path:
    """One panel each for the main head's beta_priv and beta_sh and the last head's beta_sh over
    training; per group (a setting) its mean over seeds as a line and, with several seeds, a band
    (``band``: "minmax" or "std"); ``out_path`` gets the format's suffix."""
    if band not in BANDS:
        raise ValueError(f"band {band!r}: use one of {', '.join(BANDS)}")
    plt = _plt()
    heads = max((m["heads"] for _, seeds in groups for m in seeds), key=len)
    panels = [("beta_priv", heads[0], f"{heads[0]} head, private task β_priv"),
              ("beta_sh", heads[0], f"{heads[0]} head, all classes β_sh")]
    if len(heads) > 1:
        panels.append(("beta_sh", heads[-1], f"last head ({heads[-1]}), all classes β_sh"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.9), sharey=True,
                             squeeze=False)
    all_steps: set[int] = set()
    for ax, (key, head, panel_title) in zip(axes[0], panels):
        for g, (label, seeds) in enumerate(groups):
            steps, values = _seed_curves(seeds, key, head)
            if not len(steps):
                continue
            all_steps |= set(steps.tolist())
            colour, ls = run_style(g)
            n = len(values)
            _curve(ax, steps, values.mean(axis=0), colour=colour, ls=ls, annotate=True,
                   label=f"{label} ({n} seed{'s' if n > 1 else ''})")
            if n > 1:
                mean, std = values.mean(axis=0), values.std(axis=0)
                low, high = ((values.min(axis=0), values.max(axis=0)) if band == "minmax"
                             else (mean - std, mean + std))
                if len(steps) == 1:  # a band over one step: an error bar
                    ax.errorbar(steps, mean, yerr=[mean - low, high - mean], color=colour,
                                capsize=4, lw=1.2)
                else:
                    ax.fill_between(steps, low, high, color=colour, alpha=0.2, lw=0)
        ax.set(title=panel_title, xlabel="training step", ylim=(0, 1.02))
        ax.title.set_fontsize(10)
        ax.grid(alpha=0.3)
    for ax in axes[0]:
        _step_axis(ax, all_steps)
    axes[0][0].set_ylabel("test accuracy (mean over clients)")
    several = any(len(seeds) > 1 for _, seeds in groups)
    how = f"line: mean over seeds; {BANDS[band]}" if several else "one run per setting"
    fig.suptitle(f"{title}\n{how}", fontsize=10)
    # The legend below the panels: inside one it hides curves (low last-head accuracies).
    columns = min(len(groups), 3)
    rows = -(-len(groups) // columns)
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="lower center", ncol=columns,
               fontsize=8, frameon=False, handlelength=3.5)  # long enough to show a dash
    fig.tight_layout(rect=(0, 0.045 * rows + 0.02, 1, 1))
    return _save(fig, Path(out_path), fmt, tight=False)


def plot_comparison(runs: list[tuple[str, dict, dict]], out_dir: str | Path, fmt: str = "png",
                    band: str = "minmax") -> Path:
    """``compare.FMT``: the runs grouped by setting (:func:`group_by_setting`), per setting the
    mean over its seeds with a band."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    groups = group_by_setting(runs)
    seeds = max(len(g) for _, g in groups)
    title = (f"{len(runs)} runs, {len(groups)} settings" + (f", up to {seeds} seeds each"
                                                             if seeds > 1 else ""))
    return plot_groups(groups, out / "compare", title=title, fmt=fmt, band=band)
