"""The report's figures (mhd_hpc/report/plots.py) from hand-made metrics: every format, the
sweep's grouped curves with bands, short runs' axes, the cross-client matrix's edges."""

import numpy as np
import pytest

pytest.importorskip("matplotlib", reason="pip install -e '.[plot]'")

from mhd_hpc.method import topology  # noqa: E402
from mhd_hpc.report import plots  # noqa: E402

MAGIC = {"png": b"\x89PNG\r\n\x1a\n", "pdf": b"%PDF", "svg": b"<?xml"}


def metrics(steps=(20, 40, 60), k=4, level=0.5, graph=None):
    """One run's metrics: 2 heads, ``k`` clients, accuracies ``level`` rising by 0.1 a step."""
    e, h = len(steps), 2
    rise = level + 0.1 * np.arange(e)[:, None, None]
    hops = topology.hop_distances(graph or topology.complete(k))
    return {"clients": [f"client{i}" for i in range(k)], "heads": ["main", "aux1"],
            "eval": {"step": np.array(steps), "beta_sh": np.broadcast_to(rise, (e, k, h)).copy(),
                     "beta_priv": np.broadcast_to(rise + 0.1, (e, k, h)).copy(),
                     "cross_acc": np.full((e, k, h, k), level),
                     "hop_distances": np.broadcast_to(hops, (e, k, k)).copy()},
            "train": {"step": np.array(steps), "loss_ce": np.full((e, k), 0.5),
                      "loss_aux1": np.full((e, k), 0.7), "step_time_s": np.full((e, k), 0.02),
                      "exchange_wait_s": np.full((e, k), 0.005),
                      "bytes_sent": np.full((e, k), 1e5)}}


@pytest.fixture
def figures(monkeypatch):
    """The figures as they are saved (the files are written too)."""
    saved = []
    original = plots._save

    def keep(fig, path, *args, **kw):
        saved.append((path.name, fig))
        return original(fig, path, *args, **kw)

    monkeypatch.setattr(plots, "_save", keep)
    return saved


@pytest.mark.parametrize("fmt", ["png", "pdf", "svg"])
def test_every_figure_is_written_in_each_format(tmp_path, fmt):
    made = plots.plot_run(metrics(), "mhd, 4 clients", tmp_path, fmt=fmt)
    assert sorted(p.name for p in made) == sorted(f"{n}.{fmt}" for n in (
        "accuracy", "cross_client", "by_distance", "losses", "timing"))
    path = plots.plot_groups([("mhd", [metrics()])], tmp_path / "sweep", title="t", fmt=fmt)
    assert path.name == f"sweep.{fmt}"
    for p in [*made, path]:
        assert p.read_bytes().startswith(MAGIC[fmt]), p
    with pytest.raises(ValueError, match="figure format 'jpg'"):
        plots.plot_groups([("mhd", [metrics()])], tmp_path / "x", title="t", fmt="jpg")


@pytest.mark.parametrize("band", ["minmax", "std"])
def test_a_sweep_plot_has_one_line_per_setting_with_a_band_over_seeds(tmp_path, figures, band):
    groups = [("method=mhd", [metrics(level=0.5), metrics(level=0.6), metrics(level=0.7)]),
              ("method=separate", [metrics(level=0.2), metrics(level=0.3)])]
    plots.plot_groups(groups, tmp_path / "sweep", title="table1", fmt="png", band=band)
    (name, fig), = figures
    assert name == "sweep" and "mean over seeds" in fig._suptitle.get_text()
    assert plots.BANDS[band] in fig._suptitle.get_text()
    for ax in fig.axes:  # main priv, main sh, last head sh
        assert [line.get_label() for line in ax.lines] == ["method=mhd (3 seeds)",
                                                          "method=separate (2 seeds)"]
        np.testing.assert_allclose(ax.lines[0].get_ydata()[0], 0.6 + (ax is fig.axes[0]) * 0.1)
        bands = ax.collections  # fill_between: one per setting
        assert len(bands) == 2
        low, high = bands[0].get_paths()[0].vertices[:, 1].min(), \
            bands[0].get_paths()[0].vertices[:, 1].max()
        spread = 0.2 if band == "minmax" else 2 * np.std([0.5, 0.6, 0.7])
        assert high - low == pytest.approx(spread + 0.2, abs=1e-6)  # plus the curve's rise
        assert [int(t) for t in ax.get_xticks()] == [20, 40, 60]  # few points: the steps


def test_runs_group_by_setting_apart_from_their_seed():
    runs = [(f"r{i}", metrics(), {"method": m, "run.seed": s, "run.out_dir": f"d{i}"})
            for i, (m, s) in enumerate([("mhd", 0), ("mhd", 1), ("separate", 0)])]
    groups = plots.group_by_setting(runs)
    assert [(label, len(seeds)) for label, seeds in groups] == [("method=mhd", 2),
                                                               ("method=separate", 1)]


def test_a_one_evaluation_run_shows_its_value_at_its_step(tmp_path, figures):
    plots.accuracy_figure(metrics(steps=(60,)), "short", tmp_path)
    (_, fig), = figures
    ax = fig.axes[0]
    assert [int(t) for t in ax.get_xticks()] == [60] and ax.get_xlim()[0] < 60 < ax.get_xlim()[1]
    assert {t.get_text() for t in ax.texts} >= {"0.500"}  # main and aux1: beta_sh 0.5


def test_cross_client_edges_are_drawn_except_on_a_complete_graph(tmp_path, figures):
    plots.cross_client_figure(metrics(), "complete", tmp_path, None)
    plots.cross_client_figure(metrics(graph=topology.cycle(4)), "cycle", tmp_path, None)
    (_, complete), (_, cycle) = figures
    assert "complete graph" in complete._suptitle.get_text()
    assert sum(len(ax.patches) for ax in complete.axes) == 0
    assert sum(len(ax.patches) for ax in cycle.axes) == 2 * 4  # 4 edges, per head


def test_a_sweep_of_more_settings_than_colours_draws_no_two_alike(tmp_path, figures):
    """Table 1's sweep has 11 settings and 8 colours: the 9th setting on is dashed."""
    groups = [(f"setting {g}", [metrics(level=0.5)]) for g in range(11)]
    plots.plot_groups(groups, tmp_path / "many", title="many", fmt="png")
    (_, fig), = figures
    styles = [(line.get_color(), line.get_linestyle()) for line in fig.axes[0].lines]
    assert len(styles) == 11 and len(set(styles)) == 11
