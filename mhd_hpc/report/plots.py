"""The report's pictures (``python -m mhd_hpc.report RUN_DIR --plot [OUT_DIR]``), matplotlib
with the headless Agg backend (the ``plot`` extra).

One run:

* ``accuracy.png``     beta_sh and beta_priv per head over steps: the mean over clients, each
                       client faint behind it (and the linear probe when it was recorded);
* ``cross_client.png`` per head, client i's accuracy on client j's label distribution at the
                       chosen step, with the graph's edges j -> i outlined;
* ``by_distance.png``  accuracy on other clients' tasks by graph distance, per head;
* ``losses.png``       the loss terms over steps;
* ``timing.png``       step time and the part spent waiting for peers;
* ``staleness.png``    pool mode only: the age of the targets' checkpoints.

Several runs: ``compare.png``, beta_sh per head over steps, one colour per run.

A head has one colour in every figure (``HEAD_COLOURS``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mhd_hpc.report.summary import accuracy_by_distance, hops_at

__all__ = ["HEAD_COLOURS", "plot_run", "plot_comparison", "run_label"]

HEAD_COLOURS = ["#222222", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]
RUN_COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
               "#17becf"]


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


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on cluster nodes or in CI
    import matplotlib.pyplot as plt

    return plt


def head_colour(h: int) -> str:
    return HEAD_COLOURS[h % len(HEAD_COLOURS)]


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def _row(metrics: dict, step: int | None) -> int:
    steps = list(metrics["eval"]["step"])
    return len(steps) - 1 if step is None else steps.index(step)


def accuracy_figure(metrics: dict, name: str, out: Path) -> Path:
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
            for i in range(k):
                ax.plot(steps, values[:, i], color=head_colour(h), alpha=0.22, lw=0.8)
            ax.plot(steps, values.mean(axis=1), color=head_colour(h), lw=2.2, marker="o", ms=3,
                    label=head)
        if key == "beta_sh" and "probe_acc" in ev:
            ax.plot(steps, _client_mean(ev["probe_acc"], axis=1), color="#777777", ls="--", lw=1.5,
                    label="linear probe")
        ax.set(title=title, xlabel="training step", ylim=(bottom, 1.01))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy")
    axes[0].legend(title="head (bold: mean over clients)", loc="best", fontsize=8)
    fig.suptitle(f"{name}: accuracy per head over training ({k} clients, each faint)")
    return _save(fig, out / "accuracy.png")


def cross_client_figure(metrics: dict, name: str, out: Path, step: int | None) -> Path:
    plt = _plt()
    ev, heads, clients = metrics["eval"], metrics["heads"], metrics["clients"]
    row = _row(metrics, step)
    cross, hops = ev["cross_acc"][row], hops_at(metrics, row)  # (K, H, K)
    k, n = len(clients), len(heads)
    fig, axes = plt.subplots(1, n, figsize=(3.3 * n + 1.2, 3.6), squeeze=False)
    image = None
    for h, ax in enumerate(axes[0]):
        image = ax.imshow(cross[:, h, :], vmin=0, vmax=1, cmap="viridis")
        for i in range(k):
            for j in range(k):
                ax.text(j, i, f"{cross[i, h, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if cross[i, h, j] < 0.6 else "black")
                if hops is not None and hops[i, j] == 1:  # j -> i: i distills from j
                    ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False,
                                               edgecolor="#ff3030", lw=1.8))
        ax.set_title(f"head {heads[h]}", color=head_colour(h))
        ax.set_xticks(range(k), [str(j) for j in range(k)])
        ax.set_yticks(range(k), [str(i) for i in range(k)])
        ax.set_xlabel("task of client j")
    axes[0][0].set_ylabel("model of client i")
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.85, label="accuracy on j's labels")
    fig.suptitle(f"{name}, step {int(ev['step'][row])}: client i's heads on client j's task "
                 "(red box: graph edge j → i)", fontsize=10)
    fig.savefig(out / "cross_client.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out / "cross_client.png"


def distance_figure(metrics: dict, name: str, out: Path, step: int | None) -> Path | None:
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
           title=f"{name}, step {int(ev['step'][row])}: knowledge by graph distance")
    ax.legend(title="head", fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, out / "by_distance.png")


def losses_figure(metrics: dict, name: str, out: Path) -> Path | None:
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
        ax.plot(train["step"], _client_mean(train[n], axis=1), color=colour, ls=style,
                label=f"{term}" + (" (main head, private labels)" if term == "ce" else ""))
    ax.set(xlabel="training step", ylabel="loss (mean over clients and the log interval)",
           title=f"{name}: loss terms (unweighted)", yscale="log")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    return _save(fig, out / "losses.png")


def timing_figure(metrics: dict, name: str, out: Path) -> Path | None:
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
    ax.plot(steps, total, color="#1f77b4", lw=1.5)
    ax.set(xlabel="training step", ylabel="ms per step (mean over clients)", ylim=(0, None),
           title=f"{name}: step time and time spent waiting for peers' messages")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, out / "timing.png")


def staleness_figure(metrics: dict, name: str, out: Path) -> Path | None:
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
           title=f"{name}: staleness of the pool's targets (pool mode)", ylim=(0, None))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, out / "staleness.png")


def plot_run(metrics: dict, name: str, out_dir: str | Path, step: int | None = None
             ) -> list[Path]:
    """Every figure of one run into ``out_dir``; returns the files written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    made = [accuracy_figure(metrics, name, out), cross_client_figure(metrics, name, out, step),
            distance_figure(metrics, name, out, step), losses_figure(metrics, name, out),
            timing_figure(metrics, name, out), staleness_figure(metrics, name, out)]
    return [p for p in made if p is not None]


def plot_comparison(runs: list[tuple[str, dict]], out_dir: str | Path) -> Path:
    """``compare.png``: beta_sh of every head over steps, one colour per run."""
    plt = _plt()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    heads = max((m["heads"] for _, m in runs), key=len)
    fig, axes = plt.subplots(1, len(heads), figsize=(3.6 * len(heads) + 0.5, 3.8), sharey=True,
                             squeeze=False)
    for h, (head, ax) in enumerate(zip(heads, axes[0])):
        for r, (name, m) in enumerate(runs):
            if head in m["heads"]:
                j = m["heads"].index(head)
                ax.plot(m["eval"]["step"], m["eval"]["beta_sh"][:, :, j].mean(axis=1),
                        color=RUN_COLOURS[r % len(RUN_COLOURS)], lw=2, marker="o", ms=3,
                        label=name)
        ax.set(title=f"head {head}", xlabel="training step", ylim=(0, 1.02))
        ax.title.set_color(head_colour(h))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("β_sh (mean over clients)")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.suptitle("shared accuracy over training, runs side by side")
    return _save(fig, out / "compare.png")
